-- Why a job failed, as users are told it (bot.models.FailureKind: cancelled, timed_out,
-- rejected, provider_failed, unavailable, not_posted, internal). `error` keeps the
-- operator's detail (the provider's own words, redacted), which never reaches a chat.
ALTER TABLE jobs ADD COLUMN failure TEXT;
UPDATE jobs SET failure = 'cancelled' WHERE state = 'cancelled';
UPDATE jobs SET failure = 'internal' WHERE state = 'failed';
-- The channels a community allows songs in are a shared setting now (Discord had it
-- first under its own name).
UPDATE community_settings SET name = 'channels' WHERE name = 'discord_channels';
