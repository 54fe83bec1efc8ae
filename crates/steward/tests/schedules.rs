//! Schedules (docs/schedules.md) on the real binary: the CLI and HTTP with roles, a kill -9 at
//! each fire's crash windows, and two PostgreSQL nodes firing one schedule, one killed.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::v1 as pb;
use proto::v1::schedules_client::SchedulesClient;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// The runs of schedule `name`, by nominal time (several under one key would be a bug).
async fn runs_by_nominal(c: &mut Client, name: &str) -> BTreeMap<String, Vec<pb::RunSummary>> {
    let mut out: BTreeMap<String, Vec<pb::RunSummary>> = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list(pb::ListRequest {
                schedule: name.to_owned(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for r in page.runs {
            out.entry(r.nominal_time.clone()).or_default().push(r);
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

fn write_schedule(dir: &std::path::Path, body: &str) -> String {
    let file = dir.join("schedule.yaml");
    std::fs::write(&file, body).unwrap();
    file.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_through_the_cli_and_http_with_roles() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let submitter = server.token("ci", "submitter");
    let operator = server.token("ops", "operator");
    let viewer = server.token("eyes", "viewer");
    std::fs::write(
        dir.path().join("workflow.yaml"),
        "name: hello\nblocks:\n  - jobs: [{action: noop}]\n",
    )
    .unwrap();
    let file = write_schedule(
        dir.path(),
        "schedule: nightly\ncron: \"30 2 * * *\"\ntimezone: America/New_York\nworkflow_file: workflow.yaml\n",
    );
    let cli = |token: &str, args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .args(["--addr", &server.addr])
            .env("STEWARD_TOKEN", token)
            .output()
            .unwrap()
    };

    let denied = cli(&viewer, &["schedule", "create", &file]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PERMISSION_DENIED"));
    let out = cli_as(
        Some(&submitter),
        &server.addr,
        &["schedule", "create", &file],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("next fires"), "{text}");
    // The next 5 fires, each on the schedule's own wall clock.
    assert_eq!(text.matches("02:30:00-0").count(), 5, "{text}");
    let again = cli(&submitter, &["schedule", "create", &file]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("ALREADY_EXISTS"));

    // Pausing needs an operator.
    let denied = cli(
        &submitter,
        &["schedule", "pause", "nightly", "--reason", "x"],
    );
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PERMISSION_DENIED"));
    cli_as(
        Some(&operator),
        &server.addr,
        &["schedule", "pause", "nightly", "--reason", "INC-9"],
    );
    let out = cli_as(
        Some(&viewer),
        &server.addr,
        &["schedule", "show", "nightly", "--json"],
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["paused"], true);
    assert_eq!(shown["pause_reason"], "INC-9");
    assert_eq!(shown["paused_by"], "ops");
    cli_as(
        Some(&operator),
        &server.addr,
        &["schedule", "resume", "nightly"],
    );

    // A trigger runs it now; the run carries its schedule and can be listed by it.
    let out = cli_as(
        Some(&submitter),
        &server.addr,
        &["schedule", "trigger", "nightly"],
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let ch = channel_as(&server.addr, Some(&submitter)).await;
    let mut c = Client::new(ch.clone());
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "completed");
    assert_eq!(run.schedule, "nightly");
    assert!(!run.nominal_time.is_empty());
    assert_eq!(run.submitted_by, "schedule/nightly");
    let out = cli_as(
        Some(&viewer),
        &server.addr,
        &["list", "--schedule", "nightly", "--json"],
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["runs"][0]["id"], id.as_str());

    // HTTP: the same calls; bad input names its field and changes nothing.
    let auth = format!("Bearer {submitter}");
    let h = |m: &'static str, path: String, body: String| {
        let auth = auth.clone();
        let addr = server.addr.clone();
        async move {
            let (code, _, body) = http(
                &addr,
                m,
                &path,
                &[
                    ("Authorization", auth.as_str()),
                    ("Content-Type", "application/yaml"),
                ],
                &body,
            )
            .await
            .unwrap();
            (code, body)
        }
    };
    let (code, body) = h("GET", "/v1/schedules/nightly".into(), String::new()).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"upcoming\""), "{body}");
    for (bad, field) in [
        (
            "schedule: b\ncron: \"* * *\"\nworkflow: {name: hello, blocks: [{jobs: [{action: noop}]}]}",
            "cron",
        ),
        (
            "schedule: b\ncron: \"* * * * *\"\ntimezone: Nowhere/Land\nworkflow: {name: hello, blocks: [{jobs: [{action: noop}]}]}",
            "timezone",
        ),
        (
            "schedule: b\nevery: 1m\nworkflow: {name: hello, blocks: [{jobs: [{action: nope}]}]}",
            "workflow.blocks[0].jobs[0].action",
        ),
        (
            "schedule: b\nevery: 1m\nworkflow: {name: NotAllowed, blocks: [{jobs: [{action: noop}]}]}",
            "policy",
        ),
    ] {
        let (code, body) = h("POST", "/v1/schedules".into(), bad.into()).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body.contains(field), "{bad}: {body}");
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (code, _) = h("POST", "/v1/schedules".into(), deep).await;
    assert_eq!(code, 400);
    let (code, body) = h(
        "PUT",
        "/v1/schedules/nightly".into(),
        "schedule: other\nevery: 1m\nworkflow: {name: hello, blocks: [{jobs: [{action: noop}]}]}"
            .into(),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = h(
        "POST",
        "/v1/schedules/nightly/backfill".into(),
        r#"{"from": "yesterday", "to": "2026-01-01T00:00:00Z"}"#.into(),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("from"), "{body}");
    let mut sc = SchedulesClient::new(ch);
    let list = sc
        .list(pb::ScheduleListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.schedules.len(), 1, "nothing bad was stored");

    // Deleting needs an operator; the runs stay.
    let denied = cli(&submitter, &["schedule", "delete", "nightly"]);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PERMISSION_DENIED"));
    cli_as(
        Some(&operator),
        &server.addr,
        &["schedule", "delete", "nightly"],
    );
    let gone = cli(&viewer, &["schedule", "show", "nightly"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NOT_FOUND"));
    assert_eq!(status(&mut c, &id).await.state, "completed");
}

/// A kill -9 at `failpoint` on the first fire of an every-second schedule; after a restart,
/// the nominal time it was deciding has exactly one run, and it completes.
#[cfg(feature = "failpoints")]
async fn one_run_after_a_kill_at(failpoint: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[("FAILPOINTS", &format!("{failpoint}=return"))]).await;
    let file = write_schedule(
        dir.path(),
        "schedule: tick\nevery: 1s\nworkflow: {name: hello, blocks: [{jobs: [{action: noop}]}]}\n",
    );
    cli_as(None, &server.addr, &["schedule", "create", &file]);
    assert!(
        !server.wait_exit(LONG).await.success(),
        "the fail point killed the server"
    );
    assert!(server.log_text().contains(failpoint));
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let mut sc = SchedulesClient::new(server.channel().await);
    let first = {
        let s = sc
            .get(pb::ScheduleNameRequest {
                name: "tick".into(),
            })
            .await
            .unwrap()
            .into_inner();
        s.history.first().map(|h| h.nominal_time.clone())
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    sc.pause(pb::SchedulePauseRequest {
        name: "tick".into(),
        reason: "test over".into(),
    })
    .await
    .unwrap();
    let runs = runs_by_nominal(&mut c, "tick").await;
    assert!(!runs.is_empty());
    for (nominal, rs) in &runs {
        assert_eq!(rs.len(), 1, "{nominal} has {} runs", rs.len());
        wait_terminal(&mut c, &rs[0].id, LONG).await;
    }
    if let Some(first) = first {
        assert_eq!(
            runs[&first].len(),
            1,
            "the fire in the crash window ran once"
        );
    }
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_a_fires_decision_and_its_commit_leaves_one_run() {
    one_run_after_a_kill_at("schedule::before_fire_commit").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_after_a_fires_commit_leaves_one_run_that_completes() {
    one_run_after_a_kill_at("schedule::after_fire_commit").await;
}

/// Two nodes on one PostgreSQL database fire a 1-second schedule for 60 s; one is killed at a
/// time that varies from run to run. No nominal time has two runs, and none is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_fire_each_second_once_with_one_killed() {
    let pg = store_postgres::testing::PgServer::start().await;
    let url = pg.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("STEWARD_DATABASE", url.as_str()),
        ("STEWARD_LEASE_TTL", "2s"),
    ];
    let a = Server::start(&dir.path().join("a"), &env).await;
    let mut b = Server::start(&dir.path().join("b"), &env).await;
    let file = write_schedule(
        dir.path(),
        "schedule: tick\nevery: 1s\ncatchup_window: 30s\noverlap: allow\nworkflow: {name: hello, blocks: [{jobs: [{action: noop}]}]}\n",
    );
    cli_as(None, &a.addr, &["schedule", "create", &file]);
    // Between 10 s and 50 s in, from the clock's milliseconds.
    let jitter = domain::Clock::now(&domain::SystemClock).0.rem_euclid(1000);
    let kill_after = Duration::from_millis(10_000 + u64::try_from(jitter).unwrap() * 40);
    tokio::time::sleep(kill_after).await;
    b.kill9().await;
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(kill_after)).await;
    let mut sc = SchedulesClient::new(a.channel().await);
    let s = sc
        .pause(pb::SchedulePauseRequest {
            name: "tick".into(),
            reason: "test over".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut c = a.client().await;
    let runs = runs_by_nominal(&mut c, "tick").await;
    for (nominal, rs) in &runs {
        assert_eq!(rs.len(), 1, "{nominal} has {} runs", rs.len());
    }
    let times: Vec<domain::Timestamp> = runs
        .keys()
        .map(|t| domain::Timestamp::parse_rfc3339(t).unwrap())
        .collect();
    assert!(times.len() >= 50, "{} fires in 60 s", times.len());
    for pair in times.windows(2) {
        assert_eq!(
            pair[1].0 - pair[0].0,
            1000,
            "no second missing between {} and {}",
            pair[0],
            pair[1]
        );
    }
    assert_eq!(s.missed, 0, "{s:?}");
    // B's runs are taken over by A and finish.
    for rs in runs.values() {
        let run = wait_terminal(&mut c, &rs[0].id, LONG).await;
        assert_eq!(run.state, "completed", "{run:?}");
    }
}

/// The "send what is due" example: each fire sends what waits in the outbox and moves it to
/// `sent/`; what a run did not get to waits for the next fire, and nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_what_is_due_example_continues_where_the_last_run_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let root = workspace_root();
    std::fs::write(
        data.join("steward.toml"),
        std::fs::read_to_string(root.join("examples/steward.toml")).unwrap(),
    )
    .unwrap();
    let server = Server::start_as_is(&data, &[]).await;
    let outbox = dir.path().join("box/outbox");
    let sent = dir.path().join("box/sent");
    std::fs::create_dir_all(&outbox).unwrap();
    std::fs::create_dir_all(&sent).unwrap();
    for m in ["0001", "0002"] {
        std::fs::write(outbox.join(m), format!("message {m}")).unwrap();
    }
    // 0003 was sent by a run killed before it could move it: it is not sent again.
    std::fs::write(outbox.join("0003"), "message 0003").unwrap();
    std::fs::write(sent.join("0003"), "message 0003").unwrap();
    let example = std::fs::read_to_string(root.join("examples/send-what-is-due/schedule.yaml"))
        .unwrap()
        .replace("/tmp/steward-outbox/outbox", outbox.to_str().unwrap());
    let file = write_schedule(dir.path(), &example);
    cli_as(None, &server.addr, &["schedule", "create", &file]);
    // Its minute fires are paused so that the triggers below are the only runs.
    cli_as(None, &server.addr, &["schedule", "pause", "send-due"]);

    let mut c = server.client().await;
    let out = cli_as(None, &server.addr, &["schedule", "trigger", "send-due"]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "completed", "{run:?}");
    let output = &run.blocks[0].jobs[0].output;
    assert!(
        output.contains("sending 0001") && output.contains("sending 0002"),
        "{output}"
    );
    assert!(!output.contains("sending 0003"), "{output}");
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 0);

    std::fs::write(outbox.join("0004"), "message 0004").unwrap();
    let out = cli_as(None, &server.addr, &["schedule", "trigger", "send-due"]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let run = wait_terminal(&mut c, &id, LONG).await;
    let output = &run.blocks[0].jobs[0].output;
    assert!(
        output.contains("sending 0004") && output.contains("sent 1 message"),
        "{output}"
    );
    assert_eq!(std::fs::read_dir(&sent).unwrap().count(), 4);
}
