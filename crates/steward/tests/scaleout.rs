//! Several `steward serve` nodes sharing one PostgreSQL database (docs/operating.md, Several nodes on PostgreSQL): a real
//! PostgreSQL server, real nodes, real kills.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proto::v1 as pb;
use store_postgres::testing::PgServer;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

fn node_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("STEWARD_DATABASE", url.to_owned()),
        ("STEWARD_LEASE_TTL", "2s".to_owned()),
        ("STEWARD_KILL_GRACE", "1s".to_owned()),
    ]
}

async fn start_node(data: &std::path::Path, env: &[(&'static str, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(data, &env).await
}

/// Jobs whose completion the database holds.
async fn completed_in_db(url: &str) -> BTreeSet<String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let query = async move {
        client
            .query(
                "SELECT run_id, block_idx, idx FROM jobs WHERE state = 'completed'",
                &[],
            )
            .await
            .unwrap()
    };
    tokio::pin!(conn);
    let rows = tokio::select! {
        rows = query => rows,
        r = &mut conn => panic!("connection ended: {r:?}"),
    };
    rows.iter()
        .map(|r| {
            format!(
                "{}/b{}/j{}",
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2)
            )
        })
        .collect()
}

fn starts(log: &std::path::Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Some(key) = line.strip_prefix("start ") {
            *m.entry(key.to_owned()).or_insert(0) += 1;
        }
    }
    m
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_run_is_taken_over_by_another() {
    let pg = PgServer::start().await;
    let url = pg.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("jobs.log");
    let job = logged_job(&log);
    let yaml = format!(
        "name: erase\nblocks:\n  - jobs: [{job}]\n  - concurrency: 2\n    jobs: [{job}, {job}, {job}, {job}]\n  - jobs: [{job}]\n"
    );
    let env = node_env(&url);
    // Node A kills itself (SIGKILL) right after its 6th durable job commit.
    let mut a_env = env.clone();
    a_env.push((
        "FAILPOINTS",
        "engine::job_after_commit=5*off->return".to_owned(),
    ));
    let mut a = start_node(&dir.path().join("a"), &a_env).await;
    let b = start_node(&dir.path().join("b"), &env).await;

    // Submitted and executed through A: A holds the leases.
    let mut ca = a.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = submit(&mut ca, &yaml).await;
        ca.exec(pb::ExecRequest { id: id.clone() }).await.unwrap();
        ids.push(id);
    }
    assert!(
        !a.wait_exit(LONG).await.success(),
        "the fail point killed A"
    );
    let started_at_kill = starts(&log);
    let done_before = completed_in_db(&url).await;
    assert!(!done_before.is_empty(), "A completed some jobs");
    let in_flight: Vec<String> = started_at_kill
        .keys()
        .filter(|k| !done_before.contains(*k))
        .cloned()
        .collect();
    assert!(!in_flight.is_empty(), "A had jobs in flight");

    // B sees A's runs at once, and finishes them once A's leases run out.
    let mut cb = b.client().await;
    for id in &ids {
        let run = wait_terminal(&mut cb, id, LONG).await;
        assert_eq!(run.state, "completed", "run {id}: {run:?}");
    }
    // Every run is terminal, so B starts nothing more of them; A is gone, and its jobs' shells
    // died with it: the job log holds every start there will be.
    let starts = starts(&log);
    for key in &done_before {
        assert_eq!(
            starts.get(key),
            Some(&1),
            "{key} completed on A: never again"
        );
    }
    for key in &in_flight {
        assert_eq!(
            starts.get(key),
            Some(&2),
            "{key} was in flight on A: B ran it again, same key"
        );
    }
    assert_eq!(starts.len(), 3 * 6, "every job ran");
    let b_log = b.log_text();
    assert!(
        b_log.contains("claimed"),
        "B says it took the runs over:\n{b_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_estop_set_through_one_node_stops_runs_on_another() {
    estop_through_one_node_stops_runs_on_another(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_estop_in_etcd_set_through_one_node_stops_runs_on_another() {
    let etcd = estop::testing::EtcdServer::start();
    estop_through_one_node_stops_runs_on_another(&[
        ("STEWARD_ESTOP_SOURCE", "etcd".to_owned()),
        (
            "STEWARD_ETCD_ENDPOINTS",
            format!("[\"{}\"]", etcd.endpoint()),
        ),
    ])
    .await;
}

/// Two nodes on one database, the e-stop where `extra` says (the database by default): a stop
/// set through B stops a run on A, and both nodes agree on the list and the audit trail.
async fn estop_through_one_node_stops_runs_on_another(extra: &[(&'static str, String)]) {
    let pg = PgServer::start().await;
    let url = pg.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = node_env(&url);
    env.push(("STEWARD_AUTH", "token".to_owned()));
    env.extend(extra.iter().cloned());
    let a = start_node(&dir.path().join("a"), &env).await;
    let b = start_node(&dir.path().join("b"), &env).await;
    let pidfile = dir.path().join("pid");
    let mut ca = a.client().await;
    let id = start_long_job(&mut ca, &pidfile, "erase", "aap").await;
    let child = read_pid(&pidfile);
    // A token made through A serves on B: the nodes share the tokens.
    let ana = a.token("ana", "responder");

    // The stop goes to B; the run lives on A.
    cli_as(
        Some(&ana),
        &b.addr,
        &["estop", "set", "site=aap", "stop", "--reason", "INC-7"],
    );
    let run = wait_terminal(&mut ca, &id, LONG).await;
    assert_eq!(run.state, "stopped");
    let cause = run.stop_cause.unwrap();
    assert_eq!(cause.details.get("set_by").map(String::as_str), Some("ana"));
    eventually("the job's process group to be gone", LONG, || {
        process_gone(child)
    })
    .await;

    // Both nodes refuse new work for the target, and both show the same list and audit trail.
    for node in [&a, &b] {
        let addr = &node.addr;
        let mut c = node.client().await;
        let err = c
            .submit(pb::SubmitRequest {
                spec: Some(spec(
                    "name: erase\nlabels: {site: aap}\nblocks:\n  - jobs: [{action: noop}]\n",
                )),
                start: false,
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "{addr}: {err:?}"
        );
        assert!(err.message().contains("INC-7"), "{}", err.message());
        let mut e = proto::v1::e_stop_client::EStopClient::new(node.channel().await);
        let audit = e
            .audit(pb::EStopAuditRequest {
                target: "site=aap".into(),
                limit: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(audit.records.len(), 1, "{addr}");
        // Runs are shared too: B answers for a run that A drove.
        assert_eq!(status(&mut c, &id).await.state, "stopped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_mid_run_is_ridden_out() {
    let mut pg = PgServer::start().await;
    let url = pg.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("jobs.log");
    let job = logged_job(&log);
    let yaml = format!(
        "name: erase\nblocks:\n  - jobs: [{job}, {job}]\n  - jobs: [{job}, {job}]\n  - jobs: [{job}, {job}]\n  - jobs: [{job}, {job}]\n"
    );
    // The e-stop list in a file here: this is about the runs' store riding out the outage,
    // which is shorter than the lease.
    let mut env = node_env(&url);
    env.push(("STEWARD_ESTOP_SOURCE", "file".to_owned()));
    env.push(("STEWARD_LEASE_TTL", "15s".to_owned()));
    let node = start_node(&dir.path().join("a"), &env).await;
    let mut c = node.client().await;
    let id = submit_and_exec(&mut c, &yaml).await;
    eventually("two jobs to finish", LONG, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.matches("done ").count() >= 2)
    })
    .await;

    pg.restart(Duration::from_secs(2)).await;

    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "completed", "{run:?}\n{}", node.log_text());
    let starts = starts(&log);
    assert_eq!(starts.len(), 8, "every job ran");
    assert!(
        starts.values().all(|&n| n <= 2),
        "a job runs again only if the outage caught it in flight: {starts:?}"
    );
    let (code, _) = http_get(&node.addr, "/readyz").await.unwrap();
    assert_eq!(code, 200);
    // New work goes through again.
    let again = submit(&mut c, "name: erase\nblocks:\n  - jobs: [{action: noop}]\n").await;
    c.exec(pb::ExecRequest { id: again.clone() }).await.unwrap();
    assert_eq!(wait_terminal(&mut c, &again, LONG).await.state, "completed");
}

/// A node that cannot renew its leases for a whole `lease_ttl` (the database out of reach)
/// must stop driving its runs, which another node may take over now: its jobs are ended, it
/// stops with the cause `lost_store` recorded and exit code 1, and once the database is back
/// the run resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_past_the_lease_stops_the_node_with_lost_store() {
    let mut pg = PgServer::start().await;
    let url = pg.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = node_env(&url);
    env.push(("STEWARD_ESTOP_SOURCE", "file".to_owned()));
    let data = dir.path().join("a");
    let mut node = start_node(&data, &env).await;
    let mut c = node.client().await;
    let pidfile = dir.path().join("pid");
    let id = start_long_job(&mut c, &pidfile, "erase", "aap").await;
    let child = read_pid(&pidfile);

    pg.stop_now();
    let exit = node.wait_exit(LONG).await;
    assert_eq!(exit.code(), Some(1), "{}", node.log_text());
    assert!(process_gone(child), "the job outlived its lease");
    let last = std::fs::read_to_string(data.join("last-stop.json")).unwrap();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["kind"], "lost_store", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("no lease renewal"),
        "{last}"
    );

    pg.start_again().await;
    std::fs::remove_file(&pidfile).unwrap();
    let node = start_node(&data, &env).await;
    eventually("the job to run again", LONG, || pidfile.exists()).await;
    let mut c = node.client().await;
    assert_eq!(status(&mut c, &id).await.state, "running");
}

/// With the e-stop list in the database, a database that cannot be read stops everything (fail
/// closed) and says so, until it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_fails_closed_when_the_estop_lives_there() {
    let mut pg = PgServer::start().await;
    let url = pg.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    // An outage shorter than the lease.
    let mut env = node_env(&url);
    env.push(("STEWARD_LEASE_TTL", "15s".to_owned()));
    let node = start_node(&dir.path().join("a"), &env).await;
    let mut c = node.client().await;
    let pidfile = dir.path().join("pid");
    start_long_job(&mut c, &pidfile, "erase", "aap").await;
    let child = read_pid(&pidfile);

    let addr = node.addr.clone();
    let watch = async {
        let deadline = std::time::Instant::now() + LONG;
        loop {
            // The store's own failure may be reported first: the e-stop's must follow.
            if let Some((503, body)) = http_get(&addr, "/readyz").await {
                assert!(
                    body.contains("estop_unreadable") || body.contains("store_failing"),
                    "{body}"
                );
                if body.contains("estop_unreadable") {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never reported the unreadable list"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::join!(pg.restart(Duration::from_secs(3)), watch);
    eventually("the in-flight job to be stopped", LONG, || {
        process_gone(child)
    })
    .await;
    let deadline = std::time::Instant::now() + LONG;
    while http_get(&node.addr, "/readyz").await.map(|(code, _)| code) != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "the alert never cleared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.log_text().contains("e-stop"), "{}", node.log_text());
}

/// A node's own files (here the e-stop file) are created on the first start of its data
/// directory only, even when the database is shared and the node's name is configured: a file
/// lost later stays lost, and everything stops, rather than coming back as `* go`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_lost_estop_file_is_not_recreated_on_a_later_start() {
    let pg = PgServer::start().await;
    let url = pg.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a");
    let mut env = node_env(&url);
    env.push(("STEWARD_ESTOP_SOURCE", "file".to_owned()));
    env.push(("STEWARD_NODE_ID", "node-a".to_owned()));
    let mut node = start_node(&data, &env).await;
    assert!(
        data.join("estop.json").exists(),
        "the first start writes * go"
    );
    node.stop().await;
    std::fs::remove_file(data.join("estop.json")).unwrap();

    let node = start_node(&data, &env).await;
    assert!(!data.join("estop.json").exists());
    let (code, body) = http_get(&node.addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("estop_unreadable"), "{body}");
}

/// `steward drill estop` with `args`, as `token`: its exit status, stdout and stderr.
fn drill(token: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["drill", "estop"])
        .args(args)
        .env("STEWARD_TOKEN", token)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Unfinished runs, as a node lists them.
async fn unfinished(node: &Server) -> Vec<pb::RunSummary> {
    let mut c = node.client().await;
    c.list(pb::ListRequest {
        states: ["submitted", "queued", "running", "paused"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estop_drill_reaches_three_nodes_and_leaves_nothing_behind() {
    let pg = PgServer::start().await;
    let url = pg.fresh_db().await;
    let etcd = estop::testing::EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env = node_env(&url);
    env.push(("STEWARD_AUTH", "token".to_owned()));
    env.push(("STEWARD_ESTOP_SOURCE", "etcd".to_owned()));
    env.push((
        "STEWARD_ETCD_ENDPOINTS",
        format!("[\"{}\"]", etcd.endpoint()),
    ));
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(start_node(&dir.path().join(name), &env).await);
    }
    let ops = nodes[0].token("ops", "operator");
    let list_before = cli_as(Some(&ops), &nodes[1].addr, &["estop", "list", "--json"]).stdout;

    let mut args = vec!["--json".to_owned()];
    for n in &nodes {
        args.extend(["--node".to_owned(), n.addr.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = drill(&ops, &args);
    assert!(ok, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = report["nodes"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{report}");
    for (row, node) in rows.iter().zip(&nodes) {
        assert_eq!(row["node"], node.addr.as_str(), "{report}");
        assert_eq!(row["state"], "stopped", "{report}");
        assert!(row["stopped_after_ms"].as_f64().unwrap() > 0.0, "{report}");
        // Each canary was driven by the node it was submitted to.
        let mut c = node.client().await;
        let run = status(&mut c, row["run_id"].as_str().unwrap()).await;
        assert_eq!(run.stop_cause.unwrap().kind, "estop");
    }
    // Nothing left: no unfinished run, the list as it was, and the drill in the audit trail.
    for n in &nodes {
        assert!(unfinished(n).await.is_empty(), "{}", n.addr);
    }
    let list_after = cli_as(Some(&ops), &nodes[2].addr, &["estop", "list", "--json"]).stdout;
    assert_eq!(list_before, list_after);
    let target = report["target"].as_str().unwrap();
    let audit = cli_as(
        Some(&ops),
        &nodes[0].addr,
        &["estop", "audit", "--target", target, "--json"],
    )
    .stdout;
    let audit: serde_json::Value = serde_json::from_slice(&audit).unwrap();
    let records = audit["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "set, then cleared: {audit}");
    assert!(
        records[0]["reason"].as_str().unwrap().contains(" done: "),
        "the figures are in the audit trail: {audit}"
    );

    // The text form: a line per node.
    let mut text_args = Vec::new();
    for n in &nodes {
        text_args.extend(["--node", n.addr.as_str()]);
    }
    let (ok, out, err) = drill(&ops, &text_args);
    assert!(ok, "{out}\n{err}");
    for n in &nodes {
        assert_eq!(
            out.lines()
                .filter(|l| l.starts_with(n.addr.as_str()))
                .count(),
            1,
            "{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estop_drill_refuses_a_target_that_matches_real_work() {
    let dir = tempfile::tempdir().unwrap();
    let a = Server::start(&dir.path().join("a"), &[]).await;
    let mut c = a.client().await;
    let pidfile = dir.path().join("pid");
    let real = start_long_job(&mut c, &pidfile, "erase", "aap").await;
    let (ok, _, err) = drill("", &["--node", &a.addr, "--target", "site=aap"]);
    assert!(!ok);
    assert!(err.contains("a drill must not stop real work"), "{err}");
    assert!(err.contains(&real), "{err}");
    // An entry someone set is not the drill's to change.
    cli_as(
        None,
        &a.addr,
        &["estop", "set", "site=bbb", "pause", "--reason", "INC-9"],
    );
    let (ok, _, err) = drill("", &["--node", &a.addr, "--target", "site=bbb"]);
    assert!(!ok);
    assert!(err.contains("a drill must not change it"), "{err}");
    // Nothing changed: the real run runs on, no canary was submitted.
    let runs = unfinished(&a).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].id, real);
    assert_eq!(status(&mut c, &real).await.state, "running");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_outcomes_survive_a_kill_at_the_pipelined_writers_commit() {
    let pg = PgServer::start().await;
    for failpoint in ["store::writer_before_commit", "store::writer_after_commit"] {
        // The kill comes at the writer's 21st commit; should no job have completed by then (a
        // loaded machine), the scenario is run again on a fresh database, the kill 10 commits
        // later.
        let mut skip = 20;
        let (_dir, data, log, yaml, url, done_before) = loop {
            let url = pg.fresh_db().await;
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("a");
            let log = dir.path().join("jobs.log");
            let job = logged_job(&log);
            let yaml = format!(
                "name: erase\nblocks:\n  - concurrency: 2\n    jobs: [{job}, {job}, {job}, {job}]\n  - jobs: [{job}]\n"
            );
            let mut killed_env = node_env(&url);
            killed_env.push(("FAILPOINTS", format!("{failpoint}={skip}*off->return")));
            let mut a = start_node(&data, &killed_env).await;
            let mut c = a.client().await;
            crate::start_keyed(&mut c, &yaml, 4).await;
            assert!(
                !a.wait_exit(LONG).await.success(),
                "{failpoint}: the fail point must have killed the node"
            );
            let done_before = completed_in_db(&url).await;
            if !done_before.is_empty() {
                break (dir, data, log, yaml, url, done_before);
            }
            assert!(
                skip < 40,
                "{failpoint}: no job completed before the kill, even at commit {}",
                skip + 1
            );
            skip += 10;
        };
        let env = node_env(&url);

        // The same node again: it resumes its runs; the clients' retries find them.
        let a = start_node(&data, &env).await;
        let mut c = a.client().await;
        assert_eq!(crate::start_keyed(&mut c, &yaml, 4).await, 4);
        let runs = c
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .runs;
        assert_eq!(runs.len(), 4, "{failpoint}: one run per key");
        for r in &runs {
            let run = wait_terminal(&mut c, &r.id, LONG).await;
            assert_eq!(run.state, "completed", "{failpoint}: {run:?}");
        }
        let starts = starts(&log);
        for key in &done_before {
            assert_eq!(
                starts.get(key),
                Some(&1),
                "{failpoint}: {key} was committed before the kill and must not run again"
            );
        }
        assert_eq!(starts.len(), 20, "{failpoint}: every job ran: {starts:?}");
    }
}
