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
    /// How a `shell` job's processes are kept together: `auto` (default: a cgroup per attempt
    /// where cgroup v2 allows it, else a process group), `cgroup` or `process_group`.
    pub job_containment: Option<String>,
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
    pub fn is_embedded(&self) -> bool {
        matches!(self, Database::Sqlite(_))
    }

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

/// `job_containment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobContainment {
    Auto,
    Cgroup,
    ProcessGroup,
}

impl JobContainment {
    pub fn mode(self) -> actions::ContainmentMode {
        match self {
            JobContainment::Auto => actions::ContainmentMode::Auto,
            JobContainment::Cgroup => actions::ContainmentMode::Cgroup,
            JobContainment::ProcessGroup => actions::ContainmentMode::ProcessGroup,
        }
    }
}

/// The validated configuration `steward serve` runs with. Serialized, it is a config file
/// that loads back (`--print-config`): the data directory (a flag) and what a start fills in
/// are left out, and secrets are hidden.
#[derive(Debug, Clone, Serialize)]
pub struct ServeConfig {
    #[serde(skip)]
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Left out when it is the embedded database in the data directory.
    #[serde(skip_serializing_if = "Database::is_embedded")]
    pub database: Database,
    /// Empty: the name kept in the data directory (`node_id` file) is used.
    #[serde(skip_serializing_if = "String::is_empty")]
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
    #[serde(rename = "log_format", serialize_with = "log_format")]
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
    pub job_containment: JobContainment,
}

fn log_format<S: serde::Serializer>(json: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *json { "json" } else { "text" })
}

mod humantime_serde_str {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// `STEWARD_*` variables that are not server settings: the CLI's, and those Steward sets in a
/// job's environment (a Steward run as a job of another keeps them).
const NOT_SETTINGS: &[&str] = &[
    "STEWARD_ADDR",
    "STEWARD_ACTOR",
    "STEWARD_TOKEN",
    "STEWARD_IDEMPOTENCY_KEY",
    "STEWARD_RUN_ID",
    "STEWARD_ATTEMPT",
];

/// The process's `STEWARD_*` variables, for [`load`]. One that is not valid UTF-8 is an error,
/// never skipped.
pub fn environment() -> anyhow::Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Some(k) = k.to_str().filter(|k| k.starts_with("STEWARD_")) else {
            continue;
        };
        let v = v
            .into_string()
            .map_err(|_| anyhow::anyhow!("{k}: the value is not valid UTF-8"))?;
        env.push((k.to_owned(), v));
    }
    Ok(env)
}

/// The config key a `STEWARD_*` variable sets: the rest of its name in lower case, `__`
/// between the parts of a nested key (`STEWARD_BUCKETS__DISK__SIZE` is `buckets.disk.size`).
/// `None` for variables that are not settings.
fn env_key(var: &str) -> Option<Vec<String>> {
    let name = var.strip_prefix("STEWARD_")?;
    if NOT_SETTINGS.contains(&var) || name.starts_with("SECRET_") {
        return None;
    }
    Some(name.split("__").map(str::to_ascii_lowercase).collect())
}

/// An environment value as TOML: a number, a boolean or an array when it reads as one, else a
/// string. Only a single value is taken (a newline cannot add keys).
fn env_value(text: &str) -> Option<toml::Value> {
    let mut t: toml::Table = toml::from_str(&format!("v = {text}")).ok()?;
    (t.len() == 1).then(|| t.remove("v")).flatten()
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("an empty key")?;
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("{p} is not a table"))?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

/// Applies every `STEWARD_*` variable of `env` to the config file's `table`, where it wins.
/// Every key of the file can be set so, nested ones included; a variable that names no key
/// is refused like an unknown key in the file (a typo in a unit file must not pass silently).
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> anyhow::Result<RawConfig> {
    // Variables whose typed reading (`20`, `true`) was refused, to be taken as strings.
    let mut as_string: Vec<&str> = Vec::new();
    loop {
        let mut merged = table.clone();
        let mut applied: Vec<(&str, String)> = Vec::new();
        for (var, text) in env {
            let Some(path) = env_key(var) else { continue };
            if path.iter().any(String::is_empty) {
                bail!("{var}: not a setting (an empty part in its name)");
            }
            let value = match env_value(text) {
                Some(v) if !as_string.contains(&var.as_str()) && !v.is_str() => v,
                _ => toml::Value::String(text.clone()),
            };
            set_path(&mut merged, &path, value).map_err(|e| anyhow::anyhow!("{var}: {e}"))?;
            applied.push((var, path.join(".")));
        }
        let error =
            match serde_path_to_error::deserialize::<_, RawConfig>(toml::Value::Table(merged)) {
                Ok(raw) => return Ok(raw),
                Err(e) => e,
            };
        let at = error.path().to_string();
        let inner = error.into_inner().to_string();
        // The variable whose key the error is at (or under, for an unknown key).
        let unknown = inner
            .strip_prefix("unknown field `")
            .and_then(|r| r.split_once('`'))
            .map(|(f, _)| f.to_owned());
        let culprit = applied
            .iter()
            .filter(|(_, key)| match &unknown {
                Some(field) => {
                    let full = if at == "." || at.is_empty() {
                        field.clone()
                    } else {
                        format!("{at}.{field}")
                    };
                    *key == full || key.starts_with(&format!("{full}.")) || *key == at
                }
                None => {
                    *key == at
                        || at.starts_with(&format!("{key}."))
                        || key.starts_with(&format!("{at}."))
                }
            })
            .max_by_key(|(_, key)| key.len());
        match culprit {
            Some((var, _)) if inner.contains("invalid type") && !as_string.contains(var) => {
                as_string.push(var);
            }
            Some((var, key)) if inner.contains("unknown field") => {
                bail!("{var}: not a setting (no config key {key}): {inner}")
            }
            Some((var, key)) => bail!("{var} (config key {key}): {inner}"),
            None => bail!("{at}: {inner}"),
        }
    }
}

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

/// Builds the server configuration from the file, the environment and the flags.
pub fn load(
    data_dir: &Path,
    config_file: Option<&Path>,
    listen_flag: Option<&str>,
    env: &[(String, String)],
) -> anyhow::Result<ServeConfig> {
    let default_file = data_dir.join("steward.toml");
    let (path, required) = match config_file {
        Some(p) => (p.to_owned(), true),
        None => (default_file, false),
    };
    let mut table = match std::fs::read_to_string(&path) {
        Ok(text) => {
            // Read as the typed config first: its errors name the line.
            toml::from_str::<RawConfig>(&text)
                .with_context(|| format!("reading the config file {}", path.display()))?;
            toml::from_str::<toml::Table>(&text)
                .with_context(|| format!("reading the config file {}", path.display()))?
        }
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("reading the config file {}", path.display()));
        }
    };
    let mut raw = apply_env(&mut table, env)?;
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
    let job_containment = match raw.job_containment.as_deref() {
        None | Some("auto") => JobContainment::Auto,
        Some("cgroup") => JobContainment::Cgroup,
        Some("process_group") => JobContainment::ProcessGroup,
        Some(other) => {
            bail!("job_containment: {other:?} is not one of: auto, cgroup, process_group")
        }
    };
    Ok(ServeConfig {
        job_containment,
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

    fn vars_of(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path(), None, None, &[]).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.submit_ttl, Duration::from_secs(3600));
        assert_eq!(c.policies, dir.path().join("policies.toml"));
        assert_eq!(c.policies_reread, Duration::from_secs(1));
    }

    #[test]
    fn the_database_is_sqlite_by_default_or_a_postgres_url() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path(), None, None, &[]).unwrap();
        assert!(matches!(&c.database, Database::Sqlite(p) if *p == dir.path().join("steward.db")));
        assert_eq!(c.estop_source, EStopSourceKind::File);
        let env = vars_of(&[(
            "STEWARD_DATABASE",
            "postgres://steward:hunter2@db:5432/steward",
        )]);
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
        let c = load(dir.path(), None, None, &[]).unwrap();
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
        let c = load(dir.path(), None, None, &[]).unwrap();
        assert_eq!(c.policies, Path::new("/etc/p.toml"));
        let env = vars_of(&[
            ("STEWARD_POLICIES", "/srv/q.toml"),
            ("STEWARD_POLICIES_REREAD", "5s"),
        ]);
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
        let env = vars_of(&[("STEWARD_SUBMIT_TTL", "7m")]);
        let c = load(dir.path(), None, Some("127.0.0.1:2"), &env).unwrap();
        assert_eq!(c.submit_ttl, Duration::from_secs(420));
        assert_eq!(c.listen.to_string(), "127.0.0.1:2");
        // Every key has its variable, nested ones too; digits for a string key stay a string.
        std::fs::write(
            dir.path().join("steward.toml"),
            "[buckets.disk]\nsize = 1\nevery = \"1m\"\n",
        )
        .unwrap();
        let vars = vars_of(&[
            ("STEWARD_BUCKETS__DISK__SIZE", "10"),
            ("STEWARD_BUCKETS__NEW__SIZE", "2"),
            ("STEWARD_BUCKETS__NEW__EVERY", "5s"),
            ("STEWARD_NODE_ID", "123"),
            ("STEWARD_ADDR", "127.0.0.1:9"),
            ("STEWARD_SECRET_DB", "hunter2"),
        ]);
        let c = load(dir.path(), None, None, &vars).unwrap();
        assert_eq!(c.buckets["disk"].size, 10);
        assert_eq!(c.buckets["new"].every, Duration::from_secs(5));
        assert_eq!(c.node_id, "123");
    }

    /// `--print-config` prints a config file that loads back to the same configuration.
    #[test]
    fn the_printed_config_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/steward.toml");
        let text = std::fs::read_to_string(example).unwrap()
            + "[[notify]]\nurl = \"https://hooks.example/services/s3cret\"\n";
        std::fs::write(dir.path().join("steward.toml"), text).unwrap();
        let vars = vars_of(&[
            ("STEWARD_NODE_ID", "n1"),
            ("STEWARD_LOG_FORMAT", "json"),
            ("STEWARD_JOB_CONTAINMENT", "process_group"),
        ]);
        for env in [&vars[..], &[][..]] {
            let first = load(dir.path(), None, None, env).unwrap();
            let printed = toml::to_string_pretty(&first).unwrap();
            let again_file = dir.path().join("printed.toml");
            std::fs::write(&again_file, &printed).unwrap();
            let again = load(dir.path(), Some(&again_file), None, &[])
                .unwrap_or_else(|e| panic!("{e:#}\n{printed}"));
            assert_eq!(toml::to_string_pretty(&again).unwrap(), printed);
            assert!(
                !printed.contains("data_dir") && !printed.contains("log_json"),
                "{printed}"
            );
            assert!(!printed.contains("s3cret"), "{printed}");
        }
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
            let err = format!("{:#}", load(dir.path(), Some(&f), None, &[]).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
        }
        for (var, value, want) in [
            (
                "STEWARD_MAX_RUNNING_JOBS",
                "many",
                "STEWARD_MAX_RUNNING_JOBS",
            ),
            (
                "STEWARD_SUBMIT_TLL",
                "5m",
                "STEWARD_SUBMIT_TLL: not a setting",
            ),
            ("STEWARD_BUCKETS__B__SIZ", "5", "STEWARD_BUCKETS__B__SIZ"),
            ("STEWARD_LISTEN__X", "1", "STEWARD_LISTEN__X"),
            ("STEWARD_", "1", "STEWARD_"),
        ] {
            let err = format!(
                "{:#}",
                load(dir.path(), None, None, &vars_of(&[(var, value)])).unwrap_err()
            );
            assert!(err.contains(want), "{var}={value}: {err}");
        }
        let missing = dir.path().join("missing.toml");
        assert!(
            load(dir.path(), Some(&missing), None, &[]).is_err(),
            "an explicit file must exist"
        );
    }
}
