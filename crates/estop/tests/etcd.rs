#![allow(clippy::unwrap_used)]

//! The e-stop list in etcd, against a real etcd server started on free loopback ports: each
//! "node" is an e-stop service of its own on its own connection, with its own SQLite audit
//! store. Changes are awaited with a generous deadline; nothing asserts on tight timings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use domain::estop::{EStopState, Snapshot, Target};
use domain::{Clock, SystemClock};
use estop::testing::EtcdServer;
use estop::{EStop, EStopHandle, EStopOptions, EtcdConfig, EtcdSource};
use store::EStopStore;
use store_sqlite::SqliteStore;

use EStopState::{Go, Stop};

const DEADLINE: Duration = Duration::from_secs(20);

/// One node: its audit store, its tasks, its service on the shared etcd.
struct Node {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    tasks: tasks::Tasks,
    _failures: tasks::Failures,
    handle: EStopHandle,
}

async fn node(etcd: &EtcdServer, stale_after: Duration) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("steward.db")).unwrap());
    let (tasks, failures) = tasks::Tasks::new();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: "/steward/estop/".into(),
        ..Default::default()
    };
    let source = EtcdSource::start(&cfg, store.clone(), clock.clone(), &tasks).unwrap();
    let opts = EStopOptions {
        unlisted: Stop,
        reread: Duration::from_millis(200),
        stale_after,
    };
    let handle = EStop::start(source, clock, opts, &tasks).await;
    Node {
        _dir: dir,
        store,
        tasks,
        _failures: failures,
        handle,
    }
}

fn t(s: &str) -> Target {
    s.parse().unwrap()
}

/// Waits until `f` holds for the node's snapshot.
async fn until(n: &Node, what: &str, f: impl Fn(&Snapshot) -> bool) {
    let mut rx = n.handle.subscribe();
    tokio::time::timeout(DEADLINE, async {
        loop {
            if f(&rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out waiting for {what}; have {:?}",
            n.handle.snapshot()
        )
    });
}

fn state_of(s: &Snapshot, target: &str) -> Option<EStopState> {
    match s {
        Snapshot::Ok(l) => l.get(&t(target)).map(|e| e.state),
        Snapshot::Unreadable(_) => None,
    }
}

async fn set(n: &Node, target: &str, state: EStopState, reason: &str) {
    n.handle
        .set(t(target), state, reason.into(), "ana".into())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_node_reaches_the_other_and_is_audited_once() {
    let etcd = EtcdServer::start();
    let (a, b) = (
        node(&etcd, Duration::from_secs(5)).await,
        node(&etcd, Duration::from_secs(5)).await,
    );
    // A fresh prefix holds nothing: unlisted runs are stopped.
    let labels: BTreeMap<String, String> = [("site".into(), "aap".into())].into();
    assert_eq!(b.handle.verdict("erase", &labels).state, Stop);
    set(&a, "*", Go, "").await;
    set(&a, "site=aap", Stop, "INC-1").await;
    until(&b, "site=aap stop on b", |s| {
        state_of(s, "site=aap") == Some(Stop)
    })
    .await;
    assert_eq!(b.handle.verdict("erase", &labels).state, Stop);
    assert_eq!(b.handle.verdict("erase", &BTreeMap::new()).state, Go);
    let rec = a
        .handle
        .clear(t("site=aap"), "ana".into(), "fixed".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.old_state, Some(Stop));
    until(&b, "site=aap cleared on b", |s| {
        matches!(s, Snapshot::Ok(_)) && state_of(s, "site=aap").is_none()
    })
    .await;
    // The audit trail is the database's: the node that made the change recorded it.
    let audit = a.store.audit_list(None, 10).await.unwrap();
    assert_eq!(audit.len(), 3, "{audit:?}");
    assert!(b.store.audit_list(None, 10).await.unwrap().is_empty());
    a.tasks.token().cancel();
    b.tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sets_of_one_target_both_land_in_order() {
    let etcd = EtcdServer::start();
    let (a, b) = (
        node(&etcd, Duration::from_secs(5)).await,
        node(&etcd, Duration::from_secs(5)).await,
    );
    let mut before: Option<EStopState> = None;
    for round in 0..10 {
        let (ra, rb) = tokio::join!(
            a.handle
                .set(t("erase"), Stop, format!("a-{round}"), "ana".into()),
            b.handle
                .set(t("erase"), Go, format!("b-{round}"), "bob".into()),
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        // The entry left is the one written last; the other landed first, on top of the
        // previous round's, and the last one's old state is the first one's new state.
        a.handle.reload().await;
        let Snapshot::Ok(list) = &*a.handle.snapshot() else {
            panic!("unreadable")
        };
        let last = list.get(&t("erase")).unwrap();
        let (first, second) = if last.reason == ra.reason {
            (&rb, &ra)
        } else {
            (&ra, &rb)
        };
        assert_eq!(last.reason, second.reason);
        assert_eq!(first.old_state, before, "round {round}: {ra:?} {rb:?}");
        assert_eq!(
            second.old_state, first.new_state,
            "round {round}: {ra:?} {rb:?}"
        );
        before = second.new_state;
    }
    a.tasks.token().cancel();
    b.tasks.token().cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_etcd_lose_no_change_on_any_node() {
    let mut etcd = EtcdServer::start();
    let nodes = [
        node(&etcd, Duration::from_secs(30)).await,
        node(&etcd, Duration::from_secs(30)).await,
    ];
    let writer = node(&etcd, Duration::from_secs(30)).await;
    for i in 0..5 {
        set(&writer, &format!("site=s{i}"), Stop, "before the restart").await;
        etcd.stop();
        etcd.restart();
        // Written right after the restart, while the watches reconnect.
        let state = if i % 2 == 0 { Go } else { Stop };
        set(&writer, &format!("w{i}"), state, "after the restart").await;
    }
    for n in &nodes {
        until(n, "every change", |s| {
            (0..5).all(|i| {
                state_of(s, &format!("site=s{i}")) == Some(Stop)
                    && state_of(s, &format!("w{i}")) == Some(if i % 2 == 0 { Go } else { Stop })
            })
        })
        .await;
    }
    for n in nodes.iter().chain([&writer]) {
        n.tasks.token().cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_stops_everything_within_the_staleness_limit_and_recovers() {
    let mut etcd = EtcdServer::start();
    let stale_after = Duration::from_secs(2);
    let nodes = [
        node(&etcd, stale_after).await,
        node(&etcd, stale_after).await,
    ];
    set(&nodes[0], "*", Go, "").await;
    for n in &nodes {
        until(n, "go", |s| state_of(s, "*") == Some(Go)).await;
    }

    // Frozen: connections hang and no read answers.
    etcd.freeze();
    let frozen = tokio::time::Instant::now();
    for n in &nodes {
        until(n, "unreadable while frozen", |s| {
            matches!(s, Snapshot::Unreadable(_))
        })
        .await;
        assert_eq!(n.handle.verdict("erase", &BTreeMap::new()).state, Stop);
        assert!(n.handle.alert().is_some());
    }
    assert!(
        frozen.elapsed() < stale_after + Duration::from_secs(2),
        "every node stopped after {:?}",
        frozen.elapsed()
    );
    etcd.thaw();
    for n in &nodes {
        until(n, "readable after the thaw", |s| {
            state_of(s, "*") == Some(Go)
        })
        .await;
    }

    // Gone: connections are refused.
    etcd.kill();
    for n in &nodes {
        until(n, "unreadable while down", |s| {
            matches!(s, Snapshot::Unreadable(_))
        })
        .await;
    }
    etcd.restart();
    for n in &nodes {
        until(n, "readable after the restart", |s| {
            state_of(s, "*") == Some(Go)
        })
        .await;
        assert!(n.handle.alert().is_none());
        n.tasks.token().cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_is_not_steward_s_makes_the_list_unreadable_naming_the_key() {
    let etcd = EtcdServer::start();
    let n = node(&etcd, Duration::from_secs(5)).await;
    set(&n, "*", Go, "").await;
    // Written by hand, as `etcdctl put /steward/estop/erase stop` would.
    let body = serde_json::json!({
        "key": base64("/steward/estop/erase"),
        "value": base64("stop"),
    });
    etcd.post("/v3/kv/put", &body.to_string());
    until(&n, "unreadable", |s| matches!(s, Snapshot::Unreadable(_))).await;
    let alert = n.handle.alert().unwrap();
    assert!(alert.contains("/steward/estop/erase"), "{alert}");
    assert_eq!(n.handle.verdict("other", &BTreeMap::new()).state, Stop);
    n.tasks.token().cancel();
}

fn base64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
