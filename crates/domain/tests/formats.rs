#![allow(clippy::unwrap_used)]

//! The JSON the domain types are stored and sent as, pinned: database columns (specs, labels,
//! stop causes, the e-stop list and its audit records), `last-stop.json`, the e-stop file. A
//! change to a domain type that would change a stored format fails here, and must come with a
//! migration or a reader of the old format.

use domain::estop::{AuditRecord, EStopList, EStopState, Entry};
use domain::stop::ShutdownMode;
use domain::{StopCause, WorkflowSpec};

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap()
}

#[test]
fn stop_causes() {
    let causes = vec![
        StopCause::Cancelled {
            by: "ana".into(),
            reason: "INC-1".into(),
        },
        StopCause::Signal {
            signal: "SIGTERM".into(),
            mode: ShutdownMode::Drain,
        },
        StopCause::StopCommand {
            mode: ShutdownMode::EndOfRound,
        },
        StopCause::EStop {
            target: "site=aap".into(),
            state: "stop".into(),
            reason: "INC-42".into(),
            set_by: "ana".into(),
        },
        StopCause::Fatal {
            component: "policy watcher".into(),
            message: "it ended unexpectedly".into(),
        },
        StopCause::LostStore {
            message: "connection refused".into(),
        },
        StopCause::Expired { ttl_secs: 3600 },
    ];
    insta::assert_snapshot!(json(&causes));
    // What was stored reads back as it was.
    let back: Vec<StopCause> = serde_json::from_str(&json(&causes)).unwrap();
    assert_eq!(back, causes);
}

#[test]
fn a_workflow_spec() {
    let spec = WorkflowSpec::parse(
        r#"
name: SatelliteDiskErase
desc: Erase the disks of satellite site aap
labels: {site: aap}
idempotency_key: erase-aap-1
blocks:
  - desc: preconditions
    concurrency: 1
    jobs:
      - action: token_bucket
        args: {bucket: disk-erase-satellite}
      - action: shell
        args: {argv: ["./check-decom.sh", "aap"], env: {SITE: aap}}
  - desc: erase
    concurrency: 5
    max_failures: 2
    jobs:
      - action: shell
        desc: erase aap01
        args: {argv: ["erase", "--machine", "aap01"]}
        retry: {attempts: 3, initial_backoff: 1s, max_backoff: 30s}
        timeout: 10m
"#,
    )
    .unwrap();
    insta::assert_snapshot!(json(&spec));
    let back: WorkflowSpec = serde_json::from_str(&json(&spec)).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn the_estop_list_and_an_audit_record() {
    let list = EStopList {
        entries: vec![
            Entry {
                target: "*".parse().unwrap(),
                state: EStopState::Go,
                reason: String::new(),
                set_by: String::new(),
                set_at: String::new(),
            },
            Entry {
                target: "site=aap".parse().unwrap(),
                state: EStopState::Stop,
                reason: "INC-42".into(),
                set_by: "ana".into(),
                set_at: "2026-11-21T10:00:00Z".into(),
            },
        ],
    };
    insta::assert_snapshot!(json(&list));
    assert_eq!(EStopList::parse(&json(&list)).unwrap(), list);
    let rec = AuditRecord {
        at: "2026-11-21T10:00:00.000Z".into(),
        target: "SatelliteDiskErase".parse().unwrap(),
        old_state: None,
        new_state: Some(EStopState::Pause),
        set_by: "ana".into(),
        reason: "INC-43".into(),
        source: "api".into(),
    };
    insta::assert_snapshot!(json(&rec));
}
