//! The real `steward` binary: the handshake across restarts, crashes at fail points, cancel.

#![allow(clippy::unwrap_used)]

mod alerts;
mod console;
mod estop;
mod faults;
mod harness;
mod history;
mod metrics;
mod notify;
mod policies;
mod rails;
mod scaleout;
mod schedules;
mod secrets;
mod shutdown;
mod telemetry;
mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use harness::*;
use proto::v1 as pb;

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_through_grpc_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("ran");
    let job = sh(&format!(
        "echo $STEWARD_IDEMPOTENCY_KEY >> {}",
        log.display()
    ));
    let yaml = format!("name: hello\nidempotency_key: hello-1\nblocks:\n  - jobs: [{job}]\n");

    let mut server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let first = c
        .submit(pb::SubmitRequest {
            spec: Some(spec(&yaml)),
            start: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    // Submit stores and does not run (checked again below, once the process has exited).
    assert_eq!(status(&mut c, &first.id).await.state, "submitted");

    // The same idempotency key gives the same ID and stores nothing new.
    let again = c
        .submit(pb::SubmitRequest {
            spec: Some(spec(&yaml)),
            start: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, first.id);
    assert!(!again.created);
    // The same key with a different spec is a client bug: refused, naming the key and the run.
    let changed = yaml.replace("name: hello", "name: hello\ndesc: changed");
    let err = c
        .submit(pb::SubmitRequest {
            spec: Some(spec(&changed)),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("\"hello-1\"") && err.message().contains(&first.id),
        "{}",
        err.message()
    );
    let listed = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1);

    // Status answers across a restart, before and after Exec.
    server.stop().await;
    // The process that took the Submit has exited: whatever it ran has left its mark.
    assert!(!log.exists(), "Submit must not execute anything");
    let mut server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    assert_eq!(status(&mut c, &first.id).await.state, "submitted");

    // Exec queues only a run that is still submitted: nothing ran it before.
    let exec = c
        .exec(pb::ExecRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exec.state, "queued", "Submit must not execute anything");
    let run = wait_terminal(&mut c, &first.id, LONG).await;
    assert_eq!(run.state, "completed");
    let err = c
        .exec(pb::ExecRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    // Once the process has exited, nothing it could have started again is still to come.
    server.stop().await;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        1,
        "ran exactly once"
    );
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let run = status(&mut c, &first.id).await;
    assert_eq!(run.state, "completed");
    assert_eq!(run.blocks[0].jobs[0].state, "completed");
    let err = c
        .exec(pb::ExecRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_submission_answers_failed_precondition() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_SUBMIT_TTL", "500ms")]).await;
    let mut c = server.client().await;
    let id = submit(&mut c, "name: hello\nblocks:\n  - jobs: [{action: noop}]\n").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let err = c
        .exec(pb::ExecRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("submit TTL"), "{}", err.message());
    let run = status(&mut c, &id).await;
    assert_eq!(run.state, "expired");
    assert_eq!(run.stop_cause.unwrap().kind, "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_a_shell_jobs_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_KILL_GRACE", "1s")]).await;
    let mut c = server.client().await;
    let pidfile = dir.path().join("grandchild.pid");
    let job = sh(&format!(
        "sleep 300 & echo $! > {}; wait",
        pidfile.display()
    ));
    let id = submit_and_exec(
        &mut c,
        &format!("name: hello\nblocks:\n  - jobs: [{job}]\n"),
    )
    .await;
    eventually("the grandchild to start", LONG, || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!process_gone(grandchild));

    // Through the CLI, as an operator would.
    let out = std::process::Command::new(BIN)
        .args([
            "cancel",
            &id,
            "--reason",
            "wrong site",
            "--addr",
            &server.addr,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "cancelled");
    assert_eq!(run.blocks[0].jobs[0].state, "cancelled");
    let cause = run.stop_cause.unwrap();
    assert_eq!(cause.kind, "cancelled");
    assert_eq!(
        cause.details.get("reason").map(String::as_str),
        Some("wrong site")
    );
    eventually("the grandchild to be killed", LONG, || {
        process_gone(grandchild)
    })
    .await;
}

/// One line per job start and end, written by the jobs themselves.
fn job_log(path: &std::path::Path) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let mut starts = BTreeMap::new();
    let mut dones = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Some((what, key)) = line.split_once(' ') {
            let m = if what == "start" {
                &mut starts
            } else {
                &mut dones
            };
            *m.entry(key.to_owned()).or_insert(0) += 1;
        }
    }
    (starts, dones)
}

/// Jobs whose completion the database holds, read straight from the file.
fn completed_in_db(db: &std::path::Path) -> BTreeSet<String> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT run_id, block_idx, idx FROM jobs WHERE state = 'completed'")
        .unwrap();
    stmt.query_map([], |r| {
        Ok(format!(
            "{}/b{}/j{}",
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_block_resumes_at_the_first_unfinished_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("jobs.log");
    let job = logged_job(&log);
    let yaml = format!(
        "name: erase\nblocks:\n  - jobs: [{job}]\n  - concurrency: 2\n    jobs: [{job}, {job}, {job}, {job}, {job}]\n  - jobs: [{job}]\n"
    );

    // The process kills itself (SIGKILL) right after the 6th durable job commit.
    let mut server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&mut c, &yaml).await);
    }
    server.stop().await;
    let mut server = Server::start(
        &data,
        &[("FAILPOINTS", "engine::job_after_commit=5*off->return")],
    )
    .await;
    let mut c = server.client().await;
    for id in &ids {
        c.exec(pb::ExecRequest { id: id.clone() }).await.unwrap();
    }
    let status = server.wait_exit(LONG).await;
    assert!(
        !status.success(),
        "the fail point must have killed the process"
    );
    // The process is gone, and its jobs' shells with it (they die with their parent): the
    // database and the job log hold what was done and started before the kill.

    let done_before = completed_in_db(&data.join("steward.db"));
    let (starts_before, _) = job_log(&log);
    let in_flight: Vec<&String> = starts_before
        .keys()
        .filter(|k| !done_before.contains(*k))
        .collect();
    assert!(
        !done_before.is_empty(),
        "some jobs completed before the kill"
    );
    assert!(
        !in_flight.is_empty(),
        "some jobs were in flight at the kill"
    );
    let mid_block = ids.iter().any(|id| {
        let in_block_1 = done_before
            .iter()
            .filter(|k| k.starts_with(&format!("{id}/b1/")))
            .count();
        (1..5).contains(&in_block_1)
    });
    assert!(mid_block, "the kill came mid-block: {done_before:?}");

    drop(server);
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    for id in &ids {
        let run = wait_terminal(&mut c, id, LONG).await;
        assert_eq!(run.state, "completed", "run {id}: {run:?}");
        for b in &run.blocks {
            for j in &b.jobs {
                assert_eq!(j.state, "completed");
            }
        }
    }
    let (starts, dones) = job_log(&log);
    for key in &done_before {
        assert_eq!(
            starts.get(key),
            Some(&1),
            "{key} completed before the kill and must not run again"
        );
    }
    for key in &in_flight {
        assert_eq!(
            starts.get(*key),
            Some(&2),
            "{key} was in flight: it runs again, with the same key"
        );
    }
    assert_eq!(starts.len(), 3 * 7, "every job ran");
    assert!(dones.len() == 3 * 7, "every job finished");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_by_submit_survives_a_kill_between_its_commit_and_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("jobs.log");
    let job = logged_job(&log);
    let yaml =
        format!("name: erase\nidempotency_key: erase-aap-1\nblocks:\n  - jobs: [{job}, {job}]\n");
    let start = || pb::SubmitRequest {
        spec: Some(spec(&yaml)),
        start: true,
    };

    // Submit with start commits the run queued and leased, then the process dies before it
    // answers or starts a job.
    let mut server = Server::start(
        &data,
        &[("FAILPOINTS", "engine::submit_started_after_commit=return")],
    )
    .await;
    let mut c = server.client().await;
    assert!(c.submit(start()).await.is_err(), "the answer is lost");
    assert!(!server.wait_exit(LONG).await.success());
    assert_eq!(
        job_log(&log),
        Default::default(),
        "no job ran before the kill"
    );

    // After a restart the run resumes by itself, and the client's retry finds it.
    drop(server);
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let again = c.submit(start()).await.unwrap().into_inner();
    assert!(!again.created, "nothing new stored: {again:?}");
    let run = wait_terminal(&mut c, &again.id, LONG).await;
    assert_eq!(run.state, "completed", "{run:?}");
    let (starts, dones) = job_log(&log);
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(
        starts.values().all(|n| *n == 1),
        "each job ran once: {starts:?}"
    );
    assert_eq!(dones.len(), 2);
    let listed = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(listed.len(), 1, "one run: {listed:?}");

    // The CLI starts a keyed spec in one call and, asked again, answers the same run.
    let file = dir.path().join("keyed.yaml");
    std::fs::write(&file, yaml.replace("erase-aap-1", "erase-aap-2")).unwrap();
    let token = server.admin_token();
    let args = ["submit", file.to_str().unwrap(), "--wait"];
    let first = cli_as(token.as_deref(), &server.addr, &args);
    let first_line = |out: std::process::Output| {
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().next().unwrap_or_default().to_owned()
    };
    let id = first_line(first);
    assert_eq!(status(&mut c, &id).await.state, "completed");
    let second = cli_as(token.as_deref(), &server.addr, &args);
    assert_eq!(first_line(second), id);
    let (starts, _) = job_log(&log);
    assert_eq!(starts.len(), 4, "{starts:?}");
    assert!(starts.values().all(|n| *n == 1), "{starts:?}");
}

/// Starts keyed runs of `yaml` (`key-0`, `key-1`...) with Submit's `start`, one call each;
/// stops at the first refused call (the process died).
pub(crate) async fn start_keyed(c: &mut Client, yaml: &str, n: usize) -> usize {
    for i in 0..n {
        let spec = spec(&format!("idempotency_key: key-{i}\n{yaml}"));
        let req = pb::SubmitRequest {
            spec: Some(spec),
            start: true,
        };
        if c.submit(req).await.is_err() {
            return i;
        }
    }
    n
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_outcomes_survive_a_kill_at_the_writers_commit() {
    for failpoint in ["store::writer_before_commit", "store::writer_after_commit"] {
        // The kill comes at the writer's 21st commit; should no job have completed by then (a
        // loaded machine, where the runs' and jobs' starts took every commit so far), the
        // scenario is run again from scratch with the kill 10 commits later.
        let mut skip = 20;
        let (_dir, data, log, yaml, done_before) = loop {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let log = dir.path().join("jobs.log");
            let job = logged_job(&log);
            let yaml = format!(
                "name: erase\nblocks:\n  - concurrency: 2\n    jobs: [{job}, {job}, {job}, {job}]\n  - jobs: [{job}]\n"
            );
            let mut server = Server::start(
                &data,
                &[("FAILPOINTS", &format!("{failpoint}={skip}*off->return"))],
            )
            .await;
            let mut c = server.client().await;
            start_keyed(&mut c, &yaml, 4).await;
            assert!(
                !server.wait_exit(LONG).await.success(),
                "{failpoint}: the fail point must have killed the process"
            );
            let done_before = completed_in_db(&data.join("steward.db"));
            if !done_before.is_empty() {
                break (dir, data, log, yaml, done_before);
            }
            assert!(
                skip < 40,
                "{failpoint}: no job completed before the kill, even at commit {}",
                skip + 1
            );
            skip += 10;
        };

        // The clients' retries find their runs (or store the ones the kill lost), and every
        // run completes; what was committed before the kill is never done again.
        let server = Server::start(&data, &[]).await;
        let mut c = server.client().await;
        assert_eq!(start_keyed(&mut c, &yaml, 4).await, 4);
        let runs = c
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .runs;
        assert_eq!(runs.len(), 4, "{failpoint}: one run per key");
        for r in &runs {
            let run = wait_terminal(&mut c, &r.id, LONG).await;
            assert_eq!(run.state, "completed", "{failpoint}: {run:?}");
        }
        let (starts, _) = job_log(&log);
        for key in &done_before {
            assert_eq!(
                starts.get(key),
                Some(&1),
                "{failpoint}: {key} was committed before the kill and must not run again"
            );
        }
        assert_eq!(starts.len(), 20, "{failpoint}: every job ran: {starts:?}");
    }
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_between_a_started_submit_and_its_driver_is_heard() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let marker = dir.path().join("ran");
    let job = sh(&format!("touch {}", marker.display()));
    let yaml = format!("name: erase\nidempotency_key: erase-aap-1\nblocks:\n  - jobs: [{job}]\n");
    // The run is stored, queued and leased; its driver starts 1 s later.
    let server = Server::start(
        &data,
        &[("FAILPOINTS", "engine::before_driver_start=return(1000)")],
    )
    .await;
    let mut c = server.client().await;
    let mut submitter = server.client().await;
    let req = pb::SubmitRequest {
        spec: Some(spec(&yaml)),
        start: true,
    };
    let cancel = async {
        let id = loop {
            let runs = c
                .list(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner()
                .runs;
            if let Some(r) = runs.first() {
                break r.id.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        c.cancel(pb::CancelRequest {
            id: id.clone(),
            reason: "wrong site".into(),
        })
        .await
        .unwrap();
        id
    };
    let (submitted, id) = tokio::join!(submitter.submit(req), cancel);
    assert_eq!(submitted.unwrap().into_inner().id, id);
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "cancelled", "{run:?}");
    assert!(!marker.exists(), "the job must not have run");
}

/// The runtime gets one worker thread per CPU unless `worker_threads` says otherwise; a value
/// out of range stops `serve` before it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_as_many_workers_as_configured() {
    // The line is written once the node has started: read after the server stopped.
    let workers = |log: &str| -> Option<u64> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "steward serving")
            .and_then(|v| v["workers"].as_u64())
    };
    let default = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(std::thread::available_parallelism().unwrap().get() as u64);
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(&dir.path().join("default"), &[]).await;
    s.stop().await;
    assert_eq!(workers(&s.log_text()), Some(default), "{}", s.log_text());
    let mut s = Server::start(
        &dir.path().join("three"),
        &[("STEWARD_WORKER_THREADS", "3")],
    )
    .await;
    s.stop().await;
    assert_eq!(workers(&s.log_text()), Some(3), "{}", s.log_text());

    for bad in ["0", "1025", "many"] {
        // --print-config: were the value taken, the command would end at once all the same.
        let out = std::process::Command::new(BIN)
            .args(["serve", "--print-config", "--data-dir"])
            .arg(dir.path().join("bad"))
            .env("STEWARD_WORKER_THREADS", bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("worker_threads"), "{bad}: {err}");
    }
}
