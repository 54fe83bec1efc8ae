//! Benchmarks against a separate `steward serve` process (the binary running the benchmark),
//! driven from this process over gRPC, as users' clients drive it: nothing is shared but the
//! socket. Completion is observed through the API (List of unfinished runs, then the
//! finished-runs counter of `/metrics`), and the server's CPU time is read from `/proc`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use proto::v1 as pb;
use proto::v1::steward_client::StewardClient;

use crate::{BENCH_POLICIES, channel, ms, noop_spec};

/// A `steward serve` process on a fresh data directory and a free loopback port.
pub(crate) struct External {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    pub(crate) addr: String,
    /// From spawn to the first answered call.
    pub(crate) ready_after: Duration,
}

impl External {
    /// Starts the server with `settings` (`STEWARD_*` and others) on top of this process's
    /// environment, its stderr to `log` (or nowhere), and waits until it answers.
    ///
    /// The port is found free by binding it and letting it go, so that another process (an
    /// outgoing connection's local port, say) can take it before the server binds it: a server
    /// that exits before it answers is started again on another port, up to 3 times.
    pub(crate) async fn start(
        settings: &[(&str, &str)],
        log: Option<&Path>,
    ) -> anyhow::Result<External> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::try_start(settings, log).await? {
                Ok(server) => return Ok(server),
                Err(status) if tries < 3 => {
                    println!("  (the server exited before it answered, {status}; started again)");
                }
                Err(status) => {
                    anyhow::bail!("the server exited before it answered, 3 times: {status}")
                }
            }
        }
    }

    /// The server, or how it exited before it answered.
    async fn try_start(
        settings: &[(&str, &str)],
        log: Option<&Path>,
    ) -> anyhow::Result<Result<External, std::process::ExitStatus>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("policies.toml"), BENCH_POLICIES)?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let addr = format!("127.0.0.1:{port}");
        let stderr = match log {
            Some(p) => std::process::Stdio::from(std::fs::File::create(p)?),
            None => std::process::Stdio::null(),
        };
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.args(["serve", "--data-dir"])
            .arg(dir.path())
            .args(["--listen", &addr])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        for (k, v) in settings {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting steward serve")?;
        let deadline = started + Duration::from_secs(30);
        let ready_after = loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Err(status));
            }
            if let Ok(ch) = channel(&addr, dir.path()).await
                && StewardClient::new(ch)
                    .list(pb::ListRequest {
                        page_size: 1,
                        ..Default::default()
                    })
                    .await
                    .is_ok()
            {
                break started.elapsed();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server was not ready within 30s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        Ok(Ok(External {
            child,
            dir,
            addr,
            ready_after,
        }))
    }

    pub(crate) async fn client(&self) -> anyhow::Result<StewardClient<crate::Channel>> {
        Ok(StewardClient::new(
            channel(&self.addr, self.dir.path()).await?,
        ))
    }

    pub(crate) async fn schedules(
        &self,
    ) -> anyhow::Result<proto::v1::schedules_client::SchedulesClient<crate::Channel>> {
        Ok(proto::v1::schedules_client::SchedulesClient::new(
            channel(&self.addr, self.dir.path()).await?,
        ))
    }

    /// Its data directory (clients read its admin token there).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the server has exited")
    }

    /// Resident memory, in KiB.
    pub(crate) fn rss_kb(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        Ok(status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// User plus system CPU time the server has used, all threads.
    pub(crate) fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?))?;
        // Fields after the command name (which may hold spaces), from field 3 on.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("unreadable /proc stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            Ok(f.get(i).context("short /proc stat")?.parse()?)
        };
        // utime and stime: fields 14 and 15, here 11 and 12 (0-based from field 3).
        let total = ticks(11)? + ticks(12)?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100);
        let hz = u64::try_from(hz).unwrap_or(100).max(1);
        Ok(Duration::from_micros(total * 1_000_000 / hz))
    }

    /// SIGTERM, then up to 10 s for it to exit.
    pub(crate) async fn stop(mut self) {
        if let Ok(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// What one throughput measurement saw.
pub(crate) struct Throughput {
    pub(crate) runs_per_s: f64,
    /// Server CPU per run.
    pub(crate) cpu_per_run: Duration,
}

/// Submit + Exec `n` runs of `jobs` sequential no-op jobs from `concurrency` clients, each run
/// after the previous; time until no run is unfinished, checked against `/metrics`.
pub(crate) async fn throughput(
    x: &External,
    n: usize,
    jobs: usize,
    concurrency: usize,
) -> anyhow::Result<Throughput> {
    let spec = noop_spec(jobs);
    let before = finished(&x.addr).await?;
    let cpu_before = x.cpu()?;
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(x.client().await?);
    }
    let started = Instant::now();
    crate::submit_and_exec(clients, &spec, n)
        .await
        .context("submitting")?;
    let mut c = x.client().await?;
    let unfinished = || pb::ListRequest {
        states: ["submitted", "queued", "running", "paused"]
            .map(String::from)
            .to_vec(),
        page_size: 1,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while !c.list(unfinished()).await?.into_inner().runs.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "runs still unfinished after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let cpu = x.cpu()?.saturating_sub(cpu_before);
    completed(&[x.addr.as_str()], before, n).await?;
    Ok(Throughput {
        runs_per_s: n as f64 / elapsed.as_secs_f64(),
        cpu_per_run: cpu / u32::try_from(n).unwrap_or(u32::MAX).max(1),
    })
}

/// `steward_runs_finished_total{workflow="bench",state="completed"}` from `/metrics`.
pub(crate) async fn finished(addr: &str) -> anyhow::Result<f64> {
    Ok(finished_by_state(addr)
        .await?
        .get("completed")
        .copied()
        .unwrap_or(0.0))
}

/// `steward_runs_finished_total{workflow="bench"}` from `/metrics`, by state.
async fn finished_by_state(addr: &str) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let (code, body) = crate::page(addr, "", "/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    let mut by_state = std::collections::BTreeMap::new();
    for l in body.lines() {
        let Some((labels, value)) = l
            .strip_prefix("steward_runs_finished_total{")
            .and_then(|l| l.split_once('}'))
        else {
            continue;
        };
        let state = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("state=\""))
            .and_then(|v| v.strip_suffix('"'));
        if let (true, Some(state), Ok(v)) = (
            labels.contains("workflow=\"bench\""),
            state,
            value.trim().parse::<f64>(),
        ) {
            *by_state.entry(state.to_owned()).or_insert(0.0) += v;
        }
    }
    Ok(by_state)
}

/// Waits until the nodes at `addrs` count `n` more completed runs than `before` (their
/// `/metrics` summed). A run is counted just after its end is committed, so the count may
/// trail what List shows for a moment: it is read again for up to 5 s. Short of `n` then,
/// the error says how the other runs ended.
pub(crate) async fn completed(addrs: &[&str], before: f64, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut done = -before;
        let mut others = Vec::new();
        for addr in addrs {
            for (state, count) in finished_by_state(addr).await? {
                if state == "completed" {
                    done += count;
                } else if count > 0.0 {
                    others.push(format!("{count} {state} on {addr}"));
                }
            }
        }
        if done >= n as f64 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{done} of {n} runs completed; since the node started: {}",
                if others.is_empty() {
                    "none ended otherwise".to_owned()
                } else {
                    others.join(", ")
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An OTLP/HTTP collector that takes every batch and keeps only its size: the cost measured
/// is Steward's, not a collector's.
async fn otlp_sink() -> anyhow::Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let bytes = std::sync::Arc::new(AtomicU64::new(0));
    let b = bytes.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let b = b.clone();
            async move {
                b.fetch_add(body.len() as u64, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Ends with the benchmark's runtime.
    #[allow(clippy::disallowed_methods)]
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), bytes))
}

/// Throughput with everything a production node exports on (metrics, spans to a collector on
/// loopback, JSON logs at `info` to a file) against the same with traces and logs off,
/// alternating the two over `rounds` rounds, each on a fresh server.
pub(crate) async fn telemetry_suite(o: &crate::BenchOpts) -> anyhow::Result<()> {
    let (endpoint, exported) = otlp_sink().await?;
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("server.log");
    let configs: [(&str, Vec<(&str, &str)>); 4] = [
        (
            "all off (RUST_LOG=off, no exporter)",
            vec![("RUST_LOG", "off")],
        ),
        (
            "JSON logs at info only",
            vec![("RUST_LOG", "info"), ("STEWARD_LOG_FORMAT", "json")],
        ),
        (
            "spans only (RUST_LOG=off)",
            vec![
                ("RUST_LOG", "off"),
                ("STEWARD_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ],
        ),
        (
            "all on (JSON logs at info, spans to OTLP on loopback)",
            vec![
                ("RUST_LOG", "info"),
                ("STEWARD_LOG_FORMAT", "json"),
                ("STEWARD_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ],
        ),
    ];
    // Single rounds on this kind of machine differ by more than the cost measured: the
    // medians of 9 rounds move less from one run of the suite to the next than those of 5.
    let rounds = 9;
    let mut rates = vec![Vec::new(); configs.len()];
    let mut cpus = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        // Each round starts at another setting, so that none always runs first or after the
        // same one while the machine's other load drifts.
        for k in 0..configs.len() {
            let i = (round + k) % configs.len();
            let settings = &configs[i].1;
            let x = External::start(settings, Some(&log)).await?;
            // Warm up connections, caches and the page cache.
            throughput(&x, 200, 3, o.concurrency).await?;
            let t = throughput(&x, o.runs, 3, o.concurrency).await?;
            rates[i].push(t.runs_per_s);
            cpus[i].push(t.cpu_per_run);
            x.stop().await;
        }
    }
    println!(
        "telemetry: separate server, {} runs x 3 noop jobs, {} clients, median of {rounds} rounds each (metrics always on)",
        o.runs, o.concurrency
    );
    // Each round's own ratio (this setting against all off, seconds apart) is printed too:
    // this machine's speed drifts over minutes, which moves the medians of the settings apart
    // but cancels out of a ratio taken within a round.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let off_rates = rates[0].clone();
    let off_cpus: Vec<f64> = cpus[0].iter().map(Duration::as_secs_f64).collect();
    for (i, (name, _)) in configs.iter().enumerate() {
        let rate = median(rates[i].clone());
        let cpu_of = |r: usize| cpus[i][r].as_secs_f64();
        let cpu = median((0..rounds).map(cpu_of).collect());
        let paired = median((0..rounds).map(|r| rates[i][r] / off_rates[r]).collect());
        let cpu_paired = median((0..rounds).map(|r| off_cpus[r] / cpu_of(r)).collect());
        // The CPU ratio is all off's CPU per run over this setting's: like the throughput
        // ratio, 1 is free and lower costs more.
        println!(
            "  {name}: {rate:.0} runs/s (ratio {:.3}; within rounds {paired:.3}), server CPU {:.1} µs per run (ratio {:.3}; within rounds {cpu_paired:.3})",
            rate / median(off_rates.clone()),
            cpu * 1e6,
            median(off_cpus.clone()) / cpu
        );
    }
    println!(
        "  exported {:.1} MiB of spans; the last log {:.1} MiB",
        exported.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1048576.0,
        std::fs::metadata(&log).map_or(0, |m| m.len()) as f64 / 1048576.0
    );
    Ok(())
}

/// `steward drill estop` against three separate nodes on one PostgreSQL database, `trials`
/// times, with the e-stop in the database (`LISTEN/NOTIFY`) and in etcd (a server of the
/// benchmark's own on loopback): per trial, the time from the stop to every canary stopped
/// (its process gone), and per node.
pub(crate) async fn drill_suite(o: &crate::BenchOpts, trials: usize) -> anyhow::Result<()> {
    let Some(url) = &o.database else {
        anyhow::bail!("--suite drill needs --database postgres://...");
    };
    let etcd = tokio::task::spawn_blocking(estop::testing::EtcdServer::start).await?;
    let endpoints = format!("[\"{}\"]", etcd.endpoint());
    let sources: [(&str, Vec<(&str, &str)>); 2] = [
        (
            "PostgreSQL LISTEN/NOTIFY",
            vec![("STEWARD_ESTOP_SOURCE", "db")],
        ),
        (
            "etcd watch",
            vec![
                ("STEWARD_ESTOP_SOURCE", "etcd"),
                ("STEWARD_ETCD_ENDPOINTS", endpoints.as_str()),
            ],
        ),
    ];
    for (name, extra) in sources {
        let mut settings = vec![
            ("STEWARD_DATABASE", url.as_str()),
            ("STEWARD_AUTH", "none"),
            ("STEWARD_KILL_GRACE", "1s"),
        ];
        settings.extend(extra);
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(External::start(&settings, None).await?);
        }
        // The database is not fresh for the second source: say what may run, as an operator
        // of a new etcd prefix would.
        let seeded = tokio::process::Command::new(std::env::current_exe()?)
            .args(["estop", "set", "*", "go", "--addr", &nodes[0].addr])
            .output()
            .await?;
        anyhow::ensure!(
            seeded.status.success(),
            "setting * = go: {}",
            String::from_utf8_lossy(&seeded.stderr)
        );
        let mut last = Vec::with_capacity(trials);
        let mut each = Vec::with_capacity(trials * 3);
        for _ in 0..trials {
            let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
            cmd.args(["drill", "estop", "--json", "--timeout", "10s"]);
            for n in &nodes {
                cmd.args(["--node", &n.addr]);
            }
            let out = cmd.output().await?;
            anyhow::ensure!(
                out.status.success(),
                "the drill failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let times: Vec<Duration> = report["nodes"]
                .as_array()
                .context("no nodes in the drill's report")?
                .iter()
                .map(|r| {
                    r["stopped_after_ms"]
                        .as_f64()
                        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                        .context("a canary did not stop")
                })
                .collect::<anyhow::Result<_>>()?;
            last.push(times.iter().copied().max().unwrap_or_default());
            each.extend(times);
        }
        for n in nodes {
            n.stop().await;
        }
        last.sort();
        each.sort();
        println!(
            "e-stop drill, 3 nodes, e-stop in {name}: {trials} trials, stop set to every canary's process gone: p50 {}  p99 {}  max {}; per node p50 {}  p99 {}",
            ms(crate::percentile(&last, 0.5)),
            ms(crate::percentile(&last, 0.99)),
            ms(crate::percentile(&last, 1.0)),
            ms(crate::percentile(&each, 0.5)),
            ms(crate::percentile(&each, 0.99)),
        );
    }
    drop(etcd);
    Ok(())
}
