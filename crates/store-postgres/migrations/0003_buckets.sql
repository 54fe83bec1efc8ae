CREATE TABLE buckets (
    name        TEXT PRIMARY KEY,
    tokens      BIGINT NOT NULL,
    refilled_at BIGINT NOT NULL  -- unix ms: the last refill boundary
);

-- One row per job that was granted a token, keyed by the job's idempotency key, so that a job
-- re-run after a crash gets its grant again instead of a second token.
CREATE TABLE bucket_grants (
    bucket     TEXT NOT NULL,
    grant_key  TEXT NOT NULL,
    granted_at BIGINT NOT NULL,
    PRIMARY KEY (bucket, grant_key)
);
