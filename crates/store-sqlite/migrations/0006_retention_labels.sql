-- Retention deletes finished runs by the time they ended, oldest first.
CREATE INDEX runs_by_end ON runs (ended_at) WHERE ended_at IS NOT NULL;

-- A run's labels, one row each, so that List by label reads an index at any size.
CREATE TABLE run_labels (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (key, value, run_id)
) WITHOUT ROWID;
CREATE INDEX run_labels_by_run ON run_labels (run_id);
INSERT INTO run_labels (run_id, key, value)
    SELECT r.id, l.key, l.value FROM runs r, json_each(r.labels) l;
