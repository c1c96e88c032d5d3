-- Covering indexes for the quota sums every admission reads (storage/jobs.py _usage and
-- _spend): SQLite answers them from the index alone instead of visiting each of the
-- day's job rows. Each replaces an index that was a prefix of it.
DROP INDEX jobs_user_created;
CREATE INDEX jobs_user_usage ON jobs (user_key, created_at, refunded, duration);
DROP INDEX jobs_community_created;
CREATE INDEX jobs_community_usage ON jobs (community_key, created_at, refunded, duration);
DROP INDEX jobs_created;
CREATE INDEX jobs_day_spend ON jobs (created_at, refunded, charged_usd, reserved_usd);
