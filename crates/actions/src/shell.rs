//! The `shell` action: runs a program directly (never through `/bin/sh`) in its own process
//! group, and makes sure nothing of that group outlives the attempt.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use domain::FieldError;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::args::{Args, kind, nul_check, quote_hint};
use crate::contain::Attempt;
use crate::identity::Identity;
use crate::secret::{Sensitive, Text};
use crate::tail::Tail;
use crate::{ActionError, JobContext, JobOutput};

/// Variables Steward sets for every `shell` job; `env` may not override them.
pub(crate) const RESERVED_ENV: &[&str] = &[
    "STEWARD_IDEMPOTENCY_KEY",
    "STEWARD_RUN_ID",
    "STEWARD_ATTEMPT",
];

/// How long to keep reading output once the leader has exited and its group is killed. Only
/// a process that left the group (`setsid`, a daemon) can hold the pipe open past that.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

const READ_CHUNK: usize = 16 * 1024;

/// `shell` args: `{argv: [program, arg...], env: {NAME: value}, cwd: /abs/dir}`.
#[derive(Clone, PartialEq, Eq)]
pub struct ShellArgs {
    /// The program (looked up in `PATH` unless it contains a `/`) and its arguments.
    pub argv: Vec<String>,
    /// Added to the environment Steward itself runs with (less its `STEWARD_*` variables).
    pub env: BTreeMap<String, Text>,
    /// Working directory (absolute); Steward's own when absent.
    pub cwd: Option<PathBuf>,
}

/// Env values may be secrets: only their names are shown.
impl fmt::Debug for ShellArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShellArgs")
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .finish()
    }
}

impl ShellArgs {
    pub(crate) fn parse(
        map: &Map<String, Value>,
        job_path: &str,
    ) -> Result<ShellArgs, Vec<FieldError>> {
        let mut a = Args::new(map, job_path, &["argv", "env", "cwd"]);
        let argv = parse_argv(&mut a);
        let env = a.text_map("env");
        for (k, v) in &env {
            if k.is_empty() || k.contains(['=', '\0']) {
                a.error(
                    "env",
                    format!(
                        "invalid variable name {k:?}: it must be non-empty and hold no '=' or NUL"
                    ),
                );
            } else if RESERVED_ENV.contains(&k.as_str()) {
                a.error(
                    "env",
                    format!("{k} is set by Steward and cannot be overridden"),
                );
            }
            if let Some(m) = v
                .plain()
                .and_then(|v| nul_check(&format!("value of {k:?}"), v))
            {
                a.error("env", m);
            }
        }
        let cwd = a.string("cwd", false).map(PathBuf::from);
        if let Some(cwd) = &cwd {
            if let Some(m) = nul_check("the path", &cwd.to_string_lossy()) {
                a.error("cwd", m);
            } else if !cwd.is_absolute() {
                a.error("cwd", "must be an absolute path");
            }
        }
        a.finish(argv.map(|argv| ShellArgs { argv, env, cwd }))
    }
}

fn parse_argv(a: &mut Args<'_>) -> Option<Vec<String>> {
    const MSG: &str = "must be a non-empty array of strings";
    let v = a.required("argv")?;
    let Value::Array(items) = v else {
        a.error("argv", format!("{MSG}, not {}", kind(v)));
        return None;
    };
    if items.is_empty() {
        a.error("argv", MSG);
        return None;
    }
    let mut argv = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) => {
                if let Some(m) = nul_check(&format!("item {i}"), s) {
                    a.error("argv", m);
                }
                argv.push(s.clone());
            }
            other => a.error(
                "argv",
                format!("{MSG}; item {i} is {}{}", kind(other), quote_hint(other)),
            ),
        }
    }
    if items[0].as_str() == Some("") {
        a.error("argv", "item 0, the program, must not be empty");
    }
    Some(argv)
}

/// Runs one attempt.
///
/// The child gets its own process group, stdin from `/dev/null`, and one pipe for stdout and
/// stderr whose last `ctx.output_limit` bytes are kept.
///
/// **The group is the unit of work.** When the leader (`argv[0]`) exits, however it exits,
/// every process still in its group is SIGKILLed, like systemd's `KillMode=control-group`:
/// a job cannot leave a background process running on, or holding the output pipe open.
/// Work that must outlive its job has to leave the group on purpose (`setsid`), and then
/// Steward neither waits for it nor reads its output for more than a moment.
///
/// On `ctx.cancel` the group gets SIGTERM, the leader has `ctx.kill_grace` to exit, then the
/// group gets SIGKILL. If this future is dropped instead, the group is SIGKILLed at once.
pub(crate) async fn run(
    args: &ShellArgs,
    ctx: &JobContext,
    sensitive: &mut Sensitive,
) -> Result<JobOutput, ActionError> {
    let Some((program, rest)) = args.argv.split_first() else {
        return Err(ActionError::Fatal {
            message: "argv is empty".into(),
            output: String::new(),
        });
    };
    if ctx.cancel.is_cancelled() {
        return Err(ActionError::Cancelled {
            output: String::new(),
        });
    }
    let mut env = Vec::with_capacity(args.env.len());
    for (k, v) in &args.env {
        let v = sensitive
            .resolve(
                v,
                &ctx.guardrails.secrets,
                crate::redact::is_sensitive_env(k),
            )
            .map_err(ActionError::from)?;
        if v.contains('\0') {
            return Err(ActionError::Fatal {
                message: format!("env {k}: the secret's value holds a NUL byte"),
                output: String::new(),
            });
        }
        env.push((k, v));
    }
    let identity = Identity::resolve_async(ctx.run_as.as_ref()).await?;
    let mut cmd = Command::new(program);
    if let Some(id) = &identity {
        cmd.env("HOME", &id.home)
            .env("USER", &id.name)
            .env("LOGNAME", &id.name);
    }
    // The server's own settings and credentials (`STEWARD_DATABASE` with its password,
    // `STEWARD_TOKEN`, `STEWARD_SECRET_*`...) are not the job's.
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("STEWARD_")) {
            cmd.env_remove(&k);
        }
    }
    cmd.args(rest);
    // W3C Trace Context's variable; the job's own `env` may set another.
    if let Some(tp) = &ctx.traceparent {
        cmd.env("TRACEPARENT", tp.to_string());
    }
    cmd.envs(env)
        .env("STEWARD_IDEMPOTENCY_KEY", &ctx.idempotency_key)
        .env("STEWARD_RUN_ID", ctx.run_id.to_string())
        .env("STEWARD_ATTEMPT", ctx.attempt.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // Entered as the job's user when it has one (in the child, after the switch): a
    // directory its user may not enter is not entered for it.
    let mut enter = None;
    if let Some(cwd) = &args.cwd {
        if identity.is_some() {
            use std::os::unix::ffi::OsStrExt as _;
            enter = Some(
                std::ffi::CString::new(cwd.as_os_str().as_bytes()).map_err(|_| {
                    ActionError::Fatal {
                        message: "cwd holds a NUL byte".into(),
                        output: String::new(),
                    }
                })?,
            );
        } else {
            cmd.current_dir(cwd);
        }
    }
    let mut attempt = match &ctx.supervisor {
        Some(s) => Some(
            s.begin(&ctx.idempotency_key, ctx.attempt)
                .await
                .map_err(|e| ActionError::NotStarted {
                    message: format!("cannot set up the job's containment: {e}"),
                })?,
        ),
        None => None,
    };
    prepare_child(
        &mut cmd,
        attempt.as_ref().and_then(Attempt::procs_fd),
        identity,
        enter,
    );
    let mut child = cmd
        .spawn()
        .map_err(|e| spawn_error(program, args.cwd.as_deref(), &e))?;
    // The leader's pid is the group's id (`process_group(0)`).
    let group = match child.id().and_then(|id| i32::try_from(id).ok()) {
        Some(id) => {
            let pgid = Pid::from_raw(id);
            if let Some(a) = &mut attempt {
                a.started(pgid);
            }
            ProcessGroup::new(pgid, attempt)
        }
        None => {
            return Err(ActionError::Failed {
                message: format!("{program:?} exited before it could be supervised"),
                exit_code: None,
                output: String::new(),
            });
        }
    };
    let mut out = Output::new(child.stdout.take(), child.stderr.take(), ctx.output_limit);
    tracing::debug!(program = %program, pgid = %group.pgid, "shell job started");

    let (status, cancelled) = supervise(&mut child, &mut out, &group, ctx).await;
    group.kill_rest().await;
    if tokio::time::timeout(DRAIN_TIMEOUT, out.drain())
        .await
        .is_err()
    {
        tracing::debug!(program = %program, "output pipe still open after the process group was killed: a process left the group");
    }
    let output = out.into_string();
    if cancelled {
        return Err(ActionError::Cancelled { output });
    }
    match status {
        Ok(st) if st.success() => Ok(JobOutput {
            exit_code: Some(0),
            output,
        }),
        Ok(st) => Err(ActionError::Failed {
            message: describe_failure(st),
            exit_code: st.code(),
            output,
        }),
        Err(e) => Err(ActionError::Failed {
            message: format!("waiting for {program:?} failed: {e}"),
            exit_code: None,
            output,
        }),
    }
}

/// Waits for the leader while reading output; on cancel, SIGTERM, grace, SIGKILL.
/// Returns the leader's status and whether the attempt was cancelled.
async fn supervise(
    child: &mut Child,
    out: &mut Output,
    group: &ProcessGroup,
    ctx: &JobContext,
) -> (io::Result<ExitStatus>, bool) {
    // `Child::wait` is cancel safe, so it can be polled again after each other branch.
    let mut wait = pin!(child.wait());
    loop {
        tokio::select! {
            biased;
            st = &mut wait => return (st, false),
            () = ctx.cancel.cancelled() => break,
            () = out.read_some(), if out.is_open() => {}
        }
    }
    tracing::debug!(pgid = %group.pgid, grace = ?ctx.kill_grace, "shell job cancelled: SIGTERM to its process group");
    group.signal(Signal::SIGTERM);
    let mut grace = pin!(tokio::time::sleep(ctx.kill_grace));
    loop {
        tokio::select! {
            biased;
            st = &mut wait => return (st, true),
            () = &mut grace => break,
            () = out.read_some(), if out.is_open() => {}
        }
    }
    tracing::debug!(pgid = %group.pgid, "shell job outlived its grace: SIGKILL to its process group");
    group.signal(Signal::SIGKILL);
    loop {
        tokio::select! {
            biased;
            st = &mut wait => return (st, true),
            () = out.read_some(), if out.is_open() => {}
        }
    }
}

/// A job's process group (and, with a supervisor, its cgroup and ledger entry). Dropped
/// without [`ProcessGroup::kill_rest`] (the attempt's future was dropped), it SIGKILLs all of
/// it.
struct ProcessGroup {
    pgid: Pid,
    attempt: Option<Attempt>,
    done: bool,
}

impl ProcessGroup {
    fn new(pgid: Pid, attempt: Option<Attempt>) -> ProcessGroup {
        ProcessGroup {
            pgid,
            attempt,
            done: false,
        }
    }

    /// Signals the group, and everything the attempt's containment holds (a cgroup holds
    /// what left the group too).
    fn signal(&self, sig: Signal) {
        match killpg(self.pgid, sig) {
            // ESRCH: nobody left in the group.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(pgid = %self.pgid, signal = %sig, %error, "cannot signal a job's process group")
            }
        }
        if let Some(a) = &self.attempt {
            a.signal(sig);
        }
    }

    /// SIGKILLs whatever is left once the leader is gone. The leader has been reaped just
    /// before, and a group id stays allocated while the group has members, so the signal
    /// cannot reach an unrelated group.
    async fn kill_rest(mut self) {
        match killpg(self.pgid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(pgid = %self.pgid, %error, "cannot signal a job's process group")
            }
        }
        if let Some(a) = self.attempt.take() {
            a.finish().await;
        }
        self.done = true;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.done {
            let _ = killpg(self.pgid, Signal::SIGKILL);
            // Dropping the attempt kills the rest of it and cleans up.
            self.attempt.take();
        }
    }
}

/// The child's stdout and stderr, merged into one bounded tail.
struct Output {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    out_buf: Box<[u8]>,
    err_buf: Box<[u8]>,
    tail: Tail,
}

impl Output {
    fn new(stdout: Option<ChildStdout>, stderr: Option<ChildStderr>, limit: usize) -> Output {
        Output {
            stdout,
            stderr,
            out_buf: vec![0; READ_CHUNK].into_boxed_slice(),
            err_buf: vec![0; READ_CHUNK].into_boxed_slice(),
            tail: Tail::new(limit),
        }
    }

    fn is_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    /// Reads one chunk from whichever pipe has data; a pipe at EOF is closed. Cancel safe:
    /// a read that does not complete takes nothing from its pipe.
    async fn read_some(&mut self) {
        let (n, from_stdout) = tokio::select! {
            n = read_pipe(&mut self.stdout, &mut self.out_buf) => (n, true),
            n = read_pipe(&mut self.stderr, &mut self.err_buf) => (n, false),
        };
        match (n, from_stdout) {
            (0, true) => self.stdout = None,
            (0, false) => self.stderr = None,
            (n, true) => self.tail.push(&self.out_buf[..n]),
            (n, false) => self.tail.push(&self.err_buf[..n]),
        }
    }

    async fn drain(&mut self) {
        while self.is_open() {
            self.read_some().await;
        }
    }

    fn into_string(self) -> String {
        self.tail.into_string()
    }
}

/// Reads into `buf`; 0 at EOF or on error. Never completes for a closed pipe.
async fn read_pipe<R: AsyncRead + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> usize {
    match pipe {
        Some(p) => p.read(buf).await.unwrap_or(0),
        None => std::future::pending().await,
    }
}

fn describe_failure(st: ExitStatus) -> String {
    if let Some(code) = st.code() {
        return format!("exit status {code}");
    }
    match st.signal() {
        Some(sig) => {
            let name = Signal::try_from(sig)
                .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_owned());
            let core = if st.core_dumped() {
                " (core dumped)"
            } else {
                ""
            };
            format!("killed by signal {name}{core}")
        }
        None => format!("ended abnormally: {st}"),
    }
}

fn spawn_error(program: &str, cwd: Option<&Path>, e: &io::Error) -> ActionError {
    let message = match e.kind() {
        io::ErrorKind::NotFound => match cwd {
            Some(cwd) if !cwd.is_dir() => {
                format!(
                    "cannot run {program:?}: working directory {} does not exist",
                    cwd.display()
                )
            }
            _ if !program.contains('/') => {
                format!("cannot run {program:?}: program not found in PATH")
            }
            _ if cwd.unwrap_or(Path::new(".")).join(program).exists() => {
                format!("cannot run {program:?}: its interpreter (the #! line) was not found")
            }
            _ => format!("cannot run {program:?}: no such file"),
        },
        io::ErrorKind::PermissionDenied => {
            format!("cannot run {program:?}: permission denied (is it executable?)")
        }
        _ => format!("cannot run {program:?}: {e}"),
    };
    ActionError::Failed {
        message,
        exit_code: None,
        output: String::new(),
    }
}

/// The soft limit on open files the server started with, which jobs get back
/// ([`raise_fd_limit`]): its soft and hard values.
static JOB_NOFILE: std::sync::OnceLock<(libc::rlim_t, libc::rlim_t)> = std::sync::OnceLock::new();

/// Raises the process's soft limit on open files to its hard limit, and returns the limit now
/// in force. Linux's default soft limit (1,024) is set for programs that `select(2)`, which
/// Steward does not; jobs may, and programs that close every descriptor up to the limit are
/// slow with a large one, so `shell` jobs start with the soft limit the server started with.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return u64::MAX;
    };
    let _ = JOB_NOFILE.set((soft, hard));
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return hard,
            Err(e) => tracing::warn!(error = %e, "could not raise the limit on open files"),
        }
    }
    soft
}

/// Prepares the child, between fork and exec: joins the attempt's cgroup (`cgroup_procs`, the
/// cgroup's `cgroup.procs` opened by the parent) so that everything it starts stays inside,
/// and sets `PR_SET_PDEATHSIG` to SIGKILL, so that a Steward that dies (kill -9, crash) does
/// not leave the job's leader running unsupervised while a restarted Steward runs the job
/// again. Every descriptor above stderr is marked close-on-exec, so the job gets none of the
/// server's (its sockets, its database, whatever the server itself inherited). The leader's own children are not covered by the death signal: the ledger finds them
/// at the next start (see `contain`).
///
/// Linux sends the death signal when the *thread* that spawned the child exits, not the
/// process. Jobs are spawned from tokio runtime threads, which live as long as the runtime,
/// unless `tokio::task::block_in_place` retires one: code in the Steward process must not use
/// `block_in_place`, or a job spawned from that thread may get SIGKILL when it exits.
#[allow(unsafe_code)]
fn prepare_child(
    cmd: &mut Command,
    cgroup_procs: Option<i32>,
    identity: Option<Identity>,
    cwd: Option<std::ffi::CString>,
) {
    let parent = nix::unistd::getpid();
    let drop_to = identity.map(|id| (id.uid, id.gid, id.groups));
    let nofile = JOB_NOFILE.get().map(|&(soft, hard)| libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    });
    // SAFETY: the closure runs in the forked child before exec. It calls only write(2),
    // getrlimit(2), setrlimit(2), setgroups(2), setgid(2), setuid(2), chdir(2), prctl(2),
    // getppid(2) and close_range(2), which are async-signal-safe, and allocates nothing (the group list and the directory
    // were built before the fork; errors come from raw errno values). The descriptor stays open in the parent until the
    // spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup_procs {
                // "0" moves the writing process into the cgroup.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // The soft limit the server started with (it raised its own), under whatever hard
            // limit is in force now (an operator may have lowered it since).
            if let Some(started) = &nofile {
                let mut now = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) == 0 {
                    let limit = libc::rlimit {
                        rlim_cur: started.rlim_cur.min(now.rlim_max),
                        rlim_max: now.rlim_max,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            // After the cgroup write (moving needs the server's rights), before the prctl
            // (a change of identity clears the parent-death signal). Groups first: after
            // setuid, setgroups is no longer allowed.
            if let Some((uid, gid, groups)) = &drop_to
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            if let Some(dir) = &cwd
                && libc::chdir(dir.as_ptr()) != 0
            {
                return Err(io::Error::last_os_error());
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died before the prctl: then nobody would ever signal us.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // After the cgroup write, which needs its descriptor: nothing above stderr
            // survives the exec. A kernel without close_range (before 5.11) keeps them.
            let _ = libc::syscall(
                libc::SYS_close_range,
                3_u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}
