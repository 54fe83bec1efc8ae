//! The emergency stop (docs/operating.md, The emergency stop) through the real binary: the file, the CLI, the API.

use std::time::Duration;

use proto::v1 as pb;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// Runs a client command against `server` (whose tokens are off).
fn cli(server: &Server, args: &[&str]) -> std::process::Output {
    cli_with(server, None, args)
}

/// Runs a client command against `server` with `token`. The login name is someone else's:
/// only the token names the caller.
fn cli_with(server: &Server, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args)
        .env("STEWARD_ADDR", &server.addr)
        .env("USER", "mallory")
        .env("STEWARD_ACTOR", "mallory")
        .env_remove("STEWARD_TOKEN");
    if let Some(t) = token {
        cmd.env("STEWARD_TOKEN", t);
    }
    cmd.output().unwrap()
}

/// Replaces the e-stop file the way an editor or `mv` would.
fn write_estop(data: &std::path::Path, json: &str) {
    let tmp = data.join("estop.json.edit");
    std::fs::write(&tmp, json).unwrap();
    std::fs::rename(&tmp, data.join("estop.json")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edit_of_the_file_stops_running_jobs_without_an_api_call() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[("STEWARD_KILL_GRACE", "1s")]).await;
    let mut c = server.client().await;
    let pidfile = dir.path().join("pid");
    let id = start_long_job(&mut c, &pidfile, "SatelliteDiskErase", "aap").await;
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let bystander_pid = dir.path().join("pid2");
    let bystander = start_long_job(&mut c, &bystander_pid, "Other", "bbb").await;

    write_estop(
        &data,
        r#"{"entries": [{"target": "*", "state": "go"}, {"target": "site=aap", "state": "stop", "reason": "INC-42", "set_by": "ana"}]}"#,
    );
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "stopped");
    assert_eq!(run.blocks[0].jobs[0].state, "stopped");
    let cause = run.stop_cause.unwrap();
    assert_eq!(cause.kind, "estop");
    assert_eq!(cause.details["target"], "site=aap");
    assert_eq!(cause.details["set_by"], "ana");
    assert_eq!(cause.details["reason"], "INC-42");
    eventually("the job's whole process group to be gone", LONG, || {
        process_gone(grandchild)
    })
    .await;
    assert_eq!(
        status(&mut c, &bystander).await.state,
        "running",
        "other runs go on"
    );

    // The audit trail has the hand edit.
    let out = cli(&server, &["estop", "audit", "--target", "site=aap"]);
    let audit = String::from_utf8_lossy(&out.stdout);
    assert!(
        audit.contains("site=aap: (none) -> stop") && audit.contains("(file)"),
        "{audit}"
    );
    c.cancel(pb::CancelRequest {
        id: bystander,
        reason: "done".into(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_stop_from_the_cli_and_everyone_sees_who_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &[("STEWARD_KILL_GRACE", "1s"), ("STEWARD_AUTH", "token")],
    )
    .await;
    let mut c = server.client().await;
    // An operator, and a pager that may pull the cord but not release it.
    let ana = server.token("ana", "operator");
    let pager = server.token("pager", "responder");
    let cli = |server: &Server, args: &[&str]| cli_with(server, Some(&ana), args);
    let pidfile = dir.path().join("pid");
    let id = start_long_job(&mut c, &pidfile, "SatelliteDiskErase", "aap").await;

    // A reason is required.
    let out = cli(&server, &["estop", "set", "SatelliteDiskErase", "stop"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reason"));

    let out = cli(
        &server,
        &[
            "estop",
            "set",
            "SatelliteDiskErase",
            "stop",
            "--reason",
            "disks vanishing at aap",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "stopped");
    assert_eq!(run.estop.as_ref().unwrap().state, "stop");
    let human = String::from_utf8_lossy(&cli(&server, &["status", &id]).stdout).into_owned();
    assert!(
        human.contains("set by ana") && human.contains("disks vanishing at aap"),
        "{human}"
    );

    // New work is refused, naming the entry; a stopped run stays stopped after go.
    let file = dir.path().join("w.yaml");
    std::fs::write(
        &file,
        "name: SatelliteDiskErase\nblocks:\n  - jobs: [{action: noop}]\n",
    )
    .unwrap();
    let out = cli(&server, &["submit", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAILED_PRECONDITION")
            && err.contains("SatelliteDiskErase")
            && err.contains("ana")
            && err.contains("disks vanishing"),
        "{err}"
    );
    let (code, body) = http_post(
        &server.addr,
        "/v1/runs",
        "name: SatelliteDiskErase\nblocks:\n  - jobs: [{action: noop}]\n",
    )
    .await;
    assert_eq!(code, 401, "no token: {body}");
    // The pager cannot release the stop, and is told why.
    let out = cli_with(
        &server,
        Some(&pager),
        &["estop", "set", "SatelliteDiskErase", "go"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PERMISSION_DENIED") && err.contains("responder"),
        "{err}"
    );

    let out = cli(&server, &["estop", "set", "SatelliteDiskErase", "go"]);
    assert!(out.status.success());
    let out = cli(&server, &["clone", &id, "--exec"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The node acts on the go: the clone, executed after it, starts its job. Whatever the go
    // could have done to the stopped run, it has done by now.
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let clone = stdout.lines().next().unwrap_or_default().trim().to_owned();
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let run = status(&mut c, &clone).await;
        if run.blocks[0].jobs[0].state == "running" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the clone never started its job: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        status(&mut c, &id).await.state,
        "stopped",
        "a stopped run stays stopped after go"
    );

    // Every change is in the audit trail, newest first.
    let out = cli(&server, &["estop", "audit", "--json"]);
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = audit["records"].as_array().unwrap();
    let ours: Vec<_> = records
        .iter()
        .filter(|r| r["target"] == "SatelliteDiskErase")
        .collect();
    assert_eq!(ours.len(), 2);
    assert_eq!(
        (ours[0]["old_state"].as_str(), ours[0]["new_state"].as_str()),
        (Some("stop"), Some("go"))
    );
    assert_eq!(
        (ours[1]["old_state"].as_str(), ours[1]["new_state"].as_str()),
        (Some(""), Some("stop"))
    );
    assert_eq!(ours[1]["set_by"], "ana");
    assert_eq!(ours[1]["reason"], "disks vanishing at aap");
    assert!(!ours[1]["at"].as_str().unwrap().is_empty());

    // Who is recorded is the token, whatever the client's environment says (USER and
    // STEWARD_ACTOR name someone else here).
    let out = cli_with(
        &server,
        Some(&pager),
        &["estop", "set", "site=zzz", "pause", "--reason", "who"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = cli(&server, &["estop", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let entry = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["target"] == "site=zzz")
        .cloned()
        .unwrap();
    assert_eq!(entry["set_by"], "pager", "{entry}");
    // The access log has every change and the refusal.
    let out = cli_with(
        &server,
        server.admin_token().as_deref(),
        &["audit", "--json"],
    );
    let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = log["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["actor"] == "pager" && r["allowed"] == false && r["call"] == "EStopSet go"),
        "{log}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["actor"] == "ana" && r["allowed"] == true && r["call"] == "EStopSet stop"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_file_stops_everything_until_it_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[("STEWARD_KILL_GRACE", "1s")]).await;
    let mut c = server.client().await;
    let pidfile = dir.path().join("pid");
    let id = start_long_job(&mut c, &pidfile, "Anything", "x").await;

    write_estop(&data, r#"{"entries": [{"target": "*", "state": "go""#);
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "stopped", "an unreadable list stops everything");
    assert!(run.stop_cause.unwrap().message.contains("estop.json"));
    let (code, body) = http_get(&server.addr, "/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("malformed"), "{body}");
    let (_, metrics) = http_get(&server.addr, "/metrics").await.unwrap();
    assert!(metrics.contains("steward_estop_alert 1"), "{metrics}");
    let err = c
        .submit(pb::SubmitRequest {
            spec: Some(spec("name: x\nblocks:\n  - jobs: [{action: noop}]\n")),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("cannot be read"),
        "{}",
        err.message()
    );

    write_estop(&data, r#"{"entries": [{"target": "*", "state": "go"}]}"#);
    eventually("readiness to recover", LONG, || true).await;
    let deadline = std::time::Instant::now() + LONG;
    while http_get(&server.addr, "/readyz").await.unwrap().0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "readiness did not recover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = submit_and_exec(&mut c, "name: x\nblocks:\n  - jobs: [{action: noop}]\n").await;
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_an_unreadable_list_starts_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Not a fresh install: a database exists and the e-stop file is gone.
    let mut server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let id = submit(&mut c, "name: x\nblocks:\n  - jobs: [{action: noop}]\n").await;
    server.stop().await;
    std::fs::remove_file(data.join("estop.json")).unwrap();

    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let (code, body) = http_get(&server.addr, "/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("missing"), "{body}");
    let err = c
        .exec(pb::ExecRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("missing"), "{}", err.message());
    assert_eq!(
        status(&mut c, &id).await.state,
        "submitted",
        "reads still answer; nothing changed"
    );
    let out = cli(&server, &["estop", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ALERT"));
}

/// The break-glass socket: with the token table unreadable, the server's own user sets `*
/// stop` over the data directory's socket, without a token, and mints a new admin token; the
/// stop reaches the running job. Another user cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_break_glass_socket_stops_everything_while_tokens_cannot_be_checked() {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &[("STEWARD_KILL_GRACE", "1s"), ("STEWARD_AUTH", "token")],
    )
    .await;
    let mut c = server.client().await;
    let pidfile = dir.path().join("pid");
    let id = start_long_job(&mut c, &pidfile, "SatelliteDiskErase", "aap").await;
    // Status over the socket: no token needed.
    let status_of = |server: &Server, id: &str| {
        let out = std::process::Command::new(BIN)
            .args(["status", id, "--json", "--addr"])
            .arg(format!(
                "unix:{}",
                server.data_dir.join("steward.sock").display()
            ))
            .output()
            .unwrap();
        let run: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        run["state"].as_str().unwrap_or_default().to_owned()
    };
    let socket = data.join("steward.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // The token table goes: no token can be checked any more.
    let db = rusqlite::Connection::open(data.join("steward.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch("ALTER TABLE tokens RENAME TO tokens_lost")
        .unwrap();
    // Once the node's short cache of checked tokens has lapsed, token calls fail.
    let deadline = std::time::Instant::now() + LONG;
    let err = loop {
        match c.list(pb::ListRequest::default()).await {
            Err(e) => break e,
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "tokens are still checked against a table that is gone"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    let local = format!("unix:{}", socket.display());
    let out = std::process::Command::new(BIN)
        .args([
            "estop",
            "set",
            "*",
            "stop",
            "--reason",
            "INC-1: break glass",
        ])
        .args(["--addr", &local])
        .env_remove("STEWARD_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + LONG;
    while !process_gone(read_pid(&pidfile)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the job outlived the stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let list = std::fs::read_to_string(data.join("estop.json")).unwrap();
    let whoami = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    assert!(
        list.contains(&format!("local:{whoami}")) && list.contains("break glass"),
        "{list}"
    );
    assert_eq!(status_of(&server, &id), "stopped");

    // The tokens come back; a new admin token is minted over the socket.
    db.execute_batch("ALTER TABLE tokens_lost RENAME TO tokens")
        .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["token", "create", "rescue", "--role", "admin", "--json"])
        .args(["--addr", &local])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["token"]["created_by"], format!("local:{whoami}"));

    // Another user cannot even connect.
    if nix::unistd::geteuid().is_root() {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(["estop", "set", "*", "go", "--addr", &local])
            .output()
            .unwrap();
        assert!(!out.status.success(), "another user used the socket");
    }
}

/// `steward estop list --json` as JSON.
fn estop_list(server: &Server) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["estop", "list", "--json", "--addr", &server.addr])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The e-stop in etcd over TLS with client certificates: a node with the certificate reads,
/// sets and follows the list; one without cannot read it, and stops everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estop_in_etcd_over_tls_needs_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = api::tls::testing::Ca::new();
    let (server, client) = (ca.leaf("etcd"), ca.client("steward"));
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca_file = file("ca.pem", &ca.pem);
    let etcd = estop::testing::EtcdServer::start_tls(estop::testing::Tls {
        cert: file("etcd.pem", &server.cert_pem).into(),
        key: file("etcd.key", &server.key_pem).into(),
        client_ca: ca_file.clone().into(),
    });
    let endpoints = format!("[\"{}\"]", etcd.endpoint());
    let (cert, key) = (
        file("client.pem", &client.cert_pem),
        file("client.key", &client.key_pem),
    );
    let common = [
        ("STEWARD_ESTOP_SOURCE", "etcd"),
        ("STEWARD_ETCD_ENDPOINTS", endpoints.as_str()),
        ("STEWARD_ETCD_CA", ca_file.as_str()),
    ];
    let mut with_cert = common.to_vec();
    with_cert.extend([
        ("STEWARD_ETCD_CERT", cert.as_str()),
        ("STEWARD_ETCD_KEY", key.as_str()),
    ]);
    let a = Server::start(&dir.path().join("a"), &with_cert).await;
    eventually("the list to be readable over TLS", LONG, || {
        estop_list(&a)["readable"] == true
    })
    .await;
    cli(
        &a,
        &["estop", "set", "site=aap", "stop", "--reason", "INC-11"],
    );
    let list = estop_list(&a);
    assert!(
        list["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["target"] == "site=aap" && e["state"] == "stop"),
        "{list}"
    );
    // Without the client certificate etcd refuses the node: it runs nothing.
    let b = Server::start(&dir.path().join("b"), &common).await;
    let list = estop_list(&b);
    assert_eq!(list["readable"], false, "{list}");
    let (code, body) = http_get(&b.addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("estop_unreadable"), "{body}");
}

/// The e-stop in etcd with etcd's password authentication: the right password reads and
/// writes; a wrong one stops everything and says why; the password is never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estop_in_etcd_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = estop::testing::EtcdServer::start();
    etcd.enable_auth("s3cret-etcd-pw");
    let endpoints = format!("[\"{}\"]", etcd.endpoint());
    let ep = endpoints.as_str();
    let env = move |password: &'static str| {
        vec![
            ("STEWARD_ESTOP_SOURCE", "etcd"),
            ("STEWARD_ETCD_ENDPOINTS", ep),
            ("STEWARD_ETCD_USERNAME", "root"),
            ("STEWARD_ETCD_PASSWORD", password),
        ]
    };
    let a = Server::start(&dir.path().join("a"), &env("s3cret-etcd-pw")).await;
    eventually("the list to be readable with the password", LONG, || {
        estop_list(&a)["readable"] == true
    })
    .await;
    cli(
        &a,
        &["estop", "set", "erase", "pause", "--reason", "INC-12"],
    );
    assert!(estop_list(&a).to_string().contains("INC-12"));
    let b = Server::start(&dir.path().join("b"), &env("wrong")).await;
    let list = estop_list(&b);
    assert_eq!(list["readable"], false, "{list}");
    assert!(
        list["error"].as_str().unwrap().contains("authenticating"),
        "{list}"
    );
    // The password is in neither log nor printed config.
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["serve", "--print-config", "--data-dir"])
        .arg(dir.path().join("a"))
        .envs(env("s3cret-etcd-pw"))
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.contains("etcd_password = \"***\""), "{printed}");
    for text in [printed.to_string(), a.log_text(), b.log_text()] {
        assert!(!text.contains("s3cret-etcd-pw"));
    }
}

/// A node that joins with a fresh database never writes its first-start `* = go` over the
/// entries in etcd: only an empty prefix is seeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_never_seeds_over_the_list_in_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = estop::testing::EtcdServer::start();
    let endpoints = format!("[\"{}\"]", etcd.endpoint());
    let env = [
        ("STEWARD_ESTOP_SOURCE", "etcd"),
        ("STEWARD_ETCD_ENDPOINTS", endpoints.as_str()),
    ];
    let a = Server::start(&dir.path().join("a"), &env).await;
    eventually("a to seed * = go", LONG, || {
        estop_list(&a).to_string().contains("\"go\"")
    })
    .await;
    cli(&a, &["estop", "set", "*", "stop", "--reason", "INC-13"]);
    let b = Server::start(&dir.path().join("b"), &env).await;
    let list = estop_list(&b);
    let all: Vec<_> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == "*")
        .collect();
    assert_eq!(all.len(), 1, "{list}");
    assert_eq!(all[0]["state"], "stop", "{list}");
    assert_eq!(all[0]["reason"], "INC-13", "{list}");
}

/// A pause that comes while the run's first start is still held (to go with its job's
/// outcome) is not undone when that start is written: the run stays `paused` in the store.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_while_the_first_start_is_held_stays_a_pause() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Starts are held 2 s instead of 1 ms: the pause comes inside that window.
    let server = Server::start(&data, &[("FAILPOINTS", "engine::start_held=return(2000)")]).await;
    let mut c = server.client().await;
    let pidfile = dir.path().join("pid");
    let started = std::time::Instant::now();
    let id = start_long_job(&mut c, &pidfile, "erase", "aap").await;
    let out = cli(
        &server,
        &["estop", "set", "site=aap", "pause", "--reason", "INC-7"],
    );
    assert!(out.status.success(), "{out:?}");
    let deadline = std::time::Instant::now() + LONG;
    while status(&mut c, &id).await.state != "paused" {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never showed paused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "the pause came after the held start was due: the test proves nothing"
    );
    // Past the moment the held start was due: nothing made the run `running` again.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(started.elapsed())).await;
    let run = status(&mut c, &id).await;
    assert_eq!(run.state, "paused", "{run:?}");
    assert_eq!(run.blocks[0].jobs[0].state, "running", "{run:?}");

    let out = cli(
        &server,
        &["estop", "set", "site=aap", "stop", "--reason", "INC-7"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "stopped");
}
