//! Faults from outside, on the real binary: crashes with jobs in flight, restarts at once after
//! kill -9, a full disk, runs that end while their leases are renewed.

use std::time::Duration;

use crate::harness::*;
use proto::v1 as pb;

const LONG: Duration = Duration::from_secs(60);

/// A run that ends on this node between the renewal's snapshot of held runs and the renewal
/// itself is no lost lease: nothing may say "lease lost to another node".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_ending_during_a_lease_renewal_is_no_lost_lease() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(
        &data,
        &[
            ("STEWARD_LEASE_TTL", "3s"),
            ("RUST_LOG", "info,engine=debug"),
            // Every renewal waits 1 s between its snapshot and the store call.
            ("FAILPOINTS", "engine::renew_after_snapshot=return(1000)"),
        ],
    )
    .await;
    let mut c = server.client().await;
    // Renewals snapshot every 2 s (a 1 s period plus the 1 s pause) and answer 1 s after
    // their snapshot; a 1.3 s run started every 0.5 s is sure to end inside some pause.
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = submit_and_exec(
            &mut c,
            &format!("name: x\nblocks:\n  - jobs: [{}]\n", sh("sleep 1.3")),
        )
        .await;
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for id in &ids {
        assert_eq!(wait_terminal(&mut c, id, LONG).await.state, "completed");
    }
    // A renewal in progress finishes before the process exits: once it has exited, every
    // renewal that held one of these runs has said what it found.
    server.stop().await;
    let log = server.log_text();
    assert!(
        log.contains("run ended while its lease was renewed"),
        "the window was not hit; log:\n{log}"
    );
    assert!(!log.contains("lease lost"), "a false alarm; log:\n{log}");
}

/// Hostile input to the real server: each gets its clear error at once and changes nothing,
/// and the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_to_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]).await;
    let before = std::fs::read_to_string(data.join("estop.json")).unwrap();
    let big = "r".repeat(1 << 20);
    let cases = [
        (
            "a 1 MB e-stop reason",
            "/v1/estop",
            format!(r#"{{"target": "x", "state": "stop", "reason": "{big}"}}"#),
            400,
            "reason: is 1048576 bytes; the limit is 1024",
        ),
        (
            "a 10 KB e-stop target",
            "/v1/estop",
            format!(
                r#"{{"target": "{}", "state": "stop", "reason": "r"}}"#,
                "t".repeat(10_240)
            ),
            400,
            "target: is 10240 bytes; the limit is 256",
        ),
        (
            "a 1 MB e-stop state",
            "/v1/estop",
            format!(r#"{{"target": "x", "state": "{big}", "reason": "r"}}"#),
            400,
            "(1048576 bytes)",
        ),
        (
            "a typo in the e-stop path",
            "/v1/estop/set",
            r#"{"target": "*", "state": "stop", "reason": "r"}"#.to_owned(),
            404,
            "no such path",
        ),
        (
            "a YAML spec nested 10^5 deep",
            "/v1/runs",
            format!(
                "name: x\nblocks: {}{}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            400,
            "the limit is 64",
        ),
    ];
    for (what, path, body, code, says) in cases {
        let started = std::time::Instant::now();
        let (got, answer) = http_post(&server.addr, path, &body).await;
        assert_eq!(got, code, "{what}: {}", &answer[..answer.len().min(300)]);
        assert!(
            answer.contains(says),
            "{what}: {}",
            &answer[..answer.len().min(300)]
        );
        assert!(answer.len() < 4096, "{what}: the answer echoes its input");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        std::fs::read_to_string(data.join("estop.json")).unwrap(),
        before,
        "nothing changed"
    );
    // The audit query as the docs write it, with its parameters left empty.
    let (code, body) = http_get(&server.addr, "/v1/estop/audit?target=&limit=")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(&server.addr, "/v1/estop/audit?limit=many")
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("is not a whole number"), "{body}");

    // A reason that holds a newline cannot forge a line of the log.
    let forged =
        r#"{"target": "x", "state": "pause", "reason": "INC-1\nERROR forged line\u001b[31m"}"#;
    let (code, answer) = http_post(&server.addr, "/v1/estop", forged).await;
    assert_eq!(code, 200, "{answer}");
    let mut c = server.client().await;
    let err = c
        .cancel(pb::CancelRequest {
            id: "0192f0c1-8a4e-7d2b-9f3a-1c2d3e4f5a6b".into(),
            reason: "why\nERROR forged too".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        http_get(&server.addr, "/healthz")
            .await
            .is_some_and(|(c, _)| c == 200)
    );
    let log = server.log_text();
    assert!(
        log.contains("INC-1\\nERROR forged line"),
        "escaped in its line:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("ERROR forged")),
        "a forged line:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no escape sequence reaches the log file:\n{log}"
    );
}

/// A `STEWARD_*` variable that names no setting stops the start (a typo in a unit file).
#[test]
fn an_unknown_steward_variable_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .env("STEWARD_SHUTDOWN_GRAEC", "30s")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("STEWARD_SHUTDOWN_GRAEC: not a setting"),
        "{err}"
    );
}

/// The job containment a server reports in `/readyz`.
async fn containment_of(server: &Server) -> String {
    let (_, body) = http_get(&server.addr, "/readyz").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["job_containment"].as_str().unwrap_or_default().to_owned()
}

/// A shell snippet that appends OVERLAP to `log` when the process whose PID is in `pidfile`
/// is still alive (a zombie is not).
fn overlap_check(pidfile: &std::path::Path, log: &std::path::Path) -> String {
    format!(
        "if [ -e {p} ]; then s=$(sed 's/.*) //' /proc/$(cat {p})/stat 2>/dev/null | cut -c1); if [ -n \"$s\" ] && [ \"$s\" != Z ]; then echo OVERLAP >> {l}; fi; fi",
        p = pidfile.display(),
        l = log.display()
    )
}

/// kill -9 with a job whose grandchild sleeps: when the job runs again after the restart, no
/// process of the old attempt is alive. Under both containments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_nothing_of_the_old_attempt_runs_beside_the_new() {
    for mode in ["auto", "process_group"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let log = dir.path().join("log");
        let grandchild = dir.path().join("grandchild");
        let env = [
            ("STEWARD_JOB_CONTAINMENT", mode),
            ("STEWARD_KILL_GRACE", "2s"),
        ];
        let mut server = Server::start(&data, &env).await;
        let how = containment_of(&server).await;
        eprintln!("job containment under {mode:?}: {how}");
        let job = sh(&format!(
            "echo start $STEWARD_ATTEMPT >> {l}; {check}; if [ -e {g} ]; then exit 0; fi; sleep 300 & echo $! > {g}; wait",
            l = log.display(),
            g = grandchild.display(),
            check = overlap_check(&grandchild, &log),
        ));
        let mut c = server.client().await;
        let id = submit_and_exec(&mut c, &format!("name: x\nblocks:\n  - jobs: [{job}]\n")).await;
        eventually("the grandchild to start", LONG, || {
            std::fs::read_to_string(&grandchild).is_ok_and(|s| s.ends_with('\n'))
        })
        .await;
        let old = read_pid(&grandchild);
        server.kill9().await;
        assert!(
            !process_gone(old),
            "{mode}: the grandchild outlives the crash"
        );

        let server = Server::start(&data, &env).await;
        let mut c = server.client().await;
        let run = wait_terminal(&mut c, &id, LONG).await;
        assert_eq!(run.state, "completed", "{mode}: {run:?}");
        let lines = std::fs::read_to_string(&log).unwrap();
        assert!(
            !lines.contains("OVERLAP"),
            "{mode} ({how}): the old attempt's grandchild was alive when the job ran again:\n{lines}"
        );
        assert_eq!(
            lines.lines().filter(|l| l.starts_with("start")).count(),
            2,
            "{lines}"
        );
        assert!(process_gone(old), "{mode}: the grandchild is gone");
        // Entries go off the runtime, once the attempt's processes are gone.
        let jobs = data.join("jobs");
        eventually(
            &format!("{mode}: the ledger to be empty once the job is done"),
            Duration::from_secs(10),
            || std::fs::read_dir(&jobs).unwrap().next().is_none(),
        )
        .await;
    }
}

/// A job that leaves its process group (`setsid`) is gone after a cancel, under both
/// containments (a cgroup holds it; without one, it keeps the job's environment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_leaves_its_process_group_dies_with_it() {
    for mode in ["auto", "process_group"] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let escaped = dir.path().join("escaped");
        let env = [
            ("STEWARD_JOB_CONTAINMENT", mode),
            ("STEWARD_KILL_GRACE", "1s"),
        ];
        let server = Server::start(&data, &env).await;
        let how = containment_of(&server).await;
        eprintln!("job containment under {mode:?}: {how}");
        let job = sh(&format!(
            "setsid sleep 300 & echo $! > {e}; exec sleep 300",
            e = escaped.display()
        ));
        let mut c = server.client().await;
        let id = submit_and_exec(&mut c, &format!("name: x\nblocks:\n  - jobs: [{job}]\n")).await;
        eventually("the escaped process to start", LONG, || {
            std::fs::read_to_string(&escaped).is_ok_and(|s| s.ends_with('\n'))
        })
        .await;
        let pid = read_pid(&escaped);
        // It does leave the job's process group (once `setsid` has run).
        eventually(
            "the escaped process to lead a group of its own",
            LONG,
            || {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(2).map(str::to_owned))
                        .is_some_and(|pgrp| pgrp == pid.to_string())
                })
            },
        )
        .await;
        c.cancel(pb::CancelRequest {
            id: id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
        assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "cancelled");
        eventually(
            &format!("{mode} ({how}): the escaped process to die"),
            Duration::from_secs(10),
            || process_gone(pid),
        )
        .await;
    }
}

/// A supervisor restarts a killed steward at once: every start succeeds, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_restart_right_after_kill_9_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]).await;
    // A job in flight at every kill, as on a busy node.
    let job = sh("sleep 300");
    let mut c = server.client().await;
    let id = submit(&mut c, &format!("name: x\nblocks:\n  - jobs: [{job}]\n")).await;
    c.exec(pb::ExecRequest { id }).await.unwrap();
    let restarts = 200;
    for i in 0..restarts {
        server.kill9().await;
        // Server::start panics with the log when the process exits instead of serving.
        server = Server::start(&data, &[("RUST_LOG", "warn")]).await;
        if i % 50 == 0 {
            eprintln!("restart {i} of {restarts}");
        }
    }
}

/// Unmounts a file system the test mounted, whatever happens.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `dir` until it has no space left.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.flush();
}

fn count(log: &std::path::Path, prefix: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

/// A full disk mid-run: outcomes of jobs that finished meanwhile are kept and committed once
/// space returns, nothing new starts, no job is killed or run twice, and `/readyz` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_run_loses_nothing_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&data)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root, or no mount permission)");
        return;
    }
    let _mount = Mounted(data.clone());
    // The jobs' ledger entries live on a file system of their own: removing an ended
    // attempt's entry must not give the store back room while the test needs it full.
    let jobs = data.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let jobs_mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&jobs)
        .status()
        .is_ok_and(|s| s.success());
    assert!(jobs_mounted, "cannot mount a tmpfs for the jobs' ledger");
    let _jobs_mount = Mounted(jobs);
    let log = dir.path().join("jobs.log");
    std::fs::write(data.join("policies.toml"), TEST_POLICIES).unwrap();
    let server =
        Server::start_logged(&data, Some(dir.path()), &[("STEWARD_KILL_GRACE", "1s")]).await;
    // Each job notes whether the disk was full (the filler there) when it began. It lasts
    // longer than using up the log's room takes on a loaded machine: the first jobs must end
    // into a store that already refuses writes.
    let filler = data.join("filler");
    let job = sh(&format!(
        "if [ -e {f} ]; then echo full $STEWARD_IDEMPOTENCY_KEY >> {l}; fi; echo start $STEWARD_IDEMPOTENCY_KEY >> {l}; trap 'echo TERM $STEWARD_IDEMPOTENCY_KEY >> {l}; exit 1' TERM; sleep 6 & wait; echo done $STEWARD_IDEMPOTENCY_KEY >> {l}",
        f = filler.display(),
        l = log.display()
    ));
    let mut c = server.client().await;
    let runs = 4;
    let mut ids = Vec::new();
    for _ in 0..runs {
        let id = submit_and_exec(
            &mut c,
            &format!("name: x\nblocks:\n  - jobs: [{job}]\n  - jobs: [{job}]\n"),
        )
        .await;
        ids.push(id);
    }
    eventually("every first job to start", LONG, || {
        count(&log, "start") == runs
    })
    .await;
    fill(&filler);
    // SQLite writes into the room its write-ahead log already has: submissions use it up.
    let mut refused = false;
    for i in 0..5000 {
        let r = c
            .submit(pb::SubmitRequest {
                spec: Some(spec(&format!(
                    "name: x\ndesc: filler {i}\nblocks:\n  - jobs: [{{action: noop}}]\n"
                ))),
                start: false,
            })
            .await;
        if r.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the full disk never refused a write");

    // The first jobs finish into a full disk: their outcomes cannot be written.
    eventually("/readyz to report the failing store", LONG, || {
        let addr = server.addr.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(http_get(&addr, "/readyz"))
        })
        .join()
        .unwrap()
        .is_some_and(|(code, body)| code == 503 && body.contains("store_failing"))
    })
    .await;
    eventually("the first jobs to finish", LONG, || {
        count(&log, "done") == runs
    })
    .await;
    // While the store refuses writes, nothing new starts. The disk stays full a while; a job
    // that began in that time says so itself (checked once every job has run).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count(&log, "start"),
        runs,
        "a job started on a failing store:\n{}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        server.log_text()
    );

    std::fs::remove_file(&filler).unwrap();
    for id in &ids {
        let run = wait_terminal(&mut c, id, LONG).await;
        assert_eq!(run.state, "completed", "{run:?}");
    }
    let (code, body) = http_get(&server.addr, "/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        count(&log, "full"),
        0,
        "a job started on a failing store:\n{text}"
    );
    assert_eq!(count(&log, "TERM"), 0, "no job was signalled:\n{text}");
    assert_eq!(count(&log, "start"), 2 * runs, "each job ran once:\n{text}");
    assert_eq!(count(&log, "done"), 2 * runs, "each job ran once:\n{text}");
}

/// `steward cancel` waits until the run has ended, and says how it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_command_waits_for_the_run_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_KILL_GRACE", "1s")]).await;
    let mut c = server.client().await;
    let pidfile = dir.path().join("pid");
    let id = start_long_job(&mut c, &pidfile, "x", "aap").await;
    let out = cli_as(None, &server.addr, &["cancel", &id, "--reason", "test"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), format!("{id} cancelled"));
    assert_eq!(status(&mut c, &id).await.state, "cancelled");
    assert!(process_gone(read_pid(&pidfile)));

    let id = start_long_job(&mut c, &dir.path().join("pid2"), "x", "aap").await;
    let out = cli_as(None, &server.addr, &["cancel", &id, "--no-wait"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.trim() == format!("{id} cancelled") || text.contains("cancel accepted"),
        "{text}"
    );
}

/// A background component that ends on its own (a fail point stands for the bug) stops the
/// node in order, with the component named as the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_background_component_stops_the_node_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(
        &data,
        &[
            ("FAILPOINTS", "steward::policy_watcher_exit=return"),
            ("STEWARD_POLICIES_REREAD", "200ms"),
        ],
    )
    .await;
    let status = server.wait_exit(LONG).await;
    assert_eq!(status.code(), Some(1), "a fatal stop exits 1");
    let last = std::fs::read_to_string(data.join("last-stop.json")).unwrap();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["kind"], "fatal", "{last}");
    assert_eq!(last["component"], "policy watcher", "{last}");
    let log = server.log_text();
    assert!(log.contains("a background component failed"), "{log}");
    assert!(log.contains("steward stopped"), "stopped in order:\n{log}");
}

/// `auth = "none"` serves everyone as an admin: the binary refuses it on an address that is
/// not loopback, saying how to turn tokens on, and starts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_none_off_loopback_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", "0.0.0.0:0"])
        .env("STEWARD_AUTH", "none")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loopback") && err.contains("auth = \"none\""),
        "{err}"
    );
    assert!(
        !dir.path().join("steward.db").exists(),
        "the refused start touched the data directory"
    );
}

/// A fresh start keeps its files to itself: the data directory 0700, the database (and its
/// WAL), the admin token and the socket 0600. A start on a data directory open to others
/// warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server =
        Server::start_logged(&data, Some(dir.path()), &[("STEWARD_AUTH", "token")]).await;
    // A write, so that the WAL exists.
    let token = server.token("someone", "viewer");
    assert!(!token.is_empty());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("secrets")), 0o700);
    for f in [
        "steward.db",
        "steward.db-wal",
        "admin.token",
        "steward.sock",
    ] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    assert!(!server.log_text().contains("open to other users"));
    server.stop().await;

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start_logged(&data, Some(dir.path()), &[]).await;
    assert!(
        server.log_text().contains("open to other users"),
        "{}",
        server.log_text()
    );
}

/// A job gets nothing of the server's: none of its `STEWARD_*` settings or credentials in its
/// environment (only the job's own three), and no open descriptor beyond stdin, stdout and
/// stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_inherits_no_credentials_or_descriptors_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &[
            ("STEWARD_TOKEN", "stw_leak-me"),
            ("STEWARD_KILL_GRACE", "1s"),
        ],
    )
    .await;
    let mut c = server.client().await;
    // `env`, then the descriptors `ls` itself holds: only 0, 1 and 2, and the directory it
    // reads.
    let job = sh("env; ls -l /proc/self/fd");
    let id = submit_and_exec(&mut c, &format!("name: x\nblocks:\n  - jobs: [{job}]\n")).await;
    let run = wait_terminal(&mut c, &id, Duration::from_secs(60)).await;
    assert_eq!(run.state, "completed", "{run:?}");
    let out = &run.blocks[0].jobs[0].output;
    assert!(!out.contains("leak-me"), "{out}");
    let steward_vars: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("STEWARD_"))
        .map(|l| l.split('=').next().unwrap())
        .collect();
    let mut sorted = steward_vars.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "STEWARD_ATTEMPT",
            "STEWARD_IDEMPOTENCY_KEY",
            "STEWARD_RUN_ID"
        ],
        "{out}"
    );
    let fds: Vec<&str> = out.lines().filter(|l| l.contains(" -> ")).collect();
    let unexpected: Vec<&&str> = fds
        .iter()
        .filter(|l| {
            let fd = l
                .split(" -> ")
                .next()
                .unwrap()
                .split_whitespace()
                .last()
                .unwrap();
            !matches!(fd, "0" | "1" | "2") && !l.ends_with("/fd")
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "descriptors of the server: {unexpected:?}\n{out}"
    );
    assert!(fds.len() >= 3, "{out}");
}

/// Attempts made before a crash count against a job's retry budget: a job that fails every
/// time, killed with the server in its backoff after 2 of 3 attempts, gets 1 more after the
/// restart, not 3 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_made_before_a_crash_count_against_the_retry_budget() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("attempts.log");
    let mut server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let job = format!(
        "{{action: shell, args: {{argv: [sh, -c, 'echo attempt >> {}; exit 1']}}, retry: {{attempts: 3, initial_backoff: 3s, max_backoff: 10s}}}}",
        log.display()
    );
    let id = submit_and_exec(&mut c, &format!("name: x\nblocks:\n  - jobs: [{job}]\n")).await;
    let attempts = || {
        std::fs::read_to_string(&log)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    eventually("two attempts", LONG, || attempts() == 2).await;
    // The second attempt's start is written while its process runs, but not waited for: wait
    // until the store has it, so that the kill falls in the 6 s backoff before the third.
    let deadline = std::time::Instant::now() + LONG;
    while status(&mut c, &id).await.blocks[0].jobs[0].attempts < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second attempt was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9().await;
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "failed", "{run:?}");
    assert_eq!(attempts(), 3);
    let job = &run.blocks[0].jobs[0];
    assert!(job.error.contains("(attempt 3 of 3)"), "{job:?}");
}

/// A client that opens connections and sends nothing must not run the server out of file
/// descriptors: the listener serves a bounded number at once (the rest wait in the kernel's
/// backlog), so the e-stop list and the database stay readable, the break-glass socket answers,
/// jobs get their pipes, and the listener serves again once the flood ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_runs_nothing_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 128 open files: fewer than the flood below, so that a server accepting every connection
    // would run out (`Too many open files`). (The kernel queues about 128 connections that are
    // not accepted yet: the flood is the served ones and those.)
    let server = Server::start_limited(&data, &[], (128, 128)).await;
    let flood = silent_connections(&server.addr, 400, 128).await;
    // Past the e-stop's re-read and staleness periods, with the flood held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let submitted = break_glass_still_works(&data, dir.path(), "during-the-flood");

    drop(flood);
    let mut c = server.client().await;
    let runs = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    let id = runs
        .iter()
        .find(|r| submitted.contains(&r.id))
        .unwrap_or_else(|| panic!("the run submitted during the flood: {submitted}"))
        .id
        .clone();
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "completed", "{run:?}");
    let log = server.log_text();
    for bad in ["Too many open files", "cannot be read"] {
        assert!(!log.contains(bad), "the log says {bad:?}:\n{log}");
    }
    assert!(
        log.contains("the listener serves as many connections as it may"),
        "the full listener is reported:\n{log}"
    );
}

/// A first start that fails after the database is made (its port taken, here) is done again
/// by the next start: the policy file and the e-stop file are written then, and runs run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_that_failed_is_done_again_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--listen", &taken.local_addr().unwrap().to_string()])
        .env("STEWARD_AUTH", "none")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listening on"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data.join("steward.db").exists(), "the database was made");
    assert!(data.join("first-start.unfinished").exists());
    drop(taken);

    let server = Server::start_as_is(&data, &[]).await;
    assert!(data.join("policies.toml").exists());
    assert!(data.join("estop.json").exists());
    assert!(!data.join("first-start.unfinished").exists());
    let log = server.log_text();
    assert!(
        log.contains("the first start of this data directory did not finish"),
        "{log}"
    );
    let mut c = server.client().await;
    let id = submit_and_exec(
        &mut c,
        "name: hello\nblocks:\n  - jobs: [{action: noop, args: {}}]\n",
    )
    .await;
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "completed");
}

/// The server raises its soft limit on open files to the hard one; its `shell` jobs start
/// with the soft limit it was started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_get_the_open_file_limit_the_server_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_limited(&data, &[], (1024, 4096)).await;
    let mut c = server.client().await;
    let id = submit_and_exec(
        &mut c,
        &format!("name: hello\nblocks:\n  - jobs: [{}]\n", sh("ulimit -n")),
    )
    .await;
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "completed", "{run:?}");
    assert_eq!(run.blocks[0].jobs[0].output.trim(), "1024");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        open_files.split_whitespace().nth(3) == Some("4096"),
        "the server's own: {open_files}"
    );
}
