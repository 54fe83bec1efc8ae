//! `/metrics` (docs/operating.md, Metrics) from the real binary, read with a Prometheus text
//! parser after a known mix of runs.

use std::time::Duration;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// The value of the sample named `metric` whose labels include `labels`; for a histogram,
/// its count (the `+Inf` bucket).
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value;
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_runs_and_jobs_by_workflow_state_and_action() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]).await;
    let mut c = server.client().await;
    // Two runs complete (3 jobs each), one fails (its shell job exits 3), one waits.
    for _ in 0..2 {
        let id = submit_and_exec(
            &mut c,
            &format!(
                "name: erase\nblocks:\n  - jobs: [{}, {{action: noop}}, {{action: noop}}]\n",
                sh("true")
            ),
        )
        .await;
        assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "completed");
    }
    let id = submit_and_exec(
        &mut c,
        &format!("name: x\nblocks:\n  - jobs: [{}]\n", sh("exit 3")),
    )
    .await;
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "failed");
    submit(&mut c, "name: x\nblocks:\n  - jobs: [{action: noop}]\n").await;

    let (code, text) = http_get(&server.addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let v = |m: &str, l: &[(&str, &str)]| value(&scrape, m, l);
    assert_eq!(v("steward_up", &[]), Some(1.0));
    assert_eq!(
        v(
            "steward_runs_finished_total",
            &[("workflow", "erase"), ("state", "completed")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        v(
            "steward_runs_finished_total",
            &[("workflow", "x"), ("state", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v("steward_job_attempts_total", &[("action", "shell")]),
        Some(3.0)
    );
    assert_eq!(
        v("steward_job_attempts_total", &[("action", "noop")]),
        Some(4.0)
    );
    assert_eq!(
        v("steward_job_failures_total", &[("action", "shell")]),
        Some(1.0)
    );
    assert_eq!(v("steward_job_failures_total", &[("action", "noop")]), None);
    assert_eq!(
        v("steward_job_duration_seconds", &[("action", "shell")]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(v("steward_run_start_latency_seconds", &[]), Some(3.0));
    assert!(v("steward_commit_latency_seconds", &[]).unwrap() >= 3.0);
    assert_eq!(v("steward_runs", &[("state", "submitted")]), Some(1.0));
    assert_eq!(v("steward_runs", &[("state", "running")]), Some(0.0));
    // No run ID is a label.
    assert!(!text.contains(&id), "{text}");

    // The dashboard and alert rules in deploy/ use only series that exist.
    for file in [
        "deploy/prometheus/steward-rules.yml",
        "deploy/grafana/steward-dashboard.json",
    ] {
        let body = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        let mut names: Vec<&str> = Vec::new();
        let mut rest = body.as_str();
        while let Some(i) = rest.find("steward_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            names.push(&tail[..end]);
            rest = &tail[end..];
        }
        assert!(names.len() > 5, "{file}");
        for name in names {
            // Alert labels that name an e-stop entry, not series.
            if matches!(name, "steward_estop" | "steward_state") {
                continue;
            }
            let series = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                text.lines().any(|l| l.starts_with(series)),
                "{file} uses {name}, which /metrics does not have:\n{text}"
            );
        }
    }

    // The log goes to a file, not a terminal: JSON lines, each line about a run carrying its
    // ID and workflow.
    let log = server.log_text();
    let finished: Vec<serde_json::Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .filter(|v| v["message"] == "run finished")
        .collect();
    assert_eq!(finished.len(), 3, "{log}");
    for v in &finished {
        assert!(v["span"]["run_id"].is_string(), "{v}");
        assert!(
            matches!(v["span"]["workflow"].as_str(), Some("erase" | "x")),
            "{v}"
        );
    }
}
