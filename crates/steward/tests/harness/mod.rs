//! Starts and stops the real `steward` binary on a free loopback port.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::v1 as pb;
use proto::v1::steward_client::StewardClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds a token to every request, when there is one.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Bearer {
        Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that carries a token (or none).
pub type Authed = InterceptedService<Channel, Bearer>;
pub type Client = StewardClient<Authed>;

/// A channel to `addr` carrying `token`.
pub async fn channel_as(addr: &str, token: Option<&str>) -> Authed {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    InterceptedService::new(ch, Bearer::new(token))
}

pub const BIN: &str = env!("CARGO_BIN_EXE_steward");

/// Every workflow name the tests use, accepted as it is.
pub const TEST_POLICIES: &str = "[workflows.hello]\n[workflows.SatelliteDiskErase]\n[workflows.Flaky]\n[workflows.Other]\n[workflows.Anything]\n[workflows.erase]\n[workflows.long]\n[workflows.queue]\n[workflows.rounds]\n[workflows.x]\n";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub struct Server {
    pub child: Child,
    pub data_dir: PathBuf,
    pub addr: String,
    pub log: PathBuf,
}

impl Server {
    /// Starts `steward serve` on `data_dir` with extra environment, and waits until it is ready.
    /// Writes [`TEST_POLICIES`] as the policy file unless there is one.
    pub async fn start(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        std::fs::create_dir_all(data_dir).unwrap();
        let policies = data_dir.join("policies.toml");
        if !policies.exists() {
            std::fs::write(&policies, TEST_POLICIES).unwrap();
        }
        Server::start_as_is(data_dir, env).await
    }

    /// Starts `steward serve` on `data_dir` as it is (no policy file written), and waits until
    /// it is ready.
    pub async fn start_as_is(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_logged(data_dir, None, env).await
    }

    /// Starts `steward serve` on `data_dir` as it is, its log in `log_dir` (default: the
    /// data directory), and waits until it is ready.
    pub async fn start_logged(
        data_dir: &Path,
        log_dir: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Server {
        Server::start_wrapped(data_dir, log_dir, env, &[]).await
    }

    /// [`Server::start`], the server started with these soft and hard limits on open files
    /// (set by util-linux's `prlimit`, which then becomes the server).
    pub async fn start_limited(
        data_dir: &Path,
        env: &[(&str, &str)],
        (soft, hard): (u64, u64),
    ) -> Server {
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(data_dir.join("policies.toml"), TEST_POLICIES).unwrap();
        let limit = format!("--nofile={soft}:{hard}");
        Server::start_wrapped(data_dir, None, env, &["prlimit", &limit, "--"]).await
    }

    /// Starts `steward serve` as [`Server::start_logged`] does, through the command `wrap`
    /// (empty: none), which must exec it.
    async fn start_wrapped(
        data_dir: &Path,
        log_dir: Option<&Path>,
        env: &[(&str, &str)],
        wrap: &[&str],
    ) -> Server {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        // With a log directory of its own, the data directory is left for steward to create.
        if log_dir.is_none() {
            std::fs::create_dir_all(data_dir).unwrap();
        }
        let log = log_dir
            .unwrap_or(data_dir)
            .join(format!("server-{port}.log"));
        let mut cmd = match wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        // From the workspace root, as an operator would: the examples name their scripts so.
        cmd.current_dir(workspace_root());
        cmd.args(["serve", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &addr])
            .env("RUST_LOG", "info")
            // Calls need no token unless a test sets STEWARD_AUTH=token: the tests of other
            // features call as the anonymous admin; those of who did what turn tokens on.
            .env("STEWARD_AUTH", "none")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut s = Server {
            child,
            data_dir: data_dir.to_owned(),
            addr,
            log,
        };
        // A TLS listener does not answer the plain probe: the test waits its own way.
        if !env.iter().any(|(k, _)| *k == "STEWARD_TLS_CERT") {
            s.wait_ready().await;
        }
        s
    }

    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("steward exited early ({status}); log:\n{}", self.log_text());
            }
            // 503 is an answer too: a server whose e-stop list is unreadable serves, runs nothing.
            if http_get(&self.addr, "/readyz")
                .await
                .is_some_and(|(code, _)| code == 200 || code == 503)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "steward not ready in 30s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin token the first start wrote, when tokens are on.
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_owned())
    }

    /// A client of the API, carrying the admin token when tokens are on.
    pub async fn client(&self) -> Client {
        StewardClient::new(self.channel().await)
    }

    /// A channel carrying the admin token when tokens are on.
    pub async fn channel(&self) -> Authed {
        channel_as(&self.addr, self.admin_token().as_deref()).await
    }

    /// Creates a token named `name` with `role` through the CLI (as the admin); its secret.
    pub fn token(&self, name: &str, role: &str) -> String {
        let out = Command::new(BIN)
            .args(["token", "create", name, "--role", role, "--json"])
            .args(["--addr", &self.addr, "--data-dir"])
            .arg(&self.data_dir)
            .env_remove("STEWARD_TOKEN")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "steward token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["secret"].as_str().unwrap().to_owned()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "steward did not exit in {within:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "steward exited with {status}; log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.0 request over loopback with `headers` (Host and, with a body,
/// Content-Length are added): the status, the response head and the body. `None` when nothing
/// answers within 10 s. What arrived before the server closed or reset the connection is the
/// answer: a server that refuses a body it has not read may reset once it has answered.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => break,
            Err(_) => return None,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, head.to_owned(), body.to_owned()))
}

/// A plain HTTP/1.0 GET over loopback: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_get_as(addr, path, None).await
}

/// [`http_get`] with a bearer token.
pub async fn http_get_as(addr: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    http(addr, "GET", path, &headers, "")
        .await
        .map(|(code, _, body)| (code, body))
}

/// A plain HTTP/1.0 POST of a YAML body over loopback: the status code and the body.
pub async fn http_post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let (code, _, body) = http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/yaml")],
        body,
    )
    .await
    .unwrap();
    (code, body)
}

pub fn spec(yaml: &str) -> pb::WorkReq {
    api::convert::spec_to_wire(&domain::WorkflowSpec::parse(yaml).unwrap())
}

pub async fn submit(c: &mut Client, yaml: &str) -> String {
    c.submit(pb::SubmitRequest {
        spec: Some(spec(yaml)),
        start: false,
    })
    .await
    .unwrap()
    .into_inner()
    .id
}

/// Submits the run, then starts it (Exec): the two calls a client makes.
pub async fn submit_and_exec(c: &mut Client, yaml: &str) -> String {
    let id = submit(c, yaml).await;
    c.exec(pb::ExecRequest { id: id.clone() }).await.unwrap();
    id
}

pub async fn status(c: &mut Client, id: &str) -> pb::Run {
    c.status(pb::StatusRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
}

pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "completed" | "failed" | "stopped" | "cancelled" | "expired"
    )
}

/// Polls Status until the run is terminal.
pub async fn wait_terminal(c: &mut Client, id: &str, within: Duration) -> pb::Run {
    let deadline = Instant::now() + within;
    loop {
        let run = status(c, id).await;
        if is_terminal(&run.state) {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} still {} after {within:?}",
            run.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until `f` holds.
pub async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True when no process `pid` exists any more (or only its zombie, which nothing here reaps).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// A shell job as YAML flow text.
pub fn sh(script: &str) -> String {
    format!(
        "{{action: shell, args: {{argv: [sh, -c, {}]}}}}",
        serde_json::to_string(script).unwrap()
    )
}

/// Submits and executes a run `name` labelled `site=SITE` whose first job sleeps 5 minutes in a
/// grandchild whose PID it writes to `pidfile`; returns once that PID is written.
pub async fn start_long_job(
    c: &mut Client,
    pidfile: &std::path::Path,
    name: &str,
    site: &str,
) -> String {
    let job = sh(&format!(
        "sleep 300 & echo $! > {}; wait",
        pidfile.display()
    ));
    let id = submit(
        c,
        &format!(
            "name: {name}\nlabels: {{site: {site}}}\nblocks:\n  - jobs: [{job}, {{action: noop}}]\n"
        ),
    )
    .await;
    c.exec(pb::ExecRequest { id: id.clone() }).await.unwrap();
    eventually("the job to start", Duration::from_secs(60), || {
        std::fs::read_to_string(pidfile).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    id
}

/// The PID a job wrote to `pidfile`.
pub fn read_pid(pidfile: &Path) -> i32 {
    std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Runs a `steward` client command against `addr` with `token` (none: the server has tokens
/// off); panics with its stderr unless it succeeds.
pub fn cli_as(token: Option<&str>, addr: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .args(["--addr", addr])
        .env_remove("STEWARD_TOKEN");
    if let Some(t) = token {
        cmd.env("STEWARD_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "steward {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `shell` job that appends `start KEY` and, 0.3 s later, `done KEY` (its idempotency key)
/// to `log`.
pub fn logged_job(log: &Path) -> String {
    sh(&format!(
        "echo start $STEWARD_IDEMPOTENCY_KEY >> {l}; sleep 0.3; echo done $STEWARD_IDEMPOTENCY_KEY >> {l}",
        l = log.display()
    ))
}

/// Serves `app` on a free loopback port until the test's runtime ends; its address.
pub async fn serve_loopback(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    #[allow(clippy::disallowed_methods)] // test scaffolding, ends with the test's runtime
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// An HTTP server on a free loopback port that records every POST (path, JSON body); the
/// first `fail_first` requests get a 500.
pub async fn receiver(fail_first: usize) -> (String, Received, tokio::task::JoinHandle<()>) {
    let got: Received = std::sync::Arc::default();
    let failures = std::sync::Arc::new(std::sync::Mutex::new(fail_first));
    let (g, f) = (got.clone(), failures.clone());
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::post(
            move |axum::extract::Path(path): axum::extract::Path<String>, body: String| {
                let (g, f) = (g.clone(), f.clone());
                async move {
                    {
                        let mut left = f.lock().unwrap();
                        if *left > 0 {
                            *left -= 1;
                            return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                    }
                    let v: serde_json::Value =
                        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                    g.lock().unwrap().push((path, v));
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    #[allow(clippy::disallowed_methods)] // test scaffolding, ended by abort
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), got, server)
}

pub async fn wait_for(
    got: &Received,
    what: &str,
    f: impl Fn(&(String, serde_json::Value)) -> bool,
) -> (String, serde_json::Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(x) = got.lock().unwrap().iter().find(|x| f(x)).cloned() {
            return x;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never received {what}: {:?}",
            got.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Up to `n` TCP connections to `addr` that send nothing, stopping at the first the kernel
/// does not take within 500 ms; at least `at_least` of them, or the test fails.
pub async fn silent_connections(
    addr: &str,
    n: usize,
    at_least: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut flood = Vec::new();
    for _ in 0..n {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(c)) => flood.push(c),
            _ => break,
        }
    }
    assert!(
        flood.len() >= at_least,
        "only {} connections were made",
        flood.len()
    );
    flood
}

/// What a responder must still be able to do when the listener is flooded, through the
/// break-glass socket of the server on `data`: submit and execute a run of one `shell` job
/// (idempotency key `key`, its spec written in `scratch`) and list the e-stop. What `submit`
/// printed.
pub fn break_glass_still_works(data: &Path, scratch: &Path, key: &str) -> String {
    let socket = format!("unix:{}", data.join("steward.sock").display());
    let spec = scratch.join(format!("{key}.yaml"));
    std::fs::write(
        &spec,
        format!(
            "name: hello\nidempotency_key: {key}\nblocks:\n  - jobs:\n      - {}\n",
            sh("echo fine")
        ),
    )
    .unwrap();
    let out = cli_as(None, &socket, &["submit", spec.to_str().unwrap(), "--exec"]);
    cli_as(None, &socket, &["estop", "list"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
