//! `steward serve`: wiring, the listener, signals and the stop sequence.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use domain::stop::ShutdownMode;
use domain::{NodeId, StopCause, SystemClock};
use engine::{Engine, EngineOptions};
use store::{BucketStore, EStopStore, RunStore};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Database, EStopSourceKind, ServeConfig};
use crate::pidfile::{self, PidFile};
use crate::sdnotify;

/// This node's name: the configured one, else the one generated at the first start and kept
/// in `DATA_DIR/node_id`. The file is written either way, so that it also marks a data
/// directory that has been started before.
fn node_id(cfg: &ServeConfig) -> anyhow::Result<String> {
    let path = cfg.data_dir.join("node_id");
    let kept = std::fs::read_to_string(&path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let id = match (cfg.node_id.is_empty(), kept) {
        (false, _) => cfg.node_id.clone(),
        (true, Some(id)) => return Ok(id),
        (true, None) => format!("node-{}", uuid::Uuid::now_v7().simple()),
    };
    estop::write_durably(&path, format!("{id}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// Reads (and removes) the request `steward stop` left before signalling us.
fn stop_request(cfg: &ServeConfig) -> Option<ShutdownMode> {
    let path = cfg.data_dir.join(pidfile::STOP_REQUEST_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    match text.trim() {
        "drain" => Some(ShutdownMode::Drain),
        "end_of_round" => Some(ShutdownMode::EndOfRound),
        "now" => Some(ShutdownMode::Now),
        _ => None,
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    /// The next signal, as its name and the stop mode it asks for.
    async fn next(&mut self) -> (&'static str, ShutdownMode) {
        tokio::select! {
            _ = self.term.recv() => ("SIGTERM", ShutdownMode::Drain),
            _ = self.int.recv() => ("SIGINT", ShutdownMode::Drain),
            _ = self.quit.recv() => ("SIGQUIT", ShutdownMode::Now),
            _ = self.usr1.recv() => ("SIGUSR1", ShutdownMode::EndOfRound),
        }
    }
}

/// What a start found new: the data directory (its local files: the policy file, the e-stop
/// file) and the database (the e-stop list when it lives there).
#[derive(Clone, Copy)]
struct Fresh {
    local: bool,
    db: bool,
}

/// Serves until stopped; returns why it stopped.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<StopCause> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating the data directory {}", cfg.data_dir.display()))?;
    let pid = PidFile::acquire(&cfg.data_dir)?;
    let previous = previous_stop(&cfg, pid.stale.as_deref());
    let _ = std::fs::remove_file(cfg.data_dir.join(pidfile::STOP_REQUEST_FILE));
    let first_start = !cfg.data_dir.join("node_id").exists();
    let node = node_id(&cfg)?;
    match cfg.database.clone() {
        Database::Sqlite(db_path) => {
            let fresh = !db_path.exists();
            let store = Arc::new(
                store_sqlite::SqliteStore::open(&db_path)
                    .with_context(|| format!("opening the database {}", db_path.display()))?,
            );
            let fresh = Fresh {
                local: fresh,
                db: fresh,
            };
            run(cfg, store, fresh, node, previous, pid, started).await
        }
        Database::Postgres(url) => {
            let db_tasks = TaskTracker::new();
            let store = Arc::new(
                store_postgres::PgStore::connect(&url, &db_tasks)
                    .await
                    .with_context(|| {
                        format!("connecting to the database {}", cfg.database.describe())
                    })?,
            );
            tracing::info!(database = %store.describe(), created_schema = store.created_schema(), "database connected");
            let fresh = Fresh {
                local: first_start,
                db: store.created_schema(),
            };
            let res = run(cfg, store, fresh, node, previous, pid, started).await;
            db_tasks.close();
            if tokio::time::timeout(std::time::Duration::from_secs(5), db_tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!("database connections did not close within 5s");
            }
            res
        }
    }
}

/// Serves on `store` until stopped.
async fn run<S: RunStore + EStopStore + BucketStore>(
    cfg: ServeConfig,
    store: Arc<S>,
    fresh: Fresh,
    node: String,
    previous: Option<StopCause>,
    pid: PidFile,
    started: Instant,
) -> anyhow::Result<StopCause> {
    let mut opts = EngineOptions::new(NodeId(node.clone()));
    opts.max_running_jobs = cfg.max_running_jobs;
    opts.submit_ttl = cfg.submit_ttl;
    opts.lease_ttl = cfg.lease_ttl;
    opts.kill_grace = cfg.kill_grace;
    opts.output_limit = cfg.output_limit;
    opts.estop_unlisted = cfg.estop_unlisted;
    opts.buckets = cfg
        .buckets
        .iter()
        .map(|(k, b)| {
            (
                k.clone(),
                ratelimit::BucketSpec {
                    size: b.size,
                    refill: b.refill,
                    every: b.every,
                },
            )
        })
        .collect();
    // Before anything can dispatch a job: end what a killed predecessor left running.
    let supervisor = actions::Supervisor::new(
        &cfg.data_dir.join("jobs"),
        cfg.job_containment.mode(),
        &node,
    )
    .context("setting up job containment")?;
    let swept = supervisor.sweep(cfg.kill_grace).await;
    if swept.attempts > 0 || swept.stale > 0 {
        tracing::warn!(
            attempts = swept.attempts,
            processes = swept.killed,
            stale = swept.stale,
            "ended what the previous steward left running of its jobs"
        );
    }
    tracing::info!(containment = %supervisor.containment(), "job containment");
    let containment = supervisor.containment().clone();
    opts.supervisor = Some(Arc::new(supervisor));
    let (tasks, mut failures) = tasks::Tasks::new();
    let policies = crate::policies::start(
        cfg.policies.clone(),
        fresh.local,
        cfg.policies_reread,
        &tasks,
    )?;
    opts.policies = Some(policies.feed.clone());
    let estop = start_estop(&cfg, store.clone(), fresh, &tasks).await?;
    let engine = Engine::new(
        opts,
        store.clone(),
        Arc::new(SystemClock),
        estop.subscribe(),
    );

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let api_token = CancellationToken::new();
    let mut api = api::Api::new(engine.clone(), Some(estop.clone()), api_token.clone()).await;
    api.set_policy_alert(policies.alert.clone());
    api.set_previous_stop(previous);
    api.set_job_containment(containment.to_string());
    let router = api.router();
    let server_token = api_token.clone();
    let server = tasks
        .tracker()
        .spawn(api::serve(listener, router, server_token));
    let mut signals = Signals::new()?;
    engine.start();
    crate::budgets::watch(&tasks, engine.clone(), estop.clone(), &cfg.error_budgets);
    crate::notify::start(
        &tasks,
        engine.clone(),
        estop.clone(),
        node.clone(),
        cfg.notify.clone(),
    );
    sdnotify::notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving on {local}",
        std::process::id()
    ));
    tracing::info!(
        listen = %local,
        data_dir = %cfg.data_dir.display(),
        node_id = %node,
        pid = std::process::id(),
        startup = ?started.elapsed(),
        "steward serving"
    );

    let cause = tokio::select! {
        (name, mode) = signals.next() => match stop_request(&cfg) {
            Some(mode) => StopCause::StopCommand { mode },
            None => StopCause::Signal { signal: name.to_owned(), mode },
        },
        r = server => match r {
            Ok(Ok(())) => StopCause::Fatal { component: "api".into(), message: "the listener stopped".into() },
            Ok(Err(e)) => StopCause::Fatal { component: "api".into(), message: e.to_string() },
            Err(e) => StopCause::Fatal { component: "api".into(), message: e.to_string() },
        },
        // A background component that ended or panicked: the node stops in order.
        cause = failures.next() => cause,
        cause = engine.failure() => cause,
    };
    let mode = match &cause {
        StopCause::Signal { mode, .. } | StopCause::StopCommand { mode } => *mode,
        _ => ShutdownMode::Drain,
    };
    tracing::info!(%cause, kind = cause.kind(), %mode, "stopping");
    sdnotify::notify(&format!("STOPPING=1\nSTATUS=stopping: {cause}"));
    api.set_not_serving().await;
    let mut status_tick = tokio::time::interval(std::time::Duration::from_secs(2));

    let shutdown = engine.shutdown(mode, cause.clone(), cfg.shutdown_grace);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = status_tick.tick() => sdnotify::notify(&format!(
                "STATUS=stopping ({cause}): waiting for {} runs, {} jobs running",
                engine.active_runs(),
                engine.running_jobs()
            )),
            (name, m) = signals.next() => {
                if m == ShutdownMode::EndOfRound {
                    tracing::info!(signal = name, "already stopping; ignoring");
                    continue;
                }
                let now = match stop_request(&cfg) {
                    Some(_) => StopCause::StopCommand { mode: ShutdownMode::Now },
                    None => StopCause::Signal { signal: name.to_owned(), mode: ShutdownMode::Now },
                };
                tracing::warn!(cause = %now, "second stop request: cancelling in-flight jobs now");
                engine.stop_now(now);
            }
        }
    }
    api_token.cancel();
    if tokio::time::timeout(std::time::Duration::from_secs(5), tasks.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("the listener did not close within 5s; exiting anyway");
    }
    store.close().await.context("closing the database")?;
    // A second signal escalates the stop: the cause that decided how it ended is recorded.
    let cause = engine.shutdown_cause().unwrap_or(cause);
    record_stop(&cfg, &cause);
    tracing::info!(%cause, kind = cause.kind(), elapsed = ?started.elapsed(), "steward stopped");
    drop(pid);
    Ok(cause)
}

/// Starts the e-stop source the config names. On a fresh install the list starts as `* = go`
/// (recorded in the audit trail); after that, a missing or unreadable list stops everything.
async fn start_estop(
    cfg: &ServeConfig,
    store: Arc<dyn EStopStore>,
    fresh: Fresh,
    tasks: &tasks::Tasks,
) -> anyhow::Result<estop::EStopHandle> {
    let clock: Arc<dyn domain::Clock> = Arc::new(SystemClock);
    let source: Arc<dyn estop::Source> = match cfg.estop_source {
        EStopSourceKind::File => {
            if estop::ensure_initial_file(&cfg.estop_file, fresh.local)? {
                tracing::info!(path = %cfg.estop_file.display(), "created the e-stop file: * = go");
            }
            Arc::new(estop::FileSource::new(
                cfg.estop_file.clone(),
                store,
                clock.clone(),
            ))
        }
        EStopSourceKind::Db => Arc::new(estop::DbSource::new(
            store,
            clock.clone(),
            estop::DEFAULT_DB_POLL,
        )),
    };
    let opts = estop::EStopOptions {
        unlisted: cfg.estop_unlisted,
        reread: cfg.estop_reread,
    };
    let handle = estop::EStop::start(source, clock, opts, tasks).await;
    if cfg.estop_source == EStopSourceKind::Db && fresh.db {
        handle
            .set(
                domain::estop::Target::All,
                domain::estop::EStopState::Go,
                estop::INITIAL_REASON.into(),
                "steward".into(),
            )
            .await
            .context("seeding the e-stop list")?;
    }
    match handle.alert() {
        Some(alert) => {
            tracing::error!(%alert, source = %handle.describe(), "the e-stop list cannot be read: nothing will run until it is fixed")
        }
        None => tracing::info!(source = %handle.describe(), "e-stop list loaded"),
    }
    Ok(handle)
}

const LAST_STOP_FILE: &str = "last-stop.json";

/// How the previous process ended: its recorded cause, or a crash if it left its PID file.
fn previous_stop(cfg: &ServeConfig, stale_pid: Option<&str>) -> Option<StopCause> {
    let path = cfg.data_dir.join(LAST_STOP_FILE);
    let recorded = std::fs::read_to_string(&path).ok();
    let _ = std::fs::remove_file(&path);
    let cause = match (stale_pid, recorded) {
        (Some(pid), _) => Some(StopCause::Fatal {
            component: "process".into(),
            message: format!(
                "the previous steward (pid {pid}) ended without a clean stop: killed or crashed"
            ),
        }),
        (None, Some(text)) => serde_json::from_str(&text).ok(),
        (None, None) => None,
    };
    if let Some(c) = &cause {
        tracing::info!(cause = %c, kind = c.kind(), "previous stop");
    }
    cause
}

fn record_stop(cfg: &ServeConfig, cause: &StopCause) {
    let path = cfg.data_dir.join(LAST_STOP_FILE);
    if let Err(e) = serde_json::to_string(cause)
        .map_err(std::io::Error::other)
        .and_then(|s| estop::write_durably(&path, s.as_bytes()))
    {
        tracing::warn!(error = %e, path = %path.display(), "could not record the stop cause");
    }
}
