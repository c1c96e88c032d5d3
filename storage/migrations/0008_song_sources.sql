-- Work on a song (issue 14): extend, remix, repaint an existing song, and several takes.
--
-- Source files a provider already holds (fal storage URLs, WaveSpeed media URLs), so a
-- restart mid-submit does not upload the same file twice (providers.base.UploadCache).
-- Portable SQL: PostgreSQL carries the same table.
CREATE TABLE source_uploads (
    provider   TEXT NOT NULL,
    sha256     TEXT NOT NULL,      -- of the source file (DATA_DIR/sources/<sha256>.<ext>)
    ref        TEXT NOT NULL,      -- what the provider calls it (a URL of its own storage)
    expires_at REAL NOT NULL,      -- time.time() after which the provider no longer has it
    PRIMARY KEY (provider, sha256)
);

-- Lineage and takes. The request JSON already holds the whole request (the source's hash,
-- file and job); these columns make it searchable and listable without parsing JSON.
ALTER TABLE jobs ADD COLUMN task TEXT NOT NULL DEFAULT 'generate';
ALTER TABLE jobs ADD COLUMN source_job_id TEXT;     -- the bot's song it works on, if any
ALTER TABLE jobs ADD COLUMN source_sha256 TEXT;     -- the source file's hash, if any
ALTER TABLE jobs ADD COLUMN batch_id TEXT;          -- the jobs one request made (takes)
ALTER TABLE jobs ADD COLUMN take INTEGER NOT NULL DEFAULT 1;   -- 1..takes
ALTER TABLE jobs ADD COLUMN takes INTEGER NOT NULL DEFAULT 1;  -- how many the request made
CREATE INDEX jobs_batch ON jobs (batch_id, take) WHERE batch_id IS NOT NULL;
CREATE INDEX jobs_source_job ON jobs (source_job_id) WHERE source_job_id IS NOT NULL;
-- Whether a stored source file is still some job's (a refused request's file is removed).
CREATE INDEX jobs_source_sha256 ON jobs (source_sha256) WHERE source_sha256 IS NOT NULL;
