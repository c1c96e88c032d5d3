-- PostgreSQL's form of ../0001_initial.sql (same tables and columns; REAL is DOUBLE
-- PRECISION here, PostgreSQL's REAL being single precision; INTEGER that may exceed 32
-- bits is BIGINT).
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    platform        TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    user_key        TEXT NOT NULL,
    community_key   TEXT,
    display_name    TEXT NOT NULL DEFAULT '',
    reply_target    TEXT NOT NULL,
    request         TEXT NOT NULL,
    duration        INTEGER NOT NULL,
    seed            BIGINT NOT NULL,
    state           TEXT NOT NULL,
    provider        TEXT,
    handle          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    recoveries      INTEGER NOT NULL DEFAULT 0,
    tried_providers TEXT NOT NULL DEFAULT '[]',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    reserved_usd    DOUBLE PRECISION NOT NULL DEFAULT 0,
    charged_usd     DOUBLE PRECISION,
    refunded        INTEGER NOT NULL DEFAULT 0,
    result          TEXT,
    error           TEXT,
    created_at      DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    started_at      DOUBLE PRECISION,
    finished_at     DOUBLE PRECISION,
    delivered_at    DOUBLE PRECISION
);
CREATE INDEX jobs_user_created ON jobs (user_key, created_at);
CREATE INDEX jobs_community_created ON jobs (community_key, created_at);
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_created ON jobs (created_at);

CREATE TABLE usage_ledger (
    id            BIGSERIAL PRIMARY KEY,
    job_id        TEXT NOT NULL REFERENCES jobs (id),
    user_key      TEXT NOT NULL,
    community_key TEXT,
    kind          TEXT NOT NULL,
    seconds       DOUBLE PRECISION NOT NULL DEFAULT 0,
    usd           DOUBLE PRECISION NOT NULL DEFAULT 0,
    provider      TEXT,
    at            DOUBLE PRECISION NOT NULL
);
CREATE INDEX usage_ledger_job ON usage_ledger (job_id);

CREATE TABLE limit_overrides (
    scope      TEXT NOT NULL,
    subject    TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, subject, key)
);

CREATE TABLE community_settings (
    community  TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (community, name)
);
