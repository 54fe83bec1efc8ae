//! Server configuration in stages: the raw file (serde, unknown keys refused) → `STEWARD_*`
//! environment overrides → command-line flags → validated [`ServeConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
pub const DEFAULT_DATA_DIR: &str = "./steward-data";

/// `steward.toml` as written. Every key optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    /// Where runs are stored: left out, the embedded SQLite database in the data directory; a
    /// `postgres://` URL, a PostgreSQL database that several nodes can share.
    pub database: Option<String>,
    pub node_id: Option<String>,
    pub submit_ttl: Option<String>,
    pub max_running_jobs: Option<usize>,
    pub shutdown_grace: Option<String>,
    pub kill_grace: Option<String>,
    pub lease_ttl: Option<String>,
    pub output_limit: Option<usize>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// Where the e-stop list lives: `file` (default) or `db`.
    pub estop_source: Option<String>,
    /// The e-stop file (default: `estop.json` in the data directory).
    pub estop_file: Option<String>,
    /// The e-stop state of runs no entry matches: `stop` (default, fail closed) or `go`.
    pub estop_unlisted: Option<String>,
    /// How often the e-stop list is re-read even without a change notification.
    pub estop_reread: Option<String>,
    /// The policy file (default: `policies.toml` in the data directory).
    pub policies: Option<String>,
    /// How often the policy file is checked for changes.
    pub policies_reread: Option<String>,
    /// Named token buckets for `token_bucket` jobs: `[buckets.NAME] size, refill, every`.
    pub buckets: Option<std::collections::BTreeMap<String, RawBucket>>,
    /// Per workflow: `failures` failed runs within `window` trip the e-stop for it.
    pub error_budgets: Option<std::collections::BTreeMap<String, RawBudget>>,
    /// Webhooks told of failed and stopped runs and of e-stop changes: `[[notify]]`.
    pub notify: Option<Vec<RawNotify>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub url: String,
    /// `json` (default) or `slack`.
    pub format: Option<String>,
    /// Which: `run_failed`, `run_stopped`, `estop` (default: all).
    pub events: Option<Vec<String>>,
}

/// What a webhook is told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    RunFailed,
    RunStopped,
    Estop,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 3] = [
        NotifyEvent::RunFailed,
        NotifyEvent::RunStopped,
        NotifyEvent::Estop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::RunFailed => "run_failed",
            NotifyEvent::RunStopped => "run_stopped",
            NotifyEvent::Estop => "estop",
        }
    }
}

/// The body a webhook gets: the event as JSON, or Slack's `{"text": ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    Json,
    Slack,
}

#[derive(Clone, Serialize)]
pub struct NotifyConfig {
    /// Webhook URLs carry their secret (a Slack URL's path): shown as scheme and host only.
    #[serde(serialize_with = "redact_url")]
    pub url: reqwest::Url,
    pub format: NotifyFormat,
    pub events: Vec<NotifyEvent>,
}

impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("url", &redacted(&self.url))
            .field("format", &self.format)
            .field("events", &self.events)
            .finish()
    }
}

fn redacted(url: &reqwest::Url) -> String {
    format!("{}://{}/***", url.scheme(), url.host_str().unwrap_or("?"))
}

fn redact_url<S: serde::Serializer>(url: &reqwest::Url, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redacted(url))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucket {
    /// Tokens it holds at most (and starts with).
    pub size: u64,
    /// Tokens added each `every` (default 1).
    pub refill: Option<u64>,
    pub every: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub failures: u32,
    pub window: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketConfig {
    pub size: u64,
    pub refill: u64,
    #[serde(with = "humantime_serde_str")]
    pub every: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetConfig {
    pub failures: u32,
    #[serde(with = "humantime_serde_str")]
    pub window: Duration,
}

/// Where runs are stored.
#[derive(Clone)]
pub enum Database {
    /// The embedded SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL, shared by several nodes.
    Postgres(String),
}

impl Database {
    /// For logs and `--print-config`: the password hidden.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(p) => format!("sqlite:{}", p.display()),
            Database::Postgres(url) => {
                store_postgres::redacted_url(url).unwrap_or_else(|_| "postgres://***".into())
            }
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Serialize for Database {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.describe())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EStopSourceKind {
    File,
    Db,
}

/// The validated configuration `steward serve` runs with.
#[derive(Debug, Clone, Serialize)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub database: Database,
    pub node_id: String,
    #[serde(with = "humantime_serde_str")]
    pub submit_ttl: Duration,
    pub max_running_jobs: usize,
    #[serde(with = "humantime_serde_str")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde_str")]
    pub kill_grace: Duration,
    #[serde(with = "humantime_serde_str")]
    pub lease_ttl: Duration,
    pub output_limit: usize,
    pub log_json: bool,
    pub estop_source: EStopSourceKind,
    pub estop_file: PathBuf,
    pub estop_unlisted: domain::estop::EStopState,
    #[serde(with = "humantime_serde_str")]
    pub estop_reread: Duration,
    pub policies: PathBuf,
    #[serde(with = "humantime_serde_str")]
    pub policies_reread: Duration,
    pub buckets: std::collections::BTreeMap<String, BucketConfig>,
    pub error_budgets: std::collections::BTreeMap<String, BudgetConfig>,
    pub notify: Vec<NotifyConfig>,
}

mod humantime_serde_str {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// The server's environment overrides, by config key.
const ENV_KEYS: &[(&str, &str)] = &[
    ("STEWARD_LISTEN", "listen"),
    ("STEWARD_DATABASE", "database"),
    ("STEWARD_NODE_ID", "node_id"),
    ("STEWARD_SUBMIT_TTL", "submit_ttl"),
    ("STEWARD_MAX_RUNNING_JOBS", "max_running_jobs"),
    ("STEWARD_SHUTDOWN_GRACE", "shutdown_grace"),
    ("STEWARD_KILL_GRACE", "kill_grace"),
    ("STEWARD_LEASE_TTL", "lease_ttl"),
    ("STEWARD_OUTPUT_LIMIT", "output_limit"),
    ("STEWARD_LOG_FORMAT", "log_format"),
    ("STEWARD_ESTOP_SOURCE", "estop_source"),
    ("STEWARD_ESTOP_FILE", "estop_file"),
    ("STEWARD_ESTOP_UNLISTED", "estop_unlisted"),
    ("STEWARD_ESTOP_REREAD", "estop_reread"),
    ("STEWARD_POLICIES", "policies"),
    ("STEWARD_POLICIES_REREAD", "policies_reread"),
];

fn duration(key: &str, v: Option<String>, default: Duration) -> anyhow::Result<Duration> {
    match v {
        None => Ok(default),
        Some(s) => {
            let d = humantime::parse_duration(s.trim()).map_err(|_| {
                anyhow::anyhow!("{key}: invalid duration {s:?}: expected e.g. 30s, 10m or 1h")
            })?;
            if d.is_zero() {
                bail!("{key}: must be greater than 0");
            }
            Ok(d)
        }
    }
}

fn env_override(raw: &mut RawConfig, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    for (var, key) in ENV_KEYS {
        let Some(v) = env(var) else { continue };
        let num = |v: &str| -> anyhow::Result<usize> {
            v.trim()
                .parse()
                .with_context(|| format!("{var}: {v:?} is not a whole number"))
        };
        match *key {
            "listen" => raw.listen = Some(v),
            "database" => raw.database = Some(v),
            "node_id" => raw.node_id = Some(v),
            "submit_ttl" => raw.submit_ttl = Some(v),
            "max_running_jobs" => raw.max_running_jobs = Some(num(&v)?),
            "shutdown_grace" => raw.shutdown_grace = Some(v),
            "kill_grace" => raw.kill_grace = Some(v),
            "lease_ttl" => raw.lease_ttl = Some(v),
            "output_limit" => raw.output_limit = Some(num(&v)?),
            "log_format" => raw.log_format = Some(v),
            "estop_source" => raw.estop_source = Some(v),
            "estop_file" => raw.estop_file = Some(v),
            "estop_unlisted" => raw.estop_unlisted = Some(v),
            "estop_reread" => raw.estop_reread = Some(v),
            "policies" => raw.policies = Some(v),
            "policies_reread" => raw.policies_reread = Some(v),
            _ => {}
        }
    }
    Ok(())
}

/// Builds the server configuration from the file, the environment and the flags.
pub fn load(
    data_dir: &Path,
    config_file: Option<&Path>,
    listen_flag: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<ServeConfig> {
    let default_file = data_dir.join("steward.toml");
    let (path, required) = match config_file {
        Some(p) => (p.to_owned(), true),
        None => (default_file, false),
    };
    let mut raw = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str::<RawConfig>(&text)
            .with_context(|| format!("reading the config file {}", path.display()))?,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => RawConfig::default(),
        Err(e) => {
            return Err(e).with_context(|| format!("reading the config file {}", path.display()));
        }
    };
    env_override(&mut raw, env)?;
    if let Some(l) = listen_flag {
        raw.listen = Some(l.to_owned());
    }
    let listen_s = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen: SocketAddr = listen_s.parse().with_context(|| {
        format!("listen: {listen_s:?} is not an address such as 127.0.0.1:7420")
    })?;
    let max_running_jobs = raw.max_running_jobs.unwrap_or(256);
    if !(1..=100_000).contains(&max_running_jobs) {
        bail!("max_running_jobs: {max_running_jobs} is out of range 1..=100000");
    }
    let output_limit = raw.output_limit.unwrap_or(16 * 1024);
    if !(256..=16 * 1024 * 1024).contains(&output_limit) {
        bail!("output_limit: {output_limit} bytes is out of range 256..=16777216");
    }
    let log_json = match raw.log_format.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => bail!("log_format: {other:?} is not one of: text, json"),
    };
    let node_id = match raw.node_id {
        Some(n) if n.trim().is_empty() => bail!("node_id: must not be empty"),
        Some(n) => n,
        None => String::new(), // filled from the data directory by `serve`
    };
    let database = match raw.database {
        None => Database::Sqlite(data_dir.join("steward.db")),
        Some(url) => match store_postgres::redacted_url(url.trim()) {
            Ok(_) => Database::Postgres(url.trim().to_owned()),
            Err(e) => bail!(
                "database: {e}; leave it out for the embedded SQLite database, or give postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ),
        },
    };
    let estop_source = match raw.estop_source.as_deref() {
        // Nodes sharing a database share its e-stop list: a stop set on one reaches them all.
        None if matches!(database, Database::Postgres(_)) => EStopSourceKind::Db,
        None | Some("file") => EStopSourceKind::File,
        Some("db") => EStopSourceKind::Db,
        Some(other) => bail!("estop_source: {other:?} is not one of: file, db"),
    };
    let estop_unlisted = match raw.estop_unlisted.as_deref() {
        None | Some("stop") => domain::estop::EStopState::Stop,
        Some("go") => domain::estop::EStopState::Go,
        Some(other) => bail!("estop_unlisted: {other:?} is not one of: stop, go"),
    };
    let estop_file = match raw.estop_file {
        Some(f) if f.trim().is_empty() => bail!("estop_file: must not be empty"),
        Some(f) => PathBuf::from(f),
        None => data_dir.join("estop.json"),
    };
    let mut buckets = std::collections::BTreeMap::new();
    for (name, b) in raw.buckets.unwrap_or_default() {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            bail!("buckets.{name}: a bucket name holds only letters, digits, '_', '-' and '.'");
        }
        if b.size == 0 {
            bail!("buckets.{name}.size: must be at least 1");
        }
        let refill = b.refill.unwrap_or(1);
        if refill == 0 {
            bail!("buckets.{name}.refill: must be at least 1");
        }
        let every = duration(
            &format!("buckets.{name}.every"),
            Some(b.every),
            Duration::ZERO,
        )?;
        buckets.insert(
            name,
            BucketConfig {
                size: b.size,
                refill,
                every,
            },
        );
    }
    let mut error_budgets = std::collections::BTreeMap::new();
    for (name, b) in raw.error_budgets.unwrap_or_default() {
        let spec = domain::WorkflowSpec {
            name: name.clone(),
            ..Default::default()
        };
        let mut errs = Vec::new();
        spec.validate_into(&mut errs);
        if let Some(e) = errs.iter().find(|e| e.path == "name") {
            bail!("error_budgets.{name}: {}", e.message);
        }
        if b.failures == 0 {
            bail!("error_budgets.{name}.failures: must be at least 1");
        }
        let window = duration(
            &format!("error_budgets.{name}.window"),
            Some(b.window),
            Duration::ZERO,
        )?;
        error_budgets.insert(
            name,
            BudgetConfig {
                failures: b.failures,
                window,
            },
        );
    }
    let mut notify = Vec::new();
    for (i, n) in raw.notify.unwrap_or_default().into_iter().enumerate() {
        let url: reqwest::Url = n
            .url
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("notify[{i}].url: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!(
                "notify[{i}].url: {:?} is not an http:// or https:// URL",
                url.scheme()
            );
        }
        let format = match n.format.as_deref() {
            None | Some("json") => NotifyFormat::Json,
            Some("slack") => NotifyFormat::Slack,
            Some(other) => bail!("notify[{i}].format: {other:?} is not one of: json, slack"),
        };
        let events = match n.events {
            None => NotifyEvent::ALL.to_vec(),
            Some(list) if list.is_empty() => {
                bail!("notify[{i}].events: empty; leave it out for every event")
            }
            Some(list) => list
                .iter()
                .map(|e| {
                    NotifyEvent::ALL
                        .into_iter()
                        .find(|k| k.as_str() == e)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "notify[{i}].events: {e:?} is not one of: run_failed, run_stopped, estop"
                            )
                        })
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        notify.push(NotifyConfig {
            url,
            format,
            events,
        });
    }
    let policies = match raw.policies {
        Some(p) if p.trim().is_empty() => bail!("policies: must not be empty"),
        Some(p) => PathBuf::from(p),
        None => data_dir.join("policies.toml"),
    };
    Ok(ServeConfig {
        notify,
        policies,
        policies_reread: duration(
            "policies_reread",
            raw.policies_reread,
            Duration::from_secs(1),
        )?,
        buckets,
        error_budgets,
        estop_source,
        estop_file,
        estop_unlisted,
        estop_reread: duration("estop_reread", raw.estop_reread, Duration::from_secs(1))?,
        data_dir: data_dir.to_owned(),
        listen,
        database,
        node_id,
        submit_ttl: duration("submit_ttl", raw.submit_ttl, Duration::from_secs(3600))?,
        max_running_jobs,
        shutdown_grace: duration(
            "shutdown_grace",
            raw.shutdown_grace,
            Duration::from_secs(25),
        )?,
        kill_grace: duration("kill_grace", raw.kill_grace, Duration::from_secs(10))?,
        lease_ttl: duration("lease_ttl", raw.lease_ttl, Duration::from_secs(30))?,
        output_limit,
        log_json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path(), None, None, &no_env).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.submit_ttl, Duration::from_secs(3600));
        assert_eq!(c.policies, dir.path().join("policies.toml"));
        assert_eq!(c.policies_reread, Duration::from_secs(1));
    }

    #[test]
    fn the_database_is_sqlite_by_default_or_a_postgres_url() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path(), None, None, &no_env).unwrap();
        assert!(matches!(&c.database, Database::Sqlite(p) if *p == dir.path().join("steward.db")));
        assert_eq!(c.estop_source, EStopSourceKind::File);
        let env = |k: &str| {
            (k == "STEWARD_DATABASE")
                .then(|| "postgres://steward:hunter2@db:5432/steward".to_owned())
        };
        let c = load(dir.path(), None, None, &env).unwrap();
        assert!(matches!(&c.database, Database::Postgres(u) if u.contains("hunter2")));
        assert_eq!(
            c.estop_source,
            EStopSourceKind::Db,
            "nodes sharing a database share the e-stop list"
        );
        let printed = toml::to_string(&c).unwrap();
        assert!(
            printed.contains("postgres://steward:***@db:5432/steward"),
            "{printed}"
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!format!("{c:?}").contains("hunter2"));
        std::fs::write(dir.path().join("steward.toml"), "estop_source = \"file\"\n").unwrap();
        let c = load(dir.path(), None, None, &env).unwrap();
        assert_eq!(
            c.estop_source,
            EStopSourceKind::File,
            "an explicit choice stands"
        );
    }

    #[test]
    fn webhooks_are_configured_and_their_urls_hidden() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("steward.toml"),
            "[[notify]]\nurl = \"https://hooks.slack.example/services/T0/B0/s3cret\"\nformat = \"slack\"\n\n[[notify]]\nurl = \"http://127.0.0.1:9/hook\"\nevents = [\"estop\"]\n",
        )
        .unwrap();
        let c = load(dir.path(), None, None, &no_env).unwrap();
        assert_eq!(c.notify.len(), 2);
        assert_eq!(c.notify[0].format, NotifyFormat::Slack);
        assert_eq!(c.notify[0].events, NotifyEvent::ALL);
        assert_eq!(c.notify[1].events, [NotifyEvent::Estop]);
        let printed = toml::to_string(&c).unwrap();
        assert!(
            printed.contains("https://hooks.slack.example/***"),
            "{printed}"
        );
        assert!(!printed.contains("s3cret") && !format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn the_policy_file_from_the_file_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("steward.toml"),
            "policies = \"/etc/p.toml\"\n",
        )
        .unwrap();
        let c = load(dir.path(), None, None, &no_env).unwrap();
        assert_eq!(c.policies, Path::new("/etc/p.toml"));
        let env = |k: &str| match k {
            "STEWARD_POLICIES" => Some("/srv/q.toml".to_owned()),
            "STEWARD_POLICIES_REREAD" => Some("5s".to_owned()),
            _ => None,
        };
        let c = load(dir.path(), None, None, &env).unwrap();
        assert_eq!(c.policies, Path::new("/srv/q.toml"));
        assert_eq!(c.policies_reread, Duration::from_secs(5));
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("steward.toml"),
            "submit_ttl = \"5m\"\nlisten = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let env = |k: &str| (k == "STEWARD_SUBMIT_TTL").then(|| "7m".to_owned());
        let c = load(dir.path(), None, Some("127.0.0.1:2"), &env).unwrap();
        assert_eq!(c.submit_ttl, Duration::from_secs(420));
        assert_eq!(c.listen.to_string(), "127.0.0.1:2");
    }

    #[test]
    fn bad_config_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        for (text, want) in [
            ("nope = 1\n", "unknown field `nope`"),
            ("submit_ttl = \"soon\"\n", "submit_ttl: invalid duration"),
            (
                "shutdown_grace = \"0s\"\n",
                "shutdown_grace: must be greater than 0",
            ),
            ("listen = \"here\"\n", "listen:"),
            (
                "max_running_jobs = 0\n",
                "max_running_jobs: 0 is out of range",
            ),
            ("log_format = \"xml\"\n", "log_format:"),
            ("estop_source = \"etcd\"\n", "estop_source:"),
            ("estop_unlisted = \"pause\"\n", "estop_unlisted:"),
            (
                "[buckets.b]\nsize = 0\nevery = \"1m\"\n",
                "buckets.b.size: must be at least 1",
            ),
            (
                "[buckets.b]\nsize = 1\nevery = \"never\"\n",
                "buckets.b.every: invalid duration",
            ),
            (
                "[buckets.b]\nsize = 1\nrefill = 0\nevery = \"1m\"\n",
                "buckets.b.refill: must be at least 1",
            ),
            ("[buckets.b]\nsize = 1\n", "missing field `every`"),
            (
                "[buckets.\"a b\"]\nsize = 1\nevery = \"1m\"\n",
                "bucket name",
            ),
            (
                "[error_budgets.X]\nfailures = 0\nwindow = \"10m\"\n",
                "error_budgets.X.failures",
            ),
            (
                "[error_budgets.X]\nfailures = 3\nwindow = \"0s\"\n",
                "error_budgets.X.window: must be greater than 0",
            ),
            (
                "[error_budgets.\"9x\"]\nfailures = 3\nwindow = \"10m\"\n",
                "error_budgets.9x",
            ),
            (
                "[error_budgets.X]\nfailures = 3\nwindow = \"10m\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
            (
                "estop_reread = \"often\"\n",
                "estop_reread: invalid duration",
            ),
            ("policies = \"  \"\n", "policies: must not be empty"),
            (
                "policies_reread = \"0s\"\n",
                "policies_reread: must be greater than 0",
            ),
            ("policies = 3\n", "policies"),
            (
                "database = \"mysql://x@y/z\"\n",
                "database: expected a postgres:// URL",
            ),
            (
                "database = \"postgres://x@y:5432\"\n",
                "database: the URL names no database",
            ),
        ] {
            std::fs::write(&f, text).unwrap();
            let err = format!(
                "{:#}",
                load(dir.path(), Some(&f), None, &no_env).unwrap_err()
            );
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let env = |k: &str| (k == "STEWARD_MAX_RUNNING_JOBS").then(|| "many".to_owned());
        let err = format!("{:#}", load(dir.path(), None, None, &env).unwrap_err());
        assert!(err.contains("STEWARD_MAX_RUNNING_JOBS"), "{err}");
        let missing = dir.path().join("missing.toml");
        assert!(
            load(dir.path(), Some(&missing), None, &no_env).is_err(),
            "an explicit file must exist"
        );
    }
}
