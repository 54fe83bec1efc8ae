ALTER TABLE runs ADD COLUMN schedule TEXT;              -- the schedule whose fire created it
ALTER TABLE runs ADD COLUMN nominal_time BIGINT;        -- that fire's nominal time, unix ms
CREATE INDEX runs_by_schedule ON runs (schedule, id) WHERE schedule IS NOT NULL;

CREATE TABLE schedules (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,       -- JSON, the ScheduleSpec
    state      TEXT NOT NULL,       -- JSON, the ScheduleState (cursor, counters, history)
    next_check BIGINT,              -- unix ms; NULL while paused or when it never fires again
    last_run   TEXT,                -- its newest run
    version    BIGINT NOT NULL
);
CREATE INDEX schedules_by_next_check ON schedules (next_check) WHERE next_check IS NOT NULL;
