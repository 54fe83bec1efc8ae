//! The built-in actions, tested for real: real processes and signals, real files, and a real
//! HTTP server on a loopback port.

// clippy's allow-unwrap-in-tests covers `#[test]` functions, not the helpers they share; in
// both, a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use actions::{ActionCall, ActionError, JobContext, JobOutput, validate_spec};
use domain::{FieldError, RunId, WorkflowSpec};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const JOB: &str = "blocks[0].jobs[0]";
const KEY: &str = "run-1/0/0";

fn ctx() -> JobContext {
    JobContext {
        run_id: RunId::new_v7(),
        idempotency_key: KEY.into(),
        attempt: 2,
        cancel: CancellationToken::new(),
        kill_grace: Duration::from_secs(5),
        output_limit: 64 * 1024,
        supervisor: None,
        guardrails: Default::default(),
        run_as: None,
        traceparent: Some(domain::trace::TraceParent {
            trace_id: [
                0x01, 0x92, 0xf0, 0xc1, 0x8a, 0x4e, 0x7d, 0x2b, 0x9f, 0x3a, 0x1c, 0x2d, 0x3e, 0x4f,
                0x5a, 0x6b,
            ],
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            sampled: true,
        }),
    }
}

const TRACEPARENT: &str = "00-0192f0c18a4e7d2b9f3a1c2d3e4f5a6b-0102030405060708-01";

fn call(action: &str, args: Value) -> ActionCall {
    let args = args
        .as_object()
        .expect("args must be a JSON object")
        .clone();
    ActionCall::parse(action, &args, JOB).unwrap_or_else(|e| panic!("{action} {args:?}: {e:?}"))
}

fn errors(action: &str, args: Value) -> Vec<FieldError> {
    let args = args
        .as_object()
        .expect("args must be a JSON object")
        .clone();
    match ActionCall::parse(action, &args, JOB) {
        Ok(c) => panic!("expected errors, parsed {c:?}"),
        Err(e) => e,
    }
}

/// Asserts that parsing gives exactly one error, at `path`, whose message contains `message`.
#[track_caller]
fn check_error(action: &str, args: Value, path: &str, message: &str) {
    let errs = errors(action, args);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, path, "{errs:?}");
    assert!(
        errs[0].message.contains(message),
        "{:?} does not contain {message:?}",
        errs[0].message
    );
}

fn failed(r: Result<JobOutput, ActionError>) -> (String, Option<i32>, String) {
    match r {
        Err(ActionError::Failed {
            message,
            exit_code,
            output,
        }) => (message, exit_code, output),
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn cancelled(r: Result<JobOutput, ActionError>) -> String {
    match r {
        Err(ActionError::Cancelled { output }) => output,
        other => panic!("expected Cancelled, got {other:?}"),
    }
}

/// Waits (up to 10 s) until `path` holds a line, and returns it.
async fn read_when_written(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{} was never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `fut` to its end, failing the test instead of hanging if that takes over a minute.
async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("did not finish within a minute")
}

fn pid_in(s: &str) -> Pid {
    Pid::from_raw(s.parse().unwrap_or_else(|_| panic!("not a pid: {s:?}")))
}

/// Dead: no such process, or a zombie waiting for init to reap it (its parent, the job's
/// shell, is gone, and PID 1 in a container may reap late or never).
fn is_gone(pid: Pid) -> bool {
    match kill(pid, None) {
        Err(Errno::ESRCH) => true,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true),
    }
}

/// Polls for up to 10 s: a process is killed promptly, but not necessarily before we look.
async fn assert_gone(pid: Pid) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_gone(pid) {
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("process {pid} is still running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- shell

#[tokio::test]
async fn shell_succeeds_with_output_and_steward_env() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    let ctx = ctx();
    let script = "echo out; echo err >&2; \
                  echo key=$STEWARD_IDEMPOTENCY_KEY run=$STEWARD_RUN_ID attempt=$STEWARD_ATTEMPT; \
                  echo foo=$FOO; echo cwd=$(pwd)";
    let c = call(
        "shell",
        json!({"argv": ["sh", "-c", script], "env": {"FOO": "bar"}, "cwd": cwd}),
    );
    let out = c.run(&ctx).await.unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(out.output.contains("out\n"), "{}", out.output);
    assert!(
        out.output.contains("err\n"),
        "stderr is captured too: {}",
        out.output
    );
    assert!(
        out.output
            .contains(&format!("key={KEY} run={} attempt=2\n", ctx.run_id)),
        "{}",
        out.output
    );
    assert!(out.output.contains("foo=bar\n"), "{}", out.output);
    assert!(
        out.output.contains(&format!("cwd={}\n", cwd.display())),
        "{}",
        out.output
    );
}

#[tokio::test]
async fn shell_runs_argv_directly_never_through_a_shell() {
    let out = call("shell", json!({"argv": ["echo", "$HOME; echo `id` | cat"]}))
        .run(&ctx())
        .await
        .unwrap();
    assert_eq!(out.output, "$HOME; echo `id` | cat\n");
}

#[tokio::test]
async fn shell_nonzero_exit_fails_with_the_status_and_output() {
    let r = call("shell", json!({"argv": ["sh", "-c", "echo oops; exit 3"]}))
        .run(&ctx())
        .await;
    let (message, exit_code, output) = failed(r);
    assert_eq!(message, "exit status 3");
    assert_eq!(exit_code, Some(3));
    assert_eq!(output, "oops\n");
}

#[tokio::test]
async fn shell_killed_by_a_signal_names_it() {
    let r = call("shell", json!({"argv": ["sh", "-c", "kill -KILL $$"]}))
        .run(&ctx())
        .await;
    let (message, exit_code, _) = failed(r);
    assert_eq!(message, "killed by signal SIGKILL");
    assert_eq!(exit_code, None);
}

#[tokio::test]
async fn shell_program_not_found_names_it() {
    let r = call(
        "shell",
        json!({"argv": ["steward-test-no-such-program", "x"]}),
    )
    .run(&ctx())
    .await;
    let (message, _, _) = failed(r);
    assert!(
        message.contains("\"steward-test-no-such-program\""),
        "{message}"
    );
    assert!(message.contains("not found"), "{message}");

    let r = call("shell", json!({"argv": ["/nonexistent/steward-test"]}))
        .run(&ctx())
        .await;
    let (message, _, _) = failed(r);
    assert!(
        message.contains("\"/nonexistent/steward-test\""),
        "{message}"
    );

    let r = call(
        "shell",
        json!({"argv": ["true"], "cwd": "/nonexistent/steward-test-dir"}),
    )
    .run(&ctx())
    .await;
    let (message, _, _) = failed(r);
    assert!(
        message.contains("working directory /nonexistent/steward-test-dir does not exist"),
        "{message}"
    );
}

#[tokio::test]
async fn shell_output_keeps_a_bounded_tail() {
    let mut ctx = ctx();
    ctx.output_limit = 100;
    let out = call("shell", json!({"argv": ["seq", "1", "100000"]}))
        .run(&ctx)
        .await
        .unwrap();
    assert!(out.output.len() <= 100, "{} bytes", out.output.len());
    assert!(out.output.ends_with("99999\n100000\n"), "{}", out.output);
}

#[tokio::test]
async fn shell_cancel_kills_the_whole_process_group_including_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!(
        "echo started; sleep 300 & echo $! > {}; wait",
        pidfile.display()
    );
    let c = call("shell", json!({"argv": ["sh", "-c", script]}));
    let ctx = ctx();
    let (r, grandchild) = within(async {
        tokio::join!(c.run(&ctx), async {
            let pid = read_when_written(&pidfile).await;
            ctx.cancel.cancel();
            pid_in(&pid)
        })
    })
    .await;
    let output = cancelled(r);
    assert!(
        output.contains("started"),
        "output before the cancel is kept: {output:?}"
    );
    assert_gone(grandchild).await;
}

#[tokio::test]
async fn shell_ignoring_sigterm_gets_sigkill_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // SIG_IGN is inherited through exec: the `sleep`s ignore SIGTERM as well.
    let script = format!(
        "trap '' TERM; echo $$ > {}; while true; do sleep 0.1; done",
        pidfile.display()
    );
    let c = call("shell", json!({"argv": ["sh", "-c", script]}));
    let mut ctx = ctx();
    ctx.kill_grace = Duration::from_millis(300);
    let (r, (leader, cancelled_at)) = within(async {
        tokio::join!(c.run(&ctx), async {
            let pid = read_when_written(&pidfile).await;
            ctx.cancel.cancel();
            (pid_in(&pid), Instant::now())
        })
    })
    .await;
    cancelled(r);
    assert!(
        cancelled_at.elapsed() >= ctx.kill_grace,
        "SIGKILL came before the grace ended"
    );
    assert_gone(leader).await;
}

#[tokio::test]
async fn shell_leftover_processes_are_killed_when_the_leader_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // The background `sleep` holds the output pipe open: the run must not wait for it.
    let script = format!("sleep 300 & echo $! > {}; echo done", pidfile.display());
    let out = call("shell", json!({"argv": ["sh", "-c", script]}))
        .run(&ctx())
        .await
        .unwrap();
    assert_eq!(out.output, "done\n");
    assert_gone(pid_in(&read_when_written(&pidfile).await)).await;
}

#[tokio::test]
async fn shell_does_not_wait_for_a_process_that_left_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // `setsid` leaves the group but keeps the output pipe open; the run still returns.
    let script = format!(
        "setsid sleep 300 & echo $! > {}; echo done",
        pidfile.display()
    );
    let out = call("shell", json!({"argv": ["sh", "-c", script]}))
        .run(&ctx())
        .await
        .unwrap();
    assert_eq!(out.output, "done\n");
    let escaped = pid_in(&read_when_written(&pidfile).await);
    let _ = kill(escaped, Signal::SIGKILL);
}

#[tokio::test]
async fn shell_already_cancelled_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let ctx = ctx();
    ctx.cancel.cancel();
    let c = call("shell", json!({"argv": ["touch", marker]}));
    cancelled(c.run(&ctx).await);
    assert!(!marker.exists());
}

/// PR_SET_PDEATHSIG: if Steward dies, the leader gets SIGKILL. Linux sends it when the
/// *thread* that spawned the child exits, which is what this test can make happen.
#[test]
fn shell_leader_is_killed_when_its_spawning_thread_dies() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("echo $$ > {}; sleep 300; true", pidfile.display());
    let c = call("shell", json!({"argv": ["sh", "-c", script]}));
    let pf = pidfile.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ctx = ctx();
        let mut attempt = Box::pin(c.run(&ctx));
        rt.block_on(async {
            tokio::select! {
                r = &mut attempt => panic!("finished early: {r:?}"),
                _ = read_when_written(&pf) => {}
            }
        });
        // Neither drop the attempt (that kills the group itself) nor finish it: as if the
        // process had died.
        std::mem::forget(attempt);
    })
    .join()
    .unwrap();
    let leader = pid_in(std::fs::read_to_string(&pidfile).unwrap().trim());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(assert_gone(leader));
    // The leader's own child is not covered by PDEATHSIG.
    let _ = nix::sys::signal::killpg(leader, Signal::SIGKILL);
}

// ---------------------------------------------------------------- write_file

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn write_file_writes_then_is_unchanged_then_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("motd");
    let p = path.display().to_string();
    let write = |content: &str, mode: &str| {
        call(
            "write_file",
            json!({"path": path, "content": content, "mode": mode}),
        )
    };
    let sha_hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    let out = write("hello", "0600").run(&ctx()).await.unwrap();
    assert_eq!(
        out.output,
        format!("wrote 5 bytes to {p} (sha256 {sha_hello})")
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello");
    assert_eq!(mode_of(&path), 0o600);

    let out = write("hello", "600").run(&ctx()).await.unwrap();
    assert_eq!(out.output, format!("unchanged {p} (sha256 {sha_hello})"));

    // Same content, other mode: written again.
    let out = write("hello", "0640").run(&ctx()).await.unwrap();
    assert!(out.output.starts_with("wrote 5 bytes"), "{}", out.output);
    assert_eq!(mode_of(&path), 0o640);

    let out = write("hello, world\n", "0640").run(&ctx()).await.unwrap();
    assert!(
        out.output.starts_with(&format!("wrote 13 bytes to {p}")),
        "{}",
        out.output
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello, world\n");

    // Default mode; no temporary file left behind.
    let other = dir.path().join("other");
    call("write_file", json!({"path": other, "content": ""}))
        .run(&ctx())
        .await
        .unwrap();
    assert_eq!(mode_of(&other), 0o644);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["motd", "other"]);
}

#[tokio::test]
async fn write_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir/file");
    let r = call("write_file", json!({"path": missing, "content": "x"}))
        .run(&ctx())
        .await;
    let (message, _, _) = failed(r);
    assert!(message.contains("does not exist"), "{message}");

    let r = call("write_file", json!({"path": dir.path(), "content": "x"}))
        .run(&ctx())
        .await;
    let (message, _, _) = failed(r);
    assert!(message.contains("directory"), "{message}");
}

// ---------------------------------------------------------------- http

#[derive(Debug)]
struct Request {
    head: String,
    body: String,
}

impl Request {
    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

async fn read_request(sock: &mut TcpStream) -> Request {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut req = Request {
        head,
        body: String::new(),
    };
    let len: usize = req
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    req.body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    req
}

/// Accepts one connection, reads one request, answers it and closes.
async fn serve_once(listener: &TcpListener, status: &str, body: &str) -> Request {
    let (mut sock, _) = listener.accept().await.unwrap();
    let req = read_request(&mut sock).await;
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await.unwrap();
    let _ = sock.shutdown().await;
    req
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

#[tokio::test]
async fn http_sends_the_idempotency_key_and_accepts_the_expected_status() {
    let (l, url) = listener().await;
    let c = call(
        "http",
        json!({
            "url": format!("{url}/machines/aap01/erase"),
            "method": "POST",
            "headers": {"X-Steward-Test": "yes", "Content-Type": "text/plain"},
            "body": "please",
            "expect_status": [201, 202],
        }),
    );
    let ctx = ctx();
    let (r, req) = tokio::join!(c.run(&ctx), serve_once(&l, "201 Created", "created"));
    let out = r.unwrap();
    assert_eq!(out.output, "created");
    assert_eq!(req.request_line(), "POST /machines/aap01/erase HTTP/1.1");
    assert_eq!(req.header("idempotency-key"), Some(KEY));
    assert_eq!(req.header("x-steward-test"), Some("yes"));
    assert_eq!(req.body, "please");
}

#[tokio::test]
async fn jobs_are_handed_their_traceparent_unless_their_spec_sets_one() {
    let ctx = ctx();
    let c = call(
        "shell",
        json!({"argv": ["sh", "-c", "echo tp=$TRACEPARENT"]}),
    );
    let out = c.run(&ctx).await.unwrap();
    assert_eq!(out.output, format!("tp={TRACEPARENT}\n"));
    let c = call(
        "shell",
        json!({"argv": ["sh", "-c", "echo tp=$TRACEPARENT"], "env": {"TRACEPARENT": "mine"}}),
    );
    assert_eq!(c.run(&ctx).await.unwrap().output, "tp=mine\n");

    let (l, url) = listener().await;
    let c = call("http", json!({"url": url.clone()}));
    let (r, req) = tokio::join!(c.run(&ctx), serve_once(&l, "200 OK", ""));
    r.unwrap();
    assert_eq!(req.header("traceparent"), Some(TRACEPARENT));
    let c = call(
        "http",
        json!({"url": url, "headers": {"traceparent": "00-mine"}}),
    );
    let (r, req) = tokio::join!(c.run(&ctx), serve_once(&l, "200 OK", ""));
    r.unwrap();
    assert_eq!(req.header("traceparent"), Some("00-mine"));
}

#[tokio::test]
async fn http_default_is_get_expecting_any_2xx() {
    let (l, url) = listener().await;
    let c = call("http", json!({"url": format!("{url}/health")}));
    let ctx = ctx();
    let (r, req) = tokio::join!(c.run(&ctx), serve_once(&l, "204 No Content", ""));
    assert_eq!(r.unwrap().output, "");
    assert_eq!(req.request_line(), "GET /health HTTP/1.1");
    assert_eq!(req.header("idempotency-key"), Some(KEY));
}

#[tokio::test]
async fn http_unexpected_status_fails_with_the_body() {
    let (l, url) = listener().await;
    let c = call("http", json!({"url": url}));
    let ctx = ctx();
    let (r, _) = tokio::join!(
        c.run(&ctx),
        serve_once(&l, "503 Service Unavailable", "try later")
    );
    let (message, _, output) = failed(r);
    assert!(message.contains("503"), "{message}");
    assert!(message.contains("expected 2xx"), "{message}");
    assert_eq!(output, "try later");

    // A status that is only fine when asked for.
    let c = call("http", json!({"url": url, "expect_status": 404}));
    let (r, _) = tokio::join!(c.run(&ctx), serve_once(&l, "200 OK", "found"));
    let (message, _, _) = failed(r);
    assert!(message.contains("200 OK"), "{message}");
    assert!(message.contains("expected 404"), "{message}");
}

#[tokio::test]
async fn http_body_output_is_a_bounded_tail() {
    let (l, url) = listener().await;
    let mut ctx = ctx();
    ctx.output_limit = 10;
    let body = format!("{}THE-END", "x".repeat(100_000));
    let c = call("http", json!({"url": url}));
    let (r, _) = tokio::join!(c.run(&ctx), serve_once(&l, "200 OK", &body));
    assert_eq!(r.unwrap().output, "xxxTHE-END");
}

#[tokio::test]
async fn http_cancel_stops_a_request_that_hangs() {
    let (l, url) = listener().await;
    let ctx = ctx();
    let c = call("http", json!({"url": url}));
    let (r, _sock) = within(async {
        tokio::join!(c.run(&ctx), async {
            let (mut sock, _) = l.accept().await.unwrap();
            read_request(&mut sock).await;
            ctx.cancel.cancel();
            sock // never answered; kept open until the end of the test
        })
    })
    .await;
    cancelled(r);
}

#[tokio::test]
async fn http_connection_errors_fail() {
    let (l, url) = listener().await;
    drop(l);
    let (message, _, _) = failed(call("http", json!({"url": url})).run(&ctx()).await);
    assert!(message.starts_with(&format!("GET {url}/")), "{message}");
}

#[tokio::test]
async fn https_is_supported_and_a_non_tls_server_fails_the_handshake() {
    let (l, url) = listener().await;
    let url = url.replace("http://", "https://");
    let c = call("http", json!({"url": url}));
    let ctx = ctx();
    let (r, ()) = within(async {
        tokio::join!(c.run(&ctx), async {
            let (mut sock, _) = l.accept().await.unwrap();
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
        })
    })
    .await;
    let (message, _, _) = failed(r);
    assert!(message.starts_with("GET https://127.0.0.1"), "{message}");
}

// ---------------------------------------------------------------- sleep and noop

#[tokio::test]
async fn sleep_sleeps_and_cancels() {
    call("sleep", json!({"duration": "10ms"}))
        .run(&ctx())
        .await
        .unwrap();

    let ctx = ctx();
    let c = call("sleep", json!({"duration": "1h"}));
    let (r, ()) = within(async {
        tokio::join!(c.run(&ctx), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ctx.cancel.cancel();
        })
    })
    .await;
    assert_eq!(cancelled(r), "");
}

#[tokio::test]
async fn noop_does_nothing() {
    assert_eq!(
        call("noop", json!({})).run(&ctx()).await.unwrap(),
        JobOutput::default()
    );
}

// ---------------------------------------------------------------- validation

#[test]
fn parses_typed_args() {
    let ActionCall::Shell(a) = call(
        "shell",
        json!({"argv": ["erase", "--machine", "aap01"], "env": {"SITE": "aap"}, "cwd": "/tmp"}),
    ) else {
        panic!()
    };
    assert_eq!(a.argv, ["erase", "--machine", "aap01"]);
    assert_eq!(a.env["SITE"], actions::Text::Plain("aap".into()));
    assert_eq!(a.cwd.as_deref(), Some(Path::new("/tmp")));

    let ActionCall::Http(a) = call(
        "http",
        json!({"url": "https://example.com/x", "method": "put"}),
    ) else {
        panic!()
    };
    assert_eq!(a.method, actions::HttpMethod::Put);
    assert_eq!(a.expect_status, actions::ExpectStatus::Success);

    let ActionCall::WriteFile(a) = call(
        "write_file",
        json!({"path": "/etc/motd", "content": "hi", "mode": "0600"}),
    ) else {
        panic!()
    };
    assert_eq!(a.mode, 0o600);

    let ActionCall::Sleep(a) = call("sleep", json!({"duration": "1m30s"})) else {
        panic!()
    };
    assert_eq!(a.duration, Duration::from_secs(90));

    // YAML `cwd:` with nothing after it is null: absent.
    assert!(matches!(
        call("shell", json!({"argv": ["true"], "cwd": null})),
        ActionCall::Shell(_)
    ));
}

#[test]
fn secrets_are_not_in_debug_output() {
    let c = call(
        "http",
        json!({"url": "https://u:hunter2@example.com/", "headers": {"Authorization": "Bearer hunter2"}, "body": "hunter2"}),
    );
    let s = format!("{c:?}");
    assert!(!s.contains("hunter2"), "{s}");
    let c = call(
        "shell",
        json!({"argv": ["true"], "env": {"TOKEN": "hunter2"}}),
    );
    assert!(!format!("{c:?}").contains("hunter2"));
    let c = call("write_file", json!({"path": "/x", "content": "hunter2"}));
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn unknown_action_is_named_with_the_known_ones() {
    check_error(
        "shel",
        json!({}),
        "blocks[0].jobs[0].action",
        "unknown action \"shel\"; expected one of: shell, http, write_file, sleep, token_bucket, noop",
    );
}

#[test]
fn unknown_args_are_errors() {
    check_error(
        "shell",
        json!({"argv": ["true"], "foo": 1}),
        "blocks[0].jobs[0].args.foo",
        "unknown argument \"foo\"; expected one of: argv, env, cwd",
    );
    check_error(
        "noop",
        json!({"x": 1}),
        "blocks[0].jobs[0].args.x",
        "unknown argument \"x\"; this action takes no arguments",
    );
    check_error(
        "sleep",
        json!({"duration": "1s", "seconds": 1}),
        "blocks[0].jobs[0].args.seconds",
        "expected one of: duration",
    );
}

#[test]
fn shell_bad_args() {
    let argv = "blocks[0].jobs[0].args.argv";
    check_error("shell", json!({}), argv, "required");
    check_error(
        "shell",
        json!({"argv": []}),
        argv,
        "must be a non-empty array of strings",
    );
    check_error(
        "shell",
        json!({"argv": "echo hi"}),
        argv,
        "must be a non-empty array of strings",
    );
    check_error(
        "shell",
        json!({"argv": ["sleep", 5]}),
        argv,
        "item 1 is a number (quote it: \"5\")",
    );
    check_error(
        "shell",
        json!({"argv": ["", "x"]}),
        argv,
        "item 0, the program, must not be empty",
    );
    check_error("shell", json!({"argv": ["a\u{0}b"]}), argv, "NUL");

    let env = "blocks[0].jobs[0].args.env";
    check_error(
        "shell",
        json!({"argv": ["true"], "env": ["A=1"]}),
        env,
        "must be a map of names to strings or {secret: NAME}, not a list",
    );
    check_error(
        "shell",
        json!({"argv": ["true"], "env": {"DEBUG": true}}),
        env,
        "value of \"DEBUG\" must be a string",
    );
    check_error(
        "shell",
        json!({"argv": ["true"], "env": {"A=B": "1"}}),
        env,
        "invalid variable name \"A=B\"",
    );
    check_error(
        "shell",
        json!({"argv": ["true"], "env": {"STEWARD_IDEMPOTENCY_KEY": "mine"}}),
        env,
        "STEWARD_IDEMPOTENCY_KEY is set by Steward",
    );

    let cwd = "blocks[0].jobs[0].args.cwd";
    check_error(
        "shell",
        json!({"argv": ["true"], "cwd": "relative/dir"}),
        cwd,
        "must be an absolute path",
    );
    check_error(
        "shell",
        json!({"argv": ["true"], "cwd": 7}),
        cwd,
        "must be a string",
    );
}

#[test]
fn all_problems_of_a_job_are_reported() {
    let errs = errors(
        "shell",
        json!({"argv": [], "cwd": "rel", "env": {"X": 1}, "foo": 1}),
    );
    let mut paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "blocks[0].jobs[0].args.argv",
            "blocks[0].jobs[0].args.cwd",
            "blocks[0].jobs[0].args.env",
            "blocks[0].jobs[0].args.foo",
        ],
        "{errs:?}"
    );
}

#[test]
fn http_bad_args() {
    let url = "blocks[0].jobs[0].args.url";
    check_error("http", json!({}), url, "required");
    check_error(
        "http",
        json!({"url": "ftp://example.com/"}),
        url,
        "must be an http:// or https:// URL",
    );
    check_error(
        "http",
        json!({"url": "not a url"}),
        url,
        "is not a valid URL",
    );
    check_error("http", json!({"url": 80}), url, "must be a string");

    let ok = "http://127.0.0.1/";
    check_error(
        "http",
        json!({"url": ok, "method": "FETCH"}),
        "blocks[0].jobs[0].args.method",
        "unknown method \"FETCH\"; expected one of: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
    );
    let headers = "blocks[0].jobs[0].args.headers";
    check_error(
        "http",
        json!({"url": ok, "headers": {"Bad Name": "x"}}),
        headers,
        "not a valid header name",
    );
    check_error(
        "http",
        json!({"url": ok, "headers": {"X": "a\nb"}}),
        headers,
        "not a valid header value",
    );
    check_error(
        "http",
        json!({"url": ok, "headers": {"X": 1}}),
        headers,
        "must be a string",
    );
    check_error(
        "http",
        json!({"url": ok, "headers": {"idempotency-key": "mine"}}),
        headers,
        "Idempotency-Key is set by Steward",
    );
    check_error(
        "http",
        json!({"url": ok, "body": {"a": 1}}),
        "blocks[0].jobs[0].args.body",
        "must be a string",
    );
    let expect = "blocks[0].jobs[0].args.expect_status";
    for bad in [
        json!(700),
        json!("200"),
        json!([]),
        json!([200, "x"]),
        json!(2.5),
    ] {
        check_error(
            "http",
            json!({"url": ok, "expect_status": bad}),
            expect,
            "must be an HTTP status code",
        );
    }
}

#[test]
fn write_file_bad_args() {
    let path = "blocks[0].jobs[0].args.path";
    check_error("write_file", json!({"content": "x"}), path, "required");
    check_error(
        "write_file",
        json!({"path": "etc/motd", "content": "x"}),
        path,
        "must be an absolute path",
    );
    check_error(
        "write_file",
        json!({"path": "/etc/", "content": "x"}),
        path,
        "must name a file",
    );
    check_error(
        "write_file",
        json!({"path": "/etc/motd"}),
        "blocks[0].jobs[0].args.content",
        "required",
    );
    let mode = "blocks[0].jobs[0].args.mode";
    check_error(
        "write_file",
        json!({"path": "/etc/motd", "content": "x", "mode": 644}),
        mode,
        "must be a quoted octal string such as \"0644\", not a number",
    );
    check_error(
        "write_file",
        json!({"path": "/etc/motd", "content": "x", "mode": "0999"}),
        mode,
        "is not a file mode",
    );
}

#[test]
fn sleep_bad_args() {
    let d = "blocks[0].jobs[0].args.duration";
    check_error("sleep", json!({}), d, "required");
    check_error(
        "sleep",
        json!({"duration": "soon"}),
        d,
        "invalid duration \"soon\"",
    );
    check_error(
        "sleep",
        json!({"duration": 5}),
        d,
        "must be a duration such as \"30s\"",
    );
}

#[test]
fn validate_spec_reports_structure_and_args_and_returns_the_calls() {
    let spec = WorkflowSpec::from_value(json!({
        "name": "hello",
        "blocks": [
            {"jobs": [{"action": "noop"}, {"action": "shell", "args": {"argv": ["true"]}}]},
            {"concurrency": 0, "jobs": [{"action": "sleep", "args": {}}, {"action": ""}]},
        ],
    }))
    .unwrap();
    let errs = validate_spec(&spec).unwrap_err().0;
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "blocks[1].concurrency",
            "blocks[1].jobs[1].action",
            "blocks[1].jobs[0].args.duration",
        ],
        "{errs:?}"
    );

    let spec = WorkflowSpec::parse(
        "name: hello\nblocks:\n  - jobs:\n      - action: noop\n      - action: shell\n        args: {argv: [echo, hi]}\n  - jobs:\n      - action: sleep\n        args: {duration: 1s}\n",
    )
    .unwrap();
    let calls = validate_spec(&spec).unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].len(), 2);
    assert_eq!(calls[0][1].action(), "shell");
    assert_eq!(calls[1][0].action(), "sleep");
}

#[test]
fn attempts_can_run_on_any_runtime_thread() {
    fn assert_send<T: Send>(_: &T) {}
    let ctx = ctx();
    for c in [
        call("shell", json!({"argv": ["true"]})),
        call("http", json!({"url": "http://127.0.0.1/"})),
        call("write_file", json!({"path": "/x", "content": ""})),
        call("sleep", json!({"duration": "1s"})),
        call("noop", json!({})),
    ] {
        assert_send(&c.run(&ctx));
    }
}

#[test]
fn token_bucket_args() {
    let ok = ActionCall::parse(
        "token_bucket",
        json!({"bucket": "disk-erase", "wait": "5m"})
            .as_object()
            .unwrap(),
        "j",
    );
    assert_eq!(
        ok,
        Ok(ActionCall::TokenBucket(actions::TokenBucketArgs {
            bucket: "disk-erase".into(),
            wait: Some(std::time::Duration::from_secs(300)),
        }))
    );
    for (args, path) in [
        (json!({}), "j.args.bucket"),
        (json!({"bucket": "a b"}), "j.args.bucket"),
        (json!({"bucket": 3}), "j.args.bucket"),
        (json!({"bucket": "b", "wait": "soon"}), "j.args.wait"),
        (json!({"bucket": "b", "wait": 5}), "j.args.wait"),
        (json!({"bucket": "b", "size": 1}), "j.args.size"),
    ] {
        let errs = ActionCall::parse("token_bucket", args.as_object().unwrap(), "j").unwrap_err();
        assert!(errs.iter().any(|e| e.path == path), "{args}: {errs:?}");
    }
}

// ---------------------------------------------------------------- secrets and guardrails

/// A context whose secrets come from `dir`, and whose `http` jobs may not reach `deny`.
fn ctx_with(dir: &Path, deny: actions::HttpDeny) -> JobContext {
    let mut c = ctx();
    c.guardrails = std::sync::Arc::new(actions::Guardrails {
        secrets: actions::Secrets::new(dir),
        http_deny: deny,
        ..Default::default()
    });
    c
}

fn write_secret(dir: &Path, name: &str, value: &str) {
    let p = dir.join(name);
    std::fs::write(&p, value).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn shell_secrets_reach_the_job_and_never_its_output() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "db", "s3cret-db-value\n");
    let c = call(
        "shell",
        json!({
            "argv": ["sh", "-c", "echo \"pw=$DB_PASSWORD tok=$API_TOKEN plain=$SITE\"; printf %s \"$DB_PASSWORD\" | sha256sum; printf %s \"$API_TOKEN\" | sha256sum; echo \"$DB_PASSWORD\" >&2; exit 3"],
            "env": {"DB_PASSWORD": {"secret": "db"}, "API_TOKEN": "literal-token-1", "SITE": "aap01"},
        }),
    );
    let (message, code, output) = failed(c.run(&ctx_with(dir.path(), Default::default())).await);
    assert_eq!(code, Some(3), "{message}");
    assert!(output.contains("pw=*** tok=*** plain=aap01"), "{output}");
    // The job saw the real values: their hashes are in its output.
    assert!(output.contains(&sha256_hex("s3cret-db-value")), "{output}");
    assert!(output.contains(&sha256_hex("literal-token-1")), "{output}");
    assert!(!output.contains("s3cret-db-value"), "{output}");
    assert!(!output.contains("literal-token-1"), "{output}");

    // Re-read on change: the next attempt gets the new value.
    write_secret(dir.path(), "db", "rotated-value-2");
    let c = call(
        "shell",
        json!({"argv": ["sh", "-c", "printf %s \"$P\" | sha256sum"], "env": {"P": {"secret": "db"}}}),
    );
    let out = c
        .run(&ctx_with(dir.path(), Default::default()))
        .await
        .unwrap();
    assert!(
        out.output.contains(&sha256_hex("rotated-value-2")),
        "{}",
        out.output
    );
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_fails_the_attempt_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = call(
        "shell",
        json!({"argv": ["true"], "env": {"P": {"secret": "gone"}}}),
    );
    let ctx = ctx_with(dir.path(), Default::default());
    let (message, _, _) = failed(c.run(&ctx).await);
    assert!(message.contains("secret gone: not found"), "{message}");
    assert!(message.contains("STEWARD_SECRET_GONE"), "{message}");

    std::fs::write(dir.path().join("open"), "value").unwrap();
    std::fs::set_permissions(
        dir.path().join("open"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let c = call(
        "write_file",
        json!({"path": dir.path().join("out").to_str().unwrap(), "content": {"secret": "open"}}),
    );
    let (message, _, _) = failed(c.run(&ctx).await);
    assert!(
        message.contains("secret open") && message.contains("0644"),
        "{message}"
    );
    assert!(!dir.path().join("out").exists());
}

#[tokio::test]
async fn write_file_content_can_be_a_secret_whose_digest_is_not_shown() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "key", "-----BEGIN KEY-----\nAAAA\n");
    let target = dir.path().join("key.pem");
    let c = call(
        "write_file",
        json!({"path": target.to_str().unwrap(), "content": {"secret": "key"}, "mode": "0600"}),
    );
    let out = c
        .run(&ctx_with(dir.path(), Default::default()))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "-----BEGIN KEY-----\nAAAA"
    );
    assert!(!out.output.contains("sha256"), "{}", out.output);
}

#[tokio::test]
async fn http_secrets_are_sent_and_scrubbed_from_what_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "auth", "Bearer tok-abcdef");
    write_secret(dir.path(), "body", "{\"password\":\"pw-123456\"}");
    let (l, url) = listener().await;
    let c = call(
        "http",
        json!({
            "url": format!("{url}/x?api_key=query-secret-1&page=2"),
            "method": "POST",
            "headers": {"Authorization": {"secret": "auth"}, "Cookie": "session=cookie-value-1"},
            "body": {"secret": "body"},
            "expect_status": 200,
        }),
    );
    let ctx = ctx_with(dir.path(), Default::default());
    // The server echoes everything it got: the output must hide all of it.
    let serve = async {
        let (mut sock, _) = l.accept().await.unwrap();
        let req = read_request(&mut sock).await;
        let body = format!("{}\n{}", req.head, req.body);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        req
    };
    let (r, req) = tokio::join!(c.run(&ctx), serve);
    let out = r.unwrap();
    assert_eq!(req.header("authorization"), Some("Bearer tok-abcdef"));
    assert_eq!(req.body, "{\"password\":\"pw-123456\"}");
    for secret in [
        "tok-abcdef",
        "pw-123456",
        "query-secret-1",
        "session=cookie-value-1",
    ] {
        assert!(!out.output.contains(secret), "{secret} in {}", out.output);
    }
    assert!(out.output.contains("page=2"), "{}", out.output);
}

/// A job cannot race `write_file` into Steward's own files: another job swapping a
/// directory of the path for a symlink to the data directory, as fast as it can, between the
/// check and the write, never gets a file written there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_file_cannot_be_raced_into_a_protected_directory() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut ctx = ctx();
    ctx.guardrails = std::sync::Arc::new(actions::Guardrails {
        protected: actions::Protected::new([(data.clone(), "the data directory")]),
        ..Default::default()
    });
    let real = dir.path().join("real");
    let aside = dir.path().join("real.d");
    std::fs::create_dir(&real).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let swapper = std::thread::spawn({
        let (real, aside, data, stop) = (real.clone(), aside.clone(), data.clone(), stop.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::rename(&real, &aside);
                let _ = std::os::unix::fs::symlink(&data, &real);
                let _ = std::fs::remove_file(&real);
                let _ = std::fs::rename(&aside, &real);
            }
        }
    });
    let mut refused = 0;
    for i in 0..3000 {
        let target = real.join(format!("f{i}"));
        let r = call(
            "write_file",
            json!({"path": target.to_str().unwrap(), "content": "x"}),
        )
        .run(&ctx)
        .await;
        if let Err(ActionError::Failed { message, .. }) = &r
            && message.contains("refused")
        {
            refused += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let inside: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        inside.is_empty(),
        "{} files written into the data directory, such as {:?}",
        inside.len(),
        &inside[..inside.len().min(3)]
    );
    // The race was run: some writes found the symlink in place and were refused.
    assert!(refused > 0, "the swap never won a check");
}

/// A URL that is a secret is secret whole: an error about its host does not name the host.
#[tokio::test]
async fn a_secret_urls_host_is_not_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(
        dir.path(),
        "url",
        "http://169.254.169.254/latest/meta-data/?sig=s3cret-sig",
    );
    let deny = actions::HttpDeny::parse(&["169.254.0.0/16"]).unwrap();
    let ctx = ctx_with(dir.path(), deny);
    let m = match call("http", json!({"url": {"secret": "url"}}))
        .run(&ctx)
        .await
    {
        Err(ActionError::Fatal { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(m.contains("is denied by http_deny"), "{m}");
    assert!(!m.contains("169.254.169.254"), "{m}");
    assert!(!m.contains("s3cret-sig"), "{m}");
}

#[tokio::test]
async fn http_deny_refuses_before_connecting_by_address_name_and_redirect() {
    let dir = tempfile::tempdir().unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    denied.set_nonblocking(true).unwrap();
    let denied_addr = denied.local_addr().unwrap();
    let deny = actions::HttpDeny::parse(&["169.254.0.0/16"])
        .unwrap()
        .with_listen(denied_addr);
    let ctx = ctx_with(dir.path(), deny);
    let refused = |r: Result<JobOutput, ActionError>| match r {
        Err(ActionError::Fatal { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };

    let m = refused(
        call(
            "http",
            json!({"url": "http://169.254.169.254/latest/meta-data/"}),
        )
        .run(&ctx)
        .await,
    );
    assert!(
        m.contains("169.254.169.254:80 is denied by http_deny (entry \"169.254.0.0/16\")"),
        "{m}"
    );
    let m = refused(
        call(
            "http",
            json!({"url": format!("http://{denied_addr}/v1/estop"), "method": "POST"}),
        )
        .run(&ctx)
        .await,
    );
    assert!(m.contains("Steward's own listen address"), "{m}");
    let m = refused(
        call(
            "http",
            json!({"url": format!("http://localhost:{}/", denied_addr.port())}),
        )
        .run(&ctx)
        .await,
    );
    assert!(m.contains("localhost resolves to 127.0.0.1"), "{m}");
    let m = refused(
        call(
            "http",
            json!({"url": format!("http://[::ffff:127.0.0.1]:{}/", denied_addr.port())}),
        )
        .run(&ctx)
        .await,
    );
    assert!(m.contains("denied"), "{m}");

    // An allowed server that redirects to the denied one.
    let (l, url) = listener().await;
    let redirect = async {
        let (mut sock, _) = l.accept().await.unwrap();
        read_request(&mut sock).await;
        let resp = format!(
            "HTTP/1.1 302 Found\r\nlocation: http://{denied_addr}/v1/estop\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
    };
    let c = call("http", json!({"url": url}));
    let (r, ()) = tokio::join!(c.run(&ctx), redirect);
    let m = refused(r);
    assert!(m.contains("Steward's own listen address"), "{m}");

    // Nothing ever connected to the denied listener.
    assert_eq!(
        denied.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
}

#[tokio::test]
async fn http_redirects_are_followed_and_drop_credentials_across_hosts() {
    let (a, url_a) = listener().await;
    let (b, _) = listener().await;
    let b_port = b.local_addr().unwrap().port();
    let c = call(
        "http",
        json!({"url": format!("{url_a}/start"), "method": "POST", "body": "x", "headers": {"Authorization": "Bearer t-123456"}}),
    );
    let ctx = ctx();
    let servers = async {
        let (mut sock, _) = a.accept().await.unwrap();
        let first = read_request(&mut sock).await;
        // Another host (localhost, not 127.0.0.1) and a 303: a GET without the body.
        let resp = format!(
            "HTTP/1.1 303 See Other\r\nlocation: http://localhost:{b_port}/done\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        drop(sock);
        let second = serve_once(&b, "200 OK", "landed").await;
        (first, second)
    };
    let (r, (first, second)) = tokio::join!(c.run(&ctx), servers);
    assert_eq!(r.unwrap().output, "landed");
    assert_eq!(first.header("authorization"), Some("Bearer t-123456"));
    assert_eq!(second.request_line(), "GET /done HTTP/1.1");
    assert_eq!(second.header("authorization"), None);
    assert_eq!(second.body, "");
}

#[tokio::test]
async fn shell_run_as_drops_to_that_user() {
    let mut ctx = ctx();
    ctx.run_as = Some("nobody".parse().unwrap());
    let c = call(
        "shell",
        json!({"argv": ["sh", "-c", "id -u; id -g; echo $HOME $USER"]}),
    );
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    if nix::unistd::Uid::effective().is_root() {
        let out = c.run(&ctx).await.unwrap();
        let lines: Vec<&str> = out.output.lines().collect();
        assert_eq!(lines[0], nobody.uid.to_string(), "{}", out.output);
        assert_eq!(lines[1], nobody.gid.to_string(), "{}", out.output);
        assert_eq!(lines[2], format!("{} nobody", nobody.dir.display()));
    } else {
        let m = match c.run(&ctx).await {
            Err(ActionError::Fatal { message, .. }) => message,
            other => panic!("{other:?}"),
        };
        assert!(m.contains("needs the server to run as root"), "{m}");
    }
    ctx.run_as = Some("no-such-user-here".parse().unwrap());
    let m = match c.run(&ctx).await {
        Err(ActionError::Fatal { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    assert!(m.contains("run_as no-such-user-here: no user"), "{m}");
}

#[test]
fn secret_references_are_checked_at_submit() {
    check_error(
        "shell",
        json!({"argv": ["x"], "env": {"P": {"secret": "../etc/passwd"}}}),
        "blocks[0].jobs[0].args.env",
        "value of \"P\" \"../etc/passwd\" is not a secret name",
    );
    check_error(
        "shell",
        json!({"argv": ["x"], "env": {"P": {"secret": 5}}}),
        "blocks[0].jobs[0].args.env",
        "value of \"P\" secret must name a secret (a string), not a number",
    );
    check_error(
        "http",
        json!({"url": {"vault": "x"}}),
        "blocks[0].jobs[0].args.url",
        "must be a string or {secret: NAME}",
    );
    check_error(
        "write_file",
        json!({"path": "/tmp/x", "content": 5}),
        "blocks[0].jobs[0].args.content",
        "must be a string or {secret: NAME}, not a number",
    );
    let c = call(
        "http",
        json!({"url": {"secret": "u"}, "headers": {"X-Key": {"secret": "k"}}, "body": {"secret": "b"}}),
    );
    let refs: Vec<(String, String)> = c
        .secret_refs()
        .into_iter()
        .map(|(f, n)| (f, n.to_string()))
        .collect();
    assert_eq!(
        refs,
        [
            ("url".to_owned(), "u".to_owned()),
            ("headers.X-Key".to_owned(), "k".to_owned()),
            ("body".to_owned(), "b".to_owned())
        ]
    );
}

#[tokio::test]
async fn write_file_under_run_as_writes_as_that_user() {
    if !nix::unistd::Uid::effective().is_root() {
        return; // Only root can act as another user; the refusal is tested with shell.
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut ctx = ctx();
    ctx.run_as = Some("nobody".parse().unwrap());
    // Where its user may write: the file is its user's.
    let target = open.join("f");
    call(
        "write_file",
        json!({"path": target.to_str().unwrap(), "content": "x"}),
    )
    .run(&ctx)
    .await
    .unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        std::fs::metadata(&target).unwrap().uid(),
        nobody.uid.as_raw()
    );
    // Where only root may write: refused, nothing written.
    let denied = dir.path().join("root-only");
    let (message, _, _) = failed(
        call(
            "write_file",
            json!({"path": denied.to_str().unwrap(), "content": "x"}),
        )
        .run(&ctx)
        .await,
    );
    assert!(message.contains("ermission denied"), "{message}");
    assert!(!denied.exists());
    // A shell job's cwd is entered as its user: a directory it may not enter fails it.
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let r = call(
        "shell",
        json!({"argv": ["true"], "cwd": private.to_str().unwrap()}),
    )
    .run(&ctx)
    .await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn write_file_with_a_secret_content_defaults_to_0600() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "k", "value-1234");
    let target = dir.path().join("k.out");
    call(
        "write_file",
        json!({"path": target.to_str().unwrap(), "content": {"secret": "k"}}),
    )
    .run(&ctx_with(dir.path(), Default::default()))
    .await
    .unwrap();
    assert_eq!(mode_of(&target), 0o600);
}

#[tokio::test]
async fn redirects_to_another_origin_carry_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "key", "api-key-12345");
    write_secret(dir.path(), "body", "secret-body-123");
    let ctx = ctx_with(dir.path(), Default::default());
    let (a, url_a) = listener().await;
    let (b, _) = listener().await;
    let b_port = b.local_addr().unwrap().port();
    let redirect = |status: &'static str, a: &'static str| {
        format!(
            "HTTP/1.1 {status}\r\nlocation: http://localhost:{b_port}/{a}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
    };
    // Headers from secrets, and those the rule hides, stay behind.
    let c = call(
        "http",
        json!({"url": format!("{url_a}/x"), "headers": {"X-Custom": {"secret": "key"}, "X-Api-Key": "literal-key-1", "Accept": "text/plain"}}),
    );
    let servers = async {
        let (mut sock, _) = a.accept().await.unwrap();
        read_request(&mut sock).await;
        sock.write_all(redirect("302 Found", "y").as_bytes())
            .await
            .unwrap();
        drop(sock);
        serve_once(&b, "200 OK", "ok").await
    };
    let (r, second) = tokio::join!(c.run(&ctx), servers);
    r.unwrap();
    assert_eq!(second.header("x-custom"), None);
    assert_eq!(second.header("x-api-key"), None);
    assert_eq!(second.header("accept"), Some("text/plain"));
    // A 307 would resend a secret body to the other origin: refused.
    let c = call(
        "http",
        json!({"url": format!("{url_a}/x"), "method": "PUT", "body": {"secret": "body"}}),
    );
    let server = async {
        let (mut sock, _) = a.accept().await.unwrap();
        read_request(&mut sock).await;
        sock.write_all(redirect("307 Temporary Redirect", "z").as_bytes())
            .await
            .unwrap();
    };
    let (r, ()) = tokio::join!(c.run(&ctx), server);
    match r {
        Err(ActionError::Fatal { message, .. }) => {
            assert!(message.contains("would send the secret body"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}
