//! The PID file: one live `steward serve` per data directory, found by `steward stop`.
//!
//! The file is locked for the life of the process, so a leftover file from a crashed process
//! is recognised as stale whatever PID it names. The lock is a POSIX record lock (`fcntl`
//! `F_SETLK`), which belongs to the process: a child forked to run a job does not share it
//! (an `flock` would be shared by the child until it executes its program, so a restart right
//! after a kill -9 could find the lock still held by a job caught between fork and exec). It
//! is released when the process exits, however it exits. Nothing else in the process may open
//! the PID file: closing any descriptor of it would release the lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::{FcntlArg, fcntl};

pub const PID_FILE: &str = "steward.pid";
/// Written by `steward stop` just before it signals, so the server records the right cause.
pub const STOP_REQUEST_FILE: &str = "stop-request";

pub struct PidFile {
    path: PathBuf,
    /// Holds the lock: it goes with the process, or with this descriptor's close.
    _file: File,
    /// The PID a previous process left behind: it ended without removing its file.
    pub stale: Option<String>,
}

/// A lock of `kind` over the whole file, for `F_SETLK` and `F_GETLK`.
fn whole_file(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// The PID of the process holding a lock on `file`, if any.
fn holder(file: &File) -> std::io::Result<Option<i32>> {
    let mut l = whole_file(libc::F_WRLCK);
    fcntl(file, FcntlArg::F_GETLK(&mut l))?;
    Ok((l.l_type != libc::F_UNLCK as libc::c_short).then_some(l.l_pid))
}

impl PidFile {
    pub fn acquire(data_dir: &Path) -> anyhow::Result<PidFile> {
        let path = data_dir.join(PID_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the PID file {}", path.display()))?;
        let lock = whole_file(libc::F_WRLCK);
        if let Err(e) = fcntl(&file, FcntlArg::F_SETLK(&lock)) {
            if !matches!(e, nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) {
                return Err(e).with_context(|| format!("locking the PID file {}", path.display()));
            }
            let held = holder(&file).ok().flatten().map_or_else(
                || {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    text.trim().to_owned()
                },
                |pid| pid.to_string(),
            );
            bail!(
                "another steward (pid {held}) is serving from {}; stop it first (steward stop --data-dir {})",
                data_dir.display(),
                data_dir.display()
            );
        }
        let mut stale = String::new();
        let _ = file.read_to_string(&mut stale);
        let stale = Some(stale.trim().to_owned()).filter(|s| !s.is_empty());
        if let Some(pid) = &stale {
            tracing::warn!(stale_pid = %pid, "replacing a stale PID file: the previous steward did not stop cleanly");
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(PidFile {
            path,
            _file: file,
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
    // A test, not a lock: taking one here and closing the file would be harmless (another
    // process), but F_GETLK also names the holder.
    match holder(&file).with_context(|| format!("checking the lock on {}", path.display()))? {
        None => Ok(None),
        Some(pid) => Ok(Some(pid)),
    }
}
