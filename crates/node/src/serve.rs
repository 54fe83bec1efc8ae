//! `steward serve`: wiring, the listener, signals and the stop sequence.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use domain::stop::ShutdownMode;
use domain::{NodeId, StopCause, SystemClock};
use engine::{Engine, EngineOptions};
use store::{EStopStore, RunStore};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Auth, Database, EStopSourceKind, ServeConfig};
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

/// The file the first start of a data directory writes the admin token's secret to.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Creates an admin token and writes its secret to `DATA_DIR/admin.token` (mode 0600), so that
/// the first start needs no other step. The token is named `admin`, or `admin-` and a random
/// suffix when another node of a shared database took that name.
async fn bootstrap_admin(cfg: &ServeConfig, tokens: &dyn store::AuthStore) -> anyhow::Result<()> {
    let path = cfg.data_dir.join(ADMIN_TOKEN_FILE);
    let (secret, hash) = api::auth::new_secret().map_err(|e| anyhow::anyhow!(e.message))?;
    estop::write_durably_private(&path, format!("{secret}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    let now = domain::Clock::now(&SystemClock);
    let mut name = "admin".to_owned();
    for _ in 0..4 {
        let token = store::TokenRecord {
            name: name.clone(),
            hash: hash.clone(),
            role: domain::auth::Role::Admin,
            scope: domain::auth::Scope::default(),
            created_by: "steward".into(),
            created_at: now,
            expires_at: None,
            last_used_at: None,
        };
        match tokens.token_create(token).await {
            Ok(()) => {
                tracing::warn!(token = %name, file = %path.display(), "created an admin token; its secret is in the file (mode 0600): keep it safe, or revoke it once you have tokens of your own");
                return Ok(());
            }
            Err(store::Error::Conflict(_)) => {
                // The last characters of a v7 UUID are random.
                let id = uuid::Uuid::now_v7().simple().to_string();
                name = format!("admin-{}", &id[id.len() - 8..]);
            }
            Err(e) => return Err(e).context("storing the admin token"),
        }
    }
    anyhow::bail!("storing the admin token: every name tried was taken")
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

/// Where runs are stored, for a node: either backend behind the traits the node needs.
#[derive(Clone)]
pub enum NodeStore {
    Sqlite(Arc<store_sqlite::SqliteStore>),
    Postgres(Arc<store_postgres::PgStore>),
}

impl NodeStore {
    pub fn runs(&self) -> Arc<dyn RunStore> {
        match self {
            NodeStore::Sqlite(s) => s.clone(),
            NodeStore::Postgres(s) => s.clone(),
        }
    }

    fn auth(&self) -> Arc<dyn store::AuthStore> {
        match self {
            NodeStore::Sqlite(s) => s.clone(),
            NodeStore::Postgres(s) => s.clone(),
        }
    }

    fn estop(&self) -> Arc<dyn EStopStore> {
        match self {
            NodeStore::Sqlite(s) => s.clone(),
            NodeStore::Postgres(s) => s.clone(),
        }
    }

    fn engine(&self, opts: EngineOptions, feed: engine::EStopFeed) -> Engine {
        match self {
            NodeStore::Sqlite(s) => Engine::new(opts, s.clone(), Arc::new(SystemClock), feed),
            NodeStore::Postgres(s) => Engine::new(opts, s.clone(), Arc::new(SystemClock), feed),
        }
    }

    async fn close(&self) -> store::Result<()> {
        match self {
            NodeStore::Sqlite(s) => s.close().await,
            NodeStore::Postgres(s) => s.close().await,
        }
    }
}

/// The file that says the first start of a data directory has not finished: written before
/// the database is created, removed once the node serves. While it is there, a start is a
/// first start again, so that what a first start writes (the policy file, the e-stop file or
/// entry) is written even if the first try failed after the database was made (a port in use,
/// say). What exists is never overwritten.
pub const FIRST_START_MARKER: &str = "first-start.unfinished";

fn mark_first_start(marker: &std::path::Path) -> anyhow::Result<()> {
    estop::write_durably(
        marker,
        b"the first start of this data directory has not finished; the next start does it again\n",
    )
    .with_context(|| format!("writing {}", marker.display()))
}

/// Opens the store the config names, and tells what is new: the data directory (its local
/// files) and the database (the e-stop list when it lives there).
async fn open_store(
    cfg: &ServeConfig,
    db_tasks: &TaskTracker,
) -> anyhow::Result<(NodeStore, Fresh)> {
    let first_start = !cfg.data_dir.join("node_id").exists();
    let marker = cfg.data_dir.join(FIRST_START_MARKER);
    let unfinished = marker.exists();
    if unfinished {
        tracing::warn!(
            path = %marker.display(),
            "the first start of this data directory did not finish: it is done again (what it \
             made is kept)"
        );
    }
    Ok(match &cfg.database {
        Database::Sqlite(db_path) => {
            let created = !db_path.exists();
            let fresh = created || unfinished;
            if created {
                mark_first_start(&marker)?;
                // Created readable by this user only; SQLite gives its WAL and shared-memory
                // files the database file's mode.
                use std::os::unix::fs::OpenOptionsExt as _;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(db_path)
                    .with_context(|| format!("creating the database {}", db_path.display()))?;
            }
            let store = Arc::new(
                store_sqlite::SqliteStore::open(db_path)
                    .with_context(|| format!("opening the database {}", db_path.display()))?,
            );
            (
                NodeStore::Sqlite(store),
                Fresh {
                    local: fresh,
                    db: fresh,
                },
            )
        }
        Database::Postgres(url) => {
            let store = Arc::new(
                store_postgres::PgStore::connect(url, db_tasks)
                    .await
                    .with_context(|| {
                        format!("connecting to the database {}", cfg.database.describe())
                    })?,
            );
            tracing::info!(database = %store.describe(), created_schema = store.created_schema(), "database connected");
            if first_start {
                mark_first_start(&marker)?;
            }
            let fresh = Fresh {
                local: first_start || unfinished,
                db: store.created_schema(),
            };
            (NodeStore::Postgres(store), fresh)
        }
    })
}

/// Creates the data directory readable by this user only (mode 0700), or warns when an
/// existing one is open to others: it holds the database, the admin token and the socket.
fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
        return Ok(());
    }
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("reading the data directory {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:04o}", mode & 0o7777),
            "the data directory is open to other users; it holds the database and the admin token: chmod 700 it"
        );
    }
    Ok(())
}

/// The secrets directory: created 0700; a warning when it is open to others (each file in
/// it must be 0600, or reading it fails).
fn private_secrets_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("creating the secrets directory {}", dir.display()));
        }
    }
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("reading the secrets directory {}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!(
            "{} is not a directory; it is where secret files go",
            dir.display()
        );
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:04o}", mode & 0o7777),
            "the secrets directory is open to other users: chmod 700 it"
        );
    }
    Ok(())
}

/// Serves until stopped; returns why it stopped.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<StopCause> {
    let started = Instant::now();
    private_dir(&cfg.data_dir)?;
    let pid = PidFile::acquire(&cfg.data_dir)?;
    let previous = previous_stop(&cfg, pid.stale.as_deref());
    let _ = std::fs::remove_file(cfg.data_dir.join(pidfile::STOP_REQUEST_FILE));
    let mut signals = Signals::new()?;
    let mut node = Node::start(cfg.clone(), previous).await?;
    sdnotify::notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving on {}",
        std::process::id(),
        node.addr()
    ));
    tracing::info!(
        listen = %node.addr(),
        data_dir = %cfg.data_dir.display(),
        node_id = %node.node_id(),
        pid = std::process::id(),
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        startup = ?started.elapsed(),
        "steward serving"
    );
    let cause = tokio::select! {
        (name, mode) = signals.next() => match stop_request(&cfg) {
            Some(mode) => StopCause::StopCommand { mode },
            None => StopCause::Signal { signal: name.to_owned(), mode },
        },
        cause = node.failed() => cause,
    };
    let escalate = async {
        loop {
            let (name, m) = signals.next().await;
            if m == ShutdownMode::EndOfRound {
                tracing::info!(signal = name, "already stopping; ignoring");
                continue;
            }
            return match stop_request(&cfg) {
                Some(_) => StopCause::StopCommand {
                    mode: ShutdownMode::Now,
                },
                None => StopCause::Signal {
                    signal: name.to_owned(),
                    mode: ShutdownMode::Now,
                },
            };
        }
    };
    let cause = node.stop(cause, escalate).await?;
    record_stop(&cfg, &cause);
    tracing::info!(%cause, kind = cause.kind(), elapsed = ?started.elapsed(), "steward stopped");
    drop(pid);
    Ok(cause)
}

/// One running node: started by [`Node::start`], stopped by [`Node::stop`].
pub struct Node {
    cfg: ServeConfig,
    node_id: String,
    addr: std::net::SocketAddr,
    store: NodeStore,
    db_tasks: TaskTracker,
    engine: Engine,
    api: api::Api,
    api_token: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    tasks: tasks::Tasks,
    failures: tasks::Failures,
}

impl Node {
    /// Starts a node on `cfg`: the data directory and its `node_id`, the store, job
    /// containment (ending what a killed predecessor left running before anything is
    /// dispatched), the policies, the e-stop, the engine, the API on `cfg.listen` (port 0: any
    /// free port, see [`Node::addr`]), error budgets and notifications. `previous` is how the
    /// previous process of this data directory stopped, shown in `/metrics`. The caller holds
    /// the data directory's PID file.
    pub async fn start(cfg: ServeConfig, previous: Option<StopCause>) -> anyhow::Result<Node> {
        Node::start_tuned(cfg, previous, |_| {}).await
    }

    /// [`Node::start`], with `tune` given the engine's options last: for tests of engine
    /// intervals that no config key sets (the expiry sweep's, say).
    pub async fn start_tuned(
        cfg: ServeConfig,
        previous: Option<StopCause>,
        tune: impl FnOnce(&mut EngineOptions),
    ) -> anyhow::Result<Node> {
        // Before anything is written: a node that could not run its jobs never starts.
        if let Some(r) = &cfg.run_as {
            actions::check_run_as(r).map_err(|e| anyhow::anyhow!("config key {e}"))?;
        }
        private_dir(&cfg.data_dir)?;
        let db_tasks = TaskTracker::new();
        let (store, fresh) = open_store(&cfg, &db_tasks).await?;
        // Before the node_id file marks the data directory as started: a start that dies in
        // between makes a new admin token the next time.
        if cfg.auth == Auth::Token && !cfg.data_dir.join("node_id").exists() {
            bootstrap_admin(&cfg, store.auth().as_ref()).await?;
        }
        let node = node_id(&cfg)?;
        let mut opts = EngineOptions::new(NodeId(node.clone()));
        opts.max_running_jobs = cfg.max_running_jobs;
        opts.submit_ttl = cfg.submit_ttl;
        opts.lease_ttl = cfg.lease_ttl;
        opts.kill_grace = cfg.kill_grace;
        opts.output_limit = cfg.output_limit;
        opts.estop_unlisted = cfg.estop_unlisted;
        opts.shared_store = !cfg.database.is_embedded();
        // Bound before the engine exists: `http` jobs may not reach it, on the port it got.
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("listening on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        opts.guardrails = Arc::new(cfg.guardrails(addr)?);
        opts.run_as = cfg.run_as.clone();
        opts.retention = cfg.retention.to_engine();
        private_secrets_dir(&cfg.secrets_dir())?;
        if cfg.run_as.is_none() && nix::unistd::Uid::effective().is_root() {
            tracing::warn!(
                "steward runs as root and run_as is not set: shell jobs run as root, and can read the data directory (the database, the admin token, the secrets); set run_as = \"USER\" in the config"
            );
        }
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
        let (tasks, failures) = tasks::Tasks::new();
        let policies = crate::policies::start(
            cfg.policies.clone(),
            fresh.local,
            cfg.policies_reread,
            &tasks,
        )?;
        opts.policies = Some(policies.feed.clone());
        tune(&mut opts);
        let estop = start_estop(&cfg, store.estop(), fresh, &tasks).await?;
        let engine = store.engine(opts, estop.subscribe());
        let api_token = CancellationToken::new();
        let auth = Arc::new(api::auth::Authenticator::new(
            match cfg.auth {
                Auth::Token => api::auth::AuthMode::Token,
                Auth::None => api::auth::AuthMode::None,
            },
            store.auth(),
            Arc::new(SystemClock),
        ));
        tasks.spawn_component("access log refusal count", {
            let (auth, token) = (auth.clone(), tasks.token().clone());
            async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = token.cancelled() => return,
                        _ = every.tick() => auth.flush_refusals(),
                    }
                }
            }
        });
        let mut api =
            api::Api::new(engine.clone(), Some(estop.clone()), auth, api_token.clone()).await;
        api.set_policy_alert(policies.alert.clone());
        api.set_previous_stop(previous);
        api.set_job_containment(containment.to_string());
        if cfg.console {
            let pages = console::Console::new(
                api.service(),
                console::Settings {
                    node_id: node.clone(),
                    tls: cfg.tls_cert.is_some(),
                    config_text: toml::to_string_pretty(&cfg).unwrap_or_default(),
                    policy_alert: Some(policies.alert.clone()),
                    job_containment: containment.to_string(),
                },
            );
            api.set_console(pages.router(), console::Console::owns);
        }
        let router = api.router();
        let fd_limit = actions::raise_fd_limit();
        let limits = api::conn::Limits::for_fd_limit(fd_limit);
        tracing::info!(
            open_files = fd_limit,
            max_connections = limits.max_connections,
            "connection limit"
        );
        let server = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => {
                let cert = api::tls::Certificate::open(cert, key)
                    .context("loading the TLS certificate")?;
                let listener = api::tls::TlsListener::new(
                    listener,
                    cert.server_config(cfg.tls_client_ca.as_deref())?,
                    tasks.tracker(),
                    api_token.clone(),
                    limits,
                )?;
                tasks.spawn_component("tls certificate reloader", {
                    let token = tasks.token().clone();
                    async move { cert.watch(token).await }
                });
                tasks
                    .tracker()
                    .spawn(api::serve_tls(listener, router, api_token.clone(), limits))
            }
            _ => tasks
                .tracker()
                .spawn(api::serve(listener, router, api_token.clone(), limits)),
        };
        let local = api::local::LocalListener::bind(&cfg.socket).with_context(|| {
            format!(
                "opening the break-glass socket {} (config key `socket`)",
                cfg.socket.display()
            )
        })?;
        tasks.spawn_component("break-glass socket", {
            let (router, stop) = (api.local_router(), tasks.token().clone());
            async move {
                if let Err(e) = api::serve_local(local, router, stop).await {
                    tracing::error!(error = %e, "the break-glass socket failed");
                }
            }
        });
        engine.start();
        crate::budgets::watch(&tasks, engine.clone(), estop.clone(), &cfg.error_budgets);
        crate::notify::start(
            &tasks,
            engine.clone(),
            estop.clone(),
            node.clone(),
            cfg.notify.clone(),
        );
        crate::notify::report_failed_runs(
            &tasks,
            engine.clone(),
            node.clone(),
            cfg.sentry_dsn.is_some(),
        );
        // Everything a first start makes is made.
        let marker = cfg.data_dir.join(FIRST_START_MARKER);
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %marker.display(), error = %e, "could not remove"),
        }
        Ok(Node {
            cfg,
            node_id: node,
            addr,
            store,
            db_tasks,
            engine,
            api,
            api_token,
            server,
            tasks,
            failures,
        })
    }

    /// Where the API listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The router the listener serves, for tests that call it in process.
    pub fn router(&self) -> axum::Router {
        self.api.router()
    }

    /// The node's store, for benchmarks and tests that fill it directly.
    pub fn runs(&self) -> Arc<dyn RunStore> {
        self.store.runs()
    }

    /// Resolves when the node must stop on its own: the listener ended, or a background
    /// component ended or panicked.
    pub async fn failed(&mut self) -> StopCause {
        tokio::select! {
            r = &mut self.server => match r {
                Ok(Ok(())) => StopCause::Fatal { component: "api".into(), message: "the listener stopped".into() },
                Ok(Err(e)) => StopCause::Fatal { component: "api".into(), message: e.to_string() },
                Err(e) => StopCause::Fatal { component: "api".into(), message: e.to_string() },
            },
            cause = self.failures.next() => cause,
            cause = self.engine.failure() => cause,
        }
    }

    /// Stops the node in order for `cause`: not serving at once, the engine stopped in the
    /// cause's mode (a drain lets in-flight jobs finish within `shutdown_grace`), the
    /// components and the listener, then the store. `escalate` resolving (a second signal)
    /// turns the stop into `now`. Returns the cause that decided how it stopped.
    pub async fn stop(
        self,
        cause: StopCause,
        escalate: impl std::future::Future<Output = StopCause>,
    ) -> anyhow::Result<StopCause> {
        let mode = match &cause {
            StopCause::Signal { mode, .. } | StopCause::StopCommand { mode } => *mode,
            // Other nodes may be taking over the runs: nothing of them may go on here.
            StopCause::LostStore { .. } => ShutdownMode::Now,
            _ => ShutdownMode::Drain,
        };
        tracing::info!(%cause, kind = cause.kind(), %mode, "stopping");
        sdnotify::notify(&format!("STOPPING=1\nSTATUS=stopping: {cause}"));
        self.api.set_not_serving().await;
        let mut status_tick = tokio::time::interval(std::time::Duration::from_secs(2));
        let shutdown = self
            .engine
            .shutdown(mode, cause.clone(), self.cfg.shutdown_grace);
        tokio::pin!(shutdown);
        tokio::pin!(escalate);
        let mut escalated = false;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = status_tick.tick() => sdnotify::notify(&format!(
                    "STATUS=stopping ({cause}): waiting for {} runs, {} jobs running",
                    self.engine.active_runs(),
                    self.engine.running_jobs()
                )),
                now = &mut escalate, if !escalated => {
                    escalated = true;
                    tracing::warn!(cause = %now, "second stop request: cancelling in-flight jobs now");
                    self.engine.stop_now(now);
                }
            }
        }
        self.api_token.cancel();
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.tasks.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the listener did not close within 5s; exiting anyway");
        }
        self.store.close().await.context("closing the database")?;
        self.db_tasks.close();
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.db_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("database connections did not close within 5s");
        }
        // A second signal escalates the stop: the cause that decided how it ended is recorded.
        Ok(self.engine.shutdown_cause().unwrap_or(cause))
    }
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
    let source: Arc<dyn estop::Source> = match cfg.estop_source() {
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
        EStopSourceKind::Etcd => {
            let read = |p: &Option<std::path::PathBuf>, key: &str| {
                p.as_ref()
                    .map(|p| {
                        std::fs::read(p).with_context(|| format!("{key}: reading {}", p.display()))
                    })
                    .transpose()
            };
            let etcd = estop::EtcdConfig {
                endpoints: cfg.etcd_endpoints.clone(),
                prefix: cfg.etcd_prefix.clone(),
                ca_pem: read(&cfg.etcd_ca, "etcd_ca")?,
                client_cert_pem: read(&cfg.etcd_cert, "etcd_cert")?,
                client_key_pem: read(&cfg.etcd_key, "etcd_key")?,
                username: cfg.etcd_username.clone(),
                password: cfg.etcd_password.as_ref().map(|p| p.0.clone()),
            };
            estop::EtcdSource::start(&etcd, store, clock.clone(), tasks)
                .map_err(anyhow::Error::msg)?
        }
    };
    let opts = estop::EStopOptions {
        unlisted: cfg.estop_unlisted,
        reread: cfg.estop_reread,
        stale_after: cfg.estop_stale_after,
    };
    let handle = estop::EStop::start(source, clock, opts, tasks).await;
    // The first start says what may run: `* = go`. In the database, when the database is new
    // (there can be no entry yet); in etcd, which other nodes share and outlives any node's
    // database, only when the prefix holds no entry at all, and never over an entry that
    // appears meanwhile. An etcd that cannot be reached now is not a reason not to start.
    let seed = match cfg.estop_source() {
        EStopSourceKind::File => false,
        EStopSourceKind::Db => fresh.db,
        EStopSourceKind::Etcd => {
            fresh.db
                && matches!(&*handle.snapshot(), domain::estop::Snapshot::Ok(l) if l.entries.is_empty())
        }
    };
    if seed {
        let seeded = handle
            .create(
                domain::estop::Target::All,
                domain::estop::EStopState::Go,
                estop::INITIAL_REASON.into(),
                "steward".into(),
            )
            .await;
        match seeded {
            Ok(_) => {}
            Err(e) if cfg.estop_source() == EStopSourceKind::Etcd => {
                tracing::warn!(error = %e, "could not write * = go into the empty e-stop list in etcd; everything stays stopped until an entry says go");
            }
            Err(e) => return Err(anyhow::Error::new(e).context("seeding the e-stop list")),
        }
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
