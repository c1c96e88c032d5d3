-- PostgreSQL's form of ../0007_usage_daily.sql.
--
-- Per-day totals kept in the same transaction as every change to a job (storage/jobs.py,
-- storage/tally.py): admission reads today's counters instead of summing the day's job
-- rows, and `stats` and /metrics read them instead of scanning history. The job rows stay
-- the ledger of record; `acestep-bot db check` compares the two. They also outlive job
-- rows deleted by JOB_RETENTION_DAYS, as the compact archive of older days.
--
-- One row per UTC day of admission and subject: scope `user` (user_key), `community`
-- (community_key, '' in direct messages), `provider` (the job's provider, '' before one
-- is chosen) and `all` (subject ''). Each job counts in four rows of its admission day.
CREATE TABLE usage_daily (
    scope             TEXT NOT NULL,
    day               INTEGER NOT NULL,            -- created_at / 86400, a UTC day number
    subject           TEXT NOT NULL,
    jobs              INTEGER NOT NULL DEFAULT 0,  -- admitted
    quota_jobs        INTEGER NOT NULL DEFAULT 0,  -- admitted and not refunded
    quota_seconds     DOUBLE PRECISION NOT NULL DEFAULT 0,     -- their reserved seconds
    spend_usd         DOUBLE PRECISION NOT NULL DEFAULT 0,     -- charged, or reserved while not refunded
    charged_usd       DOUBLE PRECISION NOT NULL DEFAULT 0,     -- what providers charged
    delivered         INTEGER NOT NULL DEFAULT 0,  -- songs posted
    delivered_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,     -- seconds of posted audio
    failed            INTEGER NOT NULL DEFAULT 0,
    cancelled         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, day, subject)
);

-- The same totals computed from the job rows: what the counters must equal for every day
-- whose rows are all still there. Builds the counters below, and is what the check reads.
CREATE VIEW usage_daily_from_jobs AS
WITH facts AS (
    SELECT
        CAST(FLOOR(created_at / 86400) AS INTEGER) AS day,
        user_key,
        COALESCE(community_key, '') AS community,
        COALESCE(provider, '') AS provider,
        CASE WHEN refunded = 0 THEN 1 ELSE 0 END AS kept,
        duration,
        CASE WHEN charged_usd IS NOT NULL THEN charged_usd
             WHEN refunded = 0 THEN reserved_usd ELSE 0 END AS spend_usd,
        COALESCE(charged_usd, 0) AS charged_usd,
        CASE WHEN state = 'delivered' THEN 1 ELSE 0 END AS delivered,
        CASE WHEN state = 'delivered'
             THEN COALESCE(CAST(CAST(result AS json) ->> 'duration' AS DOUBLE PRECISION),
                           duration) ELSE 0 END
            AS delivered_seconds,
        CASE WHEN state = 'failed' THEN 1 ELSE 0 END AS failed,
        CASE WHEN state = 'cancelled' THEN 1 ELSE 0 END AS cancelled
    FROM jobs
),
scopes (scope) AS (VALUES ('user'), ('community'), ('provider'), ('all'))
SELECT
    scopes.scope AS scope,
    facts.day AS day,
    CASE scopes.scope
        WHEN 'user' THEN facts.user_key
        WHEN 'community' THEN facts.community
        WHEN 'provider' THEN facts.provider
        ELSE '' END AS subject,
    COUNT(*) AS jobs,
    SUM(facts.kept) AS quota_jobs,
    SUM(CASE WHEN facts.kept = 1 THEN facts.duration ELSE 0 END) AS quota_seconds,
    SUM(facts.spend_usd) AS spend_usd,
    SUM(facts.charged_usd) AS charged_usd,
    SUM(facts.delivered) AS delivered,
    SUM(facts.delivered_seconds) AS delivered_seconds,
    SUM(facts.failed) AS failed,
    SUM(facts.cancelled) AS cancelled
FROM facts CROSS JOIN scopes
GROUP BY 1, 2, 3;

-- Upgrading a live database keeps today's usage exact: the counters start from its rows.
INSERT INTO usage_daily (scope, day, subject, jobs, quota_jobs, quota_seconds, spend_usd,
    charged_usd, delivered, delivered_seconds, failed, cancelled)
SELECT scope, day, subject, jobs, quota_jobs, quota_seconds, spend_usd, charged_usd,
    delivered, delivered_seconds, failed, cancelled
FROM usage_daily_from_jobs;

-- Small state of the storage layer itself: `pruned_before_day`, the first UTC day whose
-- job rows are all still there (retention deleted finished rows admitted before it).
CREATE TABLE storage_state (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

-- Indexes for what is still read from the job rows. Only active jobs are counted or
-- listed on hot paths (the concurrency limit, the scheduler, /queue, /metrics): partial
-- indexes hold just those, so they stay as small as the queue however long the history.
-- The WHERE clause must match the queries' text exactly (storage/jobs.py ACTIVE_SQL).
DROP INDEX jobs_state;
CREATE INDEX jobs_active ON jobs (state, created_at, provider)
    WHERE state IN ('queued', 'submitting', 'running', 'ready');
CREATE INDEX jobs_active_user ON jobs (user_key, created_at, state)
    WHERE state IN ('queued', 'submitting', 'running', 'ready');
-- The usage sums these covered are gone; keep what lists need (a user's newest jobs, the
-- newest jobs, retention's oldest finished ones), without the columns the sums read.
DROP INDEX jobs_user_usage;
CREATE INDEX jobs_user_created ON jobs (user_key, created_at);
DROP INDEX jobs_community_usage;
DROP INDEX jobs_day_spend;
CREATE INDEX jobs_created ON jobs (created_at);
