//! `run_as`: the user (and groups) a job's work is done as, looked up when it starts.

use std::path::PathBuf;

use domain::RunAs;

/// Who a job runs as when it is not the server's own user.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
    /// Supplementary groups.
    pub(crate) groups: Vec<libc::gid_t>,
    pub(crate) name: String,
    pub(crate) home: PathBuf,
}

/// Checks that `r` names a user this node can run jobs as: it exists, and the server may
/// switch to it (it runs as root, or as that user already). Blocking: NSS may ask a
/// directory service.
pub fn check_run_as(r: &RunAs) -> Result<(), String> {
    Identity::resolve(r).map(|_| ())
}

impl Identity {
    /// Looks `r` up; `None` when it is the server's own identity already (nothing to drop).
    /// Blocking: NSS may ask a directory service.
    pub(crate) fn resolve(r: &RunAs) -> Result<Option<Identity>, String> {
        use nix::unistd::{Gid, Group, Uid, User};
        let bad = |m: String| format!("run_as {r}: {m}");
        let numeric = r.user.parse::<u32>().ok();
        let entry = match numeric {
            Some(n) => User::from_uid(Uid::from_raw(n)),
            None => User::from_name(&r.user),
        }
        .map_err(|e| bad(format!("cannot look up the user: {e}")))?;
        let (uid, name, home, primary) = match (entry, numeric) {
            (Some(u), _) => (u.uid.as_raw(), u.name, u.dir, Some(u.gid.as_raw())),
            // A bare uid with no account: allowed with an explicit group.
            (None, Some(n)) => (n, r.user.clone(), PathBuf::from("/"), None),
            (None, None) => return Err(bad(format!("no user {:?} on this node", r.user))),
        };
        let gid = match &r.group {
            Some(g) => match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => Group::from_name(g)
                    .map_err(|e| bad(format!("cannot look up the group: {e}")))?
                    .ok_or_else(|| bad(format!("no group {g:?} on this node")))?
                    .gid
                    .as_raw(),
            },
            None => primary.ok_or_else(|| {
                bad("a user id with no account needs a group: \"UID:GROUP\"".into())
            })?,
        };
        let groups = match (&r.group, primary) {
            (None, Some(primary)) => {
                let cname = std::ffi::CString::new(name.clone())
                    .map_err(|_| bad("the user name holds a NUL byte".into()))?;
                nix::unistd::getgrouplist(&cname, Gid::from_raw(primary))
                    .map_err(|e| bad(format!("cannot list the user's groups: {e}")))?
                    .into_iter()
                    .map(Gid::as_raw)
                    .collect()
            }
            _ => vec![gid],
        };
        let (euid, egid) = (Uid::effective().as_raw(), Gid::effective().as_raw());
        if uid == euid && gid == egid {
            return Ok(None);
        }
        if euid != 0 {
            return Err(bad(format!(
                "switching to another user needs the server to run as root, and it runs as uid {euid}"
            )));
        }
        Ok(Some(Identity {
            uid,
            gid,
            groups,
            name,
            home,
        }))
    }

    /// Looks `r` up off the async runtime.
    pub(crate) async fn resolve_async(
        r: Option<&RunAs>,
    ) -> Result<Option<Identity>, crate::ActionError> {
        let Some(r) = r.cloned() else {
            return Ok(None);
        };
        match tokio::task::spawn_blocking(move || Identity::resolve(&r)).await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(message)) => Err(crate::ActionError::Fatal {
                message,
                output: String::new(),
            }),
            Err(e) => Err(crate::ActionError::Failed {
                message: format!("looking up run_as did not complete: {e}"),
                exit_code: None,
                output: String::new(),
            }),
        }
    }

    /// Makes the calling thread's file accesses those of this user and group: the kernel then
    /// checks permissions as them, and the root-only file capabilities are dropped from the
    /// thread (capabilities(7)). Thread-local: call it on a thread that ends after the work.
    #[allow(unsafe_code)]
    pub(crate) fn assume_for_files(&self) -> std::io::Result<()> {
        // SAFETY: plain syscalls with integer arguments. The raw syscalls (not glibc's
        // wrappers) change only the calling thread's credentials.
        let (gid_now, uid_now) = unsafe {
            libc::syscall(libc::SYS_setfsgid, self.gid);
            libc::syscall(libc::SYS_setfsuid, self.uid);
            // An invalid id changes nothing and returns the current one.
            (
                libc::syscall(libc::SYS_setfsgid, u32::MAX),
                libc::syscall(libc::SYS_setfsuid, u32::MAX),
            )
        };
        if gid_now != i64::from(self.gid) || uid_now != i64::from(self.uid) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "cannot act as {} (uid {}, gid {})",
                    self.name, self.uid, self.gid
                ),
            ));
        }
        Ok(())
    }
}
