//! The e-stop list in etcd: one key per target under a prefix (`/steward/estop/*`,
//! `/steward/estop/site=aap`), each holding its entry as JSON. The audit trail stays in the
//! database.
//!
//! - **Reading** is a linearizable range read of the prefix, at every change and every tick:
//!   a read that succeeds is what confirms that the list is current.
//! - **Changes are seen at once** through a watch on the prefix, which resumes from the revision
//!   after the last one it saw when its stream breaks (with backoff), and starts again from the
//!   current revision (after a full read) when etcd compacted the one it needed. The stream is
//!   probed with progress requests; one that stays silent is replaced.
//! - **Writes** are transactions that compare the entry's modification revision with the one
//!   just read: two operators changing one target never lose a change; the second is retried
//!   on top of the first, and its audit record names the first's state as the old one.
//!
//! Steward talks to etcd through its own compiled subset of etcd's gRPC API (`proto/etcd.proto`):
//! the `etcd-client` crate compiles etcd's protobuf files with `protoc` when it is built, and
//! Steward builds with the Rust toolchain alone.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::Clock;
use domain::estop::{AuditRecord, EStopList, Entry, Target};
use store::EStopStore;
use tokio_util::sync::CancellationToken;

use crate::{Source, SourceError};

#[allow(clippy::all, clippy::pedantic, rust_2018_idioms)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

/// How long one request to etcd may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Writes that lose a race with another writer are retried this many times.
const SAVE_ATTEMPTS: usize = 8;
/// The largest entry Steward reads from a key.
const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The watch's reconnect backoff: the first wait, doubled up to the last.
const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the watch stream is probed, and how long it may stay silent.
const WATCH_PROBE: Duration = Duration::from_secs(2);
const WATCH_SILENCE: Duration = Duration::from_secs(7);

/// How to reach etcd.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    /// `http://host:2379` or `https://host:2379`; several are balanced over.
    pub endpoints: Vec<String>,
    /// Keys start with it (`/steward/estop/`).
    pub prefix: String,
    /// With `https://` endpoints: the CA (PEM) to trust, and a client certificate and key.
    pub ca_pem: Option<Vec<u8>>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
    /// etcd's password authentication.
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// The token etcd's password authentication hands out, sent with every request.
#[derive(Clone, Default)]
struct Token(
    Arc<std::sync::RwLock<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>>>,
);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Ok(t) = self.0.read()
            && let Some(t) = t.as_ref()
        {
            req.metadata_mut().insert("token", t.clone());
        }
        Ok(req)
    }
}

type Chan = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Token>;

/// The e-stop list in etcd; see the module documentation.
pub struct EtcdSource {
    kv: pb::kv_client::KvClient<Chan>,
    watch: pb::watch_client::WatchClient<Chan>,
    auth: pb::auth_client::AuthClient<tonic::transport::Channel>,
    credentials: Option<(String, String)>,
    token: Token,
    prefix: String,
    endpoints: String,
    store: Arc<dyn EStopStore>,
    clock: Arc<dyn Clock>,
    /// Woken by the watch: the list may have changed.
    wake: Arc<tokio::sync::Notify>,
}

impl EtcdSource {
    /// Sets up the connection (lazily: an etcd that is down now is a list that is unreadable
    /// now, not an error) and starts the watch as the supervised component `e-stop watch`.
    pub fn start(
        cfg: &EtcdConfig,
        store: Arc<dyn EStopStore>,
        clock: Arc<dyn Clock>,
        tasks: &tasks::Tasks,
    ) -> Result<Arc<EtcdSource>, String> {
        if cfg.endpoints.is_empty() {
            return Err("etcd_endpoints: name at least one endpoint".into());
        }
        let mut endpoints = Vec::new();
        for e in &cfg.endpoints {
            let mut ep = tonic::transport::Endpoint::from_shared(e.clone())
                .map_err(|err| format!("etcd_endpoints: {e:?}: {err}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            if e.starts_with("https://") {
                let mut tls = tonic::transport::ClientTlsConfig::new();
                if let Some(ca) = &cfg.ca_pem {
                    tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
                }
                if let (Some(c), Some(k)) = (&cfg.client_cert_pem, &cfg.client_key_pem) {
                    tls = tls.identity(tonic::transport::Identity::from_pem(c, k));
                }
                ep = ep
                    .tls_config(tls)
                    .map_err(|err| format!("etcd_endpoints: {e:?}: TLS: {err}"))?;
            }
            endpoints.push(ep);
        }
        let channel = tonic::transport::Channel::balance_list(endpoints.into_iter());
        let token = Token::default();
        let chan =
            tonic::service::interceptor::InterceptedService::new(channel.clone(), token.clone());
        let credentials = match (&cfg.username, &cfg.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => return Err("etcd_username and etcd_password go together".into()),
        };
        let source = Arc::new(EtcdSource {
            kv: pb::kv_client::KvClient::new(chan.clone()),
            watch: pb::watch_client::WatchClient::new(chan),
            auth: pb::auth_client::AuthClient::new(channel),
            credentials,
            token,
            prefix: cfg.prefix.clone(),
            endpoints: cfg.endpoints.join(", "),
            store,
            clock,
            wake: Arc::new(tokio::sync::Notify::new()),
        });
        let task = source.clone();
        let cancel = tasks.token().clone();
        tasks.spawn_component("e-stop watch", async move { task.watch_loop(cancel).await });
        Ok(source)
    }

    fn key(&self, target: &Target) -> Vec<u8> {
        format!("{}{target}", self.prefix).into_bytes()
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> SourceError {
        SourceError::Etcd {
            what: format!("{what} ({})", self.describe()),
            error: e.to_string(),
        }
    }

    /// Logs in (when configured) if there is no token yet.
    async fn ensure_token(&self) -> Result<(), SourceError> {
        let Some((name, password)) = &self.credentials else {
            return Ok(());
        };
        if self.token.0.read().is_ok_and(|t| t.is_some()) {
            return Ok(());
        }
        let resp = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.auth.clone().authenticate(pb::AuthenticateRequest {
                name: name.clone(),
                password: password.clone(),
            }),
        )
        .await
        .map_err(|_| self.err("authenticating", "timed out"))?
        .map_err(|e| self.err("authenticating", e.message()))?;
        let value = resp
            .into_inner()
            .token
            .parse()
            .map_err(|_| self.err("authenticating", "etcd answered an unusable token"))?;
        if let Ok(mut t) = self.token.0.write() {
            *t = Some(value);
        }
        Ok(())
    }

    /// Runs `call` with a token, logging in again once if etcd says the token expired.
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T, SourceError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        for attempt in 0..2 {
            self.ensure_token().await?;
            match tokio::time::timeout(REQUEST_TIMEOUT, call()).await {
                Err(_) => return Err(self.err(what, "timed out")),
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s))
                    if attempt == 0
                        && self.credentials.is_some()
                        && (s.code() == tonic::Code::Unauthenticated
                            || s.message().contains("auth token")) =>
                {
                    if let Ok(mut t) = self.token.0.write() {
                        *t = None;
                    }
                }
                Ok(Err(s)) => return Err(self.err(what, s.message())),
            }
        }
        Err(self.err(what, "not authenticated"))
    }

    /// The key's entry and its modification revision (0: no key).
    async fn read_one(&self, target: &Target) -> Result<(Option<Entry>, i64), SourceError> {
        let key = self.key(target);
        let resp = self
            .call("reading an e-stop entry", || {
                let (mut kv, key) = (self.kv.clone(), key.clone());
                async move {
                    kv.range(pb::RangeRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        match resp.kvs.first() {
            None => Ok((None, 0)),
            Some(kv) => Ok((Some(self.decode(kv)?), kv.mod_revision)),
        }
    }

    fn decode(&self, kv: &pb::KeyValue) -> Result<Entry, SourceError> {
        let key = String::from_utf8_lossy(&kv.key);
        let malformed = |error: String| SourceError::Malformed {
            path: std::path::PathBuf::from(format!("etcd key {key}")),
            error,
        };
        let target: Target = key
            .strip_prefix(&self.prefix)
            .unwrap_or(&key)
            .parse()
            .map_err(malformed)?;
        if kv.value.len() > MAX_VALUE_BYTES {
            return Err(malformed(format!(
                "{} bytes, more than the {MAX_VALUE_BYTES} an entry may hold",
                kv.value.len()
            )));
        }
        let entry: Entry = serde_json::from_slice(&kv.value)
            .map_err(|e| malformed(format!("not an e-stop entry: {e}")))?;
        if entry.target != target {
            return Err(malformed(format!(
                "the entry names target {}, the key {target}",
                entry.target
            )));
        }
        Ok(entry)
    }

    /// Writes `entry` (or deletes the key, for `None`) if the key's modification revision is
    /// still `seen` (0: the key must not exist). `Ok(false)`: someone else wrote first.
    async fn swap(
        &self,
        target: &Target,
        seen: i64,
        entry: Option<&Entry>,
    ) -> Result<bool, SourceError> {
        let key = self.key(target);
        let compare = pb::Compare {
            result: pb::compare::CompareResult::Equal as i32,
            target: pb::compare::CompareTarget::Mod as i32,
            key: key.clone(),
            target_union: Some(pb::compare::TargetUnion::ModRevision(seen)),
        };
        let op = match entry {
            Some(e) => pb::request_op::Request::RequestPut(pb::PutRequest {
                key,
                value: serde_json::to_vec(e)
                    .map_err(|e| SourceError::InvalidArgument(e.to_string()))?,
            }),
            None => pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key,
                range_end: Vec::new(),
            }),
        };
        let req = pb::TxnRequest {
            compare: vec![compare],
            success: vec![pb::RequestOp { request: Some(op) }],
            failure: Vec::new(),
        };
        let resp = self
            .call("changing an e-stop entry", || {
                let (mut kv, req) = (self.kv.clone(), req.clone());
                async move { kv.txn(req).await }
            })
            .await?;
        Ok(resp.succeeded)
    }

    /// Reads, changes and swaps `target`'s entry until the swap wins; `change` returns the new
    /// entry (`None`: delete) and its audit record, or `None` when there is nothing to do.
    async fn modify<F>(
        &self,
        target: &Target,
        change: F,
    ) -> Result<Option<AuditRecord>, SourceError>
    where
        F: Fn(Option<&Entry>) -> Option<(Option<Entry>, AuditRecord)> + Send + Sync,
    {
        for _ in 0..SAVE_ATTEMPTS {
            let (old, rev) = self.read_one(target).await?;
            let Some((new, record)) = change(old.as_ref()) else {
                return Ok(None);
            };
            if self.swap(target, rev, new.as_ref()).await? {
                self.wake.notify_one();
                return match self.store.audit_append(vec![record.clone()]).await {
                    Ok(()) => Ok(Some(record)),
                    Err(error) => Err(SourceError::AuditNotRecorded {
                        record: Box::new(record),
                        error,
                    }),
                };
            }
            tracing::debug!(%target, "the e-stop entry changed while saving; retrying");
        }
        Err(self.err(
            "changing an e-stop entry",
            format!("{target} kept changing; try again"),
        ))
    }

    /// Follows the prefix until cancelled: each change (and each restart of the stream) wakes
    /// [`Source::changed`].
    async fn watch_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = WATCH_BACKOFF_FIRST;
        // 0: from the current revision.
        let mut from = 0i64;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                r = self.watch_once(&mut from) => r,
            };
            // Whatever happened, the list may have changed meanwhile: read it again.
            self.wake.notify_one();
            if let Err(e) = result {
                tracing::warn!(endpoints = %self.endpoints, error = %e, retry_in = ?backoff, "the etcd watch of the e-stop list broke; resuming");
            }
            if started.elapsed() > WATCH_SILENCE {
                backoff = WATCH_BACKOFF_FIRST;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
        }
    }

    /// One watch stream, from revision `from` (0: the current one), kept up to date with the
    /// next revision to ask for. Returns when the stream ends or fails.
    async fn watch_once(&self, from: &mut i64) -> Result<(), String> {
        self.ensure_token().await.map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WatchRequest>(4);
        let prefix = self.prefix.as_bytes().to_vec();
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    range_end: prefix_end(&prefix),
                    key: prefix,
                    start_revision: *from,
                    progress_notify: true,
                },
            )),
        };
        tx.send(create).await.map_err(|e| e.to_string())?;
        let mut stream = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.watch
                .clone()
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| "opening the watch timed out".to_owned())?
        .map_err(|s| s.message().to_owned())?
        .into_inner();
        let mut probe = tokio::time::interval(WATCH_PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = probe.tick() => {
                    if heard.elapsed() > WATCH_SILENCE {
                        return Err(format!("the watch stream was silent for {WATCH_SILENCE:?}"));
                    }
                    let progress = pb::WatchRequest {
                        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                            pb::WatchProgressRequest {},
                        )),
                    };
                    tx.send(progress).await.map_err(|e| e.to_string())?;
                    continue;
                }
            };
            let msg = match msg {
                Ok(Some(m)) => m,
                Ok(None) => return Err("etcd ended the watch stream".into()),
                Err(s) => return Err(s.message().to_owned()),
            };
            heard = tokio::time::Instant::now();
            if msg.compact_revision > 0 {
                // The revision asked for is gone: read everything, follow from now.
                *from = 0;
                return Err(format!(
                    "etcd compacted revision {} away; reading the whole list again",
                    msg.compact_revision
                ));
            }
            if msg.canceled {
                *from = 0;
                return Err(format!("etcd cancelled the watch: {}", msg.cancel_reason));
            }
            if msg.created && *from == 0 {
                // Nothing before this revision is missed: the next read sees it.
                *from = msg.header.as_ref().map_or(0, |h| h.revision + 1);
                self.wake.notify_one();
            }
            if let Some(last) = msg
                .events
                .iter()
                .filter_map(|e| e.kv.as_ref())
                .map(|kv| kv.mod_revision)
                .max()
            {
                *from = last + 1;
                self.wake.notify_one();
            }
        }
    }
}

/// The end of the key range of all keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key: etcd's "\0".
    vec![0]
}

#[async_trait]
impl Source for EtcdSource {
    fn describe(&self) -> String {
        format!(
            "the e-stop list in etcd ({}, prefix {})",
            self.endpoints, self.prefix
        )
    }

    async fn load(&self) -> Result<EStopList, SourceError> {
        let prefix = self.prefix.as_bytes().to_vec();
        let resp = self
            .call("reading the e-stop list", || {
                let (mut kv, key) = (self.kv.clone(), prefix.clone());
                async move {
                    kv.range(pb::RangeRequest {
                        range_end: prefix_end(&key),
                        key,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        let mut list = EStopList::default();
        for kv in &resp.kvs {
            list.entries.push(self.decode(kv)?);
        }
        list.check().map_err(|error| SourceError::Malformed {
            path: std::path::PathBuf::from(format!("etcd prefix {}", self.prefix)),
            error,
        })?;
        Ok(list)
    }

    async fn set(&self, entry: Entry, source: &str) -> Result<AuditRecord, SourceError> {
        let at = crate::set_at(&entry, self.clock.as_ref());
        let entry = Entry {
            set_at: at.clone(),
            ..entry
        };
        let target = entry.target.clone();
        let rec = self
            .modify(&target, |old| {
                Some((
                    Some(entry.clone()),
                    crate::set_record(&entry, old, &at, source),
                ))
            })
            .await?;
        rec.ok_or_else(|| SourceError::InvalidArgument("nothing was set".into()))
    }

    async fn create(&self, entry: Entry, source: &str) -> Result<Option<AuditRecord>, SourceError> {
        let at = crate::set_at(&entry, self.clock.as_ref());
        let entry = Entry {
            set_at: at.clone(),
            ..entry
        };
        let target = entry.target.clone();
        // The swap compares with the revision read: an entry written meanwhile, by another node
        // or an operator, wins, and is read on the retry.
        self.modify(&target, |old| match old {
            Some(_) => None,
            None => Some((
                Some(entry.clone()),
                crate::set_record(&entry, None, &at, source),
            )),
        })
        .await
    }

    async fn clear(
        &self,
        target: &Target,
        actor: &str,
        reason: &str,
        source: &str,
    ) -> Result<Option<AuditRecord>, SourceError> {
        let at = self.clock.now().to_rfc3339();
        self.modify(target, |old| {
            Some((None, crate::clear_record(old?, actor, reason, &at, source)))
        })
        .await
    }

    fn settle(&self) -> Duration {
        // Every change is one transaction: nothing half-written to wait out.
        Duration::ZERO
    }

    async fn changed(&self) {
        self.wake.notified().await;
    }

    async fn audit(
        &self,
        target: Option<Target>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, SourceError> {
        crate::audit_trail(self.store.as_ref(), target, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn the_prefix_range_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"/steward/estop/"), b"/steward/estop0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
