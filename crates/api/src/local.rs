//! The break-glass socket: a Unix socket in the data directory (mode 0600) that serves the
//! API to the machine itself without a token, so that a lost admin token never locks the
//! operators out and a stop never waits on a token check (docs/security.md, Break glass).
//!
//! Only the server's own user and root get in: every connection's peer credentials are read
//! from the kernel (`SO_PEERCRED`) and anyone else's connection is closed unanswered. The caller
//! is an admin named `local:USER`.

use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

/// Who is on the other end of a connection, as the kernel tells it.
#[derive(Clone, Copy, Debug)]
pub struct LocalPeer {
    pub uid: u32,
    pub pid: Option<i32>,
}

impl LocalPeer {
    /// The name recorded for what this caller does: `local:` and its login name (or uid).
    pub fn name(&self) -> String {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid))
            .ok()
            .flatten()
            .map_or_else(|| format!("uid {}", self.uid), |u| u.name);
        format!("local:{user}")
    }

    /// For the access log's peer column.
    pub fn describe(&self) -> String {
        match self.pid {
            Some(pid) => format!("unix socket, pid {pid}, uid {}", self.uid),
            None => format!("unix socket, uid {}", self.uid),
        }
    }
}

/// The socket's connections from the server's own user or root.
pub struct LocalListener {
    listener: UnixListener,
    path: PathBuf,
}

impl LocalListener {
    /// Binds `path` (replacing a socket a killed predecessor left), readable and writable by
    /// the server's user only.
    pub fn bind(path: &Path) -> std::io::Result<LocalListener> {
        use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; remove it or set `socket` elsewhere",
                        path.display()
                    ),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Bound, then closed to others. The umask is process-wide (and jobs forked meanwhile
        // would inherit it), so it is left alone: until the chmod, the data directory (0700)
        // and the peer credential check below keep others out.
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(LocalListener {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `uid` may use the socket: the server's own user, or root.
fn allowed(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

impl axum::serve::Listener for LocalListener {
    type Io = UnixStream;
    type Addr = LocalPeer;

    async fn accept(&mut self) -> (UnixStream, LocalPeer) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on the break-glass socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let peer = match stream.peer_cred() {
                Ok(c) => LocalPeer {
                    uid: c.uid(),
                    pid: c.pid(),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "no peer credentials on the break-glass socket; closed");
                    continue;
                }
            };
            if !allowed(peer.uid) {
                tracing::warn!(
                    uid = peer.uid,
                    pid = ?peer.pid,
                    "refused a connection to the break-glass socket from another user"
                );
                continue;
            }
            return (stream, peer);
        }
    }

    fn local_addr(&self) -> std::io::Result<LocalPeer> {
        Ok(LocalPeer {
            uid: nix::unistd::geteuid().as_raw(),
            pid: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, LocalListener>>
    for LocalPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, LocalListener>) -> LocalPeer {
        *stream.remote_addr()
    }
}
