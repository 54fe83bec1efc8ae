//! Graceful shutdown and stop modes (docs/operating.md, Stopping), with real signals to the real binary.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proto::v1 as pb;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// Run states straight from the database file (the server is down).
fn db_states(db: &std::path::Path) -> BTreeMap<String, (String, Option<String>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT id, state, lease_owner FROM runs")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The horror story: a steady stream of 2-second jobs, 20 at once, and a deploy's SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_busy_queue_without_losing_or_repeating_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let done = dir.path().join("done.log");
    let job = sh(&format!(
        "sleep 2; echo $STEWARD_RUN_ID >> {}",
        done.display()
    ));
    let yaml = format!("name: queue\nblocks:\n  - jobs: [{job}]\n");
    let mut server = Server::start(&data, &[("STEWARD_MAX_RUNNING_JOBS", "20")]).await;
    let mut c = server.client().await;

    // 20 runs a second for 3 seconds; SIGTERM after 1.5 s. Runs whose Submit or Exec was
    // refused during the drain are the client's to retry: they are not counted as accepted.
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut signalled = None;
    let start = Instant::now();
    for i in 0..60u32 {
        let due = start + Duration::from_millis(50 * u64::from(i));
        tokio::time::sleep_until(due.into()).await;
        if signalled.is_none() && start.elapsed() >= Duration::from_millis(1500) {
            server.signal(Signal::SIGTERM);
            signalled = Some(Instant::now());
        }
        let sub = c
            .submit(pb::SubmitRequest {
                spec: Some(spec(&yaml)),
                start: false,
            })
            .await;
        let id = match sub {
            Ok(r) => r.into_inner().id,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                refused += 1;
                continue;
            }
        };
        match c.exec(pb::ExecRequest { id: id.clone() }).await {
            Ok(_) => accepted.push(id),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                refused += 1;
            }
        }
        if signalled.is_some() && refused > 3 {
            break;
        }
    }
    assert!(refused > 0, "Submit/Exec answer UNAVAILABLE once draining");
    // While draining: not ready, gRPC health NOT_SERVING, and reads still answer.
    let (code, body) = http_get(&server.addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "steward.v1.Steward".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    status(&mut c, &accepted[0]).await;

    let exit = server.wait_exit(LONG).await;
    let drain_time = signalled.unwrap().elapsed();
    let server_log = server.log_text();
    assert!(exit.success(), "{exit}");
    assert!(
        drain_time < Duration::from_secs(20),
        "exited once in-flight jobs finished, well inside the 25 s grace: {drain_time:?}"
    );

    let states = db_states(&data.join("steward.db"));
    let finished = lines(&done);
    let mut completed = 0;
    for id in &accepted {
        let (state, owner) = &states[id];
        match state.as_str() {
            "completed" => completed += 1,
            "queued" => assert_eq!(
                owner, &None,
                "an unstarted run is left queued, free for any node"
            ),
            other => panic!("run {id} is {other} after the drain; expected completed or queued"),
        }
    }
    assert!(
        completed > 0 && completed < accepted.len(),
        "some finished, some wait: {completed}/{}; log:\n{}",
        accepted.len(),
        server_log
    );
    assert_eq!(
        finished.len(),
        completed,
        "every in-flight job finished and committed, none half-done"
    );

    // After a restart every accepted run completes, each exactly once.
    drop(server);
    let server = Server::start(&data, &[("STEWARD_MAX_RUNNING_JOBS", "20")]).await;
    let mut c = server.client().await;
    for id in &accepted {
        assert_eq!(wait_terminal(&mut c, id, LONG).await.state, "completed");
    }
    let mut finished = lines(&done);
    finished.sort();
    let mut want = accepted.clone();
    want.sort();
    assert_eq!(
        finished, want,
        "every accepted run's job completed exactly once"
    );
    let (_, metrics) = http_get(&server.addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("steward_previous_stop_info{kind=\"signal\""),
        "{metrics}"
    );
}

/// A job longer than the grace is cancelled (process group gone) and re-runs after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_expiry_cancels_and_the_job_reruns_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("log");
    let pidfile = dir.path().join("pid");
    let once = dir.path().join("once");
    let job = sh(&format!(
        "echo $STEWARD_IDEMPOTENCY_KEY >> {log}; if [ -e {once} ]; then exit 0; fi; touch {once}; echo $$ > {pid}; exec sleep 300",
        log = log.display(),
        once = once.display(),
        pid = pidfile.display()
    ));
    let env = [
        ("STEWARD_SHUTDOWN_GRACE", "1s"),
        ("STEWARD_KILL_GRACE", "1s"),
    ];
    let mut server = Server::start(&data, &env).await;
    let mut c = server.client().await;
    let id = submit_and_exec(&mut c, &format!("name: long\nblocks:\n  - jobs: [{job}]\n")).await;
    eventually("the job to start", LONG, || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    server.signal(Signal::SIGTERM);
    let exit = server.wait_exit(LONG).await;
    assert!(exit.success());
    assert!(
        process_gone(pid),
        "the job's process was killed when the grace ran out"
    );
    let states = db_states(&data.join("steward.db"));
    assert_eq!(
        states[&id].0, "running",
        "the run is left unfinished, to resume"
    );

    drop(server);
    let server = Server::start(&data, &env).await;
    let mut c = server.client().await;
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "completed");
    assert_eq!(run.blocks[0].jobs[0].attempts, 2);
    let keys = lines(&log);
    assert_eq!(keys.len(), 2, "ran twice: {keys:?}");
    assert_eq!(keys[0], keys[1], "with the same idempotency key");
}

/// SIGUSR1: runs finish their current block, then the process stops; the next block runs after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_stops_at_the_end_of_the_round() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("log");
    let first = sh(&format!("sleep 1; echo first >> {}", log.display()));
    let second = sh(&format!("echo second >> {}", log.display()));
    let mut server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let id = submit_and_exec(
        &mut c,
        &format!("name: rounds\nblocks:\n  - jobs: [{first}]\n  - jobs: [{second}]\n"),
    )
    .await;
    eventually("the first block to start", LONG, || {
        db_states(&data.join("steward.db"))
            .get(&id)
            .is_some_and(|s| s.0 == "running")
    })
    .await;
    server.signal(Signal::SIGUSR1);
    assert!(server.wait_exit(LONG).await.success());
    assert_eq!(
        lines(&log),
        vec!["first"],
        "the current block finished; the next did not start"
    );

    drop(server);
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "completed");
    assert_eq!(lines(&log), vec!["first", "second"], "each block ran once");
}

/// A second SIGTERM during a drain: in-flight jobs are cancelled at once, and the cause says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_now() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pidfile = dir.path().join("pid");
    let job = sh(&format!("echo $$ > {}; exec sleep 300", pidfile.display()));
    let mut server = Server::start(&data, &[("STEWARD_KILL_GRACE", "1s")]).await;
    let mut c = server.client().await;
    let id = submit_and_exec(&mut c, &format!("name: long\nblocks:\n  - jobs: [{job}]\n")).await;
    eventually("the job to start", LONG, || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    server.signal(Signal::SIGTERM);
    // The first signal has been taken: the engine is draining. (A second SIGTERM sent before
    // that could merge with the first.)
    eventually("the drain to begin", LONG, || {
        server.log_text().contains("shutdown begins")
    })
    .await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "a drain waits for the in-flight job (grace 25 s)"
    );
    let second = Instant::now();
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(LONG).await.success());
    assert!(
        second.elapsed() < Duration::from_secs(15),
        "exits at once, not after the grace: {:?}",
        second.elapsed()
    );
    assert!(process_gone(pid));
    let log = server.log_text();
    // Only a process still draining hears the second request: the drain did not end on its
    // own while the job was in flight.
    assert!(
        log.contains("second stop request"),
        "a drain waits for the in-flight job (grace 25 s): {log}"
    );
    // The cause recorded is the one that decided how the process stopped: `now`.
    let last = std::fs::read_to_string(data.join("last-stop.json")).unwrap();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["mode"].as_str()),
        (Some("signal"), Some("now")),
        "last-stop.json: {last}"
    );
    let final_line = log.lines().rev().find(|l| l.contains("steward stopped"));
    assert!(
        final_line.is_some_and(|l| l.contains("SIGTERM (now)")),
        "the log's last word names the escalated cause: {final_line:?}"
    );

    drop(server);
    let server = Server::start(&data, &[]).await;
    let (_, metrics) = http_get(&server.addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("cause=\"SIGTERM (now)\""),
        "steward_previous_stop_info names the escalated cause: {metrics}"
    );
    let mut c = server.client().await;
    let run = status(&mut c, &id).await;
    let job = &run.blocks[0].jobs[0];
    assert!(
        job.error.contains("SIGTERM (now)"),
        "the interrupted job names the cause: {job:?}"
    );
}

fn steward(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steward_stop_in_each_mode() {
    for (flag, mode) in [
        (None, "drain"),
        (Some("--now"), "now"),
        (Some("--end-of-round"), "end_of_round"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut server = Server::start(&data, &[]).await;
        let d = data.to_str().unwrap();
        let mut args = vec!["stop", "--data-dir", d];
        args.extend(flag);
        let out = steward(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("steward stop ({mode})")),
            "{stdout}"
        );
        assert!(server.wait_exit(LONG).await.success());
        assert!(
            !data.join("steward.pid").exists(),
            "the PID file is removed on exit"
        );
        let last: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(data.join("last-stop.json")).unwrap())
                .unwrap();
        assert_eq!(last["kind"], "stop_command");
        assert_eq!(last["mode"], mode);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_files_live_and_stale() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Nothing to stop.
    std::fs::create_dir_all(&data).unwrap();
    let out = steward(&["stop", "--data-dir", data.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to stop"));

    // A stale PID file (a crashed process) is replaced, and the crash is recorded.
    std::fs::write(data.join("steward.pid"), "999999\n").unwrap();
    let mut server = Server::start(&data, &[]).await;
    let (_, metrics) = http_get(&server.addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("steward_previous_stop_info{kind=\"fatal\""),
        "{metrics}"
    );
    assert!(metrics.contains("pid 999999"), "{metrics}");

    // A PID file held by a live process: a second server refuses to start.
    let port = free_port();
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("another steward (pid {})", server.child.id())),
        "{err}"
    );

    // `steward stop` that cannot finish in time says so and exits non-zero.
    let pidfile = dir.path().join("jobpid");
    let mut c = server.client().await;
    let job = sh(&format!("echo $$ > {}; exec sleep 300", pidfile.display()));
    let id = submit(&mut c, &format!("name: long\nblocks:\n  - jobs: [{job}]\n")).await;
    c.exec(pb::ExecRequest { id }).await.unwrap();
    eventually("the job to start", LONG, || pidfile.exists()).await;
    let out = steward(&[
        "stop",
        "--data-dir",
        data.to_str().unwrap(),
        "--timeout",
        "500ms",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not stop within 500ms"));
    let out = steward(&["stop", "--data-dir", data.to_str().unwrap(), "--now"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.wait_exit(LONG).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut server = Server::start(
        &dir.path().join("data"),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    )
    .await;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", server.child.id())),
        "{ready}"
    );
    server.signal(Signal::SIGTERM);
    let n = sock.recv(&mut buf).unwrap();
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert!(stopping.contains("SIGTERM"), "{stopping}");
    assert!(server.wait_exit(LONG).await.success());
}
