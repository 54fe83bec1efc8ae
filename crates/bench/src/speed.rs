//! Speed as a user's client sees it (`--suite speed`): a separate `steward serve` process,
//! driven by separate client processes (`steward bench-client`), each one submitter that
//! starts one run after another, as a user's script does. Nothing is shared but the socket.
//!
//! Per backend and per way of starting a run (the handshake, Submit then Exec; or Submit with
//! `start: true`, one call), on a fresh server:
//! - throughput with 1 submitter and with 16: runs of 3 sequential `noop` jobs, from the
//!   moment every client is connected until no run is unfinished (the finished-runs counter
//!   must count them all), and the server's CPU time over that window, per run;
//! - the 3-step latency: one client, Submit (and Exec) then Watch until the run completed.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use proto::v1 as pb;
use proto::v1::steward_client::StewardClient;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::external::External;
use crate::{channel, ms, noop_spec, percentile};

/// What `steward bench-client` does.
pub struct ClientArgs {
    pub addr: String,
    /// The server's data directory: its admin token and CA, if any.
    pub dir: PathBuf,
    pub runs: usize,
    pub jobs: usize,
    /// Submit with `start: true` (an idempotency key each) instead of Submit then Exec.
    pub start: bool,
    /// Wait for each run to complete (Watch) and report the time from Submit to completed.
    pub latency: bool,
    /// Makes the idempotency keys of this client unique.
    pub key_prefix: String,
}

/// One submitter: connects, prints `ready`, waits for a line on stdin, then starts `runs`
/// runs one after another and prints `{"latencies_us": [...]}` (empty unless `latency`).
pub async fn client(a: ClientArgs) -> anyhow::Result<()> {
    let mut c = StewardClient::new(channel(&a.addr, &a.dir).await?);
    let spec = noop_spec(a.jobs);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    let mut go = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut go)
        .await?;
    let mut latencies = Vec::with_capacity(if a.latency { a.runs } else { 0 });
    for i in 0..a.runs {
        let began = Instant::now();
        let id = if a.start {
            let mut spec = spec.clone();
            spec.idempotency_key = format!("{}-{i}", a.key_prefix);
            c.submit(pb::SubmitRequest {
                spec: Some(spec),
                start: true,
            })
            .await?
            .into_inner()
            .id
        } else {
            let id = c
                .submit(pb::SubmitRequest {
                    spec: Some(spec.clone()),
                    start: false,
                })
                .await?
                .into_inner()
                .id;
            c.exec(pb::ExecRequest { id: id.clone() }).await?;
            id
        };
        if a.latency {
            let mut stream = c.watch(pb::WatchRequest { id }).await?.into_inner();
            let mut state = String::new();
            while let Some(m) = stream.message().await? {
                state = m.state;
            }
            anyhow::ensure!(state == "completed", "a run ended {state:?}");
            latencies.push(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
    }
    println!("{}", serde_json::json!({ "latencies_us": latencies }));
    Ok(())
}

/// A `steward bench-client` process, connected and waiting for the go.
struct Submitter {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Submitter {
    async fn spawn(
        x: &External,
        runs: usize,
        start: bool,
        latency: bool,
        key: &str,
    ) -> anyhow::Result<Submitter> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.args(["bench-client", "--addr", &x.addr, "--dir"])
            .arg(x.dir())
            .args([
                "--runs",
                &runs.to_string(),
                "--jobs",
                "3",
                "--key-prefix",
                key,
            ])
            .env("RUST_LOG", "off")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        if start {
            cmd.arg("--start");
        }
        if latency {
            cmd.arg("--latency");
        }
        let mut child = cmd.spawn().context("starting a bench client")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let mut stdout =
            tokio::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .context("a bench client was not ready within 30 s")??;
        anyhow::ensure!(
            ready.as_deref() == Some("ready"),
            "a bench client said {ready:?}"
        );
        Ok(Submitter {
            child,
            stdin,
            stdout,
        })
    }

    async fn go(&mut self) -> anyhow::Result<()> {
        self.stdin.write_all(b"go\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Waits for the client's report; its latencies.
    async fn finish(mut self) -> anyhow::Result<Vec<Duration>> {
        let line = self
            .stdout
            .next_line()
            .await?
            .context("a bench client ended without a report")?;
        let status = self.child.wait().await?;
        anyhow::ensure!(status.success(), "a bench client failed: {status}");
        let report: serde_json::Value = serde_json::from_str(&line)?;
        Ok(report["latencies_us"]
            .as_array()
            .context("no latencies in a client's report")?
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .map(Duration::from_micros)
            .collect())
    }
}

/// Whether no run is unfinished.
async fn all_finished(c: &mut StewardClient<crate::Channel>) -> anyhow::Result<bool> {
    let unfinished = pb::ListRequest {
        states: ["submitted", "queued", "running", "paused"]
            .map(String::from)
            .to_vec(),
        page_size: 1,
        ..Default::default()
    };
    Ok(c.list(unfinished).await?.into_inner().runs.is_empty())
}

/// What one round saw.
struct Round {
    runs_per_s: f64,
    /// The server's CPU time per run.
    cpu_per_run: Duration,
    /// PostgreSQL's, when the server is on PostgreSQL (every `postgres` process of this
    /// machine: nothing else uses it while the benchmark runs).
    db_cpu_per_run: Duration,
}

/// User plus system CPU time of every process whose name is `postgres`.
fn postgres_cpu() -> Duration {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|h| u64::try_from(h).ok())
        .unwrap_or(100)
        .max(1);
    let mut ticks = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += t(11) + t(12);
    }
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// `n` runs from `submitters` client processes, shared out evenly; time from the go until
/// no run is unfinished (polled every 10 ms), checked against the finished-runs counter.
async fn round(
    x: &External,
    n: usize,
    submitters: usize,
    start: bool,
    tag: &str,
) -> anyhow::Result<Round> {
    round_on(&[x], n, submitters, start, tag).await
}

/// [`round`] against several nodes of one database, the submitters shared out among them in
/// turn; the CPU figure is the nodes' together.
async fn round_on(
    nodes: &[&External],
    n: usize,
    submitters: usize,
    start: bool,
    tag: &str,
) -> anyhow::Result<Round> {
    let x = nodes.first().context("no node")?;
    let per = n / submitters;
    let n = per * submitters;
    let mut clients = Vec::with_capacity(submitters);
    for i in 0..submitters {
        let node = nodes[i % nodes.len()];
        clients.push(Submitter::spawn(node, per, start, false, &format!("{tag}-{i}")).await?);
    }
    let mut c = x.client().await?;
    let finished = async || -> anyhow::Result<f64> {
        let mut sum = 0.0;
        for node in nodes {
            sum += crate::external::finished(&node.addr).await?;
        }
        Ok(sum)
    };
    let cpu = || -> anyhow::Result<Duration> {
        let mut sum = Duration::ZERO;
        for node in nodes {
            sum += node.cpu()?;
        }
        Ok(sum)
    };
    let before = finished().await?;
    let cpu_before = cpu()?;
    let db_before = postgres_cpu();
    let started = Instant::now();
    for s in &mut clients {
        s.go().await?;
    }
    for s in clients {
        s.finish().await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while !all_finished(&mut c).await? {
        anyhow::ensure!(Instant::now() < deadline, "runs unfinished after 600 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu()?.saturating_sub(cpu_before);
    let db = postgres_cpu().saturating_sub(db_before);
    let addrs: Vec<&str> = nodes.iter().map(|x| x.addr.as_str()).collect();
    crate::external::completed(&addrs, before, n).await?;
    let per = u32::try_from(n).unwrap_or(u32::MAX).max(1);
    Ok(Round {
        runs_per_s: n as f64 / elapsed.as_secs_f64(),
        cpu_per_run: cpu / per,
        db_cpu_per_run: db / per,
    })
}

/// A new, empty PostgreSQL database for the benchmark (`<db>_speed`, dropped first if an
/// earlier server left it), on the server `url` names, so that each server starts as on a
/// fresh install; its URL.
async fn fresh_pg(url: &str) -> anyhow::Result<String> {
    let cfg: tokio_postgres::Config = url.parse()?;
    let db = cfg.get_dbname().context("the URL names no database")?;
    let speed_db = format!("{db}_speed");
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let create = async {
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{speed_db}\" WITH (FORCE)"
            ))
            .await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{speed_db}\""))
            .await?;
        drop(client);
        Ok::<_, tokio_postgres::Error>(())
    };
    let (created, _) = tokio::join!(create, conn);
    created.context("creating the benchmark's database")?;
    match url.rsplit_once('/') {
        Some((base, tail)) => Ok(match tail.split_once('?') {
            Some((_, q)) => format!("{base}/{speed_db}?{q}"),
            None => format!("{base}/{speed_db}"),
        }),
        None => anyhow::bail!("unexpected database URL"),
    }
}

pub(crate) async fn speed_suite(o: &crate::BenchOpts) -> anyhow::Result<()> {
    let mut backends: Vec<(&str, Option<&str>)> = vec![("SQLite", None)];
    if let Some(url) = &o.database {
        backends.push(("PostgreSQL", Some(url.as_str())));
    }
    let n = o.runs;
    println!(
        "speed: separate server, separate client processes; {n} runs x 3 noop jobs per throughput round, {} runs for the latency",
        o.latency_runs
    );
    for (backend, url) in backends {
        for start in [false, true] {
            let mut settings: Vec<(&str, String)> = vec![("STEWARD_AUTH", "none".into())];
            if let Some(url) = url {
                settings.push(("STEWARD_DATABASE", fresh_pg(url).await?));
            }
            let settings: Vec<(&str, &str)> =
                settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let x = External::start(&settings, None).await?;
            // Warm up connections, caches and the page cache.
            round(&x, 320, 16, start, "warm").await?;
            let one = round(&x, n, 1, start, "one").await?;
            let sixteen = round(&x, n, 16, start, "sixteen").await?;
            let mut lat = Submitter::spawn(&x, o.latency_runs, start, true, "lat").await?;
            lat.go().await?;
            let mut l = lat.finish().await?;
            l.sort();
            x.stop().await;
            let cpu = |r: &Round| {
                if url.is_some() {
                    format!(
                        "server CPU {}, PostgreSQL {} per run",
                        ms(r.cpu_per_run),
                        ms(r.db_cpu_per_run)
                    )
                } else {
                    format!("server CPU {} per run", ms(r.cpu_per_run))
                }
            };
            println!(
                "  {backend}, {}: 1 submitter {:.0} runs/s ({}); 16 submitters {:.0} runs/s ({}); 3-step Submit→completed p50 {} p99 {}",
                if start {
                    "Submit with start (1 call)"
                } else {
                    "Submit + Exec"
                },
                one.runs_per_s,
                cpu(&one),
                sixteen.runs_per_s,
                cpu(&sixteen),
                ms(percentile(&l, 0.5)),
                ms(percentile(&l, 0.99)),
            );
        }
    }
    if let Some(url) = &o.database {
        two_nodes(url, n).await?;
    }
    Ok(())
}

/// Two nodes on one PostgreSQL database against one, 16 submitters with Submit `start`:
/// node A alone, A and B (8 submitters each), A alone again, on one fresh database.
async fn two_nodes(url: &str, n: usize) -> anyhow::Result<()> {
    let db = fresh_pg(url).await?;
    let settings = [("STEWARD_AUTH", "none"), ("STEWARD_DATABASE", db.as_str())];
    let a = External::start(&settings, None).await?;
    let b = External::start(&settings, None).await?;
    round_on(&[&a, &b], 320, 16, true, "warm").await?;
    let one_before = round_on(&[&a], n, 16, true, "one-a").await?;
    let two = round_on(&[&a, &b], n, 16, true, "two").await?;
    let one_after = round_on(&[&a], n, 16, true, "one-b").await?;
    a.stop().await;
    b.stop().await;
    let one = (one_before.runs_per_s + one_after.runs_per_s) / 2.0;
    println!(
        "  PostgreSQL, two nodes on one database, 16 submitters, Submit with start: one node {one:.0} runs/s ({:.0} before, {:.0} after), two nodes {:.0} runs/s; ratio {:.2} (server CPU {} per run, PostgreSQL {} per run)",
        one_before.runs_per_s,
        one_after.runs_per_s,
        two.runs_per_s,
        two.runs_per_s / one,
        ms(two.cpu_per_run),
        ms(two.db_cpu_per_run),
    );
    Ok(())
}
