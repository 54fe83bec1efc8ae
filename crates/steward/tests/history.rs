//! A year of runs (docs/operating.md, Retention and Backups; docs/api.md, Watch): retention and
//! `steward runs prune`, backups taken while runs are in flight, and Watch sending only what
//! changed, on the real binary.

use std::time::Duration;

use proto::v1 as pb;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// Retention and `steward runs prune` on the real binary (docs/operating.md, Retention).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_prune_by_hand_and_by_retention() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("steward.toml"),
        "[retention]\nruns = \"1h\"\n\n[retention.workflows]\nhello = \"2s\"\nx = \"0\"\n",
    )
    .unwrap();
    let server = Server::start(&data, &[("STEWARD_AUTH", "token")]).await;
    let admin = server.admin_token().unwrap();
    let operator = server.token("ops", "operator");
    let mut c = server.client().await;
    let mut ids = Vec::new();
    for name in ["hello", "x"] {
        let id = submit_and_exec(
            &mut c,
            &format!("name: {name}\nblocks:\n  - jobs: [{{action: noop}}]\n"),
        )
        .await;
        wait_terminal(&mut c, &id, LONG).await;
        ids.push(id);
    }
    let (hello, x) = (ids[0].clone(), ids[1].clone());

    // By hand: admin only; --dry-run counts and deletes nothing.
    let denied = std::process::Command::new(BIN)
        .args([
            "runs",
            "prune",
            "--before",
            "2100-01-01",
            "--addr",
            &server.addr,
        ])
        .env("STEWARD_TOKEN", &operator)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PERMISSION_DENIED"));
    let out = cli_as(
        Some(&admin),
        &server.addr,
        &[
            "runs",
            "prune",
            "--before",
            "2100-01-01",
            "--workflow",
            "x",
            "--dry-run",
            "--json",
        ],
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // uint64 is a string in the proto3 JSON mapping.
    assert_eq!(r["runs"], "1", "{r}");
    assert_eq!(status(&mut c, &x).await.state, "completed");
    let bad = std::process::Command::new(BIN)
        .args([
            "runs",
            "prune",
            "--before",
            "last week",
            "--addr",
            &server.addr,
        ])
        .env("STEWARD_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("before"));
    cli_as(
        Some(&admin),
        &server.addr,
        &["runs", "prune", "--before", "2100-01-01", "--workflow", "x"],
    );
    let err = c
        .status(pb::StatusRequest { id: x.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // By retention: `hello` keeps its runs 2 s; the first sweep comes 10 s after the start.
    let deadline = std::time::Instant::now() + LONG;
    loop {
        match c.status(pb::StatusRequest { id: hello.clone() }).await {
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::NotFound);
                assert!(e.message().contains("pruned"), "{}", e.message());
                break;
            }
            Ok(_) => {
                assert!(std::time::Instant::now() < deadline, "never pruned");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A backup taken while runs are in flight, the server then killed with SIGKILL: restored into
/// a new data directory, every run in it completes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_mid_run_restores_and_its_runs_complete() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let mut server = Server::start(&a, &[("STEWARD_LEASE_TTL", "2s")]).await;
    let mut c = server.client().await;
    let job = sh("sleep 0.3");
    for _ in 0..10 {
        let id = submit(
            &mut c,
            &format!("name: hello\nblocks:\n  - jobs: [{job}]\n  - jobs: [{job}, {job}]\n  - jobs: [{job}]\n"),
        )
        .await;
        c.exec(pb::ExecRequest { id }).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let backup = dir.path().join("backup.db");
    let run_cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env_remove("STEWARD_DATA_DIR")
            .output()
            .unwrap()
    };
    let out = run_cli(&[
        "backup",
        backup.to_str().unwrap(),
        "--data-dir",
        a.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("10 runs"));
    // Never over an existing file.
    let again = run_cli(&[
        "backup",
        backup.to_str().unwrap(),
        "--data-dir",
        a.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    // Not while a server serves the directory.
    let busy = run_cli(&[
        "restore",
        backup.to_str().unwrap(),
        "--data-dir",
        a.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&busy.stderr).contains("stop it first"));
    server.kill9().await;

    // Not something that is not a Steward database.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, "not a database").unwrap();
    let c_dir = dir.path().join("c");
    let bad = run_cli(&[
        "restore",
        junk.to_str().unwrap(),
        "--data-dir",
        c_dir.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(
        !c_dir.join("steward.db").exists(),
        "a refused restore changes nothing"
    );

    let out = run_cli(&[
        "restore",
        backup.to_str().unwrap(),
        "--data-dir",
        c_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What holds the database is this user's alone, as a server's data directory is.
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&backup), 0o600, "the backup");
    assert_eq!(mode(&c_dir), 0o700, "the restored data directory");
    assert_eq!(
        mode(&c_dir.join("steward.db")),
        0o600,
        "the restored database"
    );
    // The e-stop list is not in the database: a restored directory without it stops
    // everything (fail closed) until it is put back, as the docs say to.
    std::fs::copy(a.join("estop.json"), c_dir.join("estop.json")).unwrap();
    let mut restored = Server::start(&c_dir, &[("STEWARD_LEASE_TTL", "2s")]).await;
    let mut c = restored.client().await;
    let runs = c
        .list(pb::ListRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 10);
    for r in runs {
        let run = wait_terminal(&mut c, &r.id, LONG).await;
        assert_eq!(run.state, "completed", "{run:?}");
    }
    restored.stop().await;

    // Undoing a restore: the backup (runs unfinished) over the finished runs, which are kept
    // as steward.db.replaced, then that file restored back.
    let c_db = c_dir.join("steward.db");
    let restore = |file: &std::path::Path| {
        run_cli(&[
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            c_dir.to_str().unwrap(),
            "--replace",
        ])
    };
    let out = restore(&backup);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = restore(&c_dir.join("steward.db.replaced"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let finished = "10 runs (0 unfinished";
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(finished),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // What is served now is what was restored.
    let check = dir.path().join("check.db");
    let out = run_cli(&[
        "backup",
        check.to_str().unwrap(),
        "--data-dir",
        c_dir.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(finished),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The database itself is no backup of itself: refused, and nothing moves.
    let before = std::fs::read(&c_db).unwrap();
    let out = restore(&c_db);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the database's own file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&c_db).unwrap(), before);
}

/// Watch of a run of 10,000 jobs: the first message is the whole run, every later one carries
/// the jobs that changed, a few hundred bytes, not the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_a_ten_thousand_job_run_sends_what_changed() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]).await;
    let mut c = server.client().await;
    let many = vec!["{action: noop}"; 10_000].join(", ");
    let step = "{action: sleep, args: {duration: 300ms}}";
    let id = submit_and_exec(
        &mut c,
        &format!(
            "name: hello\nblocks:\n  - concurrency: 100\n    jobs: [{many}]\n  - jobs: [{step}]\n  - jobs: [{step}]\n  - jobs: [{step}]\n"
        ),
    )
    .await;
    let mut stream = c
        .watch(pb::WatchRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.partial);
    let whole = first.encoded_len();
    assert!(
        whole > 200_000,
        "the first message is the whole run: {whole} bytes"
    );
    let mut merged = first;
    let mut sizes = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        assert!(msg.partial);
        let changed: usize = msg.blocks.iter().map(|b| b.jobs.len()).sum();
        sizes.push((msg.encoded_len(), changed));
        api::convert::merge_run(&mut merged, msg);
    }
    assert!(sizes.len() >= 3, "{sizes:?}");
    for (bytes, changed) in &sizes {
        // The header, and about 200 bytes a changed job: never the 10,000 others.
        assert!(
            *bytes < 2_000 + 300 * changed,
            "{bytes} bytes for {changed} changed jobs"
        );
    }
    // What the merged messages say is the run as Status says it.
    let now = status(&mut c, &id).await;
    assert_eq!(merged.state, "completed");
    assert_eq!(merged.blocks, now.blocks);
}
