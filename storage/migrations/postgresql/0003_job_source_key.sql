-- The platform event that asked for a job (e.g. one Telegram update). Telegram re-sends
-- updates whose fetch was never confirmed (the bot died right after getUpdates); the
-- key makes admitting the same event twice impossible.
ALTER TABLE jobs ADD COLUMN source_key TEXT;
CREATE UNIQUE INDEX jobs_source_key ON jobs (source_key) WHERE source_key IS NOT NULL;
