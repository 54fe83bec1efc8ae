CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    labels           JSONB NOT NULL,
    idempotency_key  TEXT UNIQUE,
    spec             TEXT NOT NULL,          -- JSON, the WorkflowSpec as submitted
    state            TEXT NOT NULL,
    created_at       BIGINT NOT NULL,        -- unix ms
    started_at       BIGINT,
    ended_at         BIGINT,
    expires_at       BIGINT,
    error            TEXT,
    stop_cause       TEXT,                   -- JSON StopCause
    cancel_requested TEXT,                   -- JSON StopCause
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    cloned_from      TEXT,
    version          BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_state ON runs (state, id);
CREATE INDEX runs_by_name ON runs (name, id);
CREATE INDEX runs_by_lease ON runs (lease_owner, lease_expires_at) WHERE lease_owner IS NOT NULL;
CREATE INDEX runs_executing ON runs (id) WHERE state IN ('queued', 'running', 'paused');

CREATE TABLE blocks (
    run_id     TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx        BIGINT NOT NULL,
    state      TEXT NOT NULL,
    started_at BIGINT,
    ended_at   BIGINT,
    PRIMARY KEY (run_id, idx)
);

CREATE TABLE jobs (
    run_id     TEXT NOT NULL,
    block_idx  BIGINT NOT NULL,
    idx        BIGINT NOT NULL,
    state      TEXT NOT NULL,
    attempts   BIGINT NOT NULL DEFAULT 0,
    started_at BIGINT,
    ended_at   BIGINT,
    error      TEXT,
    exit_code  INTEGER,
    output     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, block_idx, idx),
    FOREIGN KEY (run_id, block_idx) REFERENCES blocks (run_id, idx) ON DELETE CASCADE
);
