//! `/metrics`: the engine's counters and histograms (`engine::metrics`), and this node's state
//! read at each scrape, in the OpenMetrics text format through `prometheus-client`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    kind: String,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    source: String,
    state: String,
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    r.register(name, help, g);
}

/// `s` escaped for a label value: prometheus-client writes values as given, and a cause may
/// hold quotes or a newline (a database error, a panic message).
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub(crate) async fn render(st: &AppState) -> String {
    let e = &st.service.engine;
    let mut r = Registry::default();
    gauge(&mut r, "steward_up", "1 while the process serves", 1);
    gauge(
        &mut r,
        "steward_accepting_work",
        "1 until a shutdown begins",
        i64::from(e.is_accepting()),
    );
    gauge(
        &mut r,
        "steward_active_runs",
        "Runs this node is driving",
        i64::try_from(e.active_runs()).unwrap_or(i64::MAX),
    );
    gauge(
        &mut r,
        "steward_running_jobs",
        "Jobs running on this node",
        i64::try_from(e.running_jobs()).unwrap_or(i64::MAX),
    );
    gauge(
        &mut r,
        "steward_uptime_seconds",
        "Seconds since the API started",
        i64::try_from(st.started.elapsed().as_secs()).unwrap_or(i64::MAX),
    );
    gauge(
        &mut r,
        "steward_store_failing",
        "1 while the store refuses this node's writes (nothing new starts)",
        i64::from(e.store_problem().is_some()),
    );
    // Runs by state, from the store (every node's, with a shared database).
    if let Ok(counts) = e.count_by_state_recent().await {
        let runs = Family::<StateLabels, Gauge>::default();
        for state in ["submitted", "queued", "running", "paused"] {
            let n = counts
                .iter()
                .find(|(s, _)| s.as_str() == state)
                .map_or(0, |(_, n)| *n);
            runs.get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        r.register(
            "steward_runs",
            "Runs not yet finished, by state (in the store)",
            runs,
        );
    }
    if let Some(h) = &st.service.estop {
        let snap = h.snapshot();
        let entries = match snap.as_ref() {
            domain::estop::Snapshot::Ok(l) => l.entries.len(),
            domain::estop::Snapshot::Unreadable(_) => 0,
        };
        gauge(
            &mut r,
            "steward_estop_alert",
            "1 while the e-stop list cannot be read (everything is stopped)",
            i64::from(h.alert().is_some()),
        );
        let failures = Counter::<u64>::default();
        failures.inc_by(h.read_failures());
        r.register(
            "steward_estop_read_failures",
            "Failed reads of the e-stop list",
            failures,
        );
        let changes = Family::<ChangeLabels, Counter>::default();
        for ((source, state), n) in h.change_counts() {
            changes
                .get_or_create(&ChangeLabels { source, state })
                .inc_by(n);
        }
        r.register(
            "steward_estop_changes",
            "E-stop changes made or noticed by this node, by source and new state",
            changes,
        );
        gauge(
            &mut r,
            "steward_estop_entries",
            "Entries in the e-stop list",
            i64::try_from(entries).unwrap_or(i64::MAX),
        );
    }
    if let Some(a) = &st.policy_alert {
        let on = a.lock().map(|g| g.is_some()).unwrap_or(true);
        gauge(
            &mut r,
            "steward_policy_alert",
            "Whether the policy file on disk is refused (the policies loaded before stay in force)",
            i64::from(on),
        );
    }
    let cause = |c: &domain::StopCause| CauseLabels {
        kind: c.kind().to_owned(),
        cause: label_value(&c.to_string()),
    };
    if let Some(c) = e.shutdown_cause() {
        let f = Family::<CauseLabels, Gauge>::default();
        f.get_or_create(&cause(&c)).set(1);
        r.register(
            "steward_stopping",
            "1 while the process stops, labelled with the cause",
            f,
        );
    }
    if let Some(c) = &st.previous_stop {
        let f = Family::<CauseLabels, Gauge>::default();
        f.get_or_create(&cause(c)).set(1);
        r.register(
            "steward_previous_stop_info",
            "How the previous process of this data directory stopped",
            f,
        );
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode_registry(&mut out, &r);
    let _ = encode_registry(&mut out, e.metrics().registry());
    let _ = encode_eof(&mut out);
    out
}
