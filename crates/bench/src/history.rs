//! `--suite history`: a year of runs. With `--stored-runs` finished runs in the store (SQLite,
//! or PostgreSQL with `--database`): Status p50, List by state, workflow and label p99 (first
//! pages and a deep page), Submit throughput as a ratio to an empty store, and RSS.
//!
//! The runs are stored through the store (as Submit stores them, 1,024 at a time), then marked
//! finished in one UPDATE: setting up a million runs through the API would take the figure
//! longer than the measurements.

use std::time::{Duration, Instant};

use futures::StreamExt;
use proto::v1 as pb;

use crate::{Bench, BenchOpts, EStopMode, ms, percentile, start_full};

const WORKFLOWS: usize = 10;
const SITES: usize = 100;
const SUBMITS: usize = 5_000;
const CLIENTS: usize = 16;

fn spec(i: usize) -> domain::WorkflowSpec {
    let mut s = domain::WorkflowSpec {
        name: if i.is_multiple_of(WORKFLOWS) {
            "bench".into()
        } else {
            format!("bench{}", i % WORKFLOWS)
        },
        ..Default::default()
    };
    s.labels.insert("site".into(), format!("s{}", i % SITES));
    let mut b = domain::BlockSpec::default();
    for _ in 0..3 {
        b.jobs.push(domain::JobSpec {
            action: "noop".into(),
            ..Default::default()
        });
    }
    s.blocks.push(b);
    s
}

/// Submits (only) `SUBMITS` runs from `CLIENTS` clients: runs a second.
async fn submit_rate(b: &Bench) -> anyhow::Result<f64> {
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(b.client().await?);
    }
    let req = crate::noop_spec(3);
    let started = Instant::now();
    let results: Vec<Result<(), tonic::Status>> = futures::stream::iter(0..SUBMITS)
        .map(|i| {
            let mut c = clients[i % CLIENTS].clone();
            let spec = req.clone();
            async move {
                c.submit(pb::SubmitRequest {
                    spec: Some(spec),
                    start: false,
                })
                .await?;
                Ok(())
            }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(SUBMITS as f64 / started.elapsed().as_secs_f64())
}

async fn mark_finished(b: &Bench, database: Option<&str>) -> anyhow::Result<()> {
    let sql = "UPDATE runs SET state = 'completed', started_at = created_at,
                   ended_at = created_at + 1000, expires_at = NULL
               WHERE state = 'submitted'";
    match database {
        None => {
            let c = rusqlite::Connection::open(b._dir.path().join("steward.db"))?;
            c.busy_timeout(Duration::from_secs(60))?;
            c.execute(sql, [])?;
        }
        Some(url) => {
            let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            let update = c.execute(sql, &[]);
            tokio::pin!(conn);
            tokio::select! {
                r = update => { r?; }
                r = &mut conn => anyhow::bail!("the connection ended: {r:?}"),
            }
        }
    }
    Ok(())
}

/// p50 and p99 of `n` List calls of `req`, and the size of its page.
async fn list_latency(
    b: &Bench,
    req: pb::ListRequest,
    n: usize,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let mut c = b.client().await?;
    let mut samples = Vec::with_capacity(n);
    let mut got = 0;
    for _ in 0..n {
        let t = Instant::now();
        got = c.list(req.clone()).await?.into_inner().runs.len();
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99), got))
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) async fn history_suite(o: &BenchOpts) -> anyhow::Result<()> {
    let n = o.stored_runs;
    let backend = if o.database.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!(
        "\n## history: {n} finished runs stored ({backend}), {WORKFLOWS} workflows, {SITES} sites, in-process node, gRPC clients"
    );
    let b = start_full(256, EStopMode::AllGo, None, o.database.as_deref()).await?;
    submit_rate(&b).await?;
    let empty = submit_rate(&b).await?;

    let started = Instant::now();
    let completed = b
        .store
        .count_by_state()
        .await?
        .into_iter()
        .find(|(s, _)| *s == domain::RunState::Completed)
        .map_or(0, |(_, n)| n);
    let ids = if completed >= n as u64 {
        // A database that holds them from an earlier run of the suite (PostgreSQL takes a
        // quarter of an hour to store a million): its runs are read, not stored again.
        println!("  the database holds {completed} finished runs already: using them");
        let mut c = b.client().await?;
        let mut ids = Vec::new();
        let mut token = String::new();
        while ids.len() < 10_000 {
            let page = c
                .list(pb::ListRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            ids.extend(
                page.runs
                    .iter()
                    .filter_map(|r| r.id.parse::<domain::RunId>().ok()),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        ids
    } else {
        let now = domain::Clock::now(&domain::SystemClock);
        let ids = crate::store_runs(
            b.store.as_ref(),
            (0..n).map(|i| crate::new_run(&spec(i), now)),
        )
        .await?;
        mark_finished(&b, o.database.as_deref()).await?;
        println!(
            "  stored and finished {n} runs in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        ids
    };

    let mut c = b.client().await?;
    let mut st = Vec::with_capacity(2000);
    for i in 0..2000 {
        let id = ids[(i * 7919) % ids.len()].to_string();
        let t = Instant::now();
        c.status(pb::StatusRequest { id }).await?;
        st.push(t.elapsed());
    }
    st.sort();
    println!(
        "  Status: p50 {}, p99 {}",
        ms(percentile(&st, 0.5)),
        ms(percentile(&st, 0.99))
    );
    let page = |f: fn(&mut pb::ListRequest)| {
        let mut r = pb::ListRequest {
            page_size: 100,
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let deep = ids[ids.len() / 2].to_string();
    for (what, req) in [
        (
            "state=completed",
            page(|r| r.states = vec!["completed".into()]),
        ),
        ("workflow=bench3", page(|r| r.name = "bench3".into())),
        (
            "label site=s42",
            page(|r| {
                r.labels.insert("site".into(), "s42".into());
            }),
        ),
        (
            "label site=s42 and state=completed",
            page(|r| {
                r.labels.insert("site".into(), "s42".into());
                r.states = vec!["completed".into()];
            }),
        ),
        (
            "label site=s42, a page in the middle",
            pb::ListRequest {
                page_size: 100,
                page_token: deep.clone(),
                labels: [("site".to_owned(), "s42".to_owned())].into(),
                ..Default::default()
            },
        ),
        (
            "state=running (none)",
            page(|r| r.states = vec!["running".into()]),
        ),
        (
            "label site=s42 and state=running (none)",
            page(|r| {
                r.labels.insert("site".into(), "s42".into());
                r.states = vec!["running".into()];
            }),
        ),
    ] {
        let (p50, p99, got) = list_latency(&b, req, 1000).await?;
        println!(
            "  List {what}: p50 {}, p99 {} ({got} runs a page)",
            ms(p50),
            ms(p99)
        );
    }
    let full = submit_rate(&b).await?;
    println!(
        "  Submit, {CLIENTS} clients: {full:.0} runs/s with {n} stored vs {empty:.0} on an empty store: ratio {:.2}",
        full / empty
    );
    println!("  RSS (node and clients): {} MiB", rss_kb() / 1024);
    b.stop().await;
    Ok(())
}
