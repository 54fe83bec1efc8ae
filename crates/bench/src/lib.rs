//! `steward bench`: throughput and latency through the real API, on a durable SQLite file (or
//! a PostgreSQL database).
//!
//! The node runs in this process, started by `node::Node::start` exactly as `steward serve`
//! starts one (policies, e-stop file, job containment, supervised components), with its data
//! in a temporary directory and its API on a loopback port; clients are real gRPC clients
//! over TCP. Completion is observed through the engine's event stream, so measuring adds no
//! API load. `startup_and_rss` and the `external` figures run the `steward` binary itself.

#![allow(clippy::print_stdout)] // a benchmark prints its figures

mod external;
mod history;
mod schedules;
mod speed;

pub use speed::{ClientArgs, client};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use domain::{NodeId, RunId, RunState, SystemClock};
use engine::{Engine, EngineOptions};
use proto::v1 as pb;
use proto::v1::steward_client::StewardClient;
use store::RunStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct BenchOpts {
    /// `core`, `shutdown` or `all`.
    pub suite: String,
    pub runs: usize,
    pub concurrency: usize,
    pub latency_runs: usize,
    pub status_runs: usize,
    /// Finished runs stored for the `history` figures.
    pub stored_runs: usize,
    /// A `postgres://` URL: the core figures on that database instead of a SQLite file.
    pub database: Option<String>,
}

struct Bench {
    /// The node's data directory.
    _dir: tempfile::TempDir,
    node: node::Node,
    engine: Engine,
    store: Arc<dyn RunStore>,
    addr: String,
}

/// The e-stop a benchmark node starts with, in its e-stop file.
enum EStopMode {
    /// `* = go` (what a fresh install writes).
    AllGo,
    /// A given list.
    Fixed(domain::estop::EStopList),
    /// `* = go`, for benchmarks that change the file or the list while they run.
    File,
}

/// The workflows the benchmarks submit, accepted as they are.
const BENCH_POLICIES: &str = "[workflows.bench]\n[workflows.Erase]\n";

async fn start(max_running_jobs: usize) -> anyhow::Result<Bench> {
    start_with(max_running_jobs, EStopMode::AllGo).await
}

async fn start_with(max_running_jobs: usize, mode: EStopMode) -> anyhow::Result<Bench> {
    start_full(max_running_jobs, mode, None, None).await
}

/// A node started exactly as `steward serve` starts one (crate `node`), on a fresh data
/// directory, listening on a free loopback port: the figures measure what users run.
async fn start_full(
    max_running_jobs: usize,
    mode: EStopMode,
    policies: Option<&str>,
    database: Option<&str>,
) -> anyhow::Result<Bench> {
    start_env(max_running_jobs, mode, policies, database, &[]).await
}

/// [`start_full`] with settings of the benchmark's own (`STEWARD_AUTH=none`, say), which win
/// over the environment's.
async fn start_env(
    max_running_jobs: usize,
    mode: EStopMode,
    policies: Option<&str>,
    database: Option<&str>,
    settings: &[(&str, &str)],
) -> anyhow::Result<Bench> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("policies.toml"),
        policies.unwrap_or(BENCH_POLICIES),
    )?;
    if let EStopMode::Fixed(list) = &mode {
        estop::write_durably(&dir.path().join("estop.json"), &serde_json::to_vec(list)?)?;
    }
    // The node takes the `STEWARD_*` settings of the environment, as `steward serve` does
    // (`STEWARD_JOB_CONTAINMENT=process_group`, say); the benchmark's own come on top.
    let mut env = node::config::environment()?;
    if settings.iter().any(|(k, _)| *k == "STEWARD_TLS_CERT") {
        // A certificate of a CA of the benchmark's own, for 127.0.0.1.
        let ca = api::tls::testing::Ca::new();
        let leaf = ca.leaf("steward bench");
        std::fs::write(dir.path().join(BENCH_CA), &ca.pem)?;
        std::fs::write(dir.path().join("cert.pem"), &leaf.cert_pem)?;
        std::fs::write(dir.path().join("key.pem"), &leaf.key_pem)?;
        env.push((
            "STEWARD_TLS_KEY".to_owned(),
            dir.path().join("key.pem").display().to_string(),
        ));
    }
    env.extend(settings.iter().map(|(k, v)| {
        let v = if *k == "STEWARD_TLS_CERT" {
            dir.path().join("cert.pem").display().to_string()
        } else {
            (*v).to_owned()
        };
        ((*k).to_owned(), v)
    }));
    env.push((
        "STEWARD_MAX_RUNNING_JOBS".to_owned(),
        max_running_jobs.to_string(),
    ));
    if let Some(url) = database {
        env.push(("STEWARD_DATABASE".to_owned(), url.to_owned()));
        // Each benchmark node is a fresh one on a shared database: the file holds its list.
        env.push(("STEWARD_ESTOP_SOURCE".to_owned(), "file".to_owned()));
    }
    let cfg = node::config::load(dir.path(), None, Some("127.0.0.1:0"), &env)?;
    let node = node::Node::start(cfg, None).await?;
    Ok(Bench {
        engine: node.engine().clone(),
        store: node.runs(),
        addr: node.addr().to_string(),
        node,
        _dir: dir,
    })
}

/// Adds the data directory's admin token to every request, when the node wrote one (tokens
/// on): the benchmark's clients authenticate as users' clients do.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    fn of(dir: &std::path::Path) -> anyhow::Result<Bearer> {
        match std::fs::read_to_string(dir.join(node::ADMIN_TOKEN_FILE)) {
            Ok(t) => Ok(Bearer(Some(format!("Bearer {}", t.trim()).parse()?))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Bearer(None)),
            Err(e) => Err(e.into()),
        }
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

type Channel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// The CA file the benchmark writes into a TLS node's data directory.
const BENCH_CA: &str = "bench-ca.pem";

/// A channel to the node of `dir`: over TLS (trusting the benchmark's CA) when the node was
/// given a certificate, with its admin token when tokens are on.
async fn channel(addr: &str, dir: &std::path::Path) -> anyhow::Result<Channel> {
    let ca = dir.join(BENCH_CA);
    let endpoint = if ca.exists() {
        let port = addr.rsplit(':').next().unwrap_or_default();
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&ca)?)),
        )?
    } else {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
    };
    let ch = endpoint.connect().await?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        ch,
        Bearer::of(dir)?,
    ))
}

impl Bench {
    async fn client(&self) -> anyhow::Result<StewardClient<Channel>> {
        Ok(StewardClient::new(
            channel(&self.addr, self._dir.path()).await?,
        ))
    }

    async fn stop(self) {
        let cause = domain::StopCause::Signal {
            signal: "bench".into(),
            mode: domain::stop::ShutdownMode::Drain,
        };
        if let Err(e) = self.node.stop(cause, std::future::pending()).await {
            tracing::warn!(error = %e, "stopping a benchmark node");
        }
    }
}

fn noop_spec(jobs: usize) -> pb::WorkReq {
    let mut spec = domain::WorkflowSpec {
        name: "bench".into(),
        ..Default::default()
    };
    let mut block = domain::BlockSpec::default();
    for _ in 0..jobs {
        block.jobs.push(domain::JobSpec {
            action: "noop".into(),
            ..Default::default()
        });
    }
    spec.blocks.push(block);
    api::convert::spec_to_wire(&spec)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Submits and executes `n` runs of `spec`, shared out over `clients`, each client one run
/// after another.
async fn submit_and_exec(
    clients: Vec<StewardClient<Channel>>,
    spec: &pb::WorkReq,
    n: usize,
) -> Result<(), tonic::Status> {
    let per = n.div_ceil(clients.len().max(1));
    let work = clients.into_iter().enumerate().map(|(w, mut c)| {
        let count = per.min(n.saturating_sub(w * per));
        let spec = spec.clone();
        async move {
            for _ in 0..count {
                let id = c
                    .submit(pb::SubmitRequest {
                        spec: Some(spec.clone()),
                        start: false,
                    })
                    .await?
                    .into_inner()
                    .id;
                c.exec(pb::ExecRequest { id }).await?;
            }
            Ok::<_, tonic::Status>(())
        }
    });
    futures::future::try_join_all(work).await.map(|_| ())
}

/// Submit + Exec `n` runs of `jobs` sequential no-op jobs from `concurrency` clients; time to all completed.
async fn throughput(b: &Bench, n: usize, jobs: usize, concurrency: usize) -> anyhow::Result<f64> {
    let mut events = b.engine.subscribe();
    let spec = noop_spec(jobs);
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(b.client().await?);
    }
    let started = Instant::now();
    let submit_all = submit_and_exec(clients, &spec, n);
    let count_done = async {
        let mut done = 0usize;
        while done < n {
            match events.recv().await {
                Ok(e) if e.state == RunState::Completed => done += 1,
                Ok(e) if e.state.is_terminal() => anyhow::bail!("run {} ended {}", e.id, e.state),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                    anyhow::bail!("the event stream lagged by {k}; rerun with fewer runs")
                }
                Err(e) => anyhow::bail!("event stream: {e}"),
            }
        }
        Ok(())
    };
    let (submitted, done) = tokio::join!(submit_all, count_done);
    submitted.context("submitting")?;
    done?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// One client, one run at a time: Submit → Exec → completed.
async fn latency(b: &Bench, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut c = b.client().await?;
    let spec = noop_spec(1);
    let mut events = b.engine.subscribe();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let id = c
            .submit(pb::SubmitRequest {
                spec: Some(spec.clone()),
                start: false,
            })
            .await?
            .into_inner()
            .id;
        let run: RunId = id.parse()?;
        c.exec(pb::ExecRequest { id }).await?;
        loop {
            let e = events.recv().await?;
            if e.id == run && e.state.is_terminal() {
                anyhow::ensure!(
                    e.state == RunState::Completed,
                    "run {run} ended {}",
                    e.state
                );
                break;
            }
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(samples)
}

/// A run of `spec` to store directly, as Submit would, created at `now`.
fn new_run(spec: &domain::WorkflowSpec, now: domain::Timestamp) -> store::NewRun {
    store::NewRun {
        id: RunId::new_v7(),
        spec: spec.clone(),
        created_at: now,
        expires_at: now.plus(Duration::from_secs(3600)),
        cloned_from: None,
        submitted_by: "bench".into(),
        schedule: None,
    }
}

/// Stores `runs` straight into the store, 1,024 in flight at a time: their IDs.
async fn store_runs(
    store: &dyn RunStore,
    runs: impl Iterator<Item = store::NewRun>,
) -> anyhow::Result<Vec<RunId>> {
    use futures::StreamExt;
    let mut ids = Vec::new();
    let mut pending = futures::stream::FuturesUnordered::new();
    for nr in runs {
        ids.push(nr.id);
        pending.push(store.submit(nr));
        if pending.len() >= 1024 {
            while let Some(r) = pending.next().await {
                r?;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(ids)
}

/// Status p50 with `stored` runs in the database.
async fn status_latency(b: &Bench, stored: usize) -> anyhow::Result<Vec<Duration>> {
    let spec = domain::WorkflowSpec::parse(
        "name: bench\nblocks:\n  - jobs: [{action: noop}, {action: noop}, {action: noop}]\n",
    )?;
    let now = domain::Clock::now(&SystemClock);
    let ids = store_runs(b.store.as_ref(), (0..stored).map(|_| new_run(&spec, now))).await?;
    let mut c = b.client().await?;
    let mut samples = Vec::with_capacity(2000);
    for i in 0..2000 {
        let id = ids[(i * 7919) % ids.len()].to_string();
        let t = Instant::now();
        c.status(pb::StatusRequest { id }).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(samples)
}

/// Starts the real binary, times start to ready, reads its idle RSS.
async fn startup_and_rss() -> anyhow::Result<(Duration, u64)> {
    let x = external::External::start(&[], None).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_kb = x.rss_kb()?;
    let ready = x.ready_after;
    x.stop().await;
    Ok((ready, rss_kb))
}

pub async fn run(o: BenchOpts) -> anyhow::Result<()> {
    println!(
        "steward bench: {}, gRPC over loopback, {} cores",
        if o.database.is_some() {
            "core figures on PostgreSQL, the rest on SQLite"
        } else {
            "SQLite WAL, synchronous=FULL"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    match o.suite.as_str() {
        "core" => core(&o).await,
        "shutdown" => shutdown(&o).await,
        "estop" => estop_suite(&o).await,
        "policy" => policy_suite(&o).await,
        "scaleout" => scaleout_suite(&o).await,
        "auth" => auth_suite(&o).await,
        "console" => console_suite(&o).await,
        "telemetry" => external::telemetry_suite(&o).await,
        "speed" => speed::speed_suite(&o).await,
        "schedules" => schedules::schedules_suite().await,
        "history" => history::history_suite(&o).await,
        "drill" => {
            // The three-node drills need a database; the one-node figure needs nothing.
            if o.database.is_some() {
                external::drill_suite(&o, 100).await?;
            } else {
                println!("drills across three nodes: skipped, they need --database postgres://...");
            }
            many_jobs_propagation().await
        }
        "all" => {
            core(&o).await?;
            shutdown(&o).await?;
            estop_suite(&o).await?;
            policy_suite(&o).await?;
            auth_suite(&o).await?;
            console_suite(&o).await?;
            external::telemetry_suite(&o).await?;
            schedules::schedules_suite().await
        }
        other => {
            anyhow::bail!(
                "--suite {other:?}: expected core, shutdown, estop, policy, auth, console, telemetry, speed, schedules, history, scaleout, drill or all"
            )
        }
    }
}

/// Drain overhead: how long a drain takes beyond the longest in-flight job's remaining time.
async fn drain_overhead(trials: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(trials);
    for trial in 0..trials {
        let b = start(256).await?;
        let mut c = b.client().await?;
        // Ten runs, each one `sleep` job of 300 to 750 ms.
        let mut jobs = Vec::new();
        for i in 0..10u64 {
            let dur = Duration::from_millis(300 + 50 * i);
            let spec = domain::WorkflowSpec::parse(&format!(
                "name: bench\nblocks:\n  - jobs: [{{action: sleep, args: {{duration: {}ms}}}}]\n",
                dur.as_millis()
            ))?;
            let id = c
                .submit(pb::SubmitRequest {
                    spec: Some(api::convert::spec_to_wire(&spec)),
                    start: false,
                })
                .await?
                .into_inner()
                .id;
            c.exec(pb::ExecRequest { id: id.clone() }).await?;
            jobs.push((id.parse::<RunId>()?, dur));
        }
        // Wait until every job runs, then drain.
        let mut ends = Vec::new();
        for (id, dur) in &jobs {
            let started = loop {
                let run = b.engine.status(*id).await?;
                if let Some(t) = run.blocks[0].jobs[0].started_at {
                    break t;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            ends.push(started.plus(*dur));
        }
        let last_end = ends.iter().max().copied().unwrap_or(domain::Timestamp(0));
        let t_sig = domain::Clock::now(&SystemClock);
        let sig = Instant::now();
        let cause = domain::StopCause::Signal {
            signal: "SIGTERM".into(),
            mode: domain::stop::ShutdownMode::Drain,
        };
        b.engine
            .shutdown(
                domain::stop::ShutdownMode::Drain,
                cause,
                Duration::from_secs(25),
            )
            .await;
        let drained = sig.elapsed();
        let remaining =
            Duration::from_millis(u64::try_from((last_end.0 - t_sig.0).max(0)).unwrap_or(0));
        for (id, _) in &jobs {
            anyhow::ensure!(
                b.engine.status(*id).await?.state == RunState::Completed,
                "trial {trial}: run {id} did not complete"
            );
        }
        samples.push(drained.saturating_sub(remaining));
        b.stop().await;
    }
    samples.sort();
    Ok(samples)
}

/// Restart to resumed: `n` executed, unstarted runs in the store; start an engine and time
/// until every one has its first job running.
async fn restart_to_resumed(n: usize) -> anyhow::Result<Duration> {
    use futures::StreamExt;
    let dir = tempfile::tempdir()?;
    let node = NodeId("bench".into());
    {
        let store = store_sqlite::SqliteStore::open(&dir.path().join("steward.db"))?;
        let spec = domain::WorkflowSpec::parse(
            "name: bench\nblocks:\n  - jobs: [{action: sleep, args: {duration: 30s}}]\n",
        )?;
        let now = domain::Clock::now(&SystemClock);
        let ids = store_runs(&store, (0..n).map(|_| new_run(&spec, now))).await?;
        let mut pending = futures::stream::FuturesUnordered::new();
        for id in ids {
            pending.push(store.exec(id, &node, now, now.plus(Duration::from_secs(30))));
            if pending.len() >= 1024 {
                while let Some(r) = pending.next().await {
                    r?;
                }
            }
        }
        while let Some(r) = pending.next().await {
            r?;
        }
        drop(pending);
        store.close().await?;
    }
    let store = Arc::new(store_sqlite::SqliteStore::open(
        &dir.path().join("steward.db"),
    )?);
    let mut opts = EngineOptions::new(node);
    opts.max_running_jobs = n;
    let engine = Engine::new(
        opts,
        store.clone(),
        Arc::new(SystemClock),
        engine::estop_all_go(),
    );
    let mut events = engine.subscribe();
    let started = Instant::now();
    engine.start();
    let mut running = std::collections::HashSet::with_capacity(n);
    while running.len() < n {
        match events.recv().await {
            Ok(e) if e.state == RunState::Running => {
                running.insert(e.id);
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                anyhow::bail!("event stream lagged by {k}")
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    }
    let elapsed = started.elapsed();
    let cause = domain::StopCause::Signal {
        signal: "bench".into(),
        mode: domain::stop::ShutdownMode::Now,
    };
    engine
        .shutdown(
            domain::stop::ShutdownMode::Now,
            cause,
            Duration::from_secs(5),
        )
        .await;
    store.close().await?;
    Ok(elapsed)
}

async fn shutdown(o: &BenchOpts) -> anyhow::Result<()> {
    let d = drain_overhead(20).await?;
    println!(
        "drain: SIGTERM to drained, minus the longest in-flight job's remaining time, 20 trials x 10 jobs: p50 {}  max {}",
        ms(percentile(&d, 0.5)),
        ms(percentile(&d, 1.0))
    );
    let n = o.runs;
    let r = restart_to_resumed(n).await?;
    println!(
        "restart to resumed: {n} unfinished runs in the store, start to every one's job running again: {}",
        ms(r)
    );
    Ok(())
}

async fn core(o: &BenchOpts) -> anyhow::Result<()> {
    if let Some(url) = &o.database {
        println!(
            "core figures on PostgreSQL: {}",
            store_postgres::redacted_url(url).map_err(anyhow::Error::msg)?
        );
    }
    let b = start_full(256, EStopMode::AllGo, None, o.database.as_deref()).await?;
    // Warm up connections, caches and the page cache.
    throughput(&b, 200, 3, o.concurrency).await?;
    let rate = throughput(&b, o.runs, 3, o.concurrency).await?;
    println!(
        "throughput: {} runs x 3 sequential noop jobs, {} clients: {rate:.0} runs/s",
        o.runs, o.concurrency
    );
    b.stop().await;

    let b = start_full(256, EStopMode::AllGo, None, o.database.as_deref()).await?;
    latency(&b, 50).await?;
    let lat = latency(&b, o.latency_runs).await?;
    println!(
        "latency: Submit->Exec->completed, 1 job, {} runs one at a time: p50 {}  p99 {}  max {}",
        o.latency_runs,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(percentile(&lat, 1.0))
    );
    b.stop().await;

    let b = start_full(256, EStopMode::AllGo, None, o.database.as_deref()).await?;
    let st = status_latency(&b, o.status_runs).await?;
    println!(
        "status: {} runs stored, 2000 Status calls: p50 {}  p99 {}",
        o.status_runs,
        ms(percentile(&st, 0.5)),
        ms(percentile(&st, 0.99))
    );
    b.stop().await;

    if o.database.is_some() {
        return Ok(());
    }
    let (ready, rss_kb) = startup_and_rss().await?;
    println!(
        "startup: start to ready {}; idle RSS {:.1} MiB",
        ms(ready),
        rss_kb as f64 / 1024.0
    );
    Ok(())
}

/// A list of `n` entries: `n - 1` that match nothing, then `* = go`.
fn big_list(n: usize) -> domain::estop::EStopList {
    use domain::estop::{EStopState, Entry, Target};
    let mut entries: Vec<Entry> = (0..n.saturating_sub(1))
        .map(|i| Entry {
            target: Target::Label {
                key: "site".into(),
                value: format!("site-{i:04}"),
            },
            state: EStopState::Stop,
            reason: format!("INC-{i}"),
            set_by: "bench".into(),
            set_at: String::new(),
        })
        .collect();
    entries.push(Entry {
        target: Target::All,
        state: EStopState::Go,
        reason: String::new(),
        set_by: String::new(),
        set_at: String::new(),
    });
    domain::estop::EStopList { entries }
}

/// Sends the index of each of `pids`, with the instant it was seen, as its process exits.
/// One thread waits on a pidfd per process (readable once the process has exited), through
/// epoll: waiting costs the benchmark nothing, where probing a thousand pids every
/// millisecond would take CPU from the node it measures. The thread ends once every process
/// has exited, the receiver is dropped, or after 60 s.
fn exits(pids: &[i32]) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<(usize, Instant)>> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut fds = Vec::with_capacity(pids.len());
    for (i, &pid) in pids.iter().enumerate() {
        let p = rustix::process::Pid::from_raw(pid)
            .ok_or_else(|| anyhow::anyhow!("pid {pid} is not a process id"))?;
        let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK)
            .map_err(|e| anyhow::anyhow!("pidfd_open({pid}): {e}"))?;
        epoll.add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        fds.push(fd);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("bench-exits".into())
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut left = fds.len();
            let mut events = vec![EpollEvent::empty(); 256];
            while left > 0 && Instant::now() < deadline {
                let Ok(n) = epoll.wait(&mut events, EpollTimeout::from(100u16)) else {
                    continue;
                };
                let seen = Instant::now();
                for e in &events[..n] {
                    let i = usize::try_from(e.data()).unwrap_or(usize::MAX);
                    let Some(fd) = fds.get(i) else { continue };
                    // Level-triggered: an exited process's pidfd stays readable.
                    let _ = epoll.delete(fd);
                    left -= 1;
                    if tx.send((i, seen)).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(rx)
}

/// `runs` runs with an in-flight `shell` job; set `stop` (through the API, or by rewriting the
/// file); per run, the time from the change to its job's process gone and the run `stopped`.
async fn propagation(via_file: bool, runs: usize) -> anyhow::Result<Vec<Duration>> {
    let b = start_with(runs + 16, EStopMode::File).await?;
    let pids = tempfile::tempdir()?;
    let p = pids.path().display();
    let mut c = b.client().await?;
    let spec = domain::WorkflowSpec::parse(&format!(
        "name: Erase\nlabels: {{site: aap}}\nblocks:\n  - jobs: [{{action: shell, args: {{argv: [sh, -c, 'echo $$ > {p}/$STEWARD_RUN_ID.tmp && mv {p}/$STEWARD_RUN_ID.tmp {p}/$STEWARD_RUN_ID; exec sleep 300']}}}}]\n"
    ))?;
    let mut ids = Vec::with_capacity(runs);
    for _ in 0..runs {
        let id = c
            .submit(pb::SubmitRequest {
                spec: Some(api::convert::spec_to_wire(&spec)),
                start: false,
            })
            .await?
            .into_inner()
            .id;
        c.exec(pb::ExecRequest { id: id.clone() }).await?;
        ids.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut job_pids = Vec::with_capacity(runs);
    for id in &ids {
        let path = pids.path().join(id);
        let pid = loop {
            if let Ok(s) = std::fs::read_to_string(&path)
                && let Ok(pid) = s.trim().parse::<i32>()
            {
                break pid;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the jobs did not all start within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        job_pids.push(pid);
    }
    let mut events = b.engine.subscribe();
    let run_ids: Vec<RunId> = ids.iter().map(|i| i.parse()).collect::<Result<_, _>>()?;
    let mut gone = exits(&job_pids)?;
    let t0 = Instant::now();
    if via_file {
        let dir = b._dir.path();
        let tmp = dir.join("estop.json.edit");
        std::fs::write(&tmp, br#"{"entries": [{"target": "*", "state": "go"}, {"target": "site=aap", "state": "stop", "reason": "bench"}]}"#)?;
        std::fs::rename(&tmp, dir.join("estop.json"))?;
    } else {
        let mut e =
            proto::v1::e_stop_client::EStopClient::new(channel(&b.addr, b._dir.path()).await?);
        e.set(pb::EStopSetRequest {
            target: "site=aap".into(),
            state: "stop".into(),
            reason: "bench".into(),
        })
        .await?;
    }
    let mut stopped_at: std::collections::HashMap<RunId, Duration> =
        std::collections::HashMap::new();
    let mut gone_at: Vec<Option<Duration>> = vec![None; runs];
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    while stopped_at.len() < runs || gone_at.iter().any(Option::is_none) {
        tokio::select! {
            e = events.recv() => {
                if let Ok(e) = e && e.state == RunState::Stopped {
                    stopped_at.entry(e.id).or_insert_with(|| t0.elapsed());
                }
            }
            Some((i, seen)) = gone.recv() => {
                gone_at[i] = Some(seen.saturating_duration_since(t0));
            }
            () = &mut deadline => anyhow::bail!("not everything stopped within 60 s"),
        }
    }
    let mut samples: Vec<Duration> = run_ids
        .iter()
        .zip(&gone_at)
        .map(|(id, g)| stopped_at[id].max(g.unwrap_or_default()))
        .collect();
    samples.sort();
    b.stop().await;
    Ok(samples)
}

async fn estop_suite(o: &BenchOpts) -> anyhow::Result<()> {
    for (via_file, how) in [(false, "through the API"), (true, "by rewriting the file")] {
        let mut all = Vec::new();
        for _ in 0..3 {
            all.extend(propagation(via_file, 100).await?);
        }
        all.sort();
        println!(
            "e-stop propagation {how}: 3 trials x 100 runs with an in-flight shell job, change to job process gone and run stopped: p50 {}  p99 {}  max {}",
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            ms(percentile(&all, 1.0))
        );
    }
    // Dispatch-path cost: the core throughput with 1,000 entries against 1, interleaved.
    let mut none = Vec::new();
    let mut many = Vec::new();
    for _ in 0..3 {
        let b = start(256).await?;
        throughput(&b, 200, 3, o.concurrency).await?;
        none.push(throughput(&b, o.runs, 3, o.concurrency).await?);
        b.stop().await;
        let b = start_with(256, EStopMode::Fixed(big_list(1000))).await?;
        throughput(&b, 200, 3, o.concurrency).await?;
        many.push(throughput(&b, o.runs, 3, o.concurrency).await?);
        b.stop().await;
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (n, m) = (med(&mut none), med(&mut many));
    println!(
        "e-stop check cost: throughput with 1,000 entries {m:.0} runs/s vs 1 entry {n:.0} runs/s (median of 3 each, interleaved): ratio {:.2}",
        m / n
    );
    Ok(())
}

/// 20 policies on one workflow name: every kind, 15 `same_args` rules among them.
const TWENTY_POLICIES: &str = r#"
[workflows.bench]
allowed_actions = ["noop", "shell"]
limits = { max_blocks = 10, max_jobs = 1000, max_jobs_per_block = 500, max_concurrency = 50 }
labels = { site = ["aap", "bbb"], team = [] }
start_or_end = [
  { action = "noop", position = "start" },
  { action = "shell", args = { "argv[1]" = "erase" }, position = "end", allow_after = ["shell"] },
]
same_args = [
  { action = "shell", arg = "argv[0]" }, { action = "shell", arg = "argv[1]" },
  { action = "shell", arg = "argv[2]" }, { action = "shell", arg = "env.SITE" },
  { action = "shell", arg = "env.TEAM" }, { action = "shell", arg = "env.A" },
  { action = "shell", arg = "env.B" }, { action = "shell", arg = "env.C" },
  { action = "shell", arg = "env.D" }, { action = "shell", arg = "env.E" },
  { action = "shell", arg = "env.F" }, { action = "shell", arg = "env.G" },
  { action = "shell", arg = "env.H" }, { action = "shell", arg = "env.I" },
  { action = "shell", arg = "env.J" },
]
"#;

/// A spec that passes [`TWENTY_POLICIES`]: a `noop`, then 10 `shell` erase jobs at one site.
fn policed_spec() -> anyhow::Result<pb::WorkReq> {
    let jobs: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "{{action: shell, args: {{argv: [echo, erase, aap, aap{i:02}], env: {{SITE: aap, TEAM: infra, A: a, B: b, C: c, D: d, E: e, F: f, G: g, H: h, I: i, J: j}}}}}}"
            )
        })
        .collect();
    let yaml = format!(
        "name: bench\nlabels: {{site: aap, team: infra}}\nblocks:\n  - jobs: [{{action: noop}}]\n  - concurrency: 5\n    jobs: [{}]\n",
        jobs.join(", ")
    );
    Ok(api::convert::spec_to_wire(&domain::WorkflowSpec::parse(
        &yaml,
    )?))
}

/// One client, one Submit at a time.
async fn submit_latency(b: &Bench, spec: &pb::WorkReq, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut c = b.client().await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.submit(pb::SubmitRequest {
            spec: Some(spec.clone()),
            start: false,
        })
        .await?;
        samples.push(t.elapsed());
    }
    Ok(samples)
}

async fn policy_suite(o: &BenchOpts) -> anyhow::Result<()> {
    let set = policy::PolicySet::parse(TWENTY_POLICIES, "bench")?;
    let spec = policed_spec()?;
    let domain_spec = api::convert::spec_from_wire(spec.clone())?;
    let verdicts = set.check(&domain_spec);
    anyhow::ensure!(
        verdicts.passed() && verdicts.iter().count() == 21,
        "the benchmark spec must pass all 20 policies (and the entry check): {:?}",
        verdicts.violations()
    );
    // The check alone, in process.
    let n = 100_000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(set.check(std::hint::black_box(&domain_spec)));
    }
    let per_check = t.elapsed() / n;

    // Submit through gRPC, durable, against a server with no policies; interleaved rounds.
    let none = start_full(256, EStopMode::AllGo, None, None).await?;
    let twenty = start_full(256, EStopMode::AllGo, Some(TWENTY_POLICIES), None).await?;
    let rounds = 10;
    let per_round = (o.latency_runs / rounds).max(1);
    submit_latency(&none, &spec, 50).await?;
    submit_latency(&twenty, &spec, 50).await?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.extend(submit_latency(&none, &spec, per_round).await?);
        b.extend(submit_latency(&twenty, &spec, per_round).await?);
    }
    none.stop().await;
    twenty.stop().await;
    a.sort();
    b.sort();
    let (pa, pb) = (percentile(&a, 0.5), percentile(&b, 0.5));
    println!(
        "policy check: 20 policies on the workflow name, 11-job spec: {:.1} us per check (in process, {n} checks)",
        per_check.as_secs_f64() * 1e6
    );
    println!(
        "submit latency, {} Submits each, interleaved: no policies p50 {} p99 {}; 20 policies p50 {} p99 {}; ratio of p50 {:.2}",
        a.len(),
        ms(pa),
        ms(percentile(&a, 0.99)),
        ms(pb),
        ms(percentile(&b, 0.99)),
        pb.as_secs_f64() / pa.as_secs_f64()
    );
    Ok(())
}

/// Two nodes' e-stop services on one PostgreSQL database: `trials` changes set through one,
/// each timed until the other's list shows it.
async fn cross_node_propagation(
    url: &str,
    notify: bool,
    trials: usize,
) -> anyhow::Result<Vec<Duration>> {
    use domain::estop::{EStopState, Target};
    let db_tasks = TaskTracker::new();
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let clock: Arc<dyn domain::Clock> = Arc::new(SystemClock);
    let mut handles = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(store_postgres::PgStore::connect(url, &db_tasks).await?);
        let source = if notify {
            estop::DbSource::new(store.clone(), clock.clone(), estop::DEFAULT_DB_POLL)
        } else {
            estop::DbSource::poll_only(store.clone(), clock.clone(), estop::DEFAULT_DB_POLL)
        };
        let h = estop::EStop::start(
            Arc::new(source),
            clock.clone(),
            estop::EStopOptions::default(),
            &tasks::Tasks::with(tracker.clone(), token.clone()).0,
        )
        .await;
        handles.push(h);
        stores.push(store);
    }
    // Let both listeners subscribe.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target: Target = "site=bench-propagation"
        .parse()
        .map_err(anyhow::Error::msg)?;
    let labels: std::collections::BTreeMap<String, String> =
        [("site".to_owned(), "bench-propagation".to_owned())].into();
    let mut samples = Vec::with_capacity(trials);
    for i in 0..trials {
        let state = if i % 2 == 0 {
            EStopState::Stop
        } else {
            EStopState::Pause
        };
        let mut seen = handles[1].subscribe();
        let t = Instant::now();
        handles[0]
            .set(target.clone(), state, format!("trial {i}"), "bench".into())
            .await?;
        let deadline = t + Duration::from_secs(10);
        while handles[1].verdict("Bench", &labels).state != state {
            tokio::time::timeout_at(deadline.into(), seen.changed())
                .await
                .context("the other node never saw the change")??;
        }
        samples.push(t.elapsed());
        // Spread the changes over the poll period, as real ones would be.
        tokio::time::sleep(Duration::from_millis(20 + (i as u64 * 53) % 250)).await;
    }
    handles[0]
        .clear(target, "bench".into(), "bench done".into())
        .await?;
    token.cancel();
    tracker.close();
    tracker.wait().await;
    for s in stores {
        s.close().await?;
    }
    db_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), db_tasks.wait()).await;
    samples.sort();
    Ok(samples)
}

/// One node with 1,000 runs each running a `shell` job: from a stop through the API to the
/// last of their processes gone, over 5 trials.
async fn many_jobs_propagation() -> anyhow::Result<()> {
    const TRIALS: usize = 20;
    let mut last = Vec::new();
    let mut all = Vec::new();
    for _ in 0..TRIALS {
        let s = propagation(false, 1000).await?;
        last.push(s.last().copied().unwrap_or_default());
        all.extend(s);
    }
    last.sort();
    all.sort();
    println!(
        "e-stop with 1,000 running shell jobs on one node, {TRIALS} trials: stop to the last process gone p50 {}  p99 {}  max {}; per job p50 {}  p99 {}",
        ms(percentile(&last, 0.5)),
        ms(percentile(&last, 0.99)),
        ms(percentile(&last, 1.0)),
        ms(percentile(&all, 0.5)),
        ms(percentile(&all, 0.99)),
    );
    Ok(())
}

async fn scaleout_suite(o: &BenchOpts) -> anyhow::Result<()> {
    let Some(url) = &o.database else {
        anyhow::bail!("--suite scaleout needs --database postgres://...");
    };
    for (notify, how) in [(true, "LISTEN/NOTIFY"), (false, "polling every 250 ms")] {
        let s = cross_node_propagation(url, notify, 100).await?;
        println!(
            "e-stop across nodes ({how}): 100 changes set through one node, until the other node's list shows it: p50 {}  p99 {}  max {}",
            ms(percentile(&s, 0.5)),
            ms(percentile(&s, 0.99)),
            ms(percentile(&s, 1.0))
        );
    }
    Ok(())
}

/// What tokens and TLS cost: core throughput and Submit latency on a node with `auth =
/// "token"` (every call authenticated, mutating calls written to the access log) and TLS,
/// against one with neither, the two measured in alternating rounds.
async fn auth_suite(o: &BenchOpts) -> anyhow::Result<()> {
    let none = start_env(
        256,
        EStopMode::AllGo,
        None,
        None,
        &[("STEWARD_AUTH", "none")],
    )
    .await?;
    let token = start_env(
        256,
        EStopMode::AllGo,
        None,
        None,
        &[("STEWARD_AUTH", "token"), ("STEWARD_TLS_CERT", "")],
    )
    .await?;
    anyhow::ensure!(
        token._dir.path().join(node::ADMIN_TOKEN_FILE).exists(),
        "the token node wrote no admin token"
    );
    let rounds = 4;
    let runs_per_round = (o.runs / rounds).max(100);
    throughput(&none, 200, 3, o.concurrency).await?;
    throughput(&token, 200, 3, o.concurrency).await?;
    let (mut rate_none, mut rate_token) = (0.0, 0.0);
    for _ in 0..rounds {
        rate_none += throughput(&none, runs_per_round, 3, o.concurrency).await?;
        rate_token += throughput(&token, runs_per_round, 3, o.concurrency).await?;
    }
    let (rate_none, rate_token) = (rate_none / rounds as f64, rate_token / rounds as f64);
    let spec = noop_spec(1);
    submit_latency(&none, &spec, 50).await?;
    submit_latency(&token, &spec, 50).await?;
    let per_round = (o.latency_runs / 10).max(1);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        a.extend(submit_latency(&none, &spec, per_round).await?);
        b.extend(submit_latency(&token, &spec, per_round).await?);
    }
    none.stop().await;
    token.stop().await;
    a.sort();
    b.sort();
    println!(
        "auth: throughput, {} runs x 3 noop jobs in {rounds} alternating rounds, {} clients: none {rate_none:.0} runs/s, tokens and TLS {rate_token:.0} runs/s; ratio {:.2}",
        runs_per_round * rounds,
        o.concurrency,
        rate_token / rate_none
    );
    println!(
        "auth: Submit latency, interleaved: none p50 {} p99 {}; tokens and TLS p50 {} p99 {}; ratio of p50 {:.2}",
        ms(percentile(&a, 0.5)),
        ms(percentile(&a, 0.99)),
        ms(percentile(&b, 0.5)),
        ms(percentile(&b, 0.99)),
        percentile(&b, 0.5).as_secs_f64() / percentile(&a, 0.5).as_secs_f64()
    );
    Ok(())
}

/// One HTTP/1.1 request to the node's console with the admin token's session cookie, on a
/// connection of its own: the status, and the body.
async fn page(addr: &str, cookie: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: steward_session={cookie}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Times `n` loads of `path`, sorted.
async fn page_times(
    addr: &str,
    cookie: &str,
    path: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (code, body) = page(addr, cookie, path).await?;
        anyhow::ensure!(code == 200, "{path}: {code}: {body}");
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

/// A page open in a browser, as the console's script keeps it: an event stream, and on each
/// event the page fetched again. Returns when the page shows `want`.
async fn open_page(
    addr: String,
    cookie: String,
    path: String,
    want: String,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Instant> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(&addr).await?;
    s.write_all(
        format!(
            "GET /ui/events HTTP/1.1\r\nHost: {addr}\r\nCookie: steward_session={cookie}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 4096];
    let mut seen = String::new();
    // The response head: the stream is open.
    while !seen.contains("\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the event stream closed");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    ready.send(()).await.ok();
    loop {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the event stream closed");
        if String::from_utf8_lossy(&buf[..n]).contains("event: change") {
            let (_, body) = page(&addr, &cookie, &path).await?;
            if body.contains(&want) {
                return Ok(Instant::now());
            }
        }
    }
}

/// The console: server time of the overview and a filtered run list with `o.runs`×20 runs
/// stored (100,000 by default), and, with 20 pages open, the time from a state change to every
/// page showing it.
async fn console_suite(o: &BenchOpts) -> anyhow::Result<()> {
    let b = start_env(
        256,
        EStopMode::AllGo,
        None,
        None,
        &[("STEWARD_AUTH", "token")],
    )
    .await?;
    let cookie = std::fs::read_to_string(b._dir.path().join(node::ADMIN_TOKEN_FILE))?
        .trim()
        .to_owned();
    let stored = (o.runs * 20).max(1000);
    let now = domain::Clock::now(&SystemClock);
    let spec = domain::WorkflowSpec::parse(
        "name: bench\nblocks:\n  - jobs: [{action: noop}, {action: noop}, {action: noop}]\n",
    )?;
    store_runs(
        b.store.as_ref(),
        (0..stored).map(|i| {
            let mut spec = spec.clone();
            spec.labels.insert("site".into(), format!("s{}", i % 20));
            new_run(&spec, now)
        }),
    )
    .await?;
    let addr = b.addr.clone();
    page_times(&addr, &cookie, "/", 20).await?;
    let overview = page_times(&addr, &cookie, "/", 200).await?;
    let list = page_times(&addr, &cookie, "/runs?label=site%3Ds7", 200).await?;
    let run_list = page_times(&addr, &cookie, "/runs", 200).await?;
    println!(
        "console: {stored} runs stored: overview p50 {} p95 {} p99 {}; runs filtered by label p50 {} p95 {} p99 {}; runs unfiltered p50 {} p95 {}",
        ms(percentile(&overview, 0.5)),
        ms(percentile(&overview, 0.95)),
        ms(percentile(&overview, 0.99)),
        ms(percentile(&list, 0.5)),
        ms(percentile(&list, 0.95)),
        ms(percentile(&list, 0.99)),
        ms(percentile(&run_list, 0.5)),
        ms(percentile(&run_list, 0.95)),
    );

    // 20 pages of one run each; a round executes the run and times until every page shows it
    // completed.
    let pages = 20;
    let rounds = 30;
    let mut c = b.client().await?;
    let mut samples = Vec::with_capacity(pages * rounds);
    for _ in 0..rounds {
        let id = c
            .submit(pb::SubmitRequest {
                spec: Some(noop_spec(3)),
                start: false,
            })
            .await?
            .into_inner()
            .id;
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(pages);
        let tracker = TaskTracker::new();
        let mut handles = Vec::with_capacity(pages);
        for _ in 0..pages {
            handles.push(tracker.spawn(open_page(
                addr.clone(),
                cookie.clone(),
                format!("/runs/{id}"),
                "id=\"run-state\">completed".to_owned(),
                ready_tx.clone(),
            )));
        }
        for _ in 0..pages {
            ready_rx.recv().await;
        }
        let t0 = Instant::now();
        c.exec(pb::ExecRequest { id: id.clone() }).await?;
        for h in handles {
            let seen = tokio::time::timeout(Duration::from_secs(10), h)
                .await
                .context("a page never showed the change")???;
            samples.push(seen.duration_since(t0));
        }
        tracker.close();
    }
    samples.sort();
    println!(
        "console: change to page (Exec of a 3-job run until each of {pages} open pages shows it completed, {rounds} rounds): p50 {} p95 {} p99 {}",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.95)),
        ms(percentile(&samples, 0.99)),
    );
    b.stop().await;
    Ok(())
}
