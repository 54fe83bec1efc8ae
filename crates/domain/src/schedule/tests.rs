use super::*;

fn t(s: &str) -> Timestamp {
    Timestamp::parse_rfc3339(s).unwrap_or_else(|| panic!("bad test time {s}"))
}

fn spec(yaml: &str) -> ScheduleSpec {
    ScheduleSpec::parse(yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn daily(at: &str, tz: &str) -> Timing {
    let (h, m) = at.split_once(':').unwrap();
    spec(&format!(
        "schedule: s\ncron: \"0 {m} {h} * * *\"\ntimezone: {tz}\nworkflow: {{name: w, blocks: [{{jobs: [{{action: noop}}]}}]}}"
    ))
    .timing()
    .unwrap()
}

fn fires(timing: &Timing, from: &str, n: usize) -> Vec<String> {
    timing
        .upcoming(t(from), n)
        .into_iter()
        .map(|f| f.to_rfc3339())
        .collect()
}

#[test]
fn new_york_spring_forward_fires_at_the_end_of_the_gap() {
    // 2026-03-08: 02:00 EST becomes 03:00 EDT; 02:30 does not exist that day.
    let d = daily("02:30", "America/New_York");
    assert_eq!(
        fires(&d, "2026-03-06T12:00:00Z", 3),
        [
            "2026-03-07T07:30:00.000Z", // 02:30 EST
            "2026-03-08T07:00:00.000Z", // 03:00 EDT, the first instant after the gap
            "2026-03-09T06:30:00.000Z", // 02:30 EDT
        ]
    );
}

#[test]
fn new_york_fall_back_fires_once_at_the_first_occurrence() {
    // 2026-11-01: 02:00 EDT becomes 01:00 EST; 01:00 to 02:00 happens twice.
    let d = daily("02:30", "America/New_York");
    assert_eq!(
        fires(&d, "2026-10-31T12:00:00Z", 2),
        ["2026-11-01T07:30:00.000Z", "2026-11-02T07:30:00.000Z"]
    );
    let d = daily("01:30", "America/New_York");
    assert_eq!(
        fires(&d, "2026-10-31T12:00:00Z", 2),
        [
            "2026-11-01T05:30:00.000Z", // 01:30 EDT; 01:30 EST (06:30Z) does not fire
            "2026-11-02T06:30:00.000Z",
        ]
    );
    // Starting inside the repeated hour, on its second pass, still skips the repeat.
    assert_eq!(
        fires(&d, "2026-11-01T06:10:00Z", 1),
        ["2026-11-02T06:30:00.000Z"]
    );
    // An hourly cron is on the wall clock too: the repeated 01:00 fires once.
    let hourly = spec(
        "schedule: h\ncron: \"0 * * * *\"\ntimezone: America/New_York\nworkflow: {name: w, blocks: [{jobs: [{action: noop}]}]}",
    )
    .timing()
    .unwrap();
    assert_eq!(
        fires(&hourly, "2026-11-01T03:30:00Z", 4),
        [
            "2026-11-01T04:00:00.000Z", // 00:00 EDT
            "2026-11-01T05:00:00.000Z", // 01:00 EDT
            "2026-11-01T07:00:00.000Z", // 02:00 EST
            "2026-11-01T08:00:00.000Z", // 03:00 EST
        ]
    );
}

#[test]
fn lord_howe_half_hour_shifts() {
    // Lord Howe moves by 30 minutes: 2026-04-05 02:00 (+11) becomes 01:30 (+10:30); 2026-10-04
    // 02:00 (+10:30) becomes 02:30 (+11).
    let d = daily("02:30", "Australia/Lord_Howe");
    assert_eq!(
        fires(&d, "2026-04-03T12:00:00Z", 3),
        [
            "2026-04-03T15:30:00.000Z", // 02:30 +11
            "2026-04-04T16:00:00.000Z", // 02:30 +10:30, once
            "2026-04-05T16:00:00.000Z",
        ]
    );
    assert_eq!(
        fires(&d, "2026-10-02T12:00:00Z", 3),
        [
            "2026-10-02T16:00:00.000Z", // 02:30 +10:30
            "2026-10-03T15:30:00.000Z", // 02:30 +11, the first instant after the gap
            "2026-10-04T15:30:00.000Z",
        ]
    );
    // 02:15 is in the spring gap: it fires at its end, 02:30 +11.
    let d = daily("02:15", "Australia/Lord_Howe");
    assert_eq!(
        fires(&d, "2026-10-02T16:00:00Z", 2),
        ["2026-10-03T15:30:00.000Z", "2026-10-04T15:15:00.000Z"]
    );
    // 01:45 happens twice in April: once, at +11.
    let d = daily("01:45", "Australia/Lord_Howe");
    assert_eq!(
        fires(&d, "2026-04-03T16:00:00Z", 2),
        ["2026-04-04T14:45:00.000Z", "2026-04-05T15:15:00.000Z"]
    );
}

#[test]
fn every_is_absolute_time_across_dst() {
    let every = spec(
        "schedule: e\nevery: 1h\ntimezone: America/New_York\nworkflow: {name: w, blocks: [{jobs: [{action: noop}]}]}",
    )
    .timing()
    .unwrap();
    // The fall-back day has 25 hours: 25 fires.
    let from = t("2026-11-01T04:00:00Z");
    let day = every
        .upcoming(Timestamp(from.0 - 1), 30)
        .into_iter()
        .filter(|f| *f < t("2026-11-02T05:00:00Z"))
        .count();
    assert_eq!(day, 25);
    assert_eq!(
        every.next_after(t("2026-01-01T00:00:00Z")),
        Some(t("2026-01-01T01:00:00Z"))
    );
}

fn hourly_with_window(window: &str) -> ScheduleSpec {
    spec(&format!(
        "schedule: h\ncron: \"0 * * * *\"\ncatchup_window: {window}\nworkflow: {{name: w, blocks: [{{jobs: [{{action: noop}}]}}]}}"
    ))
}

#[test]
fn catch_up_runs_the_fires_inside_the_window_and_counts_the_rest() {
    let s = hourly_with_window("2h");
    let timing = s.timing().unwrap();
    // Down from 10:00 (after its fire) to 13:00:30: fires at 11:00, 12:00 and 13:00 are due.
    let now = t("2026-06-01T13:00:30Z");
    let d = due(&s, &timing, t("2026-06-01T10:00:00Z"), now);
    assert_eq!(d.missed, 1);
    assert_eq!(d.newest_missed, Some(t("2026-06-01T11:00:00Z")));
    assert_eq!(d.fire, Some(t("2026-06-01T12:00:00Z")));
    let state = ScheduleState {
        cursor: d.cursor,
        ..ScheduleState::default()
    };
    // The next one is due at once, so it waits for the catch-up spacing.
    assert_eq!(
        next_check(&s, &timing, &state, now, true),
        Some(now.plus(CATCHUP_SPACING))
    );
    let later = now.plus(CATCHUP_SPACING);
    let d = due(&s, &timing, d.cursor, later);
    assert_eq!((d.missed, d.fire), (0, Some(t("2026-06-01T13:00:00Z"))));
    let d = due(&s, &timing, d.cursor, later);
    assert_eq!((d.missed, d.fire), (0, None));
}

#[test]
fn a_clock_that_jumps_back_fires_nothing_again() {
    let s = hourly_with_window("2h");
    let timing = s.timing().unwrap();
    let cursor = t("2026-06-01T12:00:00Z");
    for now in [
        "2026-06-01T12:59:59Z",
        "2026-06-01T09:00:00Z",
        "1970-01-01T00:00:00Z",
    ] {
        assert_eq!(
            due(&s, &timing, cursor, t(now)),
            Due {
                cursor,
                ..Due::default()
            }
        );
    }
}

#[test]
fn a_long_outage_is_counted_without_walking_every_fire() {
    let s = spec(
        "schedule: fast\nevery: 1s\ncatchup_window: 10s\nworkflow: {name: w, blocks: [{jobs: [{action: noop}]}]}",
    );
    let timing = s.timing().unwrap();
    let start = t("2026-01-01T00:00:00Z");
    let now = t("2026-06-01T00:00:00Z");
    let d = due(&s, &timing, start, now);
    assert!(d.missed_at_least);
    assert_eq!(d.missed, MAX_MISSED_SCAN);
    let fire = d.fire.unwrap();
    assert!(fire.plus(s.catchup_window.0) >= now && fire <= now);
}

#[test]
fn jitter_is_fixed_per_fire_and_below_the_bound() {
    let s = spec(
        "schedule: j\ncron: \"* * * * *\"\njitter: 30s\nworkflow: {name: w, blocks: [{jobs: [{action: noop}]}]}",
    );
    let n = t("2026-06-01T12:00:00Z");
    assert_eq!(s.jitter_for(n), s.jitter_for(n));
    let spread: std::collections::BTreeSet<_> = (0..100)
        .map(|i| s.jitter_for(Timestamp(n.0 + i * 60_000)))
        .collect();
    assert!(spread.len() > 50, "jitter should spread fires: {spread:?}");
    assert!(spread.iter().all(|j| *j < Duration::from_secs(30)));
    assert_eq!(s.fire_key(n), "schedule/j/2026-06-01T12:00:00.000Z");
}

#[test]
fn bad_schedules_name_the_field() {
    // Rare is not never: the 29th of February, once in four years.
    let rare = ScheduleSpec::parse(
        "schedule: s\ncron: \"0 0 29 2 *\"\nworkflow: {name: w, blocks: [{jobs: [{action: noop}]}]}",
    );
    assert!(rare.is_ok(), "{rare:?}");
    let cases = [
        ("schedule: s\nworkflow: {name: w, blocks: []}", "cron"),
        (
            "schedule: s\ncron: \"* * *\"\nworkflow: {name: w, blocks: []}",
            "cron",
        ),
        (
            "schedule: s\ncron: \"* * * * * * *\"\nworkflow: {name: w, blocks: []}",
            "cron",
        ),
        (
            "schedule: s\ncron: \"61 * * * *\"\nworkflow: {name: w, blocks: []}",
            "cron",
        ),
        (
            "schedule: s\ncron: \"0 0 30 2 *\"\nworkflow: {name: w, blocks: []}",
            "cron",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\nevery: 1m\nworkflow: {name: w, blocks: []}",
            "every",
        ),
        (
            "schedule: s\nevery: 500ms\nworkflow: {name: w, blocks: []}",
            "every",
        ),
        (
            "schedule: s\nevery: 1500ms\nworkflow: {name: w, blocks: []}",
            "every",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\ntimezone: Mars/Olympus\nworkflow: {name: w, blocks: []}",
            "timezone",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\ncatchup_window: 1s\nworkflow: {name: w, blocks: []}",
            "catchup_window",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\njitter: 2h\nworkflow: {name: w, blocks: []}",
            "jitter",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\noverlap: sometimes\nworkflow: {name: w, blocks: []}",
            "overlap",
        ),
        (
            "schedule: 9lives\ncron: \"* * * * *\"\nworkflow: {name: w, blocks: []}",
            "schedule",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\nworkflow: {name: w, idempotency_key: k, blocks: []}",
            "workflow.idempotency_key",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\nworkflow: {name: '', blocks: []}",
            "workflow.name",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\nworkflow_file: w.yaml",
            "workflow_file",
        ),
        (
            "schedule: s\ncron: \"* * * * *\"\nwhen: now\nworkflow: {name: w, blocks: []}",
            "when",
        ),
        ("[1, 2]", "schedule"),
    ];
    for (text, field) in cases {
        let err = ScheduleSpec::parse(text).expect_err(text);
        assert!(
            err.0.iter().any(|e| e.path == field),
            "{text}: expected an error at {field}, got {err}"
        );
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(ScheduleSpec::parse(&deep).is_err());
}

#[test]
fn backfill_is_bounded() {
    let s = hourly_with_window("1h");
    let timing = s.timing().unwrap();
    assert_eq!(
        backfill_count(
            &timing,
            t("2026-06-01T00:00:00Z"),
            t("2026-06-01T03:00:00Z")
        ),
        Ok(4)
    );
    assert!(
        backfill_count(
            &timing,
            t("2026-06-01T03:00:00Z"),
            t("2026-06-01T00:00:00Z")
        )
        .is_err()
    );
    assert!(
        backfill_count(
            &timing,
            t("2020-01-01T00:00:00Z"),
            t("2026-01-01T00:00:00Z")
        )
        .is_err()
    );
}
