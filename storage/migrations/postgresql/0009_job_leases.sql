-- Several bot processes on one database (PostgreSQL, DATABASE_URL): a job being worked on
-- (submitting, running, ready) belongs to the process that claimed it, for as long as it
-- keeps renewing its lease (LEASE_SECONDS). Another process takes it over only once the
-- lease has run out. `owner` is "<instance>/<run>": a restarted process of the same
-- instance (host and data directory, held by one process at a time) takes its own old
-- jobs back at once (bot/engine/leases.py).
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires DOUBLE PRECISION;

-- Named holds with an expiry (Store.hold_singleton): "only one process does X" across
-- processes, e.g. only one Telegram poller per bot token.
CREATE TABLE singletons (
    name    TEXT PRIMARY KEY,
    owner   TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
