//! Server configuration: `steward.toml`, then `STEWARD_*` environment overrides, then
//! command-line flags, read into [`ServeConfig`]. Each key is one field of it: its type (or
//! its `deserialize_with`) checks the value as it is read, so an error names the key; its
//! default is in `ServeConfig::default`. Unknown keys are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Deserializer, Serialize};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
pub const DEFAULT_DATA_DIR: &str = "./steward-data";

/// The configuration `steward serve` runs with. Serialized, it is a config file that loads back
/// (`--print-config`): the data directory (a flag) and what a start fills in are left out, and
/// secrets are hidden.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// The config file read, if any.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    #[serde(deserialize_with = "de::listen")]
    pub listen: SocketAddr,
    /// Where runs are stored: left out, the embedded SQLite database in the data directory; a
    /// `postgres://` URL, a PostgreSQL database that several nodes can share.
    #[serde(skip_serializing_if = "Database::is_embedded")]
    pub database: Database,
    /// Empty: the name kept in the data directory (`node_id` file) is used.
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "de::non_empty"
    )]
    pub node_id: String,
    #[serde(with = "de::duration")]
    pub submit_ttl: Duration,
    #[serde(deserialize_with = "de::max_running_jobs")]
    pub max_running_jobs: usize,
    #[serde(with = "de::duration")]
    pub shutdown_grace: Duration,
    #[serde(with = "de::duration")]
    pub kill_grace: Duration,
    #[serde(with = "de::duration")]
    pub lease_ttl: Duration,
    #[serde(deserialize_with = "de::output_limit")]
    pub output_limit: usize,
    /// The async runtime's worker threads; left out, the runtime's default: one per CPU (or
    /// `TOKIO_WORKER_THREADS`). Fewer spend less CPU per run at low load, since each step of a
    /// run wakes fewer threads, and stop a thousand jobs more slowly (BENCHMARKS.md, "Worker
    /// threads"): the default keeps the e-stop fast.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::worker_threads"
    )]
    pub worker_threads: Option<usize>,
    /// `log_format`: `text`, `json`, or `auto` (`None`: JSON unless stderr is a terminal).
    #[serde(rename = "log_format", with = "de::log_format")]
    pub log_json: Option<bool>,
    /// Where the e-stop list lives: `file` or `db`; left out, `db` when the database is shared
    /// (nodes sharing a database share its e-stop list), else `file`. See
    /// [`ServeConfig::estop_source`].
    #[serde(rename = "estop_source", skip_serializing_if = "Option::is_none")]
    pub estop_source_set: Option<EStopSourceKind>,
    /// The e-stop file (default: `estop.json` in the data directory).
    #[serde(deserialize_with = "de::path")]
    pub estop_file: PathBuf,
    /// The e-stop state of runs no entry matches: `stop` (fail closed) or `go`.
    #[serde(deserialize_with = "de::stop_or_go")]
    pub estop_unlisted: domain::estop::EStopState,
    /// How often the e-stop list is re-read even without a change notification.
    #[serde(with = "de::duration")]
    pub estop_reread: Duration,
    /// How long the e-stop list may go without a read confirming it before everything is
    /// treated as `stop`; longer than `estop_reread`.
    #[serde(with = "de::duration")]
    pub estop_stale_after: Duration,
    /// With `estop_source = "etcd"`: etcd's client URLs (`http://host:2379`, `https://...`).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "de::etcd_endpoints"
    )]
    pub etcd_endpoints: Vec<String>,
    /// The key prefix of the e-stop entries in etcd.
    #[serde(deserialize_with = "de::non_empty")]
    pub etcd_prefix: String,
    /// With `https://` endpoints: the CA to trust, and a client certificate and key (PEM).
    #[serde(
        default,
        deserialize_with = "de::some_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub etcd_ca: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "de::some_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub etcd_cert: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "de::some_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub etcd_key: Option<PathBuf>,
    /// etcd's password authentication: both or neither; the password is never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_password: Option<Hidden>,
    /// The policy file (default: `policies.toml` in the data directory).
    #[serde(deserialize_with = "de::path")]
    pub policies: PathBuf,
    /// How often the policy file is checked for changes.
    #[serde(with = "de::duration")]
    pub policies_reread: Duration,
    /// Named token buckets for `token_bucket` jobs: `[buckets.NAME] size, refill, every`.
    #[serde(deserialize_with = "de::buckets")]
    pub buckets: BTreeMap<String, BucketConfig>,
    /// Per workflow: `failures` failed runs within `window` trip the e-stop for it.
    #[serde(deserialize_with = "de::error_budgets")]
    pub error_budgets: BTreeMap<String, BudgetConfig>,
    /// Webhooks told of failed and stopped runs and of e-stop changes: `[[notify]]`.
    pub notify: Vec<NotifyConfig>,
    /// How long finished runs and audit records are kept: `[retention]`.
    pub retention: RetentionConfig,
    /// How a `shell` job's processes are kept together: `auto` (a cgroup per attempt where
    /// cgroup v2 allows it, else a process group), `cgroup` or `process_group`.
    pub job_containment: JobContainment,
    /// `token` (every call but health, readiness and metrics needs a token) or `none` (every
    /// caller is an admin; only on a loopback `listen` address).
    pub auth: Auth,
    /// TLS on the listener: the certificate chain and its private key (PEM files), both or
    /// neither; read again when they change.
    #[serde(
        default,
        deserialize_with = "de::some_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_cert: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "de::some_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_key: Option<PathBuf>,
    /// With TLS: the CA (PEM) whose client certificates are taken as credentials, the
    /// subject's common name naming the token.
    #[serde(
        default,
        deserialize_with = "de::some_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// The break-glass socket (default: `steward.sock` in the data directory): the API for the
    /// server's own user and root on this machine, without a token.
    #[serde(deserialize_with = "de::path")]
    pub socket: PathBuf,
    /// The user `shell` jobs run as (`user` or `user:group`), unless their workflow's policy
    /// names one; left out, the server's own user.
    #[serde(
        default,
        deserialize_with = "de::run_as",
        serialize_with = "de::display",
        skip_serializing_if = "Option::is_none"
    )]
    pub run_as: Option<domain::RunAs>,
    /// Destinations `http` jobs may not reach: CIDRs, addresses, host names, each optionally
    /// with `:PORT`. Steward's own listen address is denied whatever this says.
    #[serde(deserialize_with = "de::http_deny")]
    pub http_deny: Vec<String>,
    /// Serve the operator console (web pages at `/`) on the listener.
    pub console: bool,
    /// Where run and job spans are sent (OTLP over HTTP, protobuf): `http://collector:4318`
    /// (`/v1/traces` is added to a URL without a path). Left out, spans are not exported.
    /// Credentials go in `OTEL_EXPORTER_OTLP_HEADERS`, never in the URL.
    #[serde(
        default,
        deserialize_with = "de::otlp_endpoint",
        skip_serializing_if = "Option::is_none"
    )]
    pub otlp_endpoint: Option<reqwest::Url>,
    /// Where failed runs, `error` lines and panics are reported (a Sentry DSN); shown with its
    /// key hidden.
    #[serde(
        default,
        deserialize_with = "de::sentry_dsn",
        serialize_with = "de::display",
        skip_serializing_if = "Option::is_none"
    )]
    pub sentry_dsn: Option<telemetry::SentryDsn>,
}

/// A value that is never shown: `***` when printed or serialized.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Hidden(pub String);

impl std::fmt::Debug for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Hidden {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// `auth`: whether calls need a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    Token,
    None,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            data_dir: PathBuf::new(),
            config_file: None,
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7420))),
            database: Database::Sqlite(PathBuf::new()),
            node_id: String::new(),
            submit_ttl: Duration::from_secs(3600),
            max_running_jobs: 256,
            shutdown_grace: Duration::from_secs(25),
            kill_grace: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(30),
            output_limit: 16 * 1024,
            worker_threads: None,
            log_json: None,
            estop_source_set: None,
            estop_file: PathBuf::new(),
            estop_unlisted: domain::estop::EStopState::Stop,
            estop_reread: Duration::from_secs(1),
            estop_stale_after: Duration::from_secs(5),
            etcd_endpoints: Vec::new(),
            etcd_prefix: "/steward/estop/".into(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_username: None,
            etcd_password: None,
            policies: PathBuf::new(),
            policies_reread: Duration::from_secs(1),
            buckets: BTreeMap::new(),
            error_budgets: BTreeMap::new(),
            notify: Vec::new(),
            retention: RetentionConfig::default(),
            job_containment: JobContainment::Auto,
            auth: Auth::Token,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            socket: PathBuf::new(),
            run_as: None,
            http_deny: actions::DEFAULT_HTTP_DENY
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            console: true,
            otlp_endpoint: None,
            sentry_dsn: None,
        }
    }
}

impl ServeConfig {
    /// Where `{secret: NAME}` files live.
    pub fn secrets_dir(&self) -> PathBuf {
        self.data_dir.join("secrets")
    }

    /// What every job is held to; `listen` is the address the API is bound to (the port
    /// chosen when `listen` asked for any).
    pub fn guardrails(&self, listen: SocketAddr) -> anyhow::Result<actions::Guardrails> {
        let http_deny = actions::HttpDeny::parse(&self.http_deny)
            .map_err(|errs| anyhow::anyhow!("http_deny: {}", errs.join("; ")))?
            .with_listen(listen);
        Ok(actions::Guardrails {
            protected: self.protected(),
            secrets: actions::Secrets::new(self.secrets_dir()),
            http_deny,
        })
    }

    /// Steward's own files, which no job may write.
    pub fn protected(&self) -> actions::Protected {
        let mut p = vec![
            (self.data_dir.clone(), "Steward's data directory"),
            (self.policies.clone(), "the policy file"),
            (self.estop_file.clone(), "the e-stop file"),
            (self.socket.clone(), "the break-glass socket"),
        ];
        if let Some(f) = &self.config_file {
            p.push((f.clone(), "the config file"));
        }
        for f in [&self.tls_cert, &self.tls_key, &self.tls_client_ca]
            .into_iter()
            .flatten()
        {
            p.push((f.clone(), "a TLS file"));
        }
        actions::Protected::new(p)
    }

    /// Where the e-stop list lives.
    pub fn estop_source(&self) -> EStopSourceKind {
        self.estop_source_set
            .unwrap_or(if self.database.is_embedded() {
                EStopSourceKind::File
            } else {
                EStopSourceKind::Db
            })
    }

    /// Fills in what defaults to a place in the data directory.
    fn in_data_dir(mut self, data_dir: &Path) -> ServeConfig {
        self.data_dir = data_dir.to_owned();
        if matches!(&self.database, Database::Sqlite(p) if p.as_os_str().is_empty()) {
            self.database = Database::Sqlite(data_dir.join("steward.db"));
        }
        if self.estop_file.as_os_str().is_empty() {
            self.estop_file = data_dir.join("estop.json");
        }
        if self.policies.as_os_str().is_empty() {
            self.policies = data_dir.join("policies.toml");
        }
        if self.socket.as_os_str().is_empty() {
            self.socket = data_dir.join("steward.sock");
        }
        self
    }
}

/// What a webhook is told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    RunFailed,
    RunStopped,
    Estop,
    ScheduleMissed,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 4] = [
        NotifyEvent::RunFailed,
        NotifyEvent::RunStopped,
        NotifyEvent::Estop,
        NotifyEvent::ScheduleMissed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::RunFailed => "run_failed",
            NotifyEvent::RunStopped => "run_stopped",
            NotifyEvent::Estop => "estop",
            NotifyEvent::ScheduleMissed => "schedule_missed",
        }
    }
}

/// The body a webhook gets: the event as JSON, or Slack's `{"text": ...}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    #[default]
    Json,
    Slack,
}

/// `[[notify]]`: a webhook.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// An `http://` or `https://` URL. Webhook URLs carry their secret (a Slack URL's path):
    /// shown as scheme and host only.
    #[serde(serialize_with = "redact_url", deserialize_with = "de::webhook_url")]
    pub url: reqwest::Url,
    /// `json` (default) or `slack`.
    #[serde(default)]
    pub format: NotifyFormat,
    /// Which: `run_failed`, `run_stopped`, `estop`, `schedule_missed` (default: all).
    #[serde(default = "all_events", deserialize_with = "de::events")]
    pub events: Vec<NotifyEvent>,
}

fn all_events() -> Vec<NotifyEvent> {
    NotifyEvent::ALL.to_vec()
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

/// `[buckets.NAME]`: a token bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Tokens it holds at most (and starts with).
    #[serde(deserialize_with = "de::at_least_one")]
    pub size: u64,
    /// Tokens added each `every` (default 1).
    #[serde(default = "one", deserialize_with = "de::at_least_one")]
    pub refill: u64,
    #[serde(with = "de::duration")]
    pub every: Duration,
}

fn one() -> u64 {
    1
}

/// `[retention]`: how long finished runs (by the time they ended) and audit records are kept;
/// `"0"` keeps them forever.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    #[serde(with = "de::keep")]
    pub runs: Option<Duration>,
    /// The e-stop audit trail and the access log.
    #[serde(with = "de::keep")]
    pub audit: Option<Duration>,
    /// Per workflow, over `runs`: `[retention.workflows] NAME = "7d"`.
    #[serde(
        deserialize_with = "de::keep_per_workflow",
        serialize_with = "de::keep_per_workflow_out"
    )]
    pub workflows: BTreeMap<String, Option<Duration>>,
}

impl Default for RetentionConfig {
    fn default() -> RetentionConfig {
        let r = engine::Retention::default();
        RetentionConfig {
            runs: r.runs,
            audit: r.audit,
            workflows: BTreeMap::new(),
        }
    }
}

impl RetentionConfig {
    pub fn to_engine(&self) -> engine::Retention {
        engine::Retention {
            runs: self.runs,
            workflows: self.workflows.clone(),
            audit: self.audit,
        }
    }
}

/// `[error_budgets.WORKFLOW]`: an error budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(deserialize_with = "de::at_least_one")]
    pub failures: u32,
    #[serde(with = "de::duration")]
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

impl<'de> Deserialize<'de> for Database {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Database, D::Error> {
        let url = String::deserialize(d)?;
        let url = url.trim();
        store_postgres::redacted_url(url).map_err(|e| {
            serde::de::Error::custom(format!(
                "{e}; leave it out for the embedded SQLite database, or give postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ))
        })?;
        Ok(Database::Postgres(url.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EStopSourceKind {
    File,
    Db,
    Etcd,
}

/// `job_containment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// How values are read and checked, each error saying what is wrong (serde adds the key).
mod de {
    use std::collections::BTreeMap;
    use std::fmt::Display;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};

    use super::{BucketConfig, BudgetConfig, NotifyEvent};

    pub mod duration {
        use super::*;

        pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(&humantime::format_duration(*d))
        }

        /// A duration greater than 0, written `30s`, `10m`, `1h`...
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            let s = String::deserialize(d)?;
            let v = humantime::parse_duration(s.trim()).map_err(|_| {
                D::Error::custom(format!(
                    "invalid duration {s:?}: expected e.g. 30s, 10m or 1h"
                ))
            })?;
            if v.is_zero() {
                return Err(D::Error::custom("must be greater than 0"));
            }
            Ok(v)
        }
    }

    /// A retention: a duration greater than 0, or `"0"` for forever (`None`).
    pub mod keep {
        use super::*;

        pub fn serialize<S: serde::Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.collect_str(&humantime::format_duration(*d)),
                None => s.serialize_str("0"),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s = String::deserialize(d)?;
            parse(&s).map_err(D::Error::custom)
        }

        pub(crate) fn parse(s: &str) -> Result<Option<Duration>, String> {
            if s.trim() == "0" {
                return Ok(None);
            }
            let v = humantime::parse_duration(s.trim()).map_err(|_| {
                format!("invalid retention {s:?}: expected e.g. 30d, 12h, or \"0\" to keep forever")
            })?;
            if v.is_zero() {
                return Ok(None);
            }
            Ok(Some(v))
        }
    }

    /// A table key that names a workflow must be a valid workflow name.
    fn workflow_name(name: &str) -> Result<(), String> {
        let spec = domain::WorkflowSpec {
            name: name.to_owned(),
            ..Default::default()
        };
        let mut errs = Vec::new();
        spec.validate_into(&mut errs);
        match errs.iter().find(|e| e.path == "name") {
            Some(e) => Err(format!("{name}: {}", e.message)),
            None => Ok(()),
        }
    }

    pub fn keep_per_workflow<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Option<Duration>>, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (name, text) in map {
            workflow_name(&name).map_err(D::Error::custom)?;
            let keep = keep::parse(&text).map_err(|e| D::Error::custom(format!("{name}: {e}")))?;
            out.insert(name, keep);
        }
        Ok(out)
    }

    pub fn keep_per_workflow_out<S: serde::Serializer>(
        map: &BTreeMap<String, Option<Duration>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(map.len()))?;
        for (k, v) in map {
            let text = match v {
                Some(d) => humantime::format_duration(*d).to_string(),
                None => "0".to_owned(),
            };
            m.serialize_entry(k, &text)?;
        }
        m.end()
    }

    pub mod log_format {
        use super::*;

        pub fn serialize<S: serde::Serializer>(
            json: &Option<bool>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_str(match json {
                None => "auto",
                Some(true) => "json",
                Some(false) => "text",
            })
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
            match String::deserialize(d)?.as_str() {
                "auto" => Ok(None),
                "text" => Ok(Some(false)),
                "json" => Ok(Some(true)),
                other => Err(D::Error::custom(format!(
                    "{other:?} is not one of: auto, text, json"
                ))),
            }
        }
    }

    pub fn run_as<'de, D: Deserializer<'de>>(d: D) -> Result<Option<domain::RunAs>, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Some).map_err(D::Error::custom)
    }

    pub fn display<T: Display, S: serde::Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn http_deny<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let entries = Vec::<String>::deserialize(d)?;
        actions::HttpDeny::parse(&entries).map_err(|errs| D::Error::custom(errs.join("; ")))?;
        Ok(entries)
    }

    pub fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| {
            D::Error::custom(format!("{s:?} is not an address such as 127.0.0.1:7420"))
        })
    }

    pub fn stop_or_go<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<domain::estop::EStopState, D::Error> {
        match String::deserialize(d)?.as_str() {
            "stop" => Ok(domain::estop::EStopState::Stop),
            "go" => Ok(domain::estop::EStopState::Go),
            other => Err(D::Error::custom(format!(
                "{other:?} is not one of: stop, go"
            ))),
        }
    }

    pub fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Err(D::Error::custom("must not be empty"));
        }
        Ok(s)
    }

    pub fn path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        non_empty(d).map(PathBuf::from)
    }

    pub fn some_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        path(d).map(Some)
    }

    fn in_range<'de, D: Deserializer<'de>, T>(d: D, lo: T, hi: T, unit: &str) -> Result<T, D::Error>
    where
        T: Deserialize<'de> + PartialOrd + Display,
    {
        let v = T::deserialize(d)?;
        if v < lo || v > hi {
            return Err(D::Error::custom(format!(
                "{v}{unit} is out of range {lo}..={hi}"
            )));
        }
        Ok(v)
    }

    pub fn max_running_jobs<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        in_range(d, 1, 100_000, "")
    }

    pub fn output_limit<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        in_range(d, 256, 16 * 1024 * 1024, " bytes")
    }

    pub fn worker_threads<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        in_range(d, 1, 1024, "").map(Some)
    }

    pub fn at_least_one<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + PartialOrd + From<u8>,
    {
        let v = T::deserialize(d)?;
        if v < T::from(1) {
            return Err(D::Error::custom("must be at least 1"));
        }
        Ok(v)
    }

    pub fn buckets<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, BucketConfig>, D::Error> {
        let map = BTreeMap::<String, BucketConfig>::deserialize(d)?;
        if let Some(name) = map.keys().find(|n| {
            n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        }) {
            return Err(D::Error::custom(format!(
                "{name:?}: a bucket name holds only letters, digits, '_', '-' and '.'"
            )));
        }
        Ok(map)
    }

    pub fn error_budgets<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, BudgetConfig>, D::Error> {
        let map = BTreeMap::<String, BudgetConfig>::deserialize(d)?;
        for name in map.keys() {
            workflow_name(name).map_err(D::Error::custom)?;
        }
        Ok(map)
    }

    pub fn webhook_url<'de, D: Deserializer<'de>>(d: D) -> Result<reqwest::Url, D::Error> {
        let s = String::deserialize(d)?;
        // The value is not repeated: a webhook's URL often holds its token.
        let url: reqwest::Url = s.trim().parse().map_err(|e| {
            D::Error::custom(format!(
                "not a URL ({e}); expected an http:// or https:// URL such as https://host:port/path"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(D::Error::custom(format!(
                "{:?} is not an http:// or https:// URL",
                url.scheme()
            )));
        }
        Ok(url)
    }

    pub fn otlp_endpoint<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<reqwest::Url>, D::Error> {
        let url = webhook_url(d)?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(D::Error::custom(
                "holds credentials; put them in OTEL_EXPORTER_OTLP_HEADERS instead",
            ));
        }
        Ok(Some(url))
    }

    pub fn sentry_dsn<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<telemetry::SentryDsn>, D::Error> {
        let s = String::deserialize(d)?;
        s.trim().parse().map(Some).map_err(D::Error::custom)
    }

    pub fn etcd_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        if list.is_empty() {
            return Err(D::Error::custom("empty; name at least one endpoint"));
        }
        for (i, e) in list.iter().enumerate() {
            let url: reqwest::Url = e
                .trim()
                .parse()
                .map_err(|err| D::Error::custom(format!("[{i}] {e:?}: {err}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(D::Error::custom(format!(
                    "[{i}] {e:?} is not an http:// or https:// URL with a host"
                )));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(D::Error::custom(format!(
                    "[{i}] holds credentials; use etcd_username and etcd_password"
                )));
            }
        }
        Ok(list.into_iter().map(|e| e.trim().to_owned()).collect())
    }

    pub fn events<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<NotifyEvent>, D::Error> {
        let list = Vec::<NotifyEvent>::deserialize(d)?;
        if list.is_empty() {
            return Err(D::Error::custom("empty; leave it out for every event"));
        }
        Ok(list)
    }
}

/// `STEWARD_*` variables that are not server settings: the CLI's, and those Steward sets in a
/// job's environment (a Steward run as a job of another keeps them).
const NOT_SETTINGS: &[&str] = &[
    "STEWARD_ADDR",
    "STEWARD_ACTOR",
    "STEWARD_TOKEN",
    "STEWARD_DATA_DIR",
    "STEWARD_TLS_CA",
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
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> anyhow::Result<ServeConfig> {
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
            match serde_path_to_error::deserialize::<_, ServeConfig>(toml::Value::Table(merged)) {
                Ok(raw) => return Ok(raw),
                Err(e) => e,
            };
        let at = error.path().to_string();
        let inner = error.into_inner().message().trim_end().to_owned();
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

/// The largest config file read.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

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
    let mut read = None;
    // Hostile until checked: a regular file of at most MAX_CONFIG_FILE_BYTES, UTF-8, opened
    // without blocking (a FIFO does not hang the start, nor /dev/zero fill the memory).
    let text = estop::read_capped(&path, MAX_CONFIG_FILE_BYTES).and_then(|bytes| {
        String::from_utf8(bytes).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8: {e}"))
        })
    });
    let mut table = match text {
        Ok(text) => {
            read = Some(path.clone());
            // Read as the config first: its errors name the key and the line.
            check_file(&text)
                .with_context(|| format!("reading the config file {}", path.display()))?;
            toml::from_str::<toml::Table>(&text)
                .with_context(|| format!("reading the config file {}", path.display()))?
        }
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("reading the config file {}", path.display()));
        }
    };
    let mut cfg = apply_env(&mut table, env)?;
    cfg.config_file = read;
    if let Some(l) = listen_flag {
        cfg.listen = l
            .parse()
            .with_context(|| format!("--listen: {l:?} is not an address such as 127.0.0.1:7420"))?;
    }
    match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(_), None) => bail!("tls_cert is set but tls_key is not: give both, or neither"),
        (None, Some(_)) => bail!("tls_key is set but tls_cert is not: give both, or neither"),
        _ => {}
    }
    if cfg.tls_client_ca.is_some() && cfg.tls_cert.is_none() {
        bail!("tls_client_ca needs TLS: set tls_cert and tls_key too");
    }
    if cfg.estop_stale_after <= cfg.estop_reread {
        bail!(
            "estop_stale_after ({}) must be longer than estop_reread ({}): the list is confirmed by each re-read",
            humantime::format_duration(cfg.estop_stale_after),
            humantime::format_duration(cfg.estop_reread)
        );
    }
    if cfg.estop_source() == EStopSourceKind::Etcd && cfg.etcd_endpoints.is_empty() {
        bail!(
            "estop_source = \"etcd\" needs etcd_endpoints (for example [\"http://127.0.0.1:2379\"])"
        );
    }
    if cfg.etcd_username.is_some() != cfg.etcd_password.is_some() {
        bail!("etcd_username and etcd_password go together: give both, or neither");
    }
    if cfg.etcd_cert.is_some() != cfg.etcd_key.is_some() {
        bail!("etcd_cert and etcd_key go together: give both, or neither");
    }
    if cfg.auth == Auth::None && !cfg.listen.ip().is_loopback() {
        bail!(
            "auth = \"none\" serves every caller as an admin, so it is allowed only on a loopback address, and listen is {}: remove `auth = \"none\"` (tokens are the default; the first start writes an admin token to admin.token in the data directory), or listen on 127.0.0.1",
            cfg.listen
        );
    }
    Ok(cfg.in_data_dir(data_dir))
}

/// The file's text read as the config: an error says the key, what is wrong and the line.
fn check_file(text: &str) -> anyhow::Result<()> {
    let de = toml::de::Deserializer::parse(text)?;
    let Err(e) = serde_path_to_error::deserialize::<_, ServeConfig>(de) else {
        return Ok(());
    };
    let key = e.path().to_string();
    let inner = e.into_inner();
    let line = inner
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let mut msg = String::new();
    if key != "." && !key.is_empty() {
        msg.push_str(&key);
        msg.push_str(": ");
    }
    msg.push_str(inner.message().trim_end());
    if let Some(line) = line {
        msg.push_str(&format!(" (line {line})"));
    }
    bail!(msg)
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
    fn worker_threads_are_left_to_the_runtime_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path(), None, None, &[]).unwrap();
        assert_eq!(c.worker_threads, None);
        assert!(!toml::to_string(&c).unwrap().contains("worker_threads"));
        let c = load(
            dir.path(),
            None,
            None,
            &vars_of(&[("STEWARD_WORKER_THREADS", "3")]),
        )
        .unwrap();
        assert_eq!(c.worker_threads, Some(3));
        assert!(toml::to_string(&c).unwrap().contains("worker_threads = 3"));
    }

    #[test]
    fn the_sentry_dsn_is_never_shown_whole() {
        let dir = tempfile::tempdir().unwrap();
        let env = vars_of(&[
            (
                "STEWARD_SENTRY_DSN",
                "https://k3y-hunter2@sentry.example/42",
            ),
            ("STEWARD_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ]);
        let c = load(dir.path(), None, None, &env).unwrap();
        let printed = toml::to_string(&c).unwrap();
        assert!(
            printed.contains("sentry_dsn = \"https://***@sentry.example:443/42\""),
            "{printed}"
        );
        assert!(
            printed.contains("otlp_endpoint = \"http://127.0.0.1:4318/\""),
            "{printed}"
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn the_database_is_sqlite_by_default_or_a_postgres_url() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path(), None, None, &[]).unwrap();
        assert!(matches!(&c.database, Database::Sqlite(p) if *p == dir.path().join("steward.db")));
        assert_eq!(c.estop_source(), EStopSourceKind::File);
        let env = vars_of(&[(
            "STEWARD_DATABASE",
            "postgres://steward:hunter2@db:5432/steward",
        )]);
        let c = load(dir.path(), None, None, &env).unwrap();
        assert!(matches!(&c.database, Database::Postgres(u) if u.contains("hunter2")));
        assert_eq!(
            c.estop_source(),
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
            c.estop_source(),
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
    fn retention_defaults_overrides_and_forever() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path(), None, None, &[]).unwrap();
        assert_eq!(c.retention.runs, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(c.retention.audit, Some(Duration::from_secs(365 * 86_400)));
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[retention]\nruns = \"7d\"\naudit = \"0\"\n\n[retention.workflows]\nnightly = \"1d\"\nkeep = \"0\"\n",
        )
        .unwrap();
        let env = [("STEWARD_RETENTION__RUNS".to_owned(), "14d".to_owned())];
        let c = load(dir.path(), Some(&f), None, &env).unwrap();
        assert_eq!(c.retention.runs, Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(c.retention.audit, None);
        assert_eq!(
            c.retention.workflows,
            BTreeMap::from([
                ("keep".to_owned(), None),
                ("nightly".to_owned(), Some(Duration::from_secs(86_400))),
            ])
        );
        // What --print-config writes loads back the same.
        let printed = dir.path().join("printed.toml");
        std::fs::write(&printed, toml::to_string_pretty(&c).unwrap()).unwrap();
        let again = load(dir.path(), Some(&printed), None, &[]).unwrap();
        assert_eq!(again.retention.workflows, c.retention.workflows);
        assert_eq!(again.retention.audit, None);
    }

    #[test]
    fn a_config_path_that_is_no_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "# x\n".repeat(300_000)).unwrap();
        let latin1 = dir.path().join("latin1.toml");
        std::fs::write(&latin1, b"node_id = \"caf\xe9\"\n").unwrap();
        let cases = [
            (fifo.clone(), "not a regular file"),
            (Path::new("/dev/zero").to_owned(), "not a regular file"),
            (dir.path().to_owned(), "not a regular file"),
            (big, "the limit is 1048576"),
            (latin1, "not UTF-8"),
        ];
        for (path, says) in cases {
            let started = std::time::Instant::now();
            let err = format!(
                "{:#}",
                load(dir.path(), Some(&path), None, &[]).unwrap_err()
            );
            assert!(err.contains(says), "{}: {err}", path.display());
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{}",
                path.display()
            );
        }
        // The same as the data directory's own steward.toml.
        std::fs::rename(&fifo, dir.path().join("steward.toml")).unwrap();
        let err = format!("{:#}", load(dir.path(), None, None, &[]).unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
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
            (
                "worker_threads = 0\n",
                "worker_threads: 0 is out of range 1..=1024",
            ),
            (
                "worker_threads = \"four\"\n",
                "worker_threads: invalid type",
            ),
            ("listen = \"here\"\n", "listen:"),
            (
                "http_deny = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
                "http_deny: [1] \"10.0.0.0/33\": not a CIDR",
            ),
            ("http_deny = \"10.0.0.0/8\"\n", "http_deny: invalid type"),
            ("otlp_endpoint = \"grpc://otel:4317\"\n", "otlp_endpoint:"),
            (
                "otlp_endpoint = \"\"\n",
                "otlp_endpoint: not a URL (relative URL without a base); expected an http:// or https:// URL",
            ),
            (
                "[[notify]]\nurl = \"hooks.example/T0KEN\"\n",
                "notify[0].url: not a URL",
            ),
            (
                "otlp_endpoint = \"https://u:p@otel.example\"\n",
                "otlp_endpoint: holds credentials",
            ),
            ("sentry_dsn = \"https://sentry.example\"\n", "sentry_dsn:"),
            (
                "run_as = \"a b\"\n",
                "run_as: \"a b\" is not \"user\" or \"user:group\"",
            ),
            (
                "max_running_jobs = 0\n",
                "max_running_jobs: 0 is out of range",
            ),
            ("log_format = \"xml\"\n", "log_format:"),
            ("estop_source = \"etcd\"\n", "needs etcd_endpoints"),
            ("estop_source = \"zookeeper\"\n", "estop_source:"),
            ("etcd_endpoints = [\"etcd:2379\"]\n", "etcd_endpoints: [0]"),
            (
                "etcd_endpoints = [\"http://u:p@etcd:2379\"]\n",
                "etcd_endpoints: [0] holds credentials",
            ),
            ("etcd_username = \"steward\"\n", "go together"),
            (
                "estop_stale_after = \"1s\"\n",
                "estop_stale_after (1s) must be longer than estop_reread (1s)",
            ),
            ("estop_unlisted = \"pause\"\n", "estop_unlisted:"),
            (
                "[retention]\nruns = \"soon\"\n",
                "retention.runs: invalid retention",
            ),
            ("[retention]\nforever = true\n", "unknown field `forever`"),
            (
                "[retention.workflows]\n\"a b\" = \"7d\"\n",
                "retention.workflows: a b:",
            ),
            (
                "[retention.workflows]\nnightly = \"weekly\"\n",
                "nightly: invalid retention",
            ),
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
                "error_budgets: 9x: \"9x\" is not a valid workflow name",
            ),
            (
                "[error_budgets.X]\nfailures = 3\nwindow = \"10m\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
            (
                "# buckets\n[buckets.b]\nsize = 1\nevery = \"never\"\n",
                "buckets.b.every: invalid duration \"never\": expected e.g. 30s, 10m or 1h (line 4)",
            ),
            (
                "[[notify]]\nurl = \"http://x/y\"\nevents = [\"boom\"]\n",
                "notify[0].events[0]: unknown variant `boom`",
            ),
            (
                "estop_unlisted = \"pause\"\n",
                "estop_unlisted: \"pause\" is not one of: stop, go",
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
            assert!(!err.contains("T0KEN"), "a URL's secret repeated: {err}");
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
