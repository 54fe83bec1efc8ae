//! `steward`: the server and its command-line client.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod backup;
mod client;
mod drill;
mod output;
mod stop;

use node::config;

// mimalloc frees a block from any thread without a lock. With the C library's allocator, a
// request built on a runtime thread and dropped on the store's writer thread (or a span
// queued by one thread and freed by the exporter's) took the lock of the arena it came from,
// and the threads slept on each other's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "steward",
    version,
    about = "Runs infrastructure workflows safely."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct ClientOpts {
    /// The server's address.
    #[arg(long, env = "STEWARD_ADDR", default_value = config::DEFAULT_LISTEN, global = true)]
    pub addr: String,
    /// Machine-readable output (the API's JSON).
    #[arg(long, global = true)]
    pub json: bool,
    /// The API token (default: the data directory's admin.token, when it can be read).
    #[arg(long, env = "STEWARD_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The CA certificate (PEM) that signed the server's certificate, for an https:// address
    /// (default: the system's roots).
    #[arg(long, env = "STEWARD_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Where to find admin.token when no token is given.
    #[arg(long, env = "STEWARD_DATA_DIR", default_value = config::DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the server.
    Serve {
        /// Holds the database, the config, the e-stop list and the PID file.
        #[arg(long, default_value = config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// HOST:PORT to serve gRPC, HTTP/JSON, health and metrics on.
        #[arg(long)]
        listen: Option<String>,
        /// The config file (default: steward.toml in the data directory).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Prints the effective configuration and exits.
        #[arg(long)]
        print_config: bool,
    },
    /// Stores a workflow and prints its run ID; runs nothing unless --exec.
    Submit {
        file: PathBuf,
        /// Execute it right after submitting.
        #[arg(long)]
        exec: bool,
        /// Wait until it finishes (implies --exec); exit non-zero unless it completed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Executes a submitted run.
    Exec {
        id: String,
        /// Wait until it finishes; exit non-zero unless it completed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Shows where a run stands.
    Status {
        id: String,
        /// Keep printing changes until the run finishes.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Lists runs, newest first.
    List {
        #[command(flatten)]
        filter: client::ListArgs,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancels a run, and waits until it has ended (its running jobs stopped).
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Return as soon as the cancel is accepted, without waiting for the run to end.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Submits a new run with the spec of an old one.
    Clone {
        id: String,
        #[arg(long)]
        exec: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Checks a workflow file without storing anything.
    Validate {
        file: PathBuf,
        /// Check locally only, without asking the server.
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Schedules: workflows that run on a cron expression or an interval.
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Runs in bulk: delete the finished ones that are old (admin).
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// The emergency stop: see and change what may run.
    Estop {
        #[command(subcommand)]
        command: EstopCommand,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Drills: prove on a quiet day that the safety mechanisms work.
    Drill {
        #[command(subcommand)]
        command: DrillCommand,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// API tokens: create (the secret is shown once), list, revoke. Admin only.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// The access log: every mutating call and every refusal, newest first. Admin only.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Measures throughput and latency on an in-process node, started as `serve` starts one
    /// (see BENCHMARKS.md).
    Bench {
        /// Which figures: core, shutdown, estop, policy, auth, console, telemetry, speed,
        /// schedules, history, scaleout and drill (these two need --database), or all.
        #[arg(long, default_value = "all")]
        suite: String,
        /// Runs for the throughput (and restart) figures.
        #[arg(long, default_value_t = 10_000)]
        runs: usize,
        /// Concurrent gRPC clients for the throughput figure.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Runs for the latency figure (one at a time).
        #[arg(long, default_value_t = 1000)]
        latency_runs: usize,
        /// Runs stored for the Status latency figure.
        #[arg(long, default_value_t = 100_000)]
        status_runs: usize,
        /// Finished runs stored for the history figures (List and Status at size).
        #[arg(long, default_value_t = 1_000_000)]
        stored_runs: usize,
        /// The core figures on this PostgreSQL database (postgres://...) instead of SQLite.
        #[arg(long)]
        database: Option<String>,
    },
    /// One client process of `steward bench --suite speed`: connects, prints `ready`, waits
    /// for a line on stdin, starts RUNS runs one after another and prints a JSON report.
    #[command(hide = true)]
    BenchClient {
        #[arg(long)]
        addr: String,
        /// The server's data directory (its admin token, if any).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        runs: usize,
        #[arg(long, default_value_t = 3)]
        jobs: usize,
        /// Submit with start (one call) instead of Submit then Exec.
        #[arg(long)]
        start: bool,
        /// Wait for each run to complete and report the latencies.
        #[arg(long)]
        latency: bool,
        #[arg(long, default_value = "bench")]
        key_prefix: String,
    },
    /// Copies the embedded SQLite database into FILE while the server runs (a consistent
    /// snapshot). With PostgreSQL, use pg_dump.
    Backup {
        file: PathBuf,
        #[arg(long, env = "STEWARD_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Checks a backup and puts it in place as the database of --data-dir (its server
    /// stopped); its unfinished runs resume when it is served.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// Restore over a database that is there, keeping it as steward.db.replaced.
        #[arg(long)]
        replace: bool,
    },
    /// Stops the server of a data directory and waits for it to exit.
    Stop {
        #[arg(long, default_value = config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Cancel in-flight jobs at once.
        #[arg(long, conflicts_with = "end_of_round")]
        now: bool,
        /// Let each run finish its current block first.
        #[arg(long)]
        end_of_round: bool,
        /// How long to wait for the exit.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Creates a token and prints its secret, once.
    Create {
        /// Its name: the actor recorded for what it does.
        name: String,
        /// viewer, submitter, responder, operator or admin.
        #[arg(long)]
        role: String,
        /// How long it lasts (30d, 12h); by default it does not expire.
        #[arg(long)]
        expires: Option<String>,
        /// Narrows it: workflow=NAME or LABEL=VALUE (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// Lists tokens (never their secrets).
    List,
    /// Revokes a token at once, on every node.
    Revoke { name: String },
}

#[derive(Subcommand)]
pub enum DrillCommand {
    /// Sets a stop on canary runs on every node named, measures per node the time until the
    /// canary is stopped (its process gone), restores, and prints the figures. Needs an
    /// operator token. Never touches real work: the target is a label only the canaries carry.
    Estop {
        /// A node's API address (repeatable); default: --addr.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// The target to stop, KEY=VALUE (default: steward_drill=DRILL_ID); refused if an
        /// entry names it or an unfinished run carries it.
        #[arg(long)]
        target: Option<String>,
        /// How long each node has to start, then to stop, its canary.
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
}

#[derive(Subcommand)]
pub enum RunsCommand {
    /// Deletes the finished runs that ended before --before (what retention does on its own).
    Prune {
        /// RFC 3339, or a date (its midnight UTC).
        #[arg(long)]
        before: String,
        /// Only this workflow's runs.
        #[arg(long)]
        workflow: Option<String>,
        /// Count them; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Stores a schedule from a file (YAML or JSON; `workflow_file` is read relative to it).
    Create { file: PathBuf },
    /// Replaces a schedule's spec from a file; its fires count from now on.
    Update { file: PathBuf },
    /// Lists schedules: state, next fire, counts.
    List,
    /// Shows a schedule: its next 5 fires in its time zone, its counts and latest outcomes.
    Show { name: String },
    /// Stops its fires until resumed (operator).
    Pause {
        name: String,
        /// Why: an incident, a ticket.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Fires again from now on; the fires skipped while paused are not replayed.
    Resume { name: String },
    /// Deletes it; its runs stay (operator).
    Delete { name: String },
    /// Starts one run now, outside its timing.
    Trigger { name: String },
    /// Runs every fire from --from to --to (RFC 3339, both included), one after another.
    Backfill {
        name: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
pub enum EstopCommand {
    /// Shows the list, and whether it can be read.
    List,
    /// Sets TARGET (a workflow name, KEY=VALUE, or *) to go, pause or stop.
    Set {
        target: String,
        state: String,
        /// Why (required for pause and stop): an incident, a ticket.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Removes TARGET's entry.
    Clear {
        target: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every change: who, when, old state, new state, why.
    Audit {
        /// Only this target's changes.
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // Kept until the outcome is printed: dropping it waits for blocking tasks still running.
    let mut rt = None;
    let result = match cli.command {
        // `serve` reads its configuration before the runtime starts: it sets the worker threads.
        Command::Serve {
            data_dir,
            listen,
            config,
            print_config,
        } => config::environment()
            .and_then(|env| config::load(&data_dir, config.as_deref(), listen.as_deref(), &env))
            .and_then(|cfg| {
                rt.insert(runtime(cfg.worker_threads)?)
                    .block_on(serve(cfg, print_config))
            }),
        command => runtime(None).and_then(|r| rt.insert(r).block_on(run(command))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            output::error(&format!("{e:#}"));
            ExitCode::from(1)
        }
    }
}

/// The multi-threaded runtime, with `workers` worker threads (default: `TOKIO_WORKER_THREADS`,
/// else one per CPU).
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))
}

async fn serve(cfg: config::ServeConfig, print_config: bool) -> anyhow::Result<ExitCode> {
    if print_config {
        output::line(&toml::to_string_pretty(&cfg)?);
        return Ok(ExitCode::SUCCESS);
    }
    // JSON for whatever collects the log (a file, journald, a container runtime); text
    // for a person at a terminal.
    use std::io::IsTerminal as _;
    let _telemetry = telemetry::init(telemetry::Settings {
        json: cfg.log_json.unwrap_or(!std::io::stderr().is_terminal()),
        otlp_endpoint: cfg.otlp_endpoint.clone(),
        sentry_dsn: cfg.sentry_dsn.clone(),
        node_id: (!cfg.node_id.is_empty()).then(|| cfg.node_id.clone()),
    })?;
    let cause = node::serve(cfg).await?;
    Ok(match cause {
        domain::StopCause::Signal { .. } | domain::StopCause::StopCommand { .. } => {
            ExitCode::SUCCESS
        }
        _ => ExitCode::from(1),
    })
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { .. } => unreachable!("serve starts in main"),
        Command::Submit {
            file,
            exec,
            wait,
            client,
        } => client::submit(&client, &file, exec || wait, wait).await,
        Command::Exec { id, wait, client } => client::exec(&client, &id, wait).await,
        Command::Status { id, watch, client } => client::status(&client, &id, watch).await,
        Command::List { filter, client } => client::list(&client, filter).await,
        Command::Cancel {
            id,
            reason,
            no_wait,
            client,
        } => client::cancel(&client, &id, &reason, !no_wait).await,
        Command::Clone { id, exec, client } => client::clone_run(&client, &id, exec).await,
        Command::Validate {
            file,
            offline,
            client,
        } => client::validate(&client, &file, offline).await,
        Command::Estop { command, client } => client::estop(&client, command).await,
        Command::Schedule { command, client } => client::schedule(&client, command).await,
        Command::Runs {
            command:
                RunsCommand::Prune {
                    before,
                    workflow,
                    dry_run,
                },
            client,
        } => client::prune(&client, before, workflow, dry_run).await,
        Command::Token { command, client } => client::token(&client, command).await,
        Command::Drill {
            command:
                DrillCommand::Estop {
                    nodes,
                    target,
                    timeout,
                },
            client,
        } => drill::estop(&client, nodes, target, &timeout).await,
        Command::Audit { limit, client } => client::audit(&client, limit).await,
        Command::Bench {
            suite,
            runs,
            concurrency,
            latency_runs,
            status_runs,
            stored_runs,
            database,
        } => {
            let _telemetry = telemetry::init(telemetry::Settings::default())?;
            bench::run(bench::BenchOpts {
                suite,
                runs,
                concurrency: concurrency.max(1),
                latency_runs: latency_runs.max(1),
                status_runs: status_runs.max(1),
                stored_runs: stored_runs.max(1000),
                database,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchClient {
            addr,
            dir,
            runs,
            jobs,
            start,
            latency,
            key_prefix,
        } => {
            bench::client(bench::ClientArgs {
                addr,
                dir,
                runs,
                jobs,
                start,
                latency,
                key_prefix,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { file, data_dir } => backup::backup(&data_dir, &file),
        Command::Restore {
            file,
            data_dir,
            replace,
        } => backup::restore(&file, &data_dir, replace),
        Command::Stop {
            data_dir,
            now,
            end_of_round,
            timeout,
        } => stop::stop(&data_dir, now, end_of_round, timeout).await,
    }
}
