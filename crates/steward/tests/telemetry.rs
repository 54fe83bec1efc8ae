//! Traces and error reports (docs/operating.md, Traces and Error reports) from the real
//! binary to collectors on loopback: an OTLP/HTTP receiver that decodes what it is sent, and a
//! Sentry endpoint that keeps the envelopes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// One exported span, as the receiver decoded it.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attrs: Vec<(String, String)>,
    /// Each event's name and attributes.
    events: Vec<(String, Vec<(String, String)>)>,
    /// 2: error.
    status_code: i32,
    status_message: String,
    /// The request's `api-key` header.
    api_key: Option<String>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

type Spans = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP receiver (protobuf) on a free loopback port: its endpoint and what it got.
async fn otlp_receiver() -> (String, Spans) {
    let got: Spans = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let g = g.clone();
                async move {
                    let api_key = headers
                        .get("api-key")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let req = ExportTraceServiceRequest::decode(body).unwrap();
                    let mut spans = g.lock().unwrap();
                    for rs in req.resource_spans {
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                let events = s
                                    .events
                                    .iter()
                                    .map(|e| (e.name.clone(), attrs(&e.attributes)))
                                    .collect();
                                spans.push(Span {
                                    name: s.name,
                                    trace_id: hex(&s.trace_id),
                                    span_id: hex(&s.span_id),
                                    parent_span_id: hex(&s.parent_span_id),
                                    attrs: attrs(&s.attributes),
                                    events,
                                    status_code: s.status.as_ref().map_or(0, |st| st.code),
                                    status_message: s
                                        .status
                                        .map(|st| st.message)
                                        .unwrap_or_default(),
                                    api_key: api_key.clone(),
                                });
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    let addr = serve_loopback(app).await;
    (format!("http://{addr}"), got)
}

fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.clone()) {
                Some(AnyValue::StringValue(s)) => s,
                Some(AnyValue::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// Waits until a span matching `f` has arrived.
async fn wait_span(got: &Spans, what: &str, f: impl Fn(&Span) -> bool) -> Span {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        if let Some(s) = got.lock().unwrap().iter().find(|s| f(s)).cloned() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no span {what}; got {:#?}",
            got.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `00-TRACE-SPAN-FLAGS` split.
fn parts(traceparent: &str) -> (String, String) {
    let p: Vec<&str> = traceparent.trim().split('-').collect();
    assert_eq!(p.len(), 4, "{traceparent:?}");
    assert_eq!(p[0], "00");
    (p[1].to_owned(), p[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_spans_are_one_trace_across_a_kill_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (endpoint, spans) = otlp_receiver().await;
    let env = [
        ("STEWARD_OTLP_ENDPOINT", endpoint.as_str()),
        // Batches leave every 100 ms instead of OpenTelemetry's 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let (tp1, tp2, marker) = (
        dir.path().join("tp1"),
        dir.path().join("tp2"),
        dir.path().join("marker"),
    );
    // The second job hangs on its first attempt (the server is killed under it) and finishes
    // on the next.
    let first = sh(&format!("echo $TRACEPARENT > {}", tp1.display()));
    let second = sh(&format!(
        "echo $TRACEPARENT >> {tp}; if [ ! -e {m} ]; then touch {m}; sleep 300; fi",
        tp = tp2.display(),
        m = marker.display()
    ));
    let yaml = format!("name: hello\nblocks:\n  - jobs: [{first}]\n  - jobs: [{second}]\n");

    let mut server = Server::start(&data, &env).await;
    let mut c = server.client().await;
    let id = submit_and_exec(&mut c, &yaml).await;
    let trace = id.replace('-', "");
    // The first job's span is exported by the first process before it dies.
    let job1 = wait_span(&spans, "of the first job", |s| {
        s.name == "job" && s.trace_id == trace
    })
    .await;
    eventually("the second job to start", LONG, || marker.exists()).await;
    server.kill9().await;

    let mut server = Server::start(&data, &env).await;
    let mut c = server.client().await;
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "completed", "{run:?}");
    let job2 = wait_span(&spans, "of the second job's second attempt", |s| {
        s.name == "job" && s.attr("attempt") == Some("2")
    })
    .await;
    let resumed = wait_span(&spans, "of the resumed run", |s| {
        s.name == "run" && s.trace_id == trace
    })
    .await;

    // One trace, named by the run ID, across both processes.
    assert_eq!(job2.trace_id, trace, "{job2:?}");
    assert_eq!(resumed.attr("steward.run_id"), Some(id.as_str()));
    assert_eq!(
        job2.parent_span_id, resumed.span_id,
        "an attempt is a child of its run span"
    );
    assert_ne!(
        job1.parent_span_id, resumed.span_id,
        "each process drives the run under a span of its own"
    );
    assert_eq!(job1.attr("action"), Some("shell"));
    assert!(
        spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == "job" || s.name == "run")
            .all(|s| s.trace_id == trace),
        "every span of the run is in its trace: {:#?}",
        spans.lock().unwrap()
    );
    // Both processes put the run spans under the same root, derived from the run ID.
    assert!(!resumed.parent_span_id.is_empty());

    // Each job saw its own attempt's span as its parent.
    let (t, s) = parts(&std::fs::read_to_string(&tp1).unwrap());
    assert_eq!(
        (t.as_str(), s.as_str()),
        (trace.as_str(), job1.span_id.as_str())
    );
    let lines = std::fs::read_to_string(&tp2).unwrap();
    let last = lines.lines().last().unwrap();
    let (t, s) = parts(last);
    assert_eq!(
        (t.as_str(), s.as_str()),
        (trace.as_str(), job2.span_id.as_str())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_attempt_is_an_error_span() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (endpoint, spans) = otlp_receiver().await;
    let env = [
        ("STEWARD_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=k%3D1"),
    ];
    let mut server = Server::start(&data, &env).await;
    let mut c = server.client().await;
    let job = sh("echo nope; exit 3");
    let id = submit_and_exec(
        &mut c,
        &format!("name: hello\nblocks:\n  - jobs: [{job}]\n"),
    )
    .await;
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "failed");
    let trace = id.replace('-', "");
    let job = wait_span(&spans, "of the failed job", |s| {
        s.name == "job" && s.trace_id == trace
    })
    .await;
    assert_eq!(job.status_code, 2, "status error: {job:?}");
    assert!(job.status_message.contains("exit"), "{job:?}");
    assert_eq!(job.api_key.as_deref(), Some("k=1"), "the export's headers");
    // The run's span names its workflow and ends with an event saying how the run ended.
    let run = wait_span(&spans, "of the run", |s| {
        s.name == "run" && s.trace_id == trace
    })
    .await;
    assert_eq!(run.attr("workflow"), Some("hello"), "{run:?}");
    assert_eq!(job.parent_span_id, run.span_id);
    let (name, attrs) = run.events.last().expect("an event");
    assert_eq!(name, "run finished", "{run:?}");
    assert!(
        attrs.contains(&("state".to_owned(), "failed".to_owned())),
        "{run:?}"
    );
    server.stop().await;
}

type Envelopes = Arc<Mutex<Vec<String>>>;

/// A Sentry endpoint on a free loopback port: a DSN for project 42 and the envelopes it got.
async fn sentry_receiver() -> (String, Envelopes) {
    let got: Envelopes = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/api/42/envelope/",
        axum::routing::post(move |body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                g.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                axum::http::StatusCode::OK
            }
        }),
    );
    let addr = serve_loopback(app).await;
    (format!("http://publickey@{addr}/42"), got)
}

/// The event items of the envelopes received (an envelope is lines of JSON: its header, then
/// an item header and its payload for each item).
fn events(got: &Envelopes) -> Vec<serde_json::Value> {
    got.lock()
        .unwrap()
        .iter()
        .flat_map(|e| {
            e.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v.get("event_id").is_some() && v.get("platform").is_some())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_is_reported_to_sentry_with_its_tags_and_no_secret() {
    const SECRET: &str = "sentry-test-secret-9";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("policies.toml"),
        "[workflows.hello]\nsecrets = [\"db\"]\n",
    )
    .unwrap();
    let (dsn, got) = sentry_receiver().await;
    let mut server = Server::start(
        &data,
        &[
            ("STEWARD_SENTRY_DSN", dsn.as_str()),
            ("STEWARD_SECRET_DB", SECRET),
        ],
    )
    .await;
    assert!(
        !std::fs::read_to_string(&server.log)
            .unwrap()
            .contains("publickey"),
        "the DSN's key is not logged"
    );
    let mut c = server.client().await;
    let yaml = "name: hello\nlabels: {site: aap}\nblocks:\n  - jobs: [{action: noop}, \
                {action: shell, args: {argv: [sh, -c, 'echo pw=$PASS; echo pw=$PASS >&2; exit 3'], \
                env: {PASS: {secret: db}}}}]\n";
    let id = submit_and_exec(&mut c, yaml).await;
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "failed");

    let deadline = std::time::Instant::now() + LONG;
    let event = loop {
        if let Some(e) = events(&got)
            .into_iter()
            .find(|e| e["tags"]["run_id"] == id.as_str())
        {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no event for the run: {:?}",
            got.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let tags = &event["tags"];
    assert_eq!(tags["workflow"], "hello", "{event}");
    assert_eq!(tags["label.site"], "aap", "{event}");
    assert_eq!(tags["job"], "blocks[0].jobs[1]", "{event}");
    assert_eq!(tags["action"], "shell", "{event}");
    // Left out, an event's level is `error`.
    assert!(
        event["level"].is_null() || event["level"] == "error",
        "{event}"
    );
    assert_eq!(
        event["contexts"]["trace"]["trace_id"],
        id.replace('-', ""),
        "the event is in the run's trace: {event}"
    );
    assert!(
        event["message"]
            .as_str()
            .unwrap_or_default()
            .contains("run of hello failed"),
        "{event}"
    );
    assert!(
        event["extra"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.contains(&id.replace('-', ""))),
        "{event}"
    );
    server.stop().await;
    for e in got.lock().unwrap().iter() {
        assert!(!e.contains(SECRET), "a secret reached Sentry: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_inside_a_job_attempt_carries_the_run_and_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [
        ("STEWARD_LOG_FORMAT", "json"),
        // The shell action's start line is at `debug`.
        ("RUST_LOG", "info,actions=debug"),
    ];
    let mut server = Server::start(&data, &env).await;
    let mut c = server.client().await;
    let job = sh("true");
    let id = submit_and_exec(
        &mut c,
        &format!("name: hello\nblocks:\n  - jobs: [{{action: noop}}, {job}]\n"),
    )
    .await;
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "completed");
    server.stop().await;
    let log = server.log_text();
    let started: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["message"] == "shell job started")
        .collect();
    assert_eq!(started.len(), 1, "{log}");
    let span = &started[0]["span"];
    assert_eq!(span["run_id"], id.as_str(), "{span}");
    assert_eq!(span["workflow"], "hello", "{span}");
    assert_eq!(span["job"], format!("{id}/b0/j1").as_str(), "{span}");
    assert_eq!(span["action"], "shell", "{span}");
    assert_eq!(span["attempt"], 1, "{span}");
    assert_eq!(span["name"], "job", "{span}");
}
