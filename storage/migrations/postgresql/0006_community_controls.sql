-- Personal and community defaults for new songs (bot/chat/defaults.py): what a user or
-- a community's admins chose for duration, instrumental, style suffix, provider...
-- `value` is JSON; a missing row means "not set" (the next level's default applies).
CREATE TABLE song_defaults (
    scope      TEXT NOT NULL,      -- user | community
    subject    TEXT NOT NULL,      -- "platform:id"
    name       TEXT NOT NULL,      -- duration | instrumental | style | provider | ...
    value      TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, subject, name)
);

-- Words and phrases a community's admins refuse in requests (bot/moderation.py); the
-- operator's own list is the BANNED_WORDS setting.
CREATE TABLE banned_phrases (
    community TEXT NOT NULL,       -- "platform:id"
    phrase    TEXT NOT NULL,       -- normalised as bot.moderation.normalize() does
    added_by  TEXT NOT NULL,       -- "platform:user_id"
    added_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (community, phrase)
);

-- A posted song removed by its requester or an admin: the row stays (it is the ledger),
-- its audio files are removed and the platform message deleted.
ALTER TABLE jobs ADD COLUMN deleted_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN deleted_by TEXT;
