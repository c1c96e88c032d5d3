-- Why a job failed, as users are told it (bot.models.FailureKind: cancelled, timed_out,
-- rejected, provider_failed, unavailable, not_posted, internal). `error` keeps the
-- operator's detail (the provider's own words, redacted), which never reaches a chat.
ALTER TABLE jobs ADD COLUMN failure TEXT;
UPDATE jobs SET failure = 'cancelled' WHERE state = 'cancelled';
UPDATE jobs SET failure = 'internal' WHERE state = 'failed';
