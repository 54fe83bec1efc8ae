-- The e-stop list when the database is its source (one row; absent until first saved),
-- and the audit trail of every e-stop change, whatever its source.
CREATE TABLE estop_list (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL,                -- +1 on every save (optimistic concurrency)
    body    TEXT NOT NULL                   -- JSON EStopList, the file format
);

CREATE TABLE estop_audit (
    seq       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        TEXT NOT NULL,                -- RFC 3339
    target    TEXT NOT NULL,                -- `*`, a workflow name, or key=value
    old_state TEXT,                         -- NULL: there was no entry
    new_state TEXT,                         -- NULL: the entry was cleared
    set_by    TEXT NOT NULL,
    reason    TEXT NOT NULL,
    source    TEXT NOT NULL                 -- api, file, ...
);
CREATE INDEX estop_audit_by_target ON estop_audit (target, seq);
