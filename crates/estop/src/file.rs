//! The e-stop list in a JSON file (`estop.json` in the data directory), watched with inotify.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use domain::Clock;
use domain::estop::{AuditRecord, EStopList, EStopState, Entry, Target};
use store::EStopStore;
use tokio::sync::{Mutex, Notify};

use crate::{Source, SourceError, diff_audit};

/// The reason of the one entry [`ensure_initial_file`] writes.
pub const INITIAL_REASON: &str = "created on first start; set entries to stop or pause work";

/// The e-stop list in a JSON file. Writes replace the file atomically and durably
/// ([`write_durably`]); changes to it (hand edits included) are seen through inotify on its
/// directory, so that renames over it are seen too.
pub struct FileSource {
    path: PathBuf,
    store: Arc<dyn EStopStore>,
    clock: Arc<dyn Clock>,
    /// The last list read or written: hand edits are what differs from it. Held across each
    /// read-modify-write so that a write and a re-read never audit the same change twice.
    last: Mutex<Option<EStopList>>,
    /// Hand edits audited since the last [`Source::take_noticed`].
    noticed: std::sync::Mutex<Vec<AuditRecord>>,
    wake: Arc<Notify>,
    /// Watching stops when the source is dropped.
    watcher: Option<FileWatch>,
}

impl FileSource {
    /// A source on `path` that watches it with inotify. If the watch cannot be set up (no such
    /// directory yet, inotify limits), it logs a warning and relies on the service's periodic
    /// re-read.
    pub fn new(
        path: impl Into<PathBuf>,
        store: Arc<dyn EStopStore>,
        clock: Arc<dyn Clock>,
    ) -> FileSource {
        let mut s = FileSource::poll_only(path, store, clock);
        match watch_file(&s.path, s.wake.clone()) {
            Ok(w) => s.watcher = Some(w),
            Err(e) => tracing::warn!(
                path = %s.path.display(),
                error = %e,
                "cannot watch the e-stop file; changes to it are seen by the periodic re-read only"
            ),
        }
        s
    }

    /// A source on `path` that does not watch it: changes are seen by the service's periodic
    /// re-read only (for file systems without inotify, such as some network mounts).
    pub fn poll_only(
        path: impl Into<PathBuf>,
        store: Arc<dyn EStopStore>,
        clock: Arc<dyn Clock>,
    ) -> FileSource {
        FileSource {
            path: path.into(),
            store,
            clock,
            last: Mutex::new(None),
            noticed: std::sync::Mutex::new(Vec::new()),
            wake: Arc::new(Notify::new()),
            watcher: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether inotify events are coming in (else only the periodic re-read sees changes).
    pub fn is_watching(&self) -> bool {
        self.watcher.is_some()
    }

    /// Audits what changed since the last list seen (a hand edit) and remembers `list`.
    async fn note_seen(&self, last: &mut Option<EStopList>, list: &EStopList) {
        if let Some(prev) = last.as_ref()
            && prev != list
        {
            let removed = format!("removed from {} by hand", self.path.display());
            let recs = diff_audit(prev, list, &self.clock.now().to_rfc3339(), "file", &removed);
            for r in &recs {
                tracing::info!(
                    path = %self.path.display(),
                    target = %r.target,
                    old = r.old_state.map_or("none", EStopState::as_str),
                    new = r.new_state.map_or("none", EStopState::as_str),
                    "e-stop file edited by hand"
                );
            }
            self.noticed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(recs.iter().cloned());
            if let Err(e) = self.store.audit_append(recs).await {
                tracing::error!(
                    path = %self.path.display(),
                    error = %e,
                    "recording a hand edit of the e-stop file in the audit trail failed"
                );
            }
        }
        *last = Some(list.clone());
    }

    /// Reads the file, auditing any hand edit since the last read.
    async fn read_and_note(&self, last: &mut Option<EStopList>) -> Result<EStopList, SourceError> {
        let list = read_file(&self.path).await?;
        self.note_seen(last, &list).await;
        Ok(list)
    }

    async fn write(&self, list: &EStopList) -> Result<(), SourceError> {
        list.check().map_err(SourceError::InvalidArgument)?;
        let bytes = to_bytes(list).map_err(|error| SourceError::Write {
            path: self.path.clone(),
            error,
        })?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_durably(&path, &bytes))
            .await
            .map_err(|e| SourceError::Write {
                path: self.path.clone(),
                error: io::Error::other(e.to_string()),
            })?
            .map_err(|error| SourceError::Write {
                path: self.path.clone(),
                error,
            })
    }

    async fn record(&self, record: AuditRecord) -> Result<AuditRecord, SourceError> {
        match self.store.audit_append(vec![record.clone()]).await {
            Ok(()) => Ok(record),
            Err(error) => Err(SourceError::AuditNotRecorded {
                record: Box::new(record),
                error,
            }),
        }
    }
}

#[async_trait]
impl Source for FileSource {
    fn describe(&self) -> String {
        format!("e-stop file {}", self.path.display())
    }

    async fn load(&self) -> Result<EStopList, SourceError> {
        let mut last = self.last.lock().await;
        self.read_and_note(&mut last).await
    }

    async fn set(&self, entry: Entry, source: &str) -> Result<AuditRecord, SourceError> {
        let mut last = self.last.lock().await;
        let mut list = self.read_and_note(&mut last).await?;
        let at = crate::set_at(&entry, self.clock.as_ref());
        let old = list.set(entry.clone());
        let record = crate::set_record(&entry, old.as_ref(), &at, source);
        self.write(&list).await?;
        *last = Some(list);
        drop(last);
        self.record(record).await
    }

    async fn clear(
        &self,
        target: &Target,
        actor: &str,
        reason: &str,
        source: &str,
    ) -> Result<Option<AuditRecord>, SourceError> {
        let mut last = self.last.lock().await;
        let mut list = self.read_and_note(&mut last).await?;
        let Some(old) = list.clear(target) else {
            return Ok(None);
        };
        self.write(&list).await?;
        *last = Some(list);
        drop(last);
        let at = self.clock.now().to_rfc3339();
        self.record(crate::clear_record(&old, actor, reason, &at, source))
            .await
            .map(Some)
    }

    fn take_noticed(&self) -> Vec<AuditRecord> {
        std::mem::take(
            &mut *self
                .noticed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    async fn changed(&self) {
        if self.watcher.is_some() {
            self.wake.notified().await;
        } else {
            std::future::pending::<()>().await;
        }
    }

    async fn audit(
        &self,
        target: Option<Target>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, SourceError> {
        crate::audit_trail(self.store.as_ref(), target, limit).await
    }
}

/// The largest e-stop file read; a larger one is malformed.
pub const MAX_ESTOP_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// How long one read of a file Steward depends on may take before it counts as failed.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a file Steward depends on (the e-stop list, the policies) as hostile input: only a
/// regular file (a symbolic link to one is fine), never a FIFO, a device or a directory; at
/// most `max` bytes. The open does not block (a FIFO with no writer would hang it), so this
/// returns at once for anything but a slow disk. Blocking: call it off the async runtime, or
/// through [`read_capped_async`].
pub fn read_capped(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // For the test of a read that hangs (a hung network mount).
    fail::fail_point!("estop::read_capped");
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a regular file (a {})", file_kind(&meta.file_type())),
        ));
    }
    if meta.len() > max {
        return Err(too_big(meta.len(), max));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The file may grow while it is read: read one byte past the cap to tell.
    f.take(max + 1).read_to_end(&mut bytes)?;
    let n = bytes.len() as u64;
    if n > max {
        return Err(too_big(n, max));
    }
    Ok(bytes)
}

/// [`read_capped`] on the blocking pool, failed after [`READ_TIMEOUT`] (a hung disk or
/// network file system) instead of stalling its caller. A read of `path` that timed out and
/// has still not returned fails the next ones at once: a file read every second on a hung
/// mount would otherwise fill the blocking pool with stuck threads, one a second.
pub async fn read_capped_async(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    if stuck(|s| s.iter().any(|p| p == path)) {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("an earlier read has not returned after {READ_TIMEOUT:?} or more"),
        ));
    }
    let owned = path.to_owned();
    // Set, under the same lock as the list, when the read returns: a read that returns just
    // as it times out is never listed as stuck after it has returned.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let read = tokio::task::spawn_blocking({
        let done = done.clone();
        move || {
            let r = read_capped(&owned, max);
            stuck(|s| {
                done.store(true, Ordering::Relaxed);
                s.retain(|p| p != &owned);
            });
            r
        }
    });
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(io::Error::other(join)),
        Err(_) => {
            stuck(|s| {
                if !done.load(Ordering::Relaxed) {
                    s.push(path.to_owned());
                }
            });
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("reading took longer than {READ_TIMEOUT:?}"),
            ))
        }
    }
}

/// The paths whose read timed out and has not returned: `f` of them.
fn stuck<R>(f: impl FnOnce(&mut Vec<std::path::PathBuf>) -> R) -> R {
    static STUCK: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    f(&mut STUCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner))
}

fn too_big(len: u64, max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("is over {max} bytes ({len}); the limit is {max}"),
    )
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

async fn read_file(path: &Path) -> Result<EStopList, SourceError> {
    let bytes = match read_capped_async(path, MAX_ESTOP_FILE_BYTES).await {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(SourceError::Malformed {
                path: path.to_owned(),
                error: e.to_string(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SourceError::Missing {
                path: path.to_owned(),
            });
        }
        Err(error) => {
            return Err(SourceError::Read {
                path: path.to_owned(),
                error,
            });
        }
    };
    let text = String::from_utf8(bytes).map_err(|e| SourceError::Malformed {
        path: path.to_owned(),
        error: format!("not UTF-8: {e}"),
    })?;
    EStopList::parse(&text).map_err(|error| SourceError::Malformed {
        path: path.to_owned(),
        error,
    })
}

/// The file's text. An encoding failure is an error, never an empty file.
fn to_bytes(list: &EStopList) -> io::Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(list).map_err(io::Error::other)?;
    b.push(b'\n');
    Ok(b)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A watch on one file, ended when dropped.
pub struct FileWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileWatch")
    }
}

/// Watches the directory of `path` (renames replace the file's inode, so watching the file
/// itself would lose track of it) and wakes `wake` on every event that may have changed the
/// file: a write closed, a creation, a removal, a rename naming it, lost events. Only those
/// kinds are asked of the kernel: the directory is the data directory, where the database
/// writes all the time, and asking for every modification there would cost each of those
/// writes an event (about an eighth of the core throughput). A file changed in place is seen
/// when its writer closes it; the periodic re-read covers anything else.
///
/// inotify by hand (through `nix`): the `notify` crate asks for every modification and offers
/// no way to narrow that.
pub fn watch_file(path: &Path, wake: Arc<Notify>) -> io::Result<FileWatch> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;
    let name = path.file_name().map(ToOwned::to_owned);
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    ino.add_watch(
        parent_dir(path),
        AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF,
    )?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("steward-file-watch".into())
        .spawn(move || {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            while !stopped.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(250u16)) {
                    Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "watching a file failed; the periodic re-read goes on");
                        return;
                    }
                }
                match ino.read_events() {
                    Ok(events) => {
                        let ours = events.iter().any(|e| {
                            e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                                || e.mask.intersects(
                                    AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF,
                                )
                                || e.name.as_deref() == name.as_deref()
                        });
                        if ours {
                            wake.notify_one();
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "an error watching a file; re-reading it");
                        wake.notify_one();
                    }
                }
            }
        })?;
    Ok(FileWatch { stop })
}

/// Replaces `path` with `contents` atomically and durably: writes a temporary file in the same
/// directory, fsyncs it, renames it over `path` and fsyncs the directory. A reader sees the old
/// contents or the new, never a mix; after `Ok`, the new contents survive a crash. The file
/// keeps its permissions; if `path` is a symbolic link, the file it points to is replaced and
/// the link stays.
pub fn write_durably(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_durably_as(path, contents, None)
}

/// [`write_durably`] for a secret: the file is readable and writable by its owner only
/// (mode 0600) from the moment it exists.
pub fn write_durably_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_durably_as(path, contents, Some(0o600))
}

fn write_durably_as(path: &Path, contents: &[u8], mode: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    static N: AtomicU64 = AtomicU64::new(0);
    let path = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path)?,
        _ => path.to_owned(),
    };
    let dir = parent_dir(&path);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode.unwrap_or(0o666))
            .open(&tmp)?;
        match (mode, fs::metadata(&path)) {
            (None, Ok(m)) => f.set_permissions(m.permissions())?,
            (Some(mode), _) => {
                use std::os::unix::fs::PermissionsExt as _;
                f.set_permissions(fs::Permissions::from_mode(mode))?;
            }
            (None, Err(_)) => {}
        }
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        // Gone already if the rename happened.
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Creates the e-stop file with one entry, `* go` (set by `steward`, reason
/// [`INITIAL_REASON`]), when it is missing and this is a fresh install; returns whether it did.
/// When the file is missing on a later start it is left missing: the file source then reports
/// it unreadable and everything stops (fail closed) until an operator restores it.
pub fn ensure_initial_file(path: &Path, fresh_install: bool) -> Result<bool, SourceError> {
    let exists = path.try_exists().map_err(|error| SourceError::Read {
        path: path.to_owned(),
        error,
    })?;
    if exists || !fresh_install {
        return Ok(false);
    }
    let list = EStopList {
        entries: vec![Entry {
            target: Target::All,
            state: EStopState::Go,
            reason: INITIAL_REASON.into(),
            set_by: "steward".into(),
            set_at: String::new(),
        }],
    };
    to_bytes(&list)
        .and_then(|b| write_durably(path, &b))
        .map_err(|error| SourceError::Write {
            path: path.to_owned(),
            error,
        })?;
    tracing::info!(path = %path.display(), "created the e-stop file: everything may run (* go)");
    Ok(true)
}
