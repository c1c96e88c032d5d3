-- Platform updates received but not yet handled (storage/inbox.py): a Telegram batch is
-- written here before getUpdates confirms it to Telegram, and a row goes once its
-- handler has run. Rows left after a crash are handled again at start (admission is
-- idempotent per update), so polling never waits for slow handlers.
CREATE TABLE update_inbox (
    source      TEXT NOT NULL,     -- whose updates, e.g. "telegram:<bot id>"
    update_id   BIGINT NOT NULL,
    payload     TEXT NOT NULL,     -- the update as the platform sent it (JSON)
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (source, update_id)
);
