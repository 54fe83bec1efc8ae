//! The `write_file` action: idempotent, atomic file writes.

use std::fmt;
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use domain::FieldError;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::args::{Args, kind, nul_check};
use crate::secret::{Sensitive, Text};
use crate::{ActionError, JobContext, JobOutput};

pub const DEFAULT_MODE: u32 = 0o644;

/// The mode of a file whose content is a secret, unless `mode` says otherwise.
pub const SECRET_MODE: u32 = 0o600;

/// `write_file` args: `{path: /abs/file, content: text, mode: "0644"}`; the content may be a
/// secret reference.
#[derive(Clone, PartialEq, Eq)]
pub struct WriteFileArgs {
    /// Absolute; its directory must exist.
    pub path: PathBuf,
    pub content: Text,
    /// Permission bits (at most `0o7777`).
    pub mode: u32,
}

/// The content may be sensitive: only its size is shown.
impl fmt::Debug for WriteFileArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteFileArgs")
            .field("path", &self.path)
            .field("content", &self.content)
            .field("mode", &format_args!("{:04o}", self.mode))
            .finish()
    }
}

impl WriteFileArgs {
    pub(crate) fn parse(
        map: &Map<String, Value>,
        job_path: &str,
    ) -> Result<WriteFileArgs, Vec<FieldError>> {
        let mut a = Args::new(map, job_path, &["path", "content", "mode"]);
        let path = a.string("path", true).map(PathBuf::from);
        if let Some(p) = &path {
            if let Some(m) = nul_check("the path", &p.to_string_lossy()) {
                a.error("path", m);
            } else if !p.is_absolute() {
                a.error("path", "must be an absolute path");
            } else if p.file_name().is_none() || p.to_string_lossy().ends_with('/') {
                a.error("path", "must name a file, not a directory");
            }
        }
        let content = a.text("content", true);
        let mode = match a.get("mode") {
            // A secret is not written readable by everyone unless the spec says so.
            None if matches!(content, Some(Text::Secret(_))) => Some(SECRET_MODE),
            None => Some(DEFAULT_MODE),
            Some(Value::String(s)) => {
                let m = parse_mode(s);
                match m {
                    None => a.error("mode", format!("{s:?} is not a file mode: expected octal digits such as \"0644\" or \"600\"")),
                    Some(bits) if bits & 0o7000 != 0 => a.error(
                        "mode",
                        format!("{s:?} sets the setuid, setgid or sticky bit, which a job may not set"),
                    ),
                    Some(_) => {}
                }
                m
            }
            Some(other) => {
                a.error(
                    "mode",
                    format!(
                        "must be a quoted octal string such as \"0644\", not {}",
                        kind(other)
                    ),
                );
                None
            }
        };
        let args = match (path, content, mode) {
            (Some(path), Some(content), Some(mode)) => Some(WriteFileArgs {
                path,
                content,
                mode,
            }),
            _ => None,
        };
        a.finish(args)
    }
}

/// `"0644"`, `"644"`, `"0o644"`, `"4755"` → bits; at most `0o7777`.
fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(digits, 8).ok()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Writes the file unless it already holds this content with this mode. The write is atomic
/// and durable: a temporary file in the same directory is written, given its mode, fsynced,
/// renamed over the target, and the directory is fsynced. A crash leaves the old file or the
/// new one, never a mix. A symlink at `path` is replaced by a regular file.
///
/// The work is short and not interrupted once started: `ctx.cancel` is only checked before.
pub(crate) async fn run(
    args: &WriteFileArgs,
    ctx: &JobContext,
    sensitive: &mut Sensitive,
) -> Result<JobOutput, ActionError> {
    if ctx.cancel.is_cancelled() {
        return Err(ActionError::Cancelled {
            output: String::new(),
        });
    }
    let content = sensitive.resolve(&args.content, &ctx.guardrails.secrets, false)?;
    let target = args.path.clone();
    let mode = args.mode;
    let path = args.path.display().to_string();
    let guardrails = ctx.guardrails.clone();
    // A secret's digest would let anyone who sees the output test guesses against it.
    let show_digest = args.content.plain().is_some();
    let identity = crate::identity::Identity::resolve_async(ctx.run_as.as_ref()).await?;
    let work = move || {
        write(&target, content.as_bytes(), mode, &guardrails.protected)
            .map(|w| w.describe(show_digest))
    };
    let outcome = match identity {
        None => tokio::task::spawn_blocking(work).await,
        // As the job's user: on a thread of its own, whose file credentials end with it.
        Some(id) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name("write_file".into())
                .spawn(move || {
                    let _ = tx.send(id.assume_for_files().and_then(|()| work()));
                });
            if let Err(e) = spawned {
                return Err(ActionError::NotStarted {
                    message: format!("cannot start a thread to write {path}: {e}"),
                });
            }
            Ok(rx.await.unwrap_or_else(|_| {
                Err(io::Error::other(
                    "the writing thread ended without an answer",
                ))
            }))
        }
    };
    let failed = |message: String| ActionError::Failed {
        message,
        exit_code: None,
        output: String::new(),
    };
    match outcome {
        Ok(Ok(output)) => Ok(JobOutput {
            exit_code: None,
            output,
        }),
        Ok(Err(e)) => Err(failed(format!("cannot write {path}: {e}"))),
        Err(e) => Err(failed(format!("writing {path} did not complete: {e}"))),
    }
}

/// What [`write`] did.
struct Written {
    path: PathBuf,
    /// `None`: the file already held the content.
    bytes: Option<usize>,
    digest: String,
}

impl Written {
    fn describe(&self, show_digest: bool) -> String {
        let what = match self.bytes {
            None => format!("unchanged {}", self.path.display()),
            Some(n) => format!("wrote {n} bytes to {}", self.path.display()),
        };
        if show_digest {
            format!("{what} (sha256 {})", self.digest)
        } else {
            what
        }
    }
}

fn write(
    target: &Path,
    content: &[u8],
    mode: u32,
    protected: &crate::Protected,
) -> io::Result<Written> {
    use rustix::fs::{AtFlags, CWD, Mode, OFlags};
    use std::os::fd::AsRawFd as _;
    let parent = target.parent().unwrap_or(Path::new("/"));
    let Some(name) = target.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path names no file",
        ));
    };
    // The directory is opened once, and everything after is done through that handle: what is
    // checked is where the write goes, whatever its path names a moment later (a symlink
    // swapped in among its directories by another job, say).
    let dir = rustix::fs::openat(
        CWD,
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        if e == rustix::io::Errno::NOENT {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("directory {} does not exist", parent.display()),
            )
        } else {
            io::Error::from(e)
        }
    })?;
    // The kernel's name for the directory the handle holds, every symlink resolved.
    let real = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot tell where {} is (is /proc mounted?): {e}",
                parent.display()
            ),
        )
    })?;
    let path = real.join(name);
    if let Some(what) = protected.covering(&path) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refused: {} is {what} (as it resolves now); a job may not write Steward's own files",
                path.display()
            ),
        ));
    }
    // And by identity, the directory and each one above it: a bind mount of a protected
    // directory has another path, not another inode.
    if let Some(what) = covering_ancestor(&dir, protected)? {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refused: {} is inside {what} (the same directory by another path); a job may not write Steward's own files",
                real.display()
            ),
        ));
    }
    let digest = sha256_hex(content);
    if is_unchanged(&dir, name, content.len(), &digest, mode)? {
        return Ok(Written {
            path,
            bytes: None,
            digest,
        });
    }
    let (tmp, fd) = {
        let mut tries = 0;
        loop {
            let tmp = format!(
                ".{}.{:016x}.steward-tmp",
                name.to_string_lossy(),
                random_u64()
            );
            match rustix::fs::openat(
                &dir,
                &tmp,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(fd) => break (tmp, fd),
                Err(e) if e == rustix::io::Errno::EXIST && tries < 8 => tries += 1,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let mut file = File::from(fd);
    let written = (|| -> io::Result<()> {
        file.write_all(content)?;
        // fchmod is not subject to the umask.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.sync_all()?;
        rustix::fs::renameat(&dir, &tmp, &dir, name)?;
        rustix::fs::fsync(&dir)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(&dir, &tmp, AtFlags::empty());
        return Err(e);
    }
    Ok(Written {
        path,
        bytes: Some(content.len()),
        digest,
    })
}

/// What protected directory `dir`, or a directory above it (up to the root, at most 256 levels),
/// is, by device and inode.
fn covering_ancestor(
    dir: &std::os::fd::OwnedFd,
    protected: &crate::Protected,
) -> io::Result<Option<&'static str>> {
    use rustix::fs::{Mode, OFlags};
    let up = |d: &std::os::fd::OwnedFd| {
        rustix::fs::openat(
            d,
            "..",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let mut st = rustix::fs::fstat(dir)?;
    let mut cur = up(dir)?;
    for _ in 0..256 {
        if let Some(what) = protected.covering_dir(st.st_dev, st.st_ino) {
            return Ok(Some(what));
        }
        let parent = rustix::fs::fstat(&cur)?;
        if (parent.st_dev, parent.st_ino) == (st.st_dev, st.st_ino) {
            // The root: its parent is itself.
            return Ok(None);
        }
        st = parent;
        cur = up(&cur)?;
    }
    Ok(None)
}

/// A random number, for a temporary file's name; a clock's nanoseconds if the system has no
/// randomness to give (the name is also created exclusively, and tried again if taken).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return u64::from(std::time::Instant::now().elapsed().subsec_nanos())
            ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// Whether `name` in `dir` is a regular file with this length, sha256 and mode. Any other file
/// type is replaced, except a directory, which is an error.
fn is_unchanged(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    len: usize,
    digest: &str,
    mode: u32,
) -> io::Result<bool> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(e) if e == rustix::io::Errno::NOENT => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let same_kind = |st: &rustix::fs::Stat| {
        FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
            && u64::try_from(st.st_size).is_ok_and(|n| n == len as u64)
            && st.st_mode & 0o7777 == mode
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "it is a directory",
        ));
    }
    if !same_kind(&st) {
        return Ok(false);
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // What was opened is what was looked at.
    if !same_kind(&rustix::fs::fstat(&fd)?) {
        return Ok(false);
    }
    let mut file = File::from(fd);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()) == digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("644"), Some(0o644));
        assert_eq!(parse_mode("0o600"), Some(0o600));
        assert_eq!(parse_mode("4755"), Some(0o4755));
        for bad in ["", "0o", "888", "07777x", "17777", "-644", "rw-r--r--"] {
            assert_eq!(parse_mode(bad), None, "{bad}");
        }
    }

    #[test]
    fn sha256_is_hex() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
