//! Secrets and guardrails (docs/security.md) through the real binary: what a run holds that
//! is sensitive is on no surface, while its jobs get the real values; and jobs cannot reach
//! the server that runs them.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::v1 as pb;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// Values from the node's secret sources: never stored, logged or shown.
const SECRET_VALUES: &[&str] = &[
    "env-secret-value-1",
    "file-secret-value-2",
    "url-secret-sig-3",
];

/// Values written into the spec that the redaction rule hides: never shown.
const LITERAL_VALUES: &[&str] = &[
    "literal-db-pw-1",
    "literal-auth-hdr-2",
    "literal-cookie-3",
    "literal-url-pw-4",
    "literal-query-5",
];

type Requests = Arc<Mutex<Vec<String>>>;

/// An HTTP server on a loopback port that answers every request with the request itself
/// (method, URI, headers, body), as a careless echo endpoint would, and records it.
async fn echo_server() -> (std::net::SocketAddr, Requests) {
    let got: Requests = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method,
              uri: axum::http::Uri,
              headers: axum::http::HeaderMap,
              body: String| {
            let g = g.clone();
            async move {
                let mut text = format!("{method} {uri}\n");
                for (k, v) in &headers {
                    text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                }
                text.push_str(&body);
                g.lock().unwrap().push(text.clone());
                text
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    #[allow(clippy::disallowed_methods)] // test scaffolding, ends with the test's runtime
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, got)
}

fn write_private(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads an SSE stream to its end (the run's terminal state ends it).
async fn sse(addr: &str, path: &str, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(LONG, s.read_to_end(&mut buf))
        .await
        .expect("the watch did not end with the run")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_values_reach_jobs_and_no_surface() {
    let (hooks, received, _hooks_server) = receiver(0).await;
    let (echo, requests) = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir(data.join("secrets")).unwrap();
    std::fs::set_permissions(data.join("secrets"), std::fs::Permissions::from_mode(0o700)).unwrap();
    write_private(
        &data.join("secrets/db_password"),
        "file-secret-value-2\n",
        0o600,
    );
    write_private(
        &data.join("secrets/hook_url"),
        &format!("http://127.0.0.1:{}/hook?sig=url-secret-sig-3", echo.port()),
        0o600,
    );
    std::fs::write(
        data.join("steward.toml"),
        format!("[[notify]]\nurl = \"{hooks}/json\"\n"),
    )
    .unwrap();
    std::fs::write(
        data.join("policies.toml"),
        "[workflows.x]\nsecrets = [\"api_token\", \"db_password\", \"hook_url\"]\n",
    )
    .unwrap();
    let server = Server::start(
        &data,
        &[
            ("STEWARD_AUTH", "token"),
            ("STEWARD_SECRET_API_TOKEN", "env-secret-value-1"),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let token = server.admin_token().unwrap();
    let mut c = server.client().await;

    let spec = format!(
        r#"
name: x
labels: {{site: aap}}
blocks:
  - jobs:
      - action: shell
        args:
          argv: [sh, -c, "printf '%s|%s|%s' \"$DB_PASSWORD\" \"$API_TOKEN\" \"$DB_PASS2\" | sha256sum > {out}/shell.sha; echo \"$DB_PASSWORD $API_TOKEN $DB_PASS2\""]
          env: {{DB_PASSWORD: literal-db-pw-1, API_TOKEN: {{secret: api_token}}, DB_PASS2: {{secret: db_password}}, SITE: aap01}}
      - action: http
        args:
          url: "http://alice-user:literal-url-pw-4@{echo}/echo?api_key=literal-query-5&page=1"
          method: POST
          headers: {{Authorization: "Bearer literal-auth-hdr-2", Cookie: "sid=literal-cookie-3", X-Api: {{secret: api_token}}}}
          body: {{secret: db_password}}
      - action: http
        args: {{url: {{secret: hook_url}}, method: POST, body: plain body}}
      - action: write_file
        args: {{path: {out}/written, content: {{secret: db_password}}, mode: "0600"}}
  - jobs:
      - action: shell
        args: {{argv: [sh, -c, "echo leaking $K; exit 1"], env: {{K: {{secret: api_token}}}}}}
"#,
        out = out.display()
    );
    let id = submit(&mut c, &spec).await;

    // Watchers from before the run starts, over gRPC and SSE.
    let mut grpc_watch = c
        .watch(pb::WatchRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    #[allow(clippy::disallowed_methods)] // test scaffolding, awaited below
    let sse_watch = tokio::spawn({
        let (addr, path, token) = (
            server.addr.clone(),
            format!("/v1/runs/{id}/watch"),
            token.clone(),
        );
        async move { sse(&addr, &path, &token).await }
    });
    c.exec(pb::ExecRequest { id: id.clone() }).await.unwrap();
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "failed", "{run:?}");

    // The jobs got the real values.
    let jobs = &run.blocks[0].jobs;
    for j in jobs {
        assert_eq!(j.state, "completed", "{j:?}");
    }
    assert!(
        std::fs::read_to_string(out.join("shell.sha"))
            .unwrap()
            .starts_with(&sha256_hex(
                "literal-db-pw-1|env-secret-value-1|file-secret-value-2"
            ))
    );
    assert_eq!(
        std::fs::read_to_string(out.join("written")).unwrap(),
        "file-secret-value-2"
    );
    let sent = requests.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let echo_req = sent.iter().find(|r| r.starts_with("POST /echo")).unwrap();
    for want in [
        "authorization: Bearer literal-auth-hdr-2",
        "cookie: sid=literal-cookie-3",
        "x-api: env-secret-value-1",
        "file-secret-value-2",
        "api_key=literal-query-5",
    ] {
        assert!(echo_req.contains(want), "{want} not in {echo_req}");
    }
    assert!(
        sent.iter()
            .any(|r| r.starts_with("POST /hook?sig=url-secret-sig-3"))
    );
    // What they echoed back is masked in the stored tails.
    assert_eq!(jobs[0].output.trim(), "*** *** ***");
    assert!(jobs[1].output.contains("x-api: ***"), "{}", jobs[1].output);
    assert_eq!(run.blocks[1].jobs[0].output.trim(), "leaking ***");
    // The spec as shown: rule-hidden values masked, references as written.
    let shown = format!("{:?}", run.spec);
    assert!(
        shown.contains("api_token") && shown.contains("hook_url"),
        "{shown}"
    );

    // Every surface.
    let mut surfaces: Vec<(String, String)> = vec![("Status".into(), format!("{run:?}"))];
    let mut watched = String::new();
    while let Some(m) = grpc_watch.message().await.unwrap() {
        watched.push_str(&format!("{m:?}\n"));
    }
    assert!(watched.contains("failed"), "{watched}");
    surfaces.push(("Watch".into(), watched));
    let list = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    surfaces.push(("List".into(), format!("{list:?}")));
    let sse_text = sse_watch.await.unwrap();
    assert!(sse_text.contains("event: run"), "{sse_text}");
    surfaces.push(("SSE watch".into(), sse_text));
    for path in [format!("/v1/runs/{id}"), "/v1/runs".to_owned()] {
        let (code, body) = http_get_as(&server.addr, &path, Some(&token))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        surfaces.push((format!("GET {path}"), body));
    }
    for args in [
        vec!["status", id.as_str()],
        vec!["status", id.as_str(), "--json"],
        vec!["list"],
        vec!["list", "--json"],
    ] {
        let out = cli_as(Some(&token), &server.addr, &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        surfaces.push((format!("steward {}", args.join(" ")), text));
    }
    wait_for(&received, "run_failed", |(_, v)| v["event"] == "run_failed").await;
    let hooks_text = format!("{:?}", received.lock().unwrap());
    surfaces.push(("webhooks".into(), hooks_text));
    surfaces.push(("server log".into(), server.log_text()));
    if nix::unistd::Uid::effective().is_root() {
        assert!(
            server.log_text().contains("run_as is not set"),
            "a root server without run_as warns"
        );
    }

    for (name, text) in &surfaces {
        for v in SECRET_VALUES.iter().chain(LITERAL_VALUES) {
            assert!(!text.contains(v), "{v} on {name}:\n{text}");
        }
    }
    // The CLI's text and JSON show the masked spec and tails.
    let json = &surfaces
        .iter()
        .find(|(n, _)| n.ends_with("--json") && n.contains("status"))
        .unwrap()
        .1;
    assert!(json.contains("***"), "{json}");

    // At rest: the secret references' values are in no database file.
    let mut db = Vec::new();
    for f in ["steward.db", "steward.db-wal"] {
        if let Ok(bytes) = std::fs::read(data.join(f)) {
            db.extend(bytes);
        }
    }
    assert!(!db.is_empty());
    for v in SECRET_VALUES {
        assert!(
            !db.windows(v.len()).any(|w| w == v.as_bytes()),
            "{v} in the database"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_refuses_a_secret_the_node_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]).await;
    let mut c = server.client().await;
    let e = c
        .submit(pb::SubmitRequest {
            spec: Some(spec(
                "name: x\nblocks:\n  - jobs:\n      - {action: shell, args: {argv: [\"true\"], env: {P: {secret: nowhere}}}}\n",
            )),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("blocks[0].jobs[0].args.env.P")
            && e.message().contains("secret nowhere: not found"),
        "{}",
        e.message()
    );
    let list = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.runs.is_empty(), "{list:?}");
}

/// A job that knows a token still cannot reach the server: `http` jobs may not connect to
/// Steward's own listen address, and a shell job has no token of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cannot_call_the_server_that_runs_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let mut c = server.client().await;
    let responder = server.token("leaked", "responder");
    let localhost = server.addr.replace("127.0.0.1", "localhost");
    let id = submit_and_exec(
        &mut c,
        &format!(
            r#"
name: x
blocks:
  - max_failures: 3
    jobs:
      - action: http
        args:
          url: "http://{addr}/v1/estop"
          method: POST
          headers: {{Authorization: "Bearer {responder}", Content-Type: application/json}}
          body: '{{"target": "*", "state": "stop", "reason": "from a job"}}'
      - action: http
        args:
          url: "http://{localhost}/v1/estop"
          method: POST
          headers: {{Authorization: "Bearer {responder}"}}
          body: '{{"target": "*", "state": "stop", "reason": "from a job"}}'
      - {{action: shell, args: {{argv: [curl, -s, -o, /dev/null, -w, "%{{http_code}}", "http://{addr}/v1/runs"]}}}}
"#,
            addr = server.addr
        ),
    )
    .await;
    let run = wait_terminal(&mut c, &id, LONG).await;
    let jobs = &run.blocks[0].jobs;
    for j in &jobs[..2] {
        assert_eq!(j.state, "failed", "{j:?}");
        assert!(
            j.error
                .contains("is denied by http_deny (Steward's own listen address"),
            "{}",
            j.error
        );
        assert_eq!(j.attempts, 1, "a refusal is not retried");
    }
    // No token of its own: refused like a stranger.
    assert_eq!(jobs[2].output, "401", "{:?}", jobs[2]);
    let admin = server.admin_token().unwrap();
    let (code, entries) = http_get_as(&server.addr, "/v1/estop", Some(&admin))
        .await
        .unwrap();
    assert_eq!(code, 200, "{entries}");
    assert!(!entries.contains("from a job"), "{entries}");
}

/// `run_as` in the config, and per workflow in the policy file: the job's uid is that user's
/// (`id -u`), and it cannot read the server's data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_jobs_run_as_the_configured_user() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    if !nix::unistd::Uid::effective().is_root() {
        // Only root can switch users: a node that cannot is refused at start.
        let out = std::process::Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .env("STEWARD_AUTH", "none")
            .env("STEWARD_RUN_AS", "nobody")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("needs the server to run as root"),
            "{stderr}"
        );
        return;
    }
    // A user this node does not have: refused at start, naming the key.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .env("STEWARD_AUTH", "none")
        .env("STEWARD_RUN_AS", "no-such-user-here")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("run_as no-such-user-here: no user \"no-such-user-here\""),
        "{stderr}"
    );

    std::fs::write(
        data.join("policies.toml"),
        "[workflows.x]\n[workflows.daemon-work]\nrun_as = \"daemon\"\n",
    )
    .unwrap();
    let server = Server::start(
        &data,
        &[("STEWARD_RUN_AS", "nobody"), ("STEWARD_AUTH", "token")],
    )
    .await;
    let mut c = server.client().await;
    let uid = |name: &str| {
        nix::unistd::User::from_name(name)
            .unwrap()
            .unwrap()
            .uid
            .to_string()
    };
    let job = format!(
        "{{action: shell, args: {{argv: [sh, -c, \"id -u; cat {}/admin.token || echo unreadable\"]}}}}",
        data.display()
    );
    assert!(!server.log_text().contains("run_as is not set"));
    for (workflow, user) in [("x", "nobody"), ("daemon-work", "daemon")] {
        let id = submit_and_exec(
            &mut c,
            &format!("name: {workflow}\nblocks:\n  - jobs: [{job}]\n"),
        )
        .await;
        let run = wait_terminal(&mut c, &id, LONG).await;
        let out = &run.blocks[0].jobs[0].output;
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(uid(user).as_str()), "{out}");
        assert!(out.contains("unreadable") && !out.contains("stw_"), "{out}");
    }
}
