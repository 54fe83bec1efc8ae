//! The policy file: loaded at start, then re-read whenever inotify reports a change to it and
//! every `reread` as a fallback. A new file that does not load is refused, logged and alerted;
//! the policies in force stay until a good one replaces it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use policy::PolicySet;
use tokio::sync::{Notify, watch};

/// What a fresh install starts with: the examples' workflows, and how to add more.
pub const TEMPLATE: &str = r#"# Steward's policies (docs/operating.md, Policies). Every workflow name needs an entry here, or its
# submissions are refused. An entry with no rules accepts the workflow as it is.
# This file is re-read when it changes; a change that does not load is refused and the
# policies in force stay (see the log, /readyz and the steward_policy_alert metric).

[workflows.hello]

[workflows.SatelliteDiskErase]
allowed_actions = ["token_bucket", "shell"]
labels = { site = [] }
limits = { max_jobs = 500, max_concurrency = 10 }
"#;

/// How long a changed file must stay the same before it is loaded: an editor that truncates
/// and then writes must not be caught half-way.
const SETTLE: Duration = Duration::from_millis(50);

/// The policies in force, and why the file on disk is not in force, while it is not.
#[derive(Clone)]
pub struct Policies {
    pub feed: watch::Receiver<Arc<PolicySet>>,
    pub alert: Arc<Mutex<Option<String>>>,
}

/// The largest policy file read.
const MAX_POLICY_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Reads the policy file as hostile input: a regular file, at most
/// [`MAX_POLICY_FILE_BYTES`], never blocking on a FIFO.
fn read_text(path: &Path) -> Result<String, String> {
    text_of(path, estop::read_capped(path, MAX_POLICY_FILE_BYTES))
}

/// [`read_text`] off the runtime, failing after `estop::READ_TIMEOUT` (a hung mount) instead
/// of stalling a worker thread.
async fn read_text_async(path: &Path) -> Result<String, String> {
    text_of(
        path,
        estop::read_capped_async(path, MAX_POLICY_FILE_BYTES).await,
    )
}

fn text_of(path: &Path, read: std::io::Result<Vec<u8>>) -> Result<String, String> {
    let bytes = read.map_err(|e| format!("policy file {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| format!("policy file {}: not UTF-8: {e}", path.display()))
}

/// Parses the file; a `run_as` user this node cannot run jobs as refuses it, like any other
/// problem in it (the policies in force stay).
fn parse(path: &Path, text: &str) -> Result<PolicySet, String> {
    let set = PolicySet::parse(text, &path.display().to_string()).map_err(|e| e.to_string())?;
    let problems: Vec<String> = set
        .run_as_entries()
        .filter_map(|(workflow, r)| {
            actions::check_run_as(r)
                .err()
                .map(|e| format!("{}: workflows.{workflow}.{e}", path.display()))
        })
        .collect();
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(problems.join("; "))
    }
}

/// Loads `path` (writing [`TEMPLATE`] on a fresh install), then watches it on `tracker` until
/// `cancel`. A file that is missing at start refuses every submission until it appears; one
/// that exists but does not load stops the start, naming every problem.
pub fn start(
    path: PathBuf,
    fresh_install: bool,
    reread: Duration,
    tasks: &tasks::Tasks,
) -> anyhow::Result<Policies> {
    if fresh_install && !path.exists() {
        estop::write_durably(&path, TEMPLATE.as_bytes())
            .with_context(|| format!("writing the initial policy file {}", path.display()))?;
        tracing::info!(path = %path.display(), "created the policy file");
    }
    let alert = Arc::new(Mutex::new(None));
    let (last_text, set) = match read_text(&path) {
        Ok(text) => {
            let set = parse(&path, &text).map_err(anyhow::Error::msg)?;
            (Some(text), set)
        }
        Err(e) if !path.exists() => {
            let msg = format!("{e}: every submission is refused until it exists");
            set_alert(&alert, Some(msg));
            (None, PolicySet::empty())
        }
        Err(e) => anyhow::bail!("{e}"),
    };
    tracing::info!(path = %path.display(), workflows = set.len(), "policies loaded");
    let (tx, feed) = watch::channel(Arc::new(set));
    let wake = Arc::new(Notify::new());
    let watcher = match estop::watch_file(&path, wake.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch the policy file; changes are seen every {}", humantime::format_duration(reread));
            None
        }
    };
    let watcher_alert = alert.clone();
    let cancel = tasks.token().clone();
    tasks.spawn_component("policy watcher", async move {
        // Dropping the watcher ends the watch.
        let _watcher = watcher;
        let mut reloader = Reloader {
            path,
            last_text,
            tx,
            alert: watcher_alert,
        };
        loop {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(reread) => {}
                () = cancel.cancelled() => return,
            }
            // For the supervision test: the watcher ends as a bug would end it.
            fail::fail_point!("steward::policy_watcher_exit", |_| ());
            reloader.check().await;
        }
    });
    Ok(Policies { feed, alert })
}

struct Reloader {
    path: PathBuf,
    /// The text last seen on disk (loaded or refused), so an unchanged file is not parsed again.
    last_text: Option<String>,
    tx: watch::Sender<Arc<PolicySet>>,
    alert: Arc<Mutex<Option<String>>>,
}

impl Reloader {
    async fn check(&mut self) {
        let text = match read_text_async(&self.path).await {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("{e}; the policies loaded before stay in force");
                set_alert(&self.alert, Some(msg));
                self.last_text = None;
                return;
            }
        };
        if self.last_text.as_ref() == Some(&text) {
            return;
        }
        // A file caught mid-write reads differently a moment later: wait until it holds still.
        tokio::time::sleep(SETTLE).await;
        if read_text_async(&self.path).await.ok().as_ref() != Some(&text) {
            return; // The next wake-up or tick sees the settled file.
        }
        match parse(&self.path, &text) {
            Ok(set) => {
                tracing::info!(path = %self.path.display(), workflows = set.len(), "policies reloaded");
                self.tx.send_replace(Arc::new(set));
                set_alert(&self.alert, None);
            }
            Err(e) => {
                let msg = format!("{e}; the policies loaded before stay in force");
                set_alert(&self.alert, Some(msg));
            }
        }
        self.last_text = Some(text);
    }
}

/// Raises (logging it once per distinct problem) or clears the alert.
fn set_alert(alert: &Mutex<Option<String>>, value: Option<String>) {
    let mut a = alert.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(msg) = &value
        && a.as_ref() != Some(msg)
    {
        tracing::error!(error = %msg, "refused a new policy file");
    }
    *a = value;
}
