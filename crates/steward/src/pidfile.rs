//! The PID file: one live `steward serve` per data directory, found by `steward stop`.
//!
//! The file is locked (flock) for the life of the process, so a leftover file from a
//! crashed process is recognised as stale whatever PID it names.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};

pub const PID_FILE: &str = "steward.pid";
/// Written by `steward stop` just before it signals, so the server records the right cause.
pub const STOP_REQUEST_FILE: &str = "stop-request";

pub struct PidFile {
    path: PathBuf,
    _lock: Flock<File>,
    /// The PID a previous process left behind: it ended without removing its file.
    pub stale: Option<String>,
}

impl PidFile {
    pub fn acquire(data_dir: &Path) -> anyhow::Result<PidFile> {
        let path = data_dir.join(PID_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the PID file {}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, _)) => {
                let mut held = String::new();
                let _ = file.read_to_string(&mut held);
                bail!(
                    "another steward (pid {}) is serving from {}; stop it first (steward stop --data-dir {})",
                    held.trim(),
                    data_dir.display(),
                    data_dir.display()
                );
            }
        };
        let mut stale = String::new();
        let _ = lock.read_to_string(&mut stale);
        let stale = Some(stale.trim().to_owned()).filter(|s| !s.is_empty());
        if let Some(pid) = &stale {
            tracing::warn!(stale_pid = %pid, "replacing a stale PID file: the previous steward did not stop cleanly");
        }
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        lock.sync_all()?;
        Ok(PidFile {
            path,
            _lock: lock,
            stale,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The PID of the live server of `data_dir`, if any.
pub fn live_pid(data_dir: &Path) -> anyhow::Result<Option<i32>> {
    let path = data_dir.join(PID_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // We could lock it: nobody holds it, the file is stale.
        Ok(_) => Ok(None),
        Err(_) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let pid = text.trim().parse().with_context(|| {
                format!("{} holds {:?}, not a PID", path.display(), text.trim())
            })?;
            Ok(Some(pid))
        }
    }
}
