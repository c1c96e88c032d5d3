-- Jobs: one row per admitted song request; every state change is one transaction.
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    platform        TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    user_key        TEXT NOT NULL,            -- "platform:user_id"
    community_key   TEXT,                     -- "platform:guild_or_chat_id", NULL in DMs
    display_name    TEXT NOT NULL DEFAULT '',
    reply_target    TEXT NOT NULL,            -- JSON, front-end defined
    request         TEXT NOT NULL,            -- JSON GenerationRequest
    duration        INTEGER NOT NULL,         -- seconds reserved
    seed            INTEGER NOT NULL,         -- concrete seed (never -1)
    state           TEXT NOT NULL,            -- queued|submitting|running|ready|delivered|failed|cancelled
    provider        TEXT,
    handle          TEXT,                     -- JSON providers.base.Handle
    attempts        INTEGER NOT NULL DEFAULT 0,   -- provider submits made
    recoveries      INTEGER NOT NULL DEFAULT 0,   -- restarts that found it mid-submit
    tried_providers TEXT NOT NULL DEFAULT '[]',   -- JSON list of providers that failed it
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    reserved_usd    REAL NOT NULL DEFAULT 0,
    charged_usd     REAL,                     -- set when a provider produced the song
    refunded        INTEGER NOT NULL DEFAULT 0,   -- 1: does not count against quotas
    result          TEXT,                     -- JSON metadata of the finished song
    error           TEXT,                     -- user-facing failure text
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    delivered_at    REAL
);
CREATE INDEX jobs_user_created ON jobs (user_key, created_at);
CREATE INDEX jobs_community_created ON jobs (community_key, created_at);
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_created ON jobs (created_at);

-- Usage ledger: every reservation, commit, charge and refund, for audit and balance.
CREATE TABLE usage_ledger (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        TEXT NOT NULL REFERENCES jobs (id),
    user_key      TEXT NOT NULL,
    community_key TEXT,
    kind          TEXT NOT NULL,   -- reserve | commit | refund | charge
    seconds       REAL NOT NULL DEFAULT 0,
    usd           REAL NOT NULL DEFAULT 0,
    provider      TEXT,
    at            REAL NOT NULL
);
CREATE INDEX usage_ledger_job ON usage_ledger (job_id);

-- Admin overrides of quota limits, per user or per community.
CREATE TABLE limit_overrides (
    scope      TEXT NOT NULL,      -- user | community
    subject    TEXT NOT NULL,      -- "platform:id"
    key        TEXT NOT NULL,      -- jobs_per_day | seconds_per_day | concurrent_jobs
    value      REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (scope, subject, key)
);

-- Per-community settings front-ends keep (allowed channels...), JSON values.
CREATE TABLE community_settings (
    community  TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (community, name)
);
