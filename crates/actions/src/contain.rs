//! Keeping everything a `shell` job starts together, killing it as one, and finding what a
//! crashed Steward left running.
//!
//! Two mechanisms, chosen once per node ([`Containment`]):
//! - **cgroup** (cgroup v2, where Steward may create cgroups): each attempt runs in a cgroup of
//!   its own, entered before the program is executed. Nothing it starts can leave it, not
//!   even with `setsid` or a double fork; `cgroup.kill` ends all of it at once.
//! - **process group** (everywhere else): each attempt leads a process group of its own. A
//!   process that leaves the group (`setsid`) is still found when it keeps the job's
//!   environment (`STEWARD_IDEMPOTENCY_KEY`), by a scan of `/proc` at the attempt's end.
//!
//! **The ledger** (`DATA_DIR/jobs/`, one small file per attempt in flight) names what an
//! attempt runs in: its cgroup, or its process group and the leader's start time, with the
//! boot it ran in. It is written before the program starts (the cgroup) and just after (the
//! process group), and removed once the attempt's processes are gone. A Steward that was
//! killed leaves its entries behind; the next start of the same data directory reads them and
//! ends whatever is left of those attempts (SIGTERM, the kill grace, SIGKILL) before any job is
//! dispatched again, so that an at-least-once job never runs twice at the same time on one
//! machine. Entries of an earlier boot are dropped unread: a reboot ended their processes, and
//! their ids may name unrelated processes now. No fsync: a power loss that could lose an entry
//! also ends the processes it names.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// How a node keeps a job's processes together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Containment {
    /// One cgroup v2 per attempt, under `root`.
    Cgroup { root: PathBuf },
    /// One process group per attempt; `why` says why cgroups are not used.
    ProcessGroup { why: String },
}

impl fmt::Display for Containment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Containment::Cgroup { root } => write!(f, "cgroup ({})", root.display()),
            Containment::ProcessGroup { why } => write!(f, "process group ({why})"),
        }
    }
}

/// What the operator asked for (`job_containment`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainmentMode {
    /// cgroups where Steward may create them, else process groups.
    Auto,
    /// cgroups or refuse to start.
    Cgroup,
    /// process groups even where cgroups would work.
    ProcessGroup,
}

/// One ledger entry: what one attempt in flight runs in.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    boot_id: String,
    /// The job's idempotency key.
    key: String,
    attempt: u32,
    /// Clock ticks since boot when the attempt began: its processes started no earlier.
    began: u64,
    cgroup: Option<PathBuf>,
    /// The process group (its leader's pid) and the leader's start time in ticks since boot.
    pgid: Option<i32>,
    leader_start: Option<u64>,
}

/// A node's job supervisor: its containment and its ledger. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Supervisor {
    containment: Containment,
    ledger: PathBuf,
    boot_id: String,
    /// Ended attempts' cgroups, removed one after another by a thread of their own.
    cleaner: Option<std::sync::mpsc::Sender<(PathBuf, PathBuf)>>,
    /// Without cgroups: ended attempts, for the scan that finds what left their groups.
    scanner: Option<std::sync::mpsc::Sender<(Target, PathBuf)>>,
}

/// What [`Supervisor::sweep`] found and ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Ledger entries of attempts a previous process left in flight.
    pub attempts: usize,
    /// Processes signalled.
    pub killed: usize,
    /// Entries from an earlier boot, dropped.
    pub stale: usize,
}

impl Supervisor {
    /// Sets up the ledger in `ledger` (created, mode 0700) and the containment `mode` asks
    /// for. `name` tells this node's cgroups from another node's on the same machine.
    pub fn new(ledger: &Path, mode: ContainmentMode, name: &str) -> io::Result<Supervisor> {
        create_private_dir(ledger)?;
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let containment = match mode {
            ContainmentMode::ProcessGroup => Containment::ProcessGroup {
                why: "job_containment = \"process_group\"".into(),
            },
            ContainmentMode::Auto | ContainmentMode::Cgroup => match cgroup_root(name) {
                Ok(root) => Containment::Cgroup { root },
                Err(e) if mode == ContainmentMode::Cgroup => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("job_containment = \"cgroup\", but cgroups cannot be used: {e}"),
                    ));
                }
                Err(e) => Containment::ProcessGroup {
                    why: format!("cgroup v2 not usable: {e}"),
                },
            },
        };
        let (cleaner, scanner) = match &containment {
            Containment::Cgroup { .. } => (Some(start_cleaner()?), None),
            Containment::ProcessGroup { .. } => (None, Some(start_scanner()?)),
        };
        Ok(Supervisor {
            containment,
            ledger: ledger.to_owned(),
            boot_id,
            cleaner,
            scanner,
        })
    }

    pub fn containment(&self) -> &Containment {
        &self.containment
    }

    /// One file per attempt: an ended attempt's entry may still be waiting for its removal
    /// (off the runtime) when the job's next attempt begins.
    fn entry_path(&self, key: &str, attempt: u32) -> PathBuf {
        self.ledger
            .join(format!("{}.a{attempt}.json", file_name(key)))
    }

    /// Ends whatever attempts a previous process of this data directory left running: each
    /// gets SIGTERM, then `grace`, then SIGKILL, and its ledger entry is removed. Call it before
    /// any job is dispatched.
    pub async fn sweep(&self, grace: Duration) -> SweepReport {
        let mut report = SweepReport::default();
        let Ok(dir) = fs::read_dir(&self.ledger) else {
            return report;
        };
        let mut entries = Vec::new();
        for item in dir.flatten() {
            let path = item.path();
            if path.extension().is_none_or(|e| e != "json") {
                // A temporary file of an interrupted write.
                let _ = fs::remove_file(&path);
                continue;
            }
            let entry = read_entry(&path);
            match entry {
                Some(e) if e.boot_id == self.boot_id && !self.boot_id.is_empty() => {
                    entries.push((path, e));
                }
                _ => {
                    report.stale += 1;
                    let _ = fs::remove_file(&path);
                }
            }
        }
        report.attempts = entries.len();
        if entries.is_empty() {
            self.remove_empty_cgroups();
            return report;
        }
        let targets: Vec<Target> = entries.iter().map(|(_, e)| Target::of(e)).collect();
        report.killed = end_all(&targets, grace).await;
        for (path, e) in &entries {
            tracing::warn!(job = %e.key, attempt = e.attempt, "ended what a previous steward left running of this job attempt");
            let _ = fs::remove_file(path);
        }
        self.remove_empty_cgroups();
        report
    }

    /// Removes leftover empty attempt cgroups (of attempts whose ledger entry was lost), and
    /// the job cgroups of nodes that left none below them (a node recreates its own when it
    /// needs it).
    fn remove_empty_cgroups(&self) {
        let Containment::Cgroup { root } = &self.containment else {
            return;
        };
        let remove_empty_children = |dir: &Path| {
            if let Ok(items) = fs::read_dir(dir) {
                for item in items.flatten() {
                    if item.file_type().is_ok_and(|t| t.is_dir()) && !cgroup_populated(&item.path())
                    {
                        let _ = fs::remove_dir(item.path());
                    }
                }
            }
        };
        remove_empty_children(root);
        if let Some(parent) = root.parent()
            && let Ok(items) = fs::read_dir(parent)
        {
            for item in items.flatten() {
                let path = item.path();
                let ours = item
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("steward-jobs."));
                // Only a root with no attempt cgroups at all can be removed: a live node's
                // empty attempt cgroup may be about to receive its job.
                if ours && path != *root {
                    let _ = fs::remove_dir(&path);
                }
            }
        }
    }

    /// Prepares an attempt of job `key`: its cgroup (if cgroups are used) and its ledger entry.
    pub(crate) async fn begin(&self, key: &str, attempt: u32) -> io::Result<Attempt> {
        let began = ticks_since_boot();
        let (cgroup, procs) = match &self.containment {
            Containment::Cgroup { root } => {
                // Another node's sweep may have removed the root while it was empty.
                fs::create_dir_all(root)?;
                let dir = root.join(format!("{}.a{attempt}", file_name(key)));
                match fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        // Left by an attempt whose end was not seen: empty it first.
                        end_cgroup(&dir).await;
                        fs::create_dir(&dir)?;
                    }
                    Err(e) => return Err(e),
                }
                let procs = fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))?;
                (Some(dir), Some(OwnedFd::from(procs)))
            }
            Containment::ProcessGroup { .. } => (None, None),
        };
        let entry = Entry {
            boot_id: self.boot_id.clone(),
            key: key.to_owned(),
            attempt,
            began,
            cgroup: cgroup.clone(),
            pgid: None,
            leader_start: None,
        };
        let path = self.entry_path(key, attempt);
        write_entry(&path, &entry)?;
        Ok(Attempt {
            entry,
            path,
            procs,
            cleaner: self.cleaner.clone(),
            scanner: self.scanner.clone(),
            scan_env: matches!(self.containment, Containment::ProcessGroup { .. }),
            done: false,
        })
    }
}

/// A node that stops cleanly removes its (empty) job cgroup.
impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Containment::Cgroup { root } = &self.containment {
            let _ = fs::remove_dir(root);
        }
    }
}

/// One attempt's containment: created by [`Supervisor::begin`] before the spawn.
#[derive(Debug)]
pub(crate) struct Attempt {
    entry: Entry,
    path: PathBuf,
    /// `cgroup.procs` of the attempt's cgroup, written by the child before it executes.
    procs: Option<OwnedFd>,
    /// Whether the attempt's end scans `/proc` for processes that left the group.
    scan_env: bool,
    /// Finished: nothing is left to clean up when dropped.
    done: bool,
    cleaner: Option<std::sync::mpsc::Sender<(PathBuf, PathBuf)>>,
    scanner: Option<std::sync::mpsc::Sender<(Target, PathBuf)>>,
}

impl Attempt {
    /// The raw descriptor of the cgroup's `cgroup.procs`, for the child to join before exec.
    pub(crate) fn procs_fd(&self) -> Option<i32> {
        self.procs.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Records the started process group in the ledger.
    pub(crate) fn started(&mut self, pgid: Pid) {
        self.procs = None;
        self.entry.pgid = Some(pgid.as_raw());
        self.entry.leader_start = start_time(pgid.as_raw());
        if let Err(e) = write_entry(&self.path, &self.entry) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record a job's process group in the ledger");
        }
    }

    /// Signals every process of the attempt: its cgroup's, or its group's. (Without a cgroup,
    /// processes that left the group are found by the scan at the attempt's end.)
    pub(crate) fn signal(&self, sig: Signal) {
        Target::of(&self.entry).signal(sig, false);
    }

    /// Kills what is left and drops the ledger entry. A SIGKILL cannot be caught: once it is
    /// sent (to the whole cgroup at once), nothing of the attempt runs user code again, so the
    /// outcome need not wait for the cgroup to empty; its removal is left to a blocking task
    /// (and, should the process die first, to the next start's sweep).
    pub(crate) async fn finish(mut self) {
        let target = Target::of(&self.entry);
        target.signal(Signal::SIGKILL, false);
        self.done = true;
        if let (true, Some(scanner)) = (self.scan_env, &self.scanner) {
            // Without a cgroup: what left the group but kept the job's environment is found by
            // the scanner, off the runtime; the ledger entry goes once it has looked.
            let _ = scanner.send((target, self.path.clone()));
            return;
        }
        // The cgroup, then the ledger entry, go off the runtime: a stop that ends a thousand
        // attempts at once must not wait on a thousand unlinks.
        if let (Some(dir), Some(cleaner)) = (self.entry.cgroup.clone(), &self.cleaner)
            && cleaner.send((dir, self.path.clone())).is_ok()
        {
            return;
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// An attempt dropped before [`Attempt::finish`] (its future was dropped): everything of it
/// is SIGKILLed now, and its cgroup and ledger entry are cleaned up off the runtime.
impl Drop for Attempt {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let target = Target::of(&self.entry);
        target.signal(Signal::SIGKILL, false);
        let cgroup = self.entry.cgroup.clone();
        let path = self.path.clone();
        let cleanup = move || {
            if let Some(dir) = &cgroup {
                end_cgroup_blocking(dir);
            }
            let _ = fs::remove_file(&path);
        };
        if std::thread::Builder::new()
            .name("steward-job-cleanup".into())
            .spawn(cleanup)
            .is_err()
        {
            tracing::warn!(path = %self.path.display(), "cannot clean up a dropped job attempt now; the next start does");
        }
    }
}

/// What an attempt runs in, as found again from its ledger entry.
struct Target {
    key: String,
    began: u64,
    cgroup: Option<PathBuf>,
    pgid: Option<i32>,
    leader_start: Option<u64>,
}

impl Target {
    fn of(e: &Entry) -> Target {
        Target {
            key: e.key.clone(),
            began: e.began,
            cgroup: e.cgroup.clone(),
            pgid: e.pgid,
            leader_start: e.leader_start,
        }
    }

    /// The processes of this attempt now: its cgroup's; without one, and with `scan_env`,
    /// those a scan of `/proc` finds (see [`scan`]). Without either, none: the caller signals
    /// the process group as a whole.
    fn members(&self, scan_env: bool) -> BTreeSet<i32> {
        let mut pids = BTreeSet::new();
        if let Some(dir) = &self.cgroup {
            cgroup_pids(dir, &mut pids);
        }
        if self.cgroup.is_none() && scan_env {
            pids.extend(scan(&[self]).into_iter().flatten());
        }
        pids.remove(&std::process::id().cast_signed());
        pids
    }

    fn signal(&self, sig: Signal, scan_env: bool) {
        if sig == Signal::SIGKILL
            && let Some(dir) = &self.cgroup
        {
            // The whole cgroup, its sub-cgroups included, at once.
            cgroup_kill(dir);
            if !scan_env {
                return;
            }
        }
        if let (Some(pgid), None) = (self.pgid, &self.cgroup) {
            // The group as a whole first: it reaches members the scan could not tell apart.
            match (self.leader_start, proc_stat(pgid)) {
                (Some(start), Some(s)) if s.start == start => {
                    let _ = killpg(Pid::from_raw(pgid), sig);
                }
                _ => {}
            }
        }
        for pid in self.members(scan_env) {
            match kill(Pid::from_raw(pid), sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(error) => {
                    tracing::warn!(pid, signal = %sig, %error, "cannot signal a job's process")
                }
            }
        }
    }
}

/// For each target: the members of its recorded process group, and the processes that carry
/// its job's idempotency key (`STEWARD_IDEMPOTENCY_KEY` in their environment), started since
/// its attempt began. One pass over `/proc` serves every target. A group's id can be reused
/// once the group is empty, so group members count only while the group is provably the
/// attempt's: its leader still runs (same start time), or a member carries the key.
fn scan(targets: &[&Target]) -> Vec<BTreeSet<i32>> {
    let markers: Vec<Vec<u8>> = targets
        .iter()
        .map(|t| format!("STEWARD_IDEMPOTENCY_KEY={}", t.key).into_bytes())
        .collect();
    let mut in_group = vec![BTreeSet::new(); targets.len()];
    let mut marked = vec![BTreeSet::new(); targets.len()];
    let earliest = targets.iter().map(|t| t.began).min().unwrap_or(0);
    if let Ok(proc_dir) = fs::read_dir("/proc") {
        for item in proc_dir.flatten() {
            let Some(pid) = item
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Some(stat) = proc_stat(pid) else { continue };
            if stat.state == 'Z' || stat.start < earliest {
                continue;
            }
            let mut env: Option<Vec<u8>> = None;
            for (i, t) in targets.iter().enumerate() {
                if stat.start < t.began {
                    continue;
                }
                let env = env.get_or_insert_with(|| {
                    fs::read(format!("/proc/{pid}/environ")).unwrap_or_default()
                });
                if env.split(|b| *b == 0).any(|v| v == markers[i].as_slice()) {
                    marked[i].insert(pid);
                }
                if t.pgid == Some(stat.pgrp) {
                    in_group[i].insert(pid);
                }
            }
        }
    }
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let leader_alive = match (t.pgid, t.leader_start) {
                (Some(pgid), Some(start)) => proc_stat(pgid).is_some_and(|s| s.start == start),
                _ => false,
            };
            let mut found = std::mem::take(&mut marked[i]);
            if leader_alive || in_group[i].iter().any(|p| found.contains(p)) {
                found.extend(std::mem::take(&mut in_group[i]));
            }
            found
        })
        .collect()
}

/// The thread that ends what left the process groups of ended attempts (without cgroups):
/// attempts that end together share one scan of `/proc`. Each ledger entry goes once its
/// scan is done. It ends when the supervisor and every attempt are dropped.
fn start_scanner() -> io::Result<std::sync::mpsc::Sender<(Target, PathBuf)>> {
    let (tx, rx) = std::sync::mpsc::channel::<(Target, PathBuf)>();
    std::thread::Builder::new()
        .name("steward-job-scanner".into())
        .spawn(move || {
            yield_to_jobs();
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let targets: Vec<&Target> = batch.iter().map(|(t, _)| t).collect();
                for pids in scan(&targets) {
                    for pid in pids {
                        if pid != std::process::id().cast_signed() {
                            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                        }
                    }
                }
                for (_, path) in &batch {
                    let _ = fs::remove_file(path);
                }
            }
        })?;
    Ok(tx)
}

/// SIGTERM to every target, `grace` for them to exit, SIGKILL to what is left, and a short
/// wait until it is gone. Returns how many processes were signalled.
async fn end_all(targets: &[Target], grace: Duration) -> usize {
    let mut signalled = BTreeSet::new();
    for t in targets {
        let members = t.members(true);
        if !members.is_empty() {
            tracing::info!(job = %t.key, processes = members.len(), "SIGTERM to what a previous steward left running");
        }
        signalled.extend(members);
        t.signal(Signal::SIGTERM, true);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && targets.iter().any(|t| !t.members(true).is_empty()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in targets {
        let left = t.members(true);
        if !left.is_empty() {
            tracing::warn!(job = %t.key, processes = left.len(), "SIGKILL to what outlived the kill grace");
            signalled.extend(left);
            t.signal(Signal::SIGKILL, true);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && targets.iter().any(|t| !t.members(true).is_empty()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in targets {
        if let Some(dir) = &t.cgroup {
            end_cgroup(dir).await;
        }
    }
    signalled.len()
}

// ---- cgroups ----

/// This process's cgroup v2 directory, and under it `steward-jobs.NAME` (created) where
/// attempts get their cgroups. Checks that a cgroup can be created and killed there.
fn cgroup_root(name: &str) -> io::Result<PathBuf> {
    let mount = cgroup2_mount()?;
    let own = fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "this process is in no cgroup v2")
        })?;
    let own = mount.join(own.trim_start_matches('/'));
    if !own.join("cgroup.kill").exists() && own != mount {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel has no cgroup.kill (Linux 5.14 or later needed)",
        ));
    }
    let root = own.join(format!("steward-jobs.{}", file_name(name)));
    match fs::create_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", root.display()),
            ));
        }
    }
    // A probe: a child cgroup that can be created, has cgroup.kill, and can be removed.
    let probe = root.join(format!("probe.{}", std::process::id()));
    let _ = fs::remove_dir(&probe);
    fs::create_dir(&probe)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", probe.display())))?;
    let usable = probe.join("cgroup.kill").exists() && probe.join("cgroup.procs").exists();
    let _ = fs::remove_dir(&probe);
    if !usable {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a new cgroup has no cgroup.kill (Linux 5.14 or later needed)",
        ));
    }
    Ok(root)
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on a hybrid system).
fn cgroup2_mount() -> io::Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(point) = left.split_whitespace().nth(4)
        {
            let writable = left
                .split_whitespace()
                .nth(5)
                .is_some_and(|o| o.split(',').any(|o| o == "rw"));
            if writable {
                return Ok(PathBuf::from(unescape_mount(point)));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no writable cgroup v2 file system is mounted",
    ))
}

/// Mount points escape space, tab, newline and backslash as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len() + 1
            && let Some(oct) = s.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cgroup_pids(dir: &Path, out: &mut BTreeSet<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    // A job run as root may have made cgroups of its own below its cgroup.
    if let Ok(sub) = fs::read_dir(dir) {
        for item in sub.flatten() {
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_pids(&item.path(), out);
            }
        }
    }
}

fn cgroup_populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|t| t.lines().any(|l| l == "populated 1"))
}

fn cgroup_kill(dir: &Path) {
    if let Err(e) = fs::write(dir.join("cgroup.kill"), "1")
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot kill a job's cgroup");
    }
}

/// Lowers the calling thread's priority by 10 `nice` steps (on Linux a thread has a priority
/// of its own): the cleanup after ended attempts (removing cgroups, scanning `/proc`) gives
/// way to the runtime, which, when a stop ends a thousand attempts at once, is still killing
/// and recording the rest. A kernel that refuses leaves the priority as it was.
fn yield_to_jobs() {
    let _ = rustix::process::nice(10);
}

/// [`end_cgroup_blocking`] off the runtime, awaited.
async fn end_cgroup(dir: &Path) {
    let dir = dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || end_cgroup_blocking(&dir)).await;
}

/// The thread that removes ended attempts' cgroups, then their ledger entries, in order, off
/// the runtime: by the time it gets to one, its processes (SIGKILLed) are almost always gone.
/// It ends when the supervisor and every attempt are dropped.
fn start_cleaner() -> io::Result<std::sync::mpsc::Sender<(PathBuf, PathBuf)>> {
    let (tx, rx) = std::sync::mpsc::channel::<(PathBuf, PathBuf)>();
    std::thread::Builder::new()
        .name("steward-cgroup-cleaner".into())
        .spawn(move || {
            yield_to_jobs();
            for (dir, ledger_entry) in rx {
                end_cgroup_blocking(&dir);
                let _ = fs::remove_file(&ledger_entry);
            }
        })?;
    Ok(tx)
}

/// SIGKILLs whatever is left in `dir`, waits until it is empty (a moment: the kernel delivers
/// the kill at once), and removes it. Blocking: call it on a thread of its own (the cleaner, a
/// dropped attempt's) or through [`end_cgroup`].
#[allow(clippy::disallowed_methods)] // never on the runtime: see above
fn end_cgroup_blocking(dir: &Path) {
    if cgroup_populated(dir) {
        cgroup_kill(dir);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut nap = Duration::from_micros(500);
        while cgroup_populated(dir) && Instant::now() < deadline {
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(50));
        }
    }
    remove_cgroup_tree(dir);
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(sub) = fs::read_dir(dir) {
        for item in sub.flatten() {
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&item.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::debug!(cgroup = %dir.display(), error = %e, "cannot remove a job's cgroup yet");
    }
}

// ---- /proc ----

struct ProcStat {
    state: char,
    pgrp: i32,
    /// Clock ticks since boot.
    start: u64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    // stime cutime cstime priority nice threads itrealvalue starttime ...`; comm may hold
    // anything, so fields are counted after its last `)`.
    let (_, rest) = text.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start)
}

/// Clock ticks since boot now, on the clock `/proc/PID/stat` start times use.
fn ticks_since_boot() -> u64 {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(100);
    let secs: f64 = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|s| s.parse().ok()))
        .unwrap_or(0.0);
    // A tick of slack: uptime and start times are rounded differently.
    let ticks = (secs * hz as f64) as u64;
    ticks.saturating_sub(1)
}

// ---- files ----

/// A job key (`RUN/b0/j1`) as a file name.
fn file_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("creating the job ledger {}: {e}", dir.display()),
        )),
    }
}

fn read_entry(path: &Path) -> Option<Entry> {
    let bytes = fs::read(path).ok()?;
    if bytes.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Writes an entry whole (temporary file, rename): a crash leaves the old entry or the new.
fn write_entry(path: &Path, e: &Entry) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(e).map_err(io::Error::other)?;
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    drop(f);
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_file_names() {
        assert_eq!(file_name("0192f0c1-8a4e/b0/j12"), "0192f0c1-8a4e_b0_j12");
        assert_eq!(file_name("../x"), ".._x");
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }

    #[test]
    fn this_process_has_a_start_time() {
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        let start = start_time(me).unwrap_or(0);
        assert!(start > 0 && start <= ticks_since_boot() + 2);
    }
}
