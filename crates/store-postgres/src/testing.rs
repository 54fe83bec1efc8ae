//! A real PostgreSQL server for tests: `initdb` in a temporary directory, `postgres` on a free
//! loopback port, stopped and removed on drop. Needs the server binaries (Debian's
//! `postgresql` package; `STEWARD_PG_BIN` names another directory). As root, the server runs
//! as the `postgres` user, since PostgreSQL refuses to run as root.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A running server. Each [`PgServer::fresh_db`] is a new, empty database on it.
pub struct PgServer {
    dir: tempfile::TempDir,
    child: Child,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    pub port: u16,
    next_db: AtomicUsize,
}

fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STEWARD_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "the PostgreSQL tests need the server binaries: apt-get install postgresql \
             (or set STEWARD_PG_BIN to the directory holding initdb and postgres)"
        ),
    }
}

/// The uid and gid to run the server as: `postgres` when we are root, else ourselves.
fn run_as() -> Option<(u32, u32)> {
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if uid.ok()? != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"));
    let Some(line) = line else {
        panic!(
            "running as root, the PostgreSQL tests need a `postgres` user (apt-get install postgresql creates it)"
        );
    };
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().ok()?, f[3].parse().ok()?))
}

fn command(bin: &Path, name: &str, user: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(bin.join(name));
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd.env_remove("PGDATA").env("LC_ALL", "C");
    cmd
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl PgServer {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> PgServer {
        let bin = bin_dir();
        let user = run_as();
        let dir = tempfile::tempdir().unwrap();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let out = command(&bin, "initdb", user)
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
            ])
            .args(["-E", "UTF8", "--no-sync", "--no-instructions"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = spawn(&bin, user, dir.path(), port);
        let mut server = PgServer {
            dir,
            child,
            bin,
            user,
            port,
            next_db: AtomicUsize::new(0),
        };
        server.wait_ready().await;
        server
    }

    /// Stops the server at once (as a crash would), keeps it down for `down_for`, then starts
    /// it again on the same port and data.
    pub async fn restart(&mut self, down_for: Duration) {
        self.stop_now();
        tokio::time::sleep(down_for).await;
        self.start_again().await;
    }

    /// Starts the server stopped by [`PgServer::stop_now`] again, on the same port and data.
    pub async fn start_again(&mut self) {
        self.child = spawn(&self.bin, self.user, self.dir.path(), self.port);
        self.wait_ready().await;
    }

    /// Stops the server at once, as a crash would.
    pub fn stop_now(&mut self) {
        // SIGQUIT: immediate shutdown, the postmaster ends its backends.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGQUIT,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("postgres exited ({status}): {}", self.log());
            }
            if tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready in 60 s: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn fresh_db(&self) -> String {
        let n = self.next_db.fetch_add(1, Ordering::SeqCst);
        let name = format!("steward_{n}");
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
        let create = async move {
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
        };
        tokio::pin!(conn);
        tokio::select! {
            r = create => r.unwrap(),
            r = &mut conn => panic!("the connection to postgres ended: {r:?}"),
        }
        self.url(&format!("steward_{n}"))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Starts `postgres` on the data directory `dir/data`, logging to `dir/postgres.log`.
fn spawn(bin: &Path, user: Option<(u32, u32)>, dir: &Path, port: u16) -> Child {
    let log_path = dir.join("postgres.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&log_path, Some(uid), Some(gid)).unwrap();
    }
    command(bin, "postgres", user)
        .args([
            "-D",
            dir.join("data").to_str().unwrap(),
            "-p",
            &port.to_string(),
        ])
        .args(["-k", dir.to_str().unwrap()])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=300",
        ])
        .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
        .args(["-c", "shared_buffers=32MB", "-c", "max_wal_size=256MB"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}
