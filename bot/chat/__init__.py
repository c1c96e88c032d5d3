"""The conversation layer shared by every chat platform.

- `markup`: rich text as platform-neutral spans (bold, code, links, times).
- `replies`: the reply models (status view, song card, failure notice, lists, help,
  error texts) built from jobs; all the wording users read lives here and in
  bot/messages.py.
- `conversation`: the use-cases (make a song, cancel, queue, quota, history, limits,
  buttons), talking to a platform through the small `Place` protocol.
- `status_board`: one throttled, never-backwards status message per job.
- `delivery`: the engine's `Delivery` for a platform, through its `Outlet`.

Platform modules (bot/frontends/) only render these models and move bytes.
"""
