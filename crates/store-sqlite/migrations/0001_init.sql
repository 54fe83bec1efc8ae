CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    labels           TEXT NOT NULL,          -- JSON object
    idempotency_key  TEXT UNIQUE,
    spec             TEXT NOT NULL,          -- JSON, the WorkflowSpec as submitted
    state            TEXT NOT NULL,
    created_at       INTEGER NOT NULL,       -- unix ms
    started_at       INTEGER,
    ended_at         INTEGER,
    expires_at       INTEGER,
    error            TEXT,
    stop_cause       TEXT,                   -- JSON StopCause
    cancel_requested TEXT,                   -- JSON StopCause
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    cloned_from      TEXT,
    version          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_state ON runs (state, id);
CREATE INDEX runs_by_name ON runs (name, id);
CREATE INDEX runs_by_lease ON runs (lease_owner, lease_expires_at) WHERE lease_owner IS NOT NULL;

CREATE TABLE blocks (
    run_id     TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,
    state      TEXT NOT NULL,
    started_at INTEGER,
    ended_at   INTEGER,
    PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;

CREATE TABLE jobs (
    run_id     TEXT NOT NULL,
    block_idx  INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    state      TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    started_at INTEGER,
    ended_at   INTEGER,
    error      TEXT,
    exit_code  INTEGER,
    output     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, block_idx, idx),
    FOREIGN KEY (run_id, block_idx) REFERENCES blocks (run_id, idx) ON DELETE CASCADE
) WITHOUT ROWID;
