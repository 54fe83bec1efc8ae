#![allow(clippy::unwrap_used)]

//! The API end to end, in process: a node started by `Node::start` (the wiring `steward
//! serve` uses) on a real SQLite file in a temporary directory, listening on 127.0.0.1:0. gRPC
//! goes through a real tonic client over TCP; HTTP/JSON goes through the same router with
//! `tower::ServiceExt::oneshot` (the workspace's reqwest is built without a TLS provider), and
//! a plain HTTP/1.1 request over TCP checks that the one listener serves both. No mocks.
//!
//! Sections: the fixture; bad specs (a table, checked over gRPC, HTTP YAML and HTTP JSON);
//! Validate; the three-way handshake over gRPC; HTTP/JSON; health, readiness and metrics;
//! expiry.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use domain::RunId;
use engine::EngineOptions;
use proto::v1 as pb;
use proto::v1::steward_client::StewardClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

/// Generous: these tests run on small, busy machines.
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// One Steward node on 127.0.0.1:<ephemeral>, with a gRPC client and its router.
struct Server {
    /// The node's data directory.
    dir: tempfile::TempDir,
    /// Where the tests' jobs write (never the data directory: jobs may not write there).
    scratch: tempfile::TempDir,
    addr: SocketAddr,
    grpc: StewardClient<Channel>,
    /// The same router the listener serves, for HTTP calls through `tower::ServiceExt`.
    router: axum::Router,
    _node: node::Node,
}

async fn server() -> Server {
    server_with(|_| {}).await
}

/// The workflows the tests submit: a fresh node refuses those its policy file does not name.
const POLICIES: &str = "[workflows.t]\n[workflows.k]\n[workflows.x]\n[workflows.w]\n\
    [workflows.cloneme]\n[workflows.SatelliteDiskErase]\n[workflows.hello]\n[workflows.alpha]\n\
    [workflows.beta]\n[workflows.gamma]\n[workflows.JsonBody]\n[workflows.long]\n";

/// A node on the default configuration (a 200 ms kill grace) and [`POLICIES`], its engine
/// options given to `tune` last.
async fn server_with(tune: impl FnOnce(&mut EngineOptions)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policies.toml"), POLICIES).unwrap();
    let env = [
        ("STEWARD_KILL_GRACE".to_owned(), "200ms".to_owned()),
        // The tests of access control are in tests/auth.rs.
        ("STEWARD_AUTH".to_owned(), "none".to_owned()),
    ];
    let cfg = node::config::load(dir.path(), None, Some("127.0.0.1:0"), &env).unwrap();
    let node = node::Node::start_tuned(cfg, None, tune).await.unwrap();
    let addr = node.addr();
    let grpc = StewardClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Server {
        dir,
        scratch: tempfile::tempdir().unwrap(),
        addr,
        grpc,
        router: node.router(),
        _node: node,
    }
}

impl Server {
    fn grpc(&self) -> StewardClient<Channel> {
        self.grpc.clone()
    }

    /// A path in the test's scratch directory.
    fn file(&self, name: &str) -> std::path::PathBuf {
        self.scratch.path().join(name)
    }

    // --- gRPC helpers ---

    async fn submit(&self, yaml: &str) -> pb::SubmitResponse {
        self.grpc()
            .submit(pb::SubmitRequest {
                spec: Some(wire(yaml)),
                start: false,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn submit_id(&self, yaml: &str) -> String {
        self.submit(yaml).await.id
    }

    async fn exec(&self, id: &str) -> Result<pb::ExecResponse, tonic::Status> {
        self.grpc()
            .exec(pb::ExecRequest { id: id.into() })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn status(&self, id: &str) -> pb::Run {
        self.try_status(id).await.unwrap()
    }

    async fn try_status(&self, id: &str) -> Result<pb::Run, tonic::Status> {
        self.grpc()
            .status(pb::StatusRequest { id: id.into() })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn list(&self, req: pb::ListRequest) -> Result<pb::ListResponse, tonic::Status> {
        self.grpc().list(req).await.map(tonic::Response::into_inner)
    }

    /// The generated `Clone` call (not `Clone::clone`).
    async fn clone_run(&self, id: &str) -> Result<pb::SubmitResponse, tonic::Status> {
        StewardClient::clone(&mut self.grpc(), pb::CloneRequest { id: id.into() })
            .await
            .map(tonic::Response::into_inner)
    }

    /// The IDs a List returns (one page, which holds everything these tests create).
    async fn list_ids(&self, req: pb::ListRequest) -> BTreeSet<String> {
        let page = self.list(req).await.unwrap();
        assert_eq!(page.next_page_token, "", "one page holds everything here");
        page.runs.into_iter().map(|r| r.id).collect()
    }

    async fn run_count(&self) -> usize {
        self.list_ids(pb::ListRequest::default()).await.len()
    }

    /// Polls Status until `done` holds, for up to [`DEADLINE`].
    async fn wait_for(&self, id: &str, what: &str, done: impl Fn(&pb::Run) -> bool) -> pb::Run {
        let start = tokio::time::Instant::now();
        loop {
            let run = self.status(id).await;
            if done(&run) {
                return run;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "run {id}: still not {what} after {DEADLINE:?}: {run:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_terminal(&self, id: &str) -> pb::Run {
        self.wait_for(id, "terminal", |r| is_terminal(&r.state))
            .await
    }

    // --- HTTP helpers ---

    /// One HTTP request through the router: status, headers and body text.
    async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Vec<u8>>,
    ) -> (u16, axum::http::HeaderMap, String) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let mut req = axum::http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(axum::body::Body::from(body.into())).unwrap();
        let resp = tokio::time::timeout(DEADLINE, self.router.clone().oneshot(req))
            .await
            .expect("an HTTP answer")
            .unwrap();
        let code = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = tokio::time::timeout(DEADLINE, resp.into_body().collect())
            .await
            .expect("the whole HTTP body")
            .unwrap()
            .to_bytes();
        (code, headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn http_json(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<String>,
    ) -> (u16, Value) {
        let (code, _, text) = self.http(method, path, headers, body.into()).await;
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("HTTP {code}: body is not JSON ({e}): {text:?}"));
        (code, body)
    }

    async fn post(&self, path: &str, body: impl Into<String>) -> (u16, Value) {
        self.http_json("POST", path, &[], body).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.http_json("GET", path, &[], "").await
    }

    /// A plain HTTP/1.1 GET over TCP to the listener that also serves gRPC.
    async fn get_over_tcp(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        tokio::time::timeout(DEADLINE, conn.read_to_string(&mut raw))
            .await
            .expect("the server closes the connection")
            .unwrap();
        let code = raw
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 answer: {raw:?}"));
        let (_, body) = raw.split_once("\r\n\r\n").unwrap();
        (code, body.to_owned())
    }
}

/// A YAML spec as the protobuf `WorkReq`, through the proto3 JSON mapping.
fn wire(yaml: &str) -> pb::WorkReq {
    let value: Value = serde_norway::from_str(yaml).unwrap();
    serde_json::from_value(value)
        .unwrap_or_else(|e| panic!("spec not expressible as a WorkReq ({e}):\n{yaml}"))
}

fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "completed" | "failed" | "stopped" | "cancelled" | "expired"
    )
}

fn fields(violations: &[pb::FieldViolation]) -> Vec<&str> {
    violations.iter().map(|v| v.field.as_str()).collect()
}

/// The `field`s of the `violations` of an HTTP JSON error or ValidateResponse.
fn json_fields(body: &Value) -> Vec<String> {
    body["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("no violations array: {body}"))
        .iter()
        .map(|v| {
            assert!(
                v["description"].as_str().is_some_and(|d| !d.is_empty()),
                "a violation without a description: {body}"
            );
            v["field"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// `name: t` with one block holding `job` (a YAML flow mapping).
fn one_job(job: &str) -> String {
    format!("name: t\nblocks:\n  - jobs:\n      - {job}\n")
}

/// `job` as the second job of the second block: its paths start `blocks[1].jobs[1]`.
fn deep_job(job: &str) -> String {
    format!(
        "name: t\nblocks:\n  - jobs: [{{action: noop}}]\n  - concurrency: 2\n    jobs:\n      - {{action: noop}}\n      - {job}\n"
    )
}

const NOOP: &str = "name: hello\nblocks:\n  - jobs: [{action: noop}]\n";

// ---------------------------------------------------------------------------------------------
// Bad specs
// ---------------------------------------------------------------------------------------------

/// One bad spec and the field path its error must name.
struct Bad {
    what: &'static str,
    yaml: String,
    path: &'static str,
    /// Expressible as a `WorkReq` (gRPC, and HTTP `{"spec": ...}`).
    wire: bool,
}

fn bad(what: &'static str, yaml: impl Into<String>, path: &'static str) -> Bad {
    Bad {
        what,
        yaml: yaml.into(),
        path,
        wire: true,
    }
}

/// A case only a YAML/JSON document can express (syntax, unknown keys, wrong types).
fn bad_doc(what: &'static str, yaml: impl Into<String>, path: &'static str) -> Bad {
    Bad {
        wire: false,
        ..bad(what, yaml, path)
    }
}

fn bad_specs() -> Vec<Bad> {
    let block = "blocks: [{jobs: [{action: noop}]}]";
    vec![
        // --- the workflow ---
        bad("missing name", block, "name"),
        bad(
            "bad name characters",
            format!("name: 'bad name!'\n{block}"),
            "name",
        ),
        bad(
            "name not starting with a letter",
            format!("name: 9lives\n{block}"),
            "name",
        ),
        bad(
            "name too long",
            format!("name: {}\n{block}", "a".repeat(129)),
            "name",
        ),
        bad(
            "desc too long",
            format!("name: t\ndesc: {}\n{block}", "d".repeat(4097)),
            "desc",
        ),
        bad("no blocks", "name: t\n", "blocks"),
        bad("empty blocks", "name: t\nblocks: []\n", "blocks"),
        bad(
            "block with no jobs",
            "name: t\nblocks:\n  - jobs: [{action: noop}]\n  - jobs: []\n",
            "blocks[1].jobs",
        ),
        bad(
            "concurrency 0",
            "name: t\nblocks:\n  - concurrency: 0\n    jobs: [{action: noop}]\n",
            "blocks[0].concurrency",
        ),
        bad(
            "concurrency over the limit",
            "name: t\nblocks:\n  - concurrency: 10001\n    jobs: [{action: noop}]\n",
            "blocks[0].concurrency",
        ),
        bad(
            "bad label key",
            format!("name: t\nlabels: {{'bad key': x}}\n{block}"),
            "labels.bad key",
        ),
        bad(
            "label value with a control character",
            format!("name: t\nlabels: {{site: \"a\\x07b\"}}\n{block}"),
            "labels.site",
        ),
        bad_doc(
            "empty idempotency_key",
            format!("name: t\nidempotency_key: ''\n{block}"),
            "idempotency_key",
        ),
        bad(
            "idempotency_key too long",
            format!("name: t\nidempotency_key: {}\n{block}", "k".repeat(257)),
            "idempotency_key",
        ),
        // --- jobs ---
        bad(
            "missing action",
            deep_job("{desc: no action here}"),
            "blocks[1].jobs[1].action",
        ),
        bad(
            "unknown action",
            deep_job("{action: teleport}"),
            "blocks[1].jobs[1].action",
        ),
        bad(
            "invalid timeout",
            deep_job("{action: noop, timeout: soon}"),
            "blocks[1].jobs[1].timeout",
        ),
        bad(
            "zero timeout",
            deep_job("{action: noop, timeout: 0s}"),
            "blocks[1].jobs[1].timeout",
        ),
        bad(
            "retry attempts 0",
            deep_job("{action: noop, retry: {attempts: 0}}"),
            "blocks[1].jobs[1].retry.attempts",
        ),
        bad(
            "retry attempts over the limit",
            deep_job("{action: noop, retry: {attempts: 101}}"),
            "blocks[1].jobs[1].retry.attempts",
        ),
        bad(
            "retry max_backoff < initial_backoff",
            deep_job("{action: noop, retry: {attempts: 3, initial_backoff: 10s, max_backoff: 1s}}"),
            "blocks[1].jobs[1].retry.max_backoff",
        ),
        bad(
            "retry backoff not a duration",
            deep_job("{action: noop, retry: {attempts: 3, initial_backoff: later}}"),
            "blocks[1].jobs[1].retry.initial_backoff",
        ),
        // --- document-only: syntax, unknown keys, types ---
        bad_doc("not YAML at all", "name: [unclosed\n  : :\n", "spec"),
        bad_doc("a YAML list", "- name: t\n- blocks: []\n", "spec"),
        bad_doc("a bare scalar", "just some words\n", "spec"),
        bad_doc("an empty document", "", "spec"),
        bad_doc(
            "unknown top-level field",
            format!("name: t\nnmae: t\n{block}"),
            "nmae",
        ),
        bad_doc(
            "unknown block field",
            "name: t\nblocks:\n  - concurency: 2\n    jobs: [{action: noop}]\n",
            "blocks[0].concurency",
        ),
        bad_doc(
            "unknown job field",
            deep_job("{action: noop, arg: {x: y}}"),
            "blocks[1].jobs[1].arg",
        ),
        bad_doc(
            "wrong type: concurrency: five",
            "name: t\nblocks:\n  - concurrency: five\n    jobs: [{action: noop}]\n",
            "blocks[0].concurrency",
        ),
        bad_doc(
            "wrong type: labels is a list",
            format!("name: t\nlabels: [a, b]\n{block}"),
            "labels",
        ),
        bad_doc(
            "wrong type: timeout is a number",
            deep_job("{action: noop, timeout: 5}"),
            "blocks[1].jobs[1].timeout",
        ),
        // --- shell ---
        bad(
            "shell argv missing",
            deep_job("{action: shell, args: {cwd: /tmp}}"),
            "blocks[1].jobs[1].args.argv",
        ),
        bad(
            "shell without args",
            one_job("{action: shell}"),
            "blocks[0].jobs[0].args.argv",
        ),
        bad(
            "shell argv empty",
            deep_job("{action: shell, args: {argv: []}}"),
            "blocks[1].jobs[1].args.argv",
        ),
        bad(
            "shell argv with a non-string",
            deep_job("{action: shell, args: {argv: [sleep, 5]}}"),
            "blocks[1].jobs[1].args.argv",
        ),
        bad(
            "shell argv a string",
            deep_job("{action: shell, args: {argv: 'echo hi'}}"),
            "blocks[1].jobs[1].args.argv",
        ),
        bad(
            "shell empty program",
            deep_job("{action: shell, args: {argv: ['', x]}}"),
            "blocks[1].jobs[1].args.argv",
        ),
        bad(
            "shell cwd relative",
            deep_job("{action: shell, args: {argv: [true], cwd: some/dir}}"),
            "blocks[1].jobs[1].args.cwd",
        ),
        bad(
            "shell unknown arg",
            deep_job("{action: shell, args: {argv: [true], shell: bash}}"),
            "blocks[1].jobs[1].args.shell",
        ),
        bad(
            "shell env overrides a reserved variable",
            deep_job("{action: shell, args: {argv: [true], env: {STEWARD_RUN_ID: x}}}"),
            "blocks[1].jobs[1].args.env",
        ),
        // --- http ---
        bad(
            "http url missing",
            deep_job("{action: http, args: {method: GET}}"),
            "blocks[1].jobs[1].args.url",
        ),
        bad(
            "http url with a bad scheme",
            deep_job("{action: http, args: {url: 'ftp://example.com/x'}}"),
            "blocks[1].jobs[1].args.url",
        ),
        bad(
            "http url not a URL",
            deep_job("{action: http, args: {url: 'not a url'}}"),
            "blocks[1].jobs[1].args.url",
        ),
        bad(
            "http bad method",
            deep_job("{action: http, args: {url: 'http://127.0.0.1:9/', method: FETCH}}"),
            "blocks[1].jobs[1].args.method",
        ),
        bad(
            "http expect_status out of range",
            deep_job("{action: http, args: {url: 'http://127.0.0.1:9/', expect_status: 700}}"),
            "blocks[1].jobs[1].args.expect_status",
        ),
        bad(
            "http Idempotency-Key header set by hand",
            deep_job(
                "{action: http, args: {url: 'http://127.0.0.1:9/', headers: {Idempotency-Key: x}}}",
            ),
            "blocks[1].jobs[1].args.headers",
        ),
        // --- write_file ---
        bad(
            "write_file relative path",
            deep_job("{action: write_file, args: {path: out.txt, content: x}}"),
            "blocks[1].jobs[1].args.path",
        ),
        bad(
            "write_file missing content",
            deep_job("{action: write_file, args: {path: /tmp/steward-x}}"),
            "blocks[1].jobs[1].args.content",
        ),
        bad(
            "write_file bad mode",
            deep_job("{action: write_file, args: {path: /tmp/steward-x, content: x, mode: '999'}}"),
            "blocks[1].jobs[1].args.mode",
        ),
        bad(
            "write_file unquoted mode",
            deep_job("{action: write_file, args: {path: /tmp/steward-x, content: x, mode: 644}}"),
            "blocks[1].jobs[1].args.mode",
        ),
        // --- sleep, noop ---
        bad(
            "sleep missing duration",
            deep_job("{action: sleep}"),
            "blocks[1].jobs[1].args.duration",
        ),
        bad(
            "sleep bad duration",
            deep_job("{action: sleep, args: {duration: forever}}"),
            "blocks[1].jobs[1].args.duration",
        ),
        bad(
            "noop given an argument",
            deep_job("{action: noop, args: {x: y}}"),
            "blocks[1].jobs[1].args.x",
        ),
        // --- a JSON document is a spec too ---
        bad(
            "a JSON document",
            r#"{"name": "t", "blocks": [{"jobs": [{"action": "shell", "args": {"argv": []}}]}]}"#,
            "blocks[0].jobs[0].args.argv",
        ),
    ]
}

/// Submits `case` every way it can be written and checks each answer names `case.path`,
/// then that Validate says the same and that nothing was stored.
async fn check(s: &Server, case: &Bad) {
    let (what, path) = (case.what, case.path);

    // HTTP, the spec file as the body.
    let (code, body) = s.post("/v1/runs", case.yaml.clone()).await;
    assert_eq!(code, 400, "{what}: HTTP submit: {body}");
    assert_eq!(body["code"], "INVALID_ARGUMENT", "{what}: {body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(path), "{what}: message {message:?}");
    let got = json_fields(&body);
    assert!(
        got.iter().any(|f| f == path),
        "{what}: want {path}, got {got:?}"
    );

    // HTTP validate.
    let (code, body) = s.post("/v1/validate", case.yaml.clone()).await;
    assert_eq!(code, 200, "{what}: HTTP validate: {body}");
    assert_eq!(body["valid"], false, "{what}: {body}");
    let got = json_fields(&body);
    assert!(
        got.iter().any(|f| f == path),
        "{what}: validate: want {path}, got {got:?}"
    );

    if case.wire {
        let spec = wire(&case.yaml);

        // gRPC Submit.
        let err = s
            .grpc()
            .submit(pb::SubmitRequest {
                spec: Some(spec.clone()),
                start: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: gRPC: {err:?}");
        assert!(err.message().contains(path), "{what}: gRPC: {err:?}");

        // gRPC Validate.
        let v = s
            .grpc()
            .validate(pb::ValidateRequest {
                spec: Some(spec.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!v.valid, "{what}: gRPC validate");
        assert!(
            fields(&v.violations).contains(&path),
            "{what}: gRPC validate: want {path}, got {:?}",
            v.violations
        );

        // HTTP with the SubmitRequest message as JSON.
        let msg = serde_json::to_string(&pb::SubmitRequest {
            spec: Some(spec),
            start: false,
        })
        .unwrap();
        let (code, body) = s.post("/v1/runs", msg).await;
        assert_eq!(code, 400, "{what}: HTTP JSON submit: {body}");
        assert_eq!(body["code"], "INVALID_ARGUMENT", "{what}: {body}");
        let got = json_fields(&body);
        assert!(
            got.iter().any(|f| f == path),
            "{what}: JSON: want {path}, got {got:?}"
        );
    }

    assert_eq!(s.run_count().await, 0, "{what}: a bad spec stored a run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_rejected_naming_the_field_and_store_nothing() {
    let s = server().await;
    let cases = bad_specs();
    let kinds: BTreeSet<_> = cases.iter().map(|c| c.what).collect();
    assert_eq!(kinds.len(), cases.len(), "each case is a distinct kind");
    assert!(cases.len() >= 24);
    for case in &cases {
        check(&s, case).await;
    }
    let (code, body) = s.get("/v1/runs").await;
    assert_eq!(code, 200);
    assert_eq!(body["runs"], json!([]), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_and_unknown_field_errors_name_the_offending_key() {
    let s = server().await;
    for (yaml, key) in [
        (
            "name: t\nnmae: t\nblocks: [{jobs: [{action: noop}]}]\n",
            "nmae",
        ),
        (
            "name: t\nblocks:\n  - jobs: [{action: noop, arg: {x: y}}]\n",
            "arg",
        ),
        (
            "name: t\nblocks:\n  - concurrency: five\n    jobs: [{action: noop}]\n",
            "five",
        ),
    ] {
        let (code, body) = s.post("/v1/runs", yaml).await;
        assert_eq!(code, 400, "{body}");
        let described = body["violations"][0]["description"].as_str().unwrap();
        assert!(described.contains(key), "{key}: {body}");
    }
    assert_eq!(s.run_count().await, 0);
}

/// A spec with structural errors (names, counts, retry, timeout) and errors in the `args`
/// of several actions, and every path it must be rejected for.
const MANY_ERRORS: &str = "name: 'no spaces allowed'\nlabels: {'bad key': x}\nblocks:\n  - concurrency: 0\n    jobs:\n      - {action: teleport}\n      - {action: noop, timeout: 0s, retry: {attempts: 0}}\n  - jobs:\n      - {action: shell, args: {cwd: rel}}\n      - {action: write_file, args: {path: rel, mode: '9'}}\n      - {action: http, args: {url: 'gopher://x', method: FETCH}}\n  - jobs: []\n";
const MANY_ERRORS_STRUCTURAL: &[&str] = &[
    "name",
    "labels.bad key",
    "blocks[0].concurrency",
    "blocks[0].jobs[1].timeout",
    "blocks[0].jobs[1].retry.attempts",
    "blocks[2].jobs",
];
const MANY_ERRORS_ACTIONS: &[&str] = &[
    "blocks[0].jobs[0].action",
    "blocks[1].jobs[0].args.argv",
    "blocks[1].jobs[0].args.cwd",
    "blocks[1].jobs[1].args.path",
    "blocks[1].jobs[1].args.content",
    "blocks[1].jobs[1].args.mode",
    "blocks[1].jobs[2].args.url",
    "blocks[1].jobs[2].args.method",
];

fn set<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> BTreeSet<String> {
    items.into_iter().map(|s| s.as_ref().to_owned()).collect()
}

/// Submits `yaml` over HTTP (submit and validate) and answers the violated fields of each.
async fn http_violations(s: &Server, yaml: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (code, body) = s.post("/v1/runs", yaml).await;
    assert_eq!(code, 400, "{body}");
    let message = body["message"].as_str().unwrap().to_owned();
    let submit = set(json_fields(&body));
    for f in &submit {
        assert!(message.contains(f.as_str()), "{f} missing from {message:?}");
    }
    let (code, body) = s.post("/v1/validate", yaml).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["valid"], false);
    (submit, set(json_fields(&body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_of_a_spec_is_reported_at_once() {
    let s = server().await;
    let all = set(MANY_ERRORS_STRUCTURAL.iter().chain(MANY_ERRORS_ACTIONS));

    // gRPC: Submit names every field, Validate lists every one.
    let err = s
        .grpc()
        .submit(pb::SubmitRequest {
            spec: Some(wire(MANY_ERRORS)),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for w in &all {
        assert!(
            err.message().contains(w.as_str()),
            "{w} missing from {err:?}"
        );
    }
    let v = s
        .grpc()
        .validate(pb::ValidateRequest {
            spec: Some(wire(MANY_ERRORS)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(set(fields(&v.violations)), all);

    // HTTP with the SubmitRequest message.
    let msg = serde_json::to_string(&pb::SubmitRequest {
        spec: Some(wire(MANY_ERRORS)),
        start: false,
    })
    .unwrap();
    let (code, body) = s.post("/v1/runs", msg).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(set(json_fields(&body)), all);

    // HTTP with a file: several structural errors at once...
    let structural = "name: ''\nidempotency_key: ''\nblocks:\n  - concurrency: 0\n    jobs:\n      - {action: noop, retry: {attempts: 0, initial_backoff: 2s, max_backoff: 1s}}\n  - jobs: []\n";
    let want = set([
        "name",
        "idempotency_key",
        "blocks[0].concurrency",
        "blocks[0].jobs[0].retry.attempts",
        "blocks[0].jobs[0].retry.max_backoff",
        "blocks[1].jobs",
    ]);
    assert_eq!(http_violations(&s, structural).await, (want.clone(), want));
    // ...and several errors in the args of several jobs at once.
    let args = "name: t\nblocks:\n  - jobs:\n      - {action: teleport}\n      - {action: shell, args: {cwd: rel}}\n      - {action: write_file, args: {path: rel, mode: '9'}}\n  - jobs:\n      - {action: http, args: {url: 'gopher://x', method: FETCH}}\n";
    let want = set([
        "blocks[0].jobs[0].action",
        "blocks[0].jobs[1].args.argv",
        "blocks[0].jobs[1].args.cwd",
        "blocks[0].jobs[2].args.path",
        "blocks[0].jobs[2].args.content",
        "blocks[0].jobs[2].args.mode",
        "blocks[1].jobs[0].args.url",
        "blocks[1].jobs[0].args.method",
    ]);
    assert_eq!(http_violations(&s, args).await, (want.clone(), want));

    assert_eq!(s.run_count().await, 0);
}

/// A spec file over HTTP must get the same complete list as the same spec over gRPC: errors
/// in `args` must not be hidden until the structural ones are fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_reports_args_errors_alongside_structural_ones() {
    let s = server().await;
    let all = set(MANY_ERRORS_STRUCTURAL.iter().chain(MANY_ERRORS_ACTIONS));
    let (submit, validate) = http_violations(&s, MANY_ERRORS).await;
    assert_eq!(submit, all, "HTTP submit");
    assert_eq!(validate, all, "HTTP validate");
    assert_eq!(s.run_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_without_a_spec_is_invalid() {
    let s = server().await;
    let err = s
        .grpc()
        .submit(pb::SubmitRequest {
            spec: None,
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("spec"), "{err:?}");

    let v = s
        .grpc()
        .validate(pb::ValidateRequest { spec: None })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(fields(&v.violations), ["spec"]);

    // A body that is JSON but not a SubmitRequest.
    let (code, body) = s.post("/v1/runs", r#"{"spec": {"blocks": 7}}"#).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["code"], "INVALID_ARGUMENT");
    assert_eq!(s.run_count().await, 0);
}

// ---------------------------------------------------------------------------------------------
// Validate
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_checks_a_spec_and_stores_nothing() {
    let s = server().await;
    let good = format!(
        "name: SatelliteDiskErase\ndesc: Erase\nlabels: {{site: aap}}\nidempotency_key: erase-aap-1\nblocks:\n  - desc: preconditions\n    jobs:\n      - {{action: shell, args: {{argv: [echo, hi], env: {{A: b}}, cwd: /tmp}}}}\n      - {{action: write_file, args: {{path: '{}', content: x, mode: '0600'}}}}\n  - concurrency: 5\n    max_failures: 2\n    jobs:\n      - {{action: sleep, args: {{duration: 10ms}}, retry: {{attempts: 3, initial_backoff: 1s, max_backoff: 30s}}, timeout: 10m}}\n      - {{action: http, args: {{url: 'http://127.0.0.1:9/', method: post, headers: {{X-A: b}}, body: hi}}}}\n      - {{action: noop}}\n",
        s.file("out").display()
    );
    let bad = deep_job("{action: shell, args: {argv: []}}");

    let v = s
        .grpc()
        .validate(pb::ValidateRequest {
            spec: Some(wire(&good)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{:?}", v.violations);
    assert!(v.violations.is_empty());

    let v = s
        .grpc()
        .validate(pb::ValidateRequest {
            spec: Some(wire(&bad)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(fields(&v.violations), ["blocks[1].jobs[1].args.argv"]);
    assert!(!v.violations[0].description.is_empty());

    let (code, body) = s.post("/v1/validate", good.clone()).await;
    assert_eq!(code, 200);
    assert_eq!(
        body,
        json!({"valid": true, "violations": [], "policies": [
            {"policy": "workflows", "passed": true, "violations": []}
        ]})
    );

    let (code, body) = s.post("/v1/validate", bad).await;
    assert_eq!(code, 200);
    assert_eq!(body["valid"], false);
    assert_eq!(json_fields(&body), ["blocks[1].jobs[1].args.argv"]);

    // The SubmitRequest shape works for validate too.
    let msg = serde_json::to_string(&pb::SubmitRequest {
        spec: Some(wire(&good)),
        start: false,
    })
    .unwrap();
    let (code, body) = s.post("/v1/validate", msg).await;
    assert_eq!(code, 200);
    assert_eq!(body["valid"], true, "{body}");

    assert_eq!(s.run_count().await, 0, "validate stores nothing");
    assert!(!s.file("out").exists(), "validate runs nothing");
}

/// Numbers in `args` (`expect_status: 200`) must survive the trip through
/// `google.protobuf.Struct`, whose numbers are doubles: `steward submit` sends every spec
/// that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_args_survive_the_wire() {
    let s = server().await;
    let yaml =
        one_job("{action: http, args: {url: 'http://127.0.0.1:9/', expect_status: [200, 409]}}");
    let (code, body) = s.post("/v1/validate", yaml.clone()).await;
    assert_eq!(code, 200);
    assert_eq!(body["valid"], true, "the YAML is valid: {body}");

    // What `steward submit FILE` sends: the parsed file as a WorkReq.
    let spec = domain::WorkflowSpec::parse(&yaml).unwrap();
    let v = s
        .grpc()
        .validate(pb::ValidateRequest {
            spec: Some(api::convert::spec_to_wire(&spec)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{:?}", v.violations);
    let sub = s
        .grpc()
        .submit(pb::SubmitRequest {
            spec: Some(api::convert::spec_to_wire(&spec)),
            start: false,
        })
        .await;
    assert!(sub.is_ok(), "{sub:?}");

    // The same spec as an HTTP `{"spec": WorkReq}` body.
    let msg = json!({"spec": {"name": "t", "blocks": [{"jobs": [{"action": "http",
        "args": {"url": "http://127.0.0.1:9/", "expect_status": 204}}]}]}});
    let (code, body) = s.post("/v1/validate", msg.to_string()).await;
    assert_eq!(code, 200);
    assert_eq!(body["valid"], true, "{body}");
}

// ---------------------------------------------------------------------------------------------
// The three-way handshake, over gRPC
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_stores_without_running_and_exec_runs_it() {
    let s = server().await;
    let marker = s.file("marker");
    let yaml = format!(
        "name: hello\nlabels: {{site: aap}}\nblocks:\n  - jobs:\n      - {{action: write_file, args: {{path: '{}', content: ran}}}}\n",
        marker.display()
    );
    let sub = s.submit(&yaml).await;
    assert!(sub.created);
    assert!(sub.id.parse::<RunId>().is_ok(), "{}", sub.id);

    assert!(!marker.exists(), "Submit must not execute");
    let run = s.status(&sub.id).await;
    assert_eq!(run.state, "submitted");
    assert_eq!(run.id, sub.id);
    assert_eq!(run.name, "hello");
    assert_eq!(run.labels.get("site").map(String::as_str), Some("aap"));
    assert_eq!(run.started_at, "");
    assert_ne!(run.created_at, "");
    assert_ne!(run.expires_at, "");
    assert_eq!(run.blocks.len(), 1);
    let job = &run.blocks[0].jobs[0];
    assert_eq!(
        (job.action.as_str(), job.state.as_str(), job.attempts),
        ("write_file", "pending", 0)
    );
    assert_eq!(run.spec.as_ref().unwrap().name, "hello");

    // Only a submitted run is queued by Exec: nothing had started it since the Submit.
    let exec = s.exec(&sub.id).await.unwrap();
    assert_eq!(exec.id, sub.id);
    assert_eq!(exec.state, "queued", "Submit must not execute");

    let run = s.wait_terminal(&sub.id).await;
    assert_eq!(run.state, "completed", "{run:#?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ran");
    assert_ne!(run.started_at, "");
    assert_ne!(run.ended_at, "");
    let job = &run.blocks[0].jobs[0];
    assert_eq!((job.state.as_str(), job.attempts), ("completed", 1));
    assert_eq!(run.blocks[0].state, "completed");
    assert!(!job.idempotency_key.is_empty());
    assert_eq!(run.stop_cause, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_exec_is_already_exists_and_runs_nothing_again() {
    let s = server().await;
    let log = s.file("log");
    let yaml = one_job(&format!(
        "{{action: shell, args: {{argv: [sh, -c, 'echo ran >> {}']}}}}",
        log.display()
    ));
    let id = s.submit_id(&yaml).await;
    s.exec(&id).await.unwrap();
    // At once, while it is queued or running...
    let err = s.exec(&id).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let run = s.wait_terminal(&id).await;
    assert_eq!(run.state, "completed", "{run:#?}");
    // ...and once it is finished.
    let err = s.exec(&id).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("completed"), "{err:?}");

    // The run was terminal before that Exec, which was refused: nothing of it can run again.
    assert_eq!(lines(&log), 1, "the job ran exactly once");
    let run = s.status(&id).await;
    assert_eq!(run.state, "completed");
    assert_eq!(run.blocks[0].jobs[0].attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_gives_the_same_run() {
    let s = server().await;
    let yaml = "name: SatelliteDiskErase\nidempotency_key: erase-aap-1\nblocks:\n  - jobs: [{action: noop}]\n";
    let first = s.submit(yaml).await;
    assert!(first.created);
    let second = s.submit(yaml).await;
    assert_eq!(second.id, first.id);
    assert!(!second.created, "nothing new was stored");

    // The same over HTTP, and after the run has executed.
    s.exec(&first.id).await.unwrap();
    s.wait_terminal(&first.id).await;
    let (code, body) = s.post("/v1/runs", yaml).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"id": first.id, "created": false, "state": "completed"})
    );

    assert_eq!(s.run_count().await, 1);
    assert_eq!(s.status(&first.id).await.idempotency_key, "erase-aap-1");

    // A different key is a different run.
    let other = s.submit(&yaml.replace("erase-aap-1", "erase-aap-2")).await;
    assert!(other.created);
    assert_ne!(other.id, first.id);
    assert_eq!(s.run_count().await, 2);
}

async fn submit_start(s: &Server, yaml: &str) -> Result<pb::SubmitResponse, tonic::Status> {
    s.grpc()
        .submit(pb::SubmitRequest {
            spec: Some(wire(yaml)),
            start: true,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_with_start_runs_a_keyed_run_in_one_call_and_once() {
    let s = server().await;
    let keyed = "name: SatelliteDiskErase\nidempotency_key: erase-aap-7\nblocks:\n  - jobs: [{action: noop}, {action: noop}]\n";

    // Without a key the client could not find its run after a lost answer: refused, naming
    // the field, and nothing stored.
    let unkeyed = keyed.replace("idempotency_key: erase-aap-7\n", "");
    let err = submit_start(&s, &unkeyed).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("idempotency_key"),
        "{}",
        err.message()
    );
    assert_eq!(s.run_count().await, 0);

    let first = submit_start(&s, keyed).await.unwrap();
    assert!(first.created);
    assert_eq!(first.state, "queued");
    let run = s.wait_terminal(&first.id).await;
    assert_eq!(run.state, "completed");
    assert!(run.blocks[0].jobs.iter().all(|j| j.attempts == 1));

    // The same call again (a retry after a lost answer): the same run, nothing run again.
    let again = submit_start(&s, keyed).await.unwrap();
    assert_eq!(again.id, first.id);
    assert!(!again.created);
    assert_eq!(again.state, "completed");
    assert_eq!(s.run_count().await, 1);
    assert!(
        s.status(&first.id).await.blocks[0]
            .jobs
            .iter()
            .all(|j| j.attempts == 1)
    );
    // Exec of a run that started is what it always is.
    assert_eq!(
        s.exec(&first.id).await.unwrap_err().code(),
        tonic::Code::AlreadyExists
    );

    // A key submitted without starting is started by a Submit with start.
    let later = keyed.replace("erase-aap-7", "erase-aap-8");
    let submitted = s.submit(&later).await;
    assert_eq!(submitted.state, "submitted");
    let started = submit_start(&s, &later).await.unwrap();
    assert_eq!(started.id, submitted.id);
    assert!(!started.created);
    assert_eq!(started.state, "queued");
    assert_eq!(s.wait_terminal(&submitted.id).await.state, "completed");

    // A used key with a different spec is refused as for Submit.
    let err = submit_start(
        &s,
        &keyed.replace("{action: noop}]", "{action: noop}, {action: noop}]"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    // HTTP: ?start=true, and a bad value named.
    let third = keyed.replace("erase-aap-7", "erase-aap-9");
    let (code, body) = s.post("/v1/runs?start=true", third.clone()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["created"], json!(true));
    assert_eq!(body["state"], json!("queued"));
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_terminal(&id).await.state, "completed");
    let (code, body) = s
        .post(
            "/v1/runs?start=yes",
            keyed.replace("erase-aap-7", "erase-aap-10"),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("start"), "{body}");
    // The SubmitRequest envelope's own `start`.
    let envelope = json!({"spec": {"name": "SatelliteDiskErase", "idempotency_key": "erase-aap-11",
        "blocks": [{"jobs": [{"action": "noop"}]}]}, "start": true});
    let (code, body) = s.post("/v1/runs", envelope.to_string()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["state"], json!("queued"));
    let (code, body) = s.post("/v1/runs?start=true", unkeyed).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("idempotency_key"), "{body}");
    assert_eq!(s.run_count().await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_not_found_and_malformed_ids_are_invalid() {
    let s = server().await;
    let unknown = RunId::new_v7().to_string();
    let mut c = s.grpc();

    let not_found = [
        s.try_status(&unknown).await.unwrap_err(),
        s.exec(&unknown).await.unwrap_err(),
        c.cancel(pb::CancelRequest {
            id: unknown.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err(),
        s.clone_run(&unknown).await.unwrap_err(),
        c.watch(pb::WatchRequest {
            id: unknown.clone(),
        })
        .await
        .unwrap_err(),
    ];
    for err in not_found {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains(&unknown), "{err:?}");
    }

    for bad in ["", "nope", "12345", "0192f0c1-8a4e-7d2b-9f3a"] {
        let invalid = [
            s.try_status(bad).await.unwrap_err(),
            s.exec(bad).await.unwrap_err(),
            c.cancel(pb::CancelRequest {
                id: bad.into(),
                reason: String::new(),
            })
            .await
            .unwrap_err(),
            s.clone_run(bad).await.unwrap_err(),
            c.watch(pb::WatchRequest { id: bad.into() })
                .await
                .unwrap_err(),
        ];
        for err in invalid {
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        }
    }
    assert_eq!(s.run_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_submitted_run_cancels_it_for_good() {
    let s = server().await;
    let marker = s.file("marker");
    let yaml = one_job(&format!(
        "{{action: write_file, args: {{path: '{}', content: x}}}}",
        marker.display()
    ));
    let id = s.submit_id(&yaml).await;
    let mut req = tonic::Request::new(pb::CancelRequest {
        id: id.clone(),
        reason: "wrong site".into(),
    });
    // A name the client picks changes nothing: the caller is the token's (here, with tokens
    // off, `anonymous`).
    req.metadata_mut()
        .insert("x-steward-actor", "ana".parse().unwrap());
    let resp = s.grpc().cancel(req).await.unwrap().into_inner();
    assert_eq!(resp.id, id);
    assert_eq!(resp.state, "cancelled");

    let run = s.status(&id).await;
    assert_eq!(run.state, "cancelled");
    assert_ne!(run.ended_at, "");
    let cause = run.stop_cause.unwrap();
    assert_eq!(cause.kind, "cancelled");
    assert_eq!(
        cause.details.get("by").map(String::as_str),
        Some("anonymous")
    );
    assert_eq!(
        cause.details.get("reason").map(String::as_str),
        Some("wrong site")
    );
    assert!(cause.message.contains("wrong site"), "{cause:?}");

    // Finished: it cannot be executed, and cancelling again changes nothing.
    let err = s.exec(&id).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = s
        .grpc()
        .cancel(pb::CancelRequest {
            id: id.clone(),
            reason: "again".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let run = s.status(&id).await;
    assert_eq!(
        run.stop_cause
            .unwrap()
            .details
            .get("reason")
            .map(String::as_str),
        Some("wrong site"),
        "the first cause stays"
    );
    // Cancelled is terminal and Exec was refused: the job can never run.
    assert!(!marker.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_gives_a_new_submitted_run_with_the_same_spec() {
    let s = server().await;
    let log = s.file("log");
    let yaml = format!(
        "name: cloneme\nlabels: {{site: aap}}\nidempotency_key: once\nblocks:\n  - jobs:\n      - {{action: shell, args: {{argv: [sh, -c, 'echo ran >> {}']}}}}\n",
        log.display()
    );
    let old = s.submit_id(&yaml).await;
    s.exec(&old).await.unwrap();
    assert_eq!(s.wait_terminal(&old).await.state, "completed");

    let resp = s.clone_run(&old).await.unwrap();
    assert!(resp.created);
    assert_ne!(resp.id, old);
    let new = s.status(&resp.id).await;
    assert_eq!(new.state, "submitted");
    assert_eq!(new.cloned_from, old);
    assert_eq!(new.name, "cloneme");
    assert_eq!(new.labels, s.status(&old).await.labels);
    assert_eq!(
        new.idempotency_key, "",
        "the clone drops the idempotency key"
    );
    assert_eq!(new.blocks[0].jobs[0].state, "pending");
    assert_eq!(s.status(&old).await.cloned_from, "");

    // The clone is a run like any other: Exec runs it once more. Exec queues only a run that
    // is still submitted, so nothing ran the clone before it.
    assert_eq!(lines(&log), 1, "a clone is only submitted");
    let exec = s.exec(&resp.id).await.unwrap();
    assert_eq!(exec.state, "queued", "a clone is only submitted");
    let clone = s.wait_terminal(&resp.id).await;
    assert_eq!(clone.state, "completed");
    assert_eq!(clone.blocks[0].jobs[0].attempts, 1);
    assert_eq!(lines(&log), 2);

    // Submitting the original spec again still finds the original run.
    let again = s.submit(&yaml).await;
    assert_eq!((again.id.as_str(), again.created), (old.as_str(), false));
    assert_eq!(s.run_count().await, 2);
}

fn list_req(f: impl FnOnce(&mut pb::ListRequest)) -> pb::ListRequest {
    let mut r = pb::ListRequest::default();
    f(&mut r);
    r
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ids(items: &[&String]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_state_name_and_labels_and_pages() {
    let s = server().await;
    let spec = |name: &str, labels: &str| {
        format!("name: {name}\nlabels: {labels}\nblocks:\n  - jobs: [{{action: noop}}]\n")
    };
    let a = s.submit_id(&spec("alpha", "{site: aap}")).await;
    let b = s.submit_id(&spec("alpha", "{site: bbb}")).await;
    let c = s.submit_id(&spec("beta", "{site: aap, team: x}")).await;
    let d = s.submit_id(&spec("gamma", "{}")).await;
    let e = s.submit_id(&spec("gamma", "{}")).await;
    s.exec(&a).await.unwrap();
    assert_eq!(s.wait_terminal(&a).await.state, "completed");
    s.grpc()
        .cancel(pb::CancelRequest {
            id: c.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();

    let all = ids(&[&a, &b, &c, &d, &e]);
    assert_eq!(s.list_ids(pb::ListRequest::default()).await, all);
    let cases: Vec<(pb::ListRequest, BTreeSet<String>)> = vec![
        (
            list_req(|r| r.states = vec!["completed".into()]),
            ids(&[&a]),
        ),
        (
            list_req(|r| r.states = vec!["submitted".into()]),
            ids(&[&b, &d, &e]),
        ),
        (
            list_req(|r| r.states = vec!["submitted".into(), "cancelled".into()]),
            ids(&[&b, &c, &d, &e]),
        ),
        (
            list_req(|r| r.states = vec!["running".into()]),
            BTreeSet::new(),
        ),
        (list_req(|r| r.name = "alpha".into()), ids(&[&a, &b])),
        (list_req(|r| r.name = "nope".into()), BTreeSet::new()),
        (
            list_req(|r| r.labels = labels(&[("site", "aap")])),
            ids(&[&a, &c]),
        ),
        (
            list_req(|r| r.labels = labels(&[("site", "aap"), ("team", "x")])),
            ids(&[&c]),
        ),
        (
            list_req(|r| {
                r.name = "alpha".into();
                r.labels = labels(&[("site", "aap")]);
            }),
            ids(&[&a]),
        ),
        (
            list_req(|r| {
                r.states = vec!["submitted".into()];
                r.name = "gamma".into();
            }),
            ids(&[&d, &e]),
        ),
    ];
    for (req, want) in cases {
        assert_eq!(s.list_ids(req.clone()).await, want, "{req:?}");
    }

    // The summaries carry what a list view needs.
    let page = s
        .list(list_req(|r| r.states = vec!["cancelled".into()]))
        .await
        .unwrap();
    let run = &page.runs[0];
    assert_eq!(
        (run.name.as_str(), run.state.as_str()),
        ("beta", "cancelled")
    );
    assert_eq!(run.labels, labels(&[("site", "aap"), ("team", "x")]));
    assert_eq!(run.stop_cause.as_ref().unwrap().kind, "cancelled");

    // Paging: newest first, every run exactly once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = s
            .list(list_req(|r| {
                r.page_size = 2;
                r.page_token = token.clone();
            }))
            .await
            .unwrap();
        pages.push(page.runs.len());
        seen.extend(page.runs.into_iter().map(|r| r.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages.len() < 10, "paging does not end");
    }
    assert_eq!(pages, [2, 2, 1]);
    assert_eq!(
        seen,
        [&e, &d, &c, &b, &a].map(String::clone),
        "newest first, each once"
    );

    // Filters and paging together.
    let page = s
        .list(list_req(|r| {
            r.states = vec!["submitted".into()];
            r.page_size = 2;
        }))
        .await
        .unwrap();
    assert_eq!(page.runs.len(), 2);
    let rest = s
        .list(list_req(|r| {
            r.states = vec!["submitted".into()];
            r.page_size = 2;
            r.page_token = page.next_page_token.clone();
        }))
        .await
        .unwrap();
    assert_eq!(rest.runs.len(), 1);
    assert_eq!(rest.next_page_token, "");
    assert_eq!(rest.runs[0].id, b);

    // Bad requests.
    for req in [
        list_req(|r| r.states = vec!["bogus".into()]),
        list_req(|r| r.page_token = "not-a-token".into()),
        list_req(|r| r.page_size = 1001),
    ] {
        let err = s.list(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_the_run_until_it_is_terminal() {
    let s = server().await;
    let id = s
        .submit_id(
            "name: w\nblocks:\n  - jobs: [{action: sleep, args: {duration: 200ms}}]\n  - jobs: [{action: noop}]\n",
        )
        .await;
    let mut stream = s
        .grpc()
        .watch(pb::WatchRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.id.as_str(), first.state.as_str()),
        (id.as_str(), "submitted")
    );

    s.exec(&id).await.unwrap();
    let mut states = vec![first.state];
    let last = loop {
        let msg = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("Watch sends a change or ends")
            .unwrap();
        let Some(run) = msg else {
            panic!("the stream ended before a terminal state: {states:?}")
        };
        assert_eq!(run.id, id);
        states.push(run.state.clone());
        if is_terminal(&run.state) {
            break run;
        }
    };
    assert_eq!(last.state, "completed", "{states:?}");
    assert!(last.blocks.iter().all(|b| b.state == "completed"));
    // After the terminal state the stream ends.
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the stream ends after a terminal state")
        .unwrap();
    assert!(end.is_none(), "{end:?}");
    // Nothing after a terminal state, and no state goes back to `submitted`.
    assert_eq!(
        states.iter().filter(|s| is_terminal(s)).count(),
        1,
        "{states:?}"
    );
    assert!(!states[1..].contains(&"submitted".to_owned()), "{states:?}");

    // Watching a finished run gives it once, then ends.
    let mut stream = s
        .grpc()
        .watch(pb::WatchRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let only = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(only.state, "completed");
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_none());
}

// ---------------------------------------------------------------------------------------------
// HTTP/JSON
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_submit_exec_status_in_the_proto3_json_shape() {
    let s = server().await;
    let marker = s.file("marker");
    let yaml = format!(
        "name: SatelliteDiskErase\nlabels: {{site: aap}}\nblocks:\n  - jobs:\n      - {{action: write_file, desc: mark, args: {{path: '{}', content: x}}}}\n      - {{action: shell, args: {{argv: [sh, -c, 'echo hello; exit 0']}}}}\n",
        marker.display()
    );

    // A workflow file as the body.
    let (code, sub) = s.post("/v1/runs", yaml).await;
    assert_eq!(code, 200, "{sub}");
    assert_eq!(sub["created"], true);
    let id = sub["id"].as_str().unwrap().to_owned();

    let (code, run) = s.get(&format!("/v1/runs/{id}")).await;
    assert_eq!(code, 200, "{run}");
    assert_eq!(run["id"], id.as_str());
    assert_eq!(run["state"], "submitted");
    assert!(!marker.exists(), "Submit must not execute");

    // Only a submitted run is queued by Exec: nothing had started it since the Submit.
    let (code, exec) = s.post(&format!("/v1/runs/{id}/exec"), "").await;
    assert_eq!(code, 200, "{exec}");
    assert_eq!(
        exec,
        json!({"id": id, "state": "queued"}),
        "Submit must not execute"
    );

    s.wait_terminal(&id).await;
    let (code, run) = s.get(&format!("/v1/runs/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(run["state"], "completed", "{run}");
    assert_eq!(run["name"], "SatelliteDiskErase");
    assert_eq!(run["labels"], json!({"site": "aap"}));
    assert!(marker.exists());
    // snake_case field names, as in the .proto
    for key in [
        "created_at",
        "started_at",
        "ended_at",
        "expires_at",
        "idempotency_key",
        "cloned_from",
        "blocks",
        "spec",
    ] {
        assert!(run.get(key).is_some(), "no {key:?} in {run}");
    }
    for camel in ["stopCause", "createdAt", "clonedFrom"] {
        assert!(run.get(camel).is_none(), "camelCase {camel:?} in {run}");
    }
    // proto3 JSON: an unset message field may be left out; when given it is null.
    assert!(run.get("stop_cause").is_none_or(Value::is_null), "{run}");
    let jobs = run["blocks"][0]["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["action"], "write_file");
    assert_eq!(jobs[0]["desc"], "mark");
    assert_eq!(jobs[1]["action"], "shell");
    for job in jobs {
        assert_eq!(job["state"], "completed", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
        assert_eq!(job["error"], "", "{job}");
        assert!(
            job["idempotency_key"]
                .as_str()
                .is_some_and(|k| !k.is_empty())
        );
    }
    assert_eq!(jobs[1]["exit_code"], 0, "{}", jobs[1]);
    assert!(jobs[1]["output"].as_str().unwrap().contains("hello"));
    assert_eq!(run["spec"]["name"], "SatelliteDiskErase");

    // Exec again: ALREADY_EXISTS is 409 with the error shape.
    let (code, err) = s.post(&format!("/v1/runs/{id}/exec"), "").await;
    assert_eq!(code, 409, "{err}");
    assert_eq!(err["code"], "ALREADY_EXISTS");
    assert!(err["message"].as_str().unwrap().contains(&id));

    // The SubmitRequest message as JSON, WorkReq fields in snake_case.
    let msg = json!({"spec": {
        "name": "JsonBody",
        "labels": {"site": "aap"},
        "idempotency_key": "json-1",
        "blocks": [{"concurrency": 2, "jobs": [
            {"action": "noop", "timeout": "1m", "retry": {"attempts": 2, "initial_backoff": "1s", "max_backoff": "2s"}},
            {"action": "sleep", "args": {"duration": "10ms"}}
        ]}]
    }});
    let (code, sub) = s.post("/v1/runs", msg.to_string()).await;
    assert_eq!(code, 200, "{sub}");
    assert_eq!(sub["created"], true);
    let id2 = sub["id"].as_str().unwrap().to_owned();
    let (code, sub) = s.post("/v1/runs", msg.to_string()).await;
    assert_eq!(code, 200);
    assert_eq!(
        sub,
        json!({"id": id2, "created": false, "state": "submitted"})
    );
    let (_, exec) = s.post(&format!("/v1/runs/{id2}/exec"), "").await;
    assert_eq!(exec["state"], "queued");
    let run = s.wait_terminal(&id2).await;
    assert_eq!(run.state, "completed");
    assert_eq!(run.idempotency_key, "json-1");
    let spec = run.spec.unwrap();
    assert_eq!(spec.blocks[0].concurrency, Some(2));
    assert_eq!(spec.blocks[0].jobs[0].timeout, "1m");
    assert_eq!(spec.blocks[0].jobs[0].retry.as_ref().unwrap().attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_list_cancel_clone_and_errors() {
    let s = server().await;
    let spec = |name: &str, labels: &str, job: &str| {
        format!("name: {name}\nlabels: {labels}\nblocks:\n  - jobs: [{job}]\n")
    };
    let a = s
        .submit_id(&spec("alpha", "{site: aap}", "{action: noop}"))
        .await;
    let b = s
        .submit_id(&spec("alpha", "{site: bbb}", "{action: noop}"))
        .await;
    let c = s
        .submit_id(&spec("beta", "{site: aap}", "{action: noop}"))
        .await;
    let long = s
        .submit_id(&spec(
            "long",
            "{site: aap}",
            "{action: sleep, args: {duration: 60s}}",
        ))
        .await;
    for id in [&a, &b] {
        s.post(&format!("/v1/runs/{id}/exec"), "").await;
        assert_eq!(s.wait_terminal(id).await.state, "completed");
    }

    let listed = |body: &Value| -> BTreeSet<String> {
        body["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (code, body) = s.get("/v1/runs?state=completed&label=site=aap").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(listed(&body), ids(&[&a]));
    assert_eq!(body["next_page_token"], "");
    let r = &body["runs"][0];
    assert_eq!(r["name"], "alpha");
    assert_eq!(r["state"], "completed");
    assert!(
        r["created_at"].as_str().is_some_and(|t| !t.is_empty()),
        "{r}"
    );
    assert!(r.get("stop_cause").is_none_or(Value::is_null), "{r}");

    let (_, body) = s.get("/v1/runs?state=submitted,completed&name=alpha").await;
    assert_eq!(listed(&body), ids(&[&a, &b]));
    let (_, body) = s.get("/v1/runs?label=site=aap").await;
    assert_eq!(listed(&body), ids(&[&a, &c, &long]));
    let (_, body) = s.get("/v1/runs?state=submitted").await;
    assert_eq!(listed(&body), ids(&[&c, &long]));

    // Paging over HTTP.
    let (_, page1) = s.get("/v1/runs?page_size=3").await;
    assert_eq!(page1["runs"].as_array().unwrap().len(), 3);
    let token = page1["next_page_token"].as_str().unwrap();
    assert!(!token.is_empty());
    let (_, page2) = s
        .get(&format!("/v1/runs?page_size=3&page_token={token}"))
        .await;
    assert_eq!(page2["next_page_token"], "");
    let mut both = listed(&page1);
    both.extend(listed(&page2));
    assert_eq!(both, ids(&[&a, &b, &c, &long]));

    // Bad list queries.
    for q in [
        "state=bogus",
        "label=noequals",
        "colour=red",
        "page_size=-1",
        "page_token=xyz",
    ] {
        let (code, body) = s.get(&format!("/v1/runs?{q}")).await;
        assert_eq!(code, 400, "{q}: {body}");
        assert_eq!(body["code"], "INVALID_ARGUMENT", "{q}: {body}");
    }

    // Cancel a running run, with a reason and an actor.
    s.post(&format!("/v1/runs/{long}/exec"), "").await;
    s.wait_for(&long, "running its job", |r| {
        r.blocks[0].jobs[0].state == "running"
    })
    .await;
    let (code, body) = s
        .http_json(
            "POST",
            &format!("/v1/runs/{long}/cancel"),
            &[("x-steward-actor", "ana")],
            r#"{"reason":"x"}"#,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["id"], long.as_str());
    let run = s.wait_terminal(&long).await;
    assert_eq!(run.state, "cancelled", "{run:#?}");
    assert_eq!(run.blocks[0].jobs[0].state, "cancelled");
    let (_, run) = s.get(&format!("/v1/runs/{long}")).await;
    assert_eq!(run["stop_cause"]["kind"], "cancelled", "{run}");
    assert_eq!(run["stop_cause"]["details"]["reason"], "x", "{run}");
    assert_eq!(run["stop_cause"]["details"]["by"], "anonymous", "{run}");
    assert!(run["stop_cause"]["message"].as_str().unwrap().contains('x'));
    let (_, body) = s.get("/v1/runs?state=cancelled").await;
    assert_eq!(body["runs"][0]["id"], long.as_str(), "{body}");
    assert_eq!(body["runs"][0]["stop_cause"]["kind"], "cancelled", "{body}");

    // Cancel a submitted run with an empty body; cancel a finished one: 409.
    let (code, body) = s.post(&format!("/v1/runs/{c}/cancel"), "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, json!({"id": c, "state": "cancelled"}));
    let (code, body) = s.post(&format!("/v1/runs/{a}/cancel"), "{}").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["code"], "FAILED_PRECONDITION");
    let (code, body) = s
        .post(&format!("/v1/runs/{b}/cancel"), r#"{"reasn":"typo"}"#)
        .await;
    assert_eq!(code, 400, "{body}");

    // Clone.
    let (code, body) = s.post(&format!("/v1/runs/{a}/clone"), "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["created"], true);
    let clone = body["id"].as_str().unwrap().to_owned();
    let (_, run) = s.get(&format!("/v1/runs/{clone}")).await;
    assert_eq!(run["state"], "submitted");
    assert_eq!(run["cloned_from"], a.as_str());

    // Unknown and malformed IDs.
    let unknown = RunId::new_v7().to_string();
    for (code_want, name, path) in [
        (404, "NOT_FOUND", format!("/v1/runs/{unknown}")),
        (400, "INVALID_ARGUMENT", "/v1/runs/not-an-id".to_owned()),
    ] {
        let (code, body) = s.get(&path).await;
        assert_eq!(code, code_want, "{path}: {body}");
        assert_eq!(body["code"], name, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(body["violations"], json!([]), "{body}");
    }
    for action in ["exec", "cancel", "clone"] {
        let (code, body) = s.post(&format!("/v1/runs/{unknown}/{action}"), "").await;
        assert_eq!(code, 404, "{action}: {body}");
        assert_eq!(body["code"], "NOT_FOUND");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_watch_sends_server_sent_events_until_terminal() {
    let s = server().await;
    let id = s.submit_id(NOOP).await;
    s.exec(&id).await.unwrap();
    s.wait_terminal(&id).await;
    let (code, headers, text) = s
        .http("GET", &format!("/v1/runs/{id}/watch"), &[], "")
        .await;
    assert_eq!(code, 200, "{text}");
    let ct = headers[axum::http::header::CONTENT_TYPE].to_str().unwrap();
    assert!(ct.starts_with("text/event-stream"), "{ct:?}");
    assert!(text.contains("event: run"), "{text}");
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let run: Value = serde_json::from_str(data).unwrap();
    assert_eq!(run["id"], id.as_str());
    assert_eq!(run["state"], "completed");
}

// ---------------------------------------------------------------------------------------------
// Health, readiness, metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let s = server().await;
    // Over TCP: the listener that serves gRPC serves plain HTTP/1.1 too.
    let (code, text) = s.get_over_tcp("/healthz").await;
    assert_eq!(code, 200, "{text}");
    let (code, text) = s.get_over_tcp("/readyz").await;
    assert_eq!(code, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], "ready", "{body}");

    let (code, body) = s.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "ready", "{body}");
    let containment = body["job_containment"].as_str().unwrap_or_default();
    assert!(
        containment.starts_with("cgroup") || containment.starts_with("process_group"),
        "{body}"
    );

    let (code, _, text) = s.http("GET", "/metrics", &[], "").await;
    assert_eq!(code, 200);
    assert!(text.lines().any(|l| l == "steward_up 1"), "{text}");
    assert!(text.contains("steward_accepting_work 1"), "{text}");

    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["steward.v1.Steward", ""] {
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

// ---------------------------------------------------------------------------------------------
// Expiry
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_after_the_submit_ttl_is_failed_precondition_and_expires_the_run() {
    let s = server_with(|o| o.submit_ttl = Duration::from_millis(100)).await;
    let marker = s.file("marker");
    let id = s
        .submit_id(&one_job(&format!(
            "{{action: write_file, args: {{path: '{}', content: x}}}}",
            marker.display()
        )))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = s.exec(&id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let run = s.status(&id).await;
    assert_eq!(run.state, "expired");
    assert_eq!(run.stop_cause.unwrap().kind, "expired");
    // Still expired, and never run: a second Exec changes nothing.
    let err = s.exec(&id).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::FailedPrecondition | Code::AlreadyExists),
        "{err:?}"
    );
    let (code, body) = s.post(&format!("/v1/runs/{id}/exec"), "").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(s.status(&id).await.state, "expired");
    // Expired is terminal and every Exec was refused: the job can never run.
    assert!(!marker.exists());
}

/// The contract (docs/api.md) does not depend on who noticed the TTL first: when the
/// background sweep has already marked the run `expired`, Exec must still answer
/// FAILED_PRECONDITION, not ALREADY_EXISTS (which tells a client its work was executed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_after_the_sweep_expired_the_run_is_still_failed_precondition() {
    let s = server_with(|o| {
        o.submit_ttl = Duration::from_millis(100);
        o.expire_interval = Duration::from_millis(50);
    })
    .await;
    let id = s.submit_id(NOOP).await;
    s.wait_for(&id, "expired by the sweep", |r| r.state == "expired")
        .await;
    let err = s.exec(&id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let (code, body) = s.post(&format!("/v1/runs/{id}/exec"), "").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["code"], "FAILED_PRECONDITION", "{body}");
}

// ---------------------------------------------------------------------------------------------
// Hostile input: each gets its clear error at once, and the server goes on serving
// ---------------------------------------------------------------------------------------------

/// One hostile request over HTTP and the answer it must get.
struct Hostile {
    what: &'static str,
    method: &'static str,
    path: String,
    body: Vec<u8>,
    code: u16,
    says: &'static str,
}

fn hostile(
    what: &'static str,
    method: &'static str,
    path: impl Into<String>,
    body: impl Into<Vec<u8>>,
    code: u16,
    says: &'static str,
) -> Hostile {
    Hostile {
        what,
        method,
        path: path.into(),
        body: body.into(),
        code,
        says,
    }
}

/// With `auth = "none"`, a web page of any site could otherwise make the browser of someone
/// on the server's machine run a job: a cross-site `text/plain` POST needs no permission from
/// anyone, and a name the page's owner points at 127.0.0.1 makes the page the server's own
/// origin. Every such request is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_of_another_site_cannot_use_the_api() {
    let s = server().await;
    let here = s.addr.to_string();
    let run = |key: &str| {
        format!(
            r#"{{"spec": {{"name": "hello", "idempotency_key": "{key}", "blocks": [{{"jobs": [{{"action": "noop", "args": {{}}}}]}}]}}}}"#
        )
    };
    let plain = ("content-type", "text/plain;charset=UTF-8");
    let rebound = format!("rebind.evil.example:{}", s.addr.port());
    let rebound_origin = format!("http://{rebound}");
    type Headers<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(&str, Headers<'_>, &str)> = vec![
        (
            "a cross-site POST",
            vec![
                plain,
                ("host", &here),
                ("sec-fetch-site", "cross-site"),
                ("origin", "http://evil.example"),
            ],
            "Sec-Fetch-Site: cross-site",
        ),
        (
            "a same-site POST",
            vec![plain, ("host", &here), ("sec-fetch-site", "same-site")],
            "Sec-Fetch-Site: same-site",
        ),
        (
            "a POST from another origin, no Sec-Fetch-Site",
            vec![plain, ("host", &here), ("origin", "http://evil.example")],
            r#"a page of \"http://evil.example\""#,
        ),
        (
            "a POST from an opaque origin",
            vec![plain, ("host", &here), ("origin", "null")],
            r#"a page of \"null\""#,
        ),
        (
            "a POST through a rebound name",
            vec![
                plain,
                ("host", &rebound),
                ("sec-fetch-site", "same-origin"),
                ("origin", &rebound_origin),
            ],
            r#"addressed to host \"rebind.evil.example:"#,
        ),
    ];
    for (what, headers, says) in &cases {
        let (code, _, body) = s
            .http("POST", "/v1/runs?start=true", headers, run(what))
            .await;
        assert_eq!(code, 403, "{what}: {body}");
        assert!(
            body.contains(says),
            "{what}: the answer must say {says:?}: {body}"
        );
    }
    let (code, _, body) = s
        .http(
            "POST",
            "/v1/estop",
            &[plain, ("host", &here), ("sec-fetch-site", "cross-site")],
            r#"{"target": "*", "state": "stop", "reason": "x"}"#,
        )
        .await;
    assert_eq!(code, 403, "{body}");
    // Nor call gRPC, whose content type a page of the server's own origin may send.
    let (code, headers, _) = s
        .http(
            "POST",
            "/steward.v1.Steward/Submit",
            &[("content-type", "application/grpc"), ("host", &rebound)],
            vec![0u8, 0, 0, 0, 0],
        )
        .await;
    assert_eq!(code, 200, "a gRPC answer");
    assert_eq!(
        headers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("7"),
        "PERMISSION_DENIED: {headers:?}"
    );
    // A rebound page cannot read either, and the console is not its way in.
    for path in ["/v1/runs", "/"] {
        let (code, _, body) = s.http("GET", path, &[("host", &rebound)], "").await;
        assert_eq!(code, 403, "GET {path}: {body}");
    }
    assert_eq!(s.run_count().await, 0, "nothing was stored");
    let (_, estop) = s.get("/v1/estop").await;
    assert_eq!(
        estop["entries"].as_array().map(Vec::len),
        Some(1),
        "the e-stop is unchanged: {estop}"
    );
    assert_eq!(estop["entries"][0]["state"], "go", "{estop}");

    // What is not a page of another site goes through: the server's own origin, a link
    // followed from elsewhere (a cross-site GET), a client that sends none of these headers,
    // and probes addressed by any name.
    let own = format!("http://{here}");
    let (code, _, body) = s
        .http(
            "POST",
            "/v1/runs",
            &[
                plain,
                ("host", &here),
                ("sec-fetch-site", "same-origin"),
                ("origin", &own),
            ],
            run("own"),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = s
        .http(
            "POST",
            "/v1/runs",
            &[("host", &format!("localhost:{}", s.addr.port()))],
            run("client"),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = s
        .http(
            "GET",
            "/v1/runs",
            &[("host", &here), ("sec-fetch-site", "cross-site")],
            "",
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = s.http("GET", "/healthz", &[("host", &rebound)], "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(s.run_count().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_input_gets_a_clear_error_at_once() {
    let s = server().await;
    let deep = 100_000;
    // The longest URI the HTTP stack takes is 64 KiB.
    let long_id = "0".repeat(60 * 1024);
    let cases = vec![
        hostile(
            "JSON nested 10^5 deep",
            "POST",
            "/v1/runs",
            format!("{}{}", "[".repeat(deep), "]".repeat(deep)),
            400,
            "the limit is 64",
        ),
        hostile(
            "YAML flow nested 10^5 deep",
            "POST",
            "/v1/runs",
            format!(
                "name: x\nblocks: {}{}",
                "{a: ".repeat(deep),
                "}".repeat(deep)
            ),
            400,
            "the limit is 64",
        ),
        hostile(
            "a spec envelope nested 10^5 deep",
            "POST",
            "/v1/validate",
            format!(
                "{{\"spec\": {{\"name\": \"x\", \"labels\": {}1{}}}}}",
                "{\"a\": ".repeat(deep),
                "}".repeat(deep)
            ),
            200,
            "the limit is 64",
        ),
        hostile(
            "a typo in a path",
            "POST",
            "/v1/estop/set",
            "{}",
            404,
            "no such path",
        ),
        hostile(
            "an unknown path",
            "GET",
            "/v1/nope",
            "",
            404,
            "no such path",
        ),
        hostile(
            "the root of a gRPC service",
            "GET",
            "/steward.v1.Steward/Status",
            "",
            404,
            "no such path",
        ),
        hostile(
            "a 60 KB run ID",
            "GET",
            format!("/v1/runs/{long_id}"),
            "",
            400,
            "the limit is 64",
        ),
        hostile(
            "a 1 MB cancel reason",
            "POST",
            "/v1/runs/0192f0c1-8a4e-7d2b-9f3a-1c2d3e4f5a6b/cancel",
            format!("{{\"reason\": \"{}\"}}", "r".repeat(1 << 20)),
            400,
            "reason: is 1048576 bytes; the limit is 1024",
        ),
        hostile(
            "a label key with a backslash and quotes in a List filter",
            "GET",
            "/v1/runs?label=a%5C%22b=c",
            "",
            200,
            "",
        ),
        hostile(
            "a body of 10 MiB",
            "POST",
            "/v1/runs",
            vec![b' '; 10 << 20],
            413,
            "larger than the limit of 9 MiB",
        ),
        hostile(
            "a body that is not UTF-8",
            "POST",
            "/v1/runs",
            b"name: \xff\xfe".to_vec(),
            400,
            "the request body is not UTF-8 text",
        ),
        hostile(
            "an Alertmanager payload that is not UTF-8",
            "POST",
            "/v1/alerts/alertmanager",
            b"{\"alerts\": \"\xc3\"}".to_vec(),
            400,
            "the request body is not UTF-8 text",
        ),
        hostile(
            "a 10 KB label key in a List filter",
            "GET",
            format!("/v1/runs?label={}=c", "k".repeat(10_240)),
            "",
            400,
            "the limit is 63",
        ),
        hostile(
            "a spec envelope over the spec's limit",
            "POST",
            "/v1/runs",
            format!(
                r#"{{"spec": {{"name": "x", "desc": "{}", "blocks": [{{"jobs": [{{"action": "noop"}}]}}]}}}}"#,
                "d".repeat(8 * 1024 * 1024 + 1000)
            ),
            400,
            "(as a protobuf message); the limit is 8388608",
        ),
        hostile(
            "a 20 KB label filter without =",
            "GET",
            format!("/v1/runs?label={}", "x".repeat(20_000)),
            "",
            400,
            "is not of the form key=value",
        ),
        hostile(
            "an unknown query parameter of 20 KB",
            "GET",
            format!("/v1/runs?{}=1", "q".repeat(20_000)),
            "",
            400,
            "unknown field",
        ),
        hostile(
            "a page size that is not a number, 20 KB of it",
            "GET",
            format!("/v1/runs?page_size={}", "n".repeat(20_000)),
            "",
            400,
            "page_size",
        ),
        hostile(
            "a state of 60 KB in a List filter",
            "GET",
            format!("/v1/runs?state={}", "s".repeat(60 * 1024)),
            "",
            400,
            "(61440 bytes)",
        ),
    ];
    for c in cases {
        let started = std::time::Instant::now();
        let (code, _, body) = s.http(c.method, &c.path, &[], c.body.clone()).await;
        let took = started.elapsed();
        assert_eq!(
            code,
            c.code,
            "{}: HTTP {code}: {}",
            c.what,
            &body[..body.len().min(300)]
        );
        assert!(
            body.contains(c.says),
            "{}: the answer must say {:?}: {}",
            c.what,
            c.says,
            &body[..body.len().min(300)]
        );
        assert!(
            body.len() < 4096,
            "{}: the answer echoes the input: {} bytes",
            c.what,
            body.len()
        );
        if code != 200 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert!(
                v["code"].is_string() && v["message"].is_string(),
                "{}: {v}",
                c.what
            );
        }
        assert!(took < Duration::from_secs(2), "{}: took {took:?}", c.what);
    }
    // The same spec as a gRPC message.
    let mut big = wire("name: x\nblocks:\n  - jobs: [{action: noop}]\n");
    big.desc = "d".repeat(8 * 1024 * 1024 + 1000);
    let err = s
        .grpc()
        .submit(pb::SubmitRequest {
            spec: Some(big),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("the limit is 8388608"),
        "{}",
        err.message()
    );
    // And it still serves.
    let (code, _, _) = s.http("GET", "/healthz", &[], "").await;
    assert_eq!(code, 200);
    assert_eq!(s.run_count().await, 0, "none of it stored anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_grpc_input_gets_a_clear_error_at_once() {
    let s = server().await;
    let long_id = "0".repeat(87 * 1024);
    let err = s.try_status(&long_id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() < 200, "{}", err.message().len());
    let err = s
        .grpc()
        .cancel(pb::CancelRequest {
            id: "0192f0c1-8a4e-7d2b-9f3a-1c2d3e4f5a6b".into(),
            reason: "r".repeat(1 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("the limit is 1024"),
        "{}",
        err.message()
    );
    let page = s
        .list(list_req(|r| {
            r.labels.insert("a\\\"b".into(), "c".into());
        }))
        .await
        .unwrap();
    assert!(page.runs.is_empty());
}

/// Submit with a used idempotency key: the same spec gets the same run; a different spec is
/// refused with 409, naming the key and the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_idempotency_key_with_another_spec_is_refused() {
    let s = server().await;
    let yaml = "name: k\nidempotency_key: key-1\nblocks:\n  - jobs: [{action: noop}]\n";
    let (code, first) = s.post("/v1/runs", yaml).await;
    assert_eq!(code, 200, "{first}");
    let (code, again) = s.post("/v1/runs", yaml).await;
    assert_eq!(
        (code, &again["id"], &again["created"]),
        (200, &first["id"], &json!(false))
    );
    let (code, err) = s
        .post("/v1/runs", yaml.replace("noop}", "noop, desc: other}"))
        .await;
    assert_eq!(code, 409, "{err}");
    assert_eq!(err["code"], "ALREADY_EXISTS");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("\"key-1\"") && msg.contains(first["id"].as_str().unwrap()),
        "{msg}"
    );
    assert_eq!(s.run_count().await, 1);
}

/// A job cannot switch off its own guardrails: `write_file` to the policy file or into the
/// data directory is refused at Submit, naming the field; through a symlink an earlier job
/// made, it is refused when it runs and the file is untouched; setuid, setgid and sticky
/// modes are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_file_cannot_touch_stewards_own_files() {
    let s = server().await;
    let data = s.dir.path().to_owned();
    let write = |path: &std::path::Path, mode: &str| {
        format!(
            "name: t\nblocks:\n  - jobs: [{{action: write_file, args: {{path: {}, content: x, mode: \"{mode}\"}}}}]\n",
            path.display()
        )
    };
    for (path, mode, want) in [
        (data.join("policies.toml"), "0644", "the policy file"),
        (data.join("estop.json"), "0644", "the e-stop file"),
        (data.join("new-file"), "0644", "data directory"),
        (data.join("sub/../steward.db"), "0644", "data directory"),
        (
            std::env::temp_dir().join("steward-setuid"),
            "4755",
            "setuid",
        ),
        (
            std::env::temp_dir().join("steward-sticky"),
            "1777",
            "sticky",
        ),
    ] {
        let err = s
            .grpc()
            .submit(pb::SubmitRequest {
                spec: Some(wire(&write(&path, mode))),
                start: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path:?}: {err:?}");
        assert!(
            err.message().contains(want) && err.message().contains("blocks[0].jobs[0].args"),
            "{path:?}: {}",
            err.message()
        );
    }
    assert_eq!(s.run_count().await, 0, "nothing was stored");

    // Through a symlink made by an earlier job of the same run.
    let scratch = tempfile::tempdir().unwrap();
    let link = scratch.path().join("link");
    let before = std::fs::read(data.join("estop.json")).unwrap();
    let yaml = format!(
        "name: t\nblocks:\n  - jobs: [{{action: shell, args: {{argv: [ln, -s, {data}, {link}]}}}}]\n  - jobs: [{{action: write_file, args: {{path: {target}, content: '{{\"entries\": []}}'}}}}]\n",
        data = data.display(),
        link = link.display(),
        target = link.join("estop.json").display(),
    );
    let id = s.submit_id(&yaml).await;
    s.exec(&id).await.unwrap();
    let run = s.wait_terminal(&id).await;
    assert_eq!(run.state, "failed", "{run:#?}");
    let job = &run.blocks[1].jobs[0];
    assert!(
        job.error.contains("refused") && job.error.contains("e-stop file"),
        "{job:?}"
    );
    assert_eq!(std::fs::read(data.join("estop.json")).unwrap(), before);

    // Elsewhere, writes work.
    let ok = scratch.path().join("ok.txt");
    let id = s.submit_id(&write(&ok, "0640")).await;
    s.exec(&id).await.unwrap();
    assert_eq!(s.wait_terminal(&id).await.state, "completed");
    assert_eq!(std::fs::read_to_string(&ok).unwrap(), "x");
}
