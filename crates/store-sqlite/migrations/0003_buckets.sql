CREATE TABLE buckets (
    name        TEXT PRIMARY KEY,
    tokens      INTEGER NOT NULL,
    refilled_at INTEGER NOT NULL  -- unix ms: the last refill boundary
) WITHOUT ROWID;

-- One row per job that was granted a token, keyed by the job's idempotency key, so that a job
-- re-run after a crash gets its grant again instead of a second token.
CREATE TABLE bucket_grants (
    bucket     TEXT NOT NULL,
    grant_key  TEXT NOT NULL,
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (bucket, grant_key)
) WITHOUT ROWID;
