-- API tokens: never the secret, only its SHA-256 (hex). A revoked token's row is deleted.
CREATE TABLE tokens (
    name         TEXT PRIMARY KEY,             -- public: the actor of what the token does
    hash         TEXT NOT NULL UNIQUE,
    role         TEXT NOT NULL,                -- viewer, submitter, responder, operator, admin
    scope        TEXT NOT NULL,                -- JSON: {"workflows": [...], "labels": {...}}
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,              -- unix ms
    expires_at   BIGINT,
    last_used_at BIGINT
);

-- Every mutating call and every refusal.
CREATE TABLE access_log (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      BIGINT NOT NULL,                   -- unix ms
    actor   TEXT NOT NULL,                     -- the token's name, or - without a valid token
    call    TEXT NOT NULL,
    target  TEXT NOT NULL,
    allowed INTEGER NOT NULL,                  -- 1 allowed, 0 refused
    peer    TEXT NOT NULL,
    detail  TEXT NOT NULL
);

-- Who submitted each run (a token's name), for Cancel of one's own runs.
ALTER TABLE runs ADD COLUMN submitted_by TEXT NOT NULL DEFAULT '';
