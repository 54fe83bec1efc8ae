//! Who is calling: bearer tokens checked against the store, and the access log.
//!
//! A token is `stw_` and 43 characters of URL-safe base64 (32 random bytes); the store keeps
//! only its SHA-256. Lookups are cached for at most [`CACHE_TTL`], so a token created or
//! revoked on any node is honoured by every node within that time; unknown tokens are cached
//! too (an attacker's guesses do not each cost a database read), in a cache of bounded size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use domain::auth::{Principal, Role, Scope};
use domain::{Clock, Timestamp};
use sha2::Digest as _;
use store::{AccessRecord, AuthStore, TokenRecord};

use crate::service::ApiError;

/// How long a looked-up token (or its absence) is trusted.
pub const CACHE_TTL: Duration = Duration::from_millis(500);
/// Cached lookups at most; the cache is emptied when full.
const CACHE_MAX: usize = 10_000;
/// How often a token's `last_used_at` is written, at most.
const USE_RECORD_EVERY: Duration = Duration::from_secs(60);
/// The longest `Authorization` value looked at.
const MAX_CREDENTIAL_LEN: usize = 256;

/// Refusals written to the access log per second, at most: a flood of bad requests cannot
/// grow the log (or load the database) faster than this. The rest are counted, and the count
/// is written when the flood ends.
pub const MAX_REFUSALS_LOGGED: u32 = 100;

/// The name recorded for calls when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// Whether calls need a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Every call but health, readiness and metrics needs a valid token.
    Token,
    /// Every caller is an admin (only on loopback listeners; see the server's config check).
    None,
}

/// The caller of one request: who (once the token is checked) and from where.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    pub peer: String,
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.principal.name
    }
}

/// A new token's secret and the hash that is stored.
pub fn new_secret() -> Result<(String, String), ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        ApiError::new(
            tonic::Code::Internal,
            format!("no randomness for a token: {e}"),
        )
    })?;
    let secret = format!(
        "stw_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hash(&secret);
    Ok((secret, hash))
}

/// The SHA-256 of a secret, in hex: what the store keeps and looks up.
pub fn hash(secret: &str) -> String {
    let digest = sha2::Sha256::digest(secret.as_bytes());
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Checks tokens and records calls.
pub struct Authenticator {
    mode: AuthMode,
    store: Arc<dyn AuthStore>,
    clock: Arc<dyn Clock>,
    cache: Mutex<HashMap<String, (Instant, Option<TokenRecord>)>>,
    /// When each token's use was last recorded.
    used: Mutex<HashMap<String, Instant>>,
    /// The current second's refusals: when it began, how many were logged, how many not.
    refusals: Mutex<(Instant, u32, u64)>,
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(tonic::Code::Unauthenticated, message)
}

impl Authenticator {
    pub fn new(mode: AuthMode, store: Arc<dyn AuthStore>, clock: Arc<dyn Clock>) -> Authenticator {
        Authenticator {
            mode,
            store,
            clock,
            cache: Mutex::new(HashMap::new()),
            used: Mutex::new(HashMap::new()),
            refusals: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    pub fn store(&self) -> &Arc<dyn AuthStore> {
        &self.store
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The caller that `authorization` (the header or metadata value, if any) names, or else
    /// the common name of the verified client certificate (`client_cert`) the connection was
    /// made with.
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        client_cert: Option<&str>,
        peer: String,
    ) -> Result<Caller, ApiError> {
        if self.mode == AuthMode::None {
            return Ok(Caller {
                principal: Principal {
                    name: ANONYMOUS.into(),
                    role: Role::Admin,
                    scope: Scope::default(),
                },
                peer,
            });
        }
        let refuse = |why: &str| {
            let e = unauthenticated(why);
            self.log_refusal("-", "Authenticate", "", &peer, why);
            e
        };
        let Some(value) = authorization else {
            if let Some(name) = client_cert {
                return self.by_certificate(name, peer).await;
            }
            return Err(refuse(
                "no token: send `authorization: Bearer TOKEN` (see `steward token create`)",
            ));
        };
        if value.len() > MAX_CREDENTIAL_LEN {
            return Err(refuse(&format!(
                "the authorization value is {} bytes; the limit is {MAX_CREDENTIAL_LEN}",
                value.len()
            )));
        }
        let Some(secret) = std::str::from_utf8(value)
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|s| !s.is_empty())
        else {
            return Err(refuse("the authorization value is not `Bearer TOKEN`"));
        };
        let hash = hash(secret);
        let Some(token) = self.lookup(&hash, &hash).await? else {
            return Err(refuse("unknown or revoked token"));
        };
        self.admit(token, peer)
    }

    /// The caller of a connection made with a client certificate named `name`: the token of
    /// that name.
    async fn by_certificate(&self, name: &str, peer: String) -> Result<Caller, ApiError> {
        let Some(token) = self.lookup(&format!("cert:{name}"), name).await? else {
            let why = format!("the client certificate names {name:?}, which is no token");
            self.log_refusal("-", "Authenticate", name, &peer, &why);
            return Err(unauthenticated(&why));
        };
        self.admit(token, peer)
    }

    /// A caller with `token`, unless it has expired.
    fn admit(&self, token: TokenRecord, peer: String) -> Result<Caller, ApiError> {
        let now = self.clock.now();
        if token.expires_at.is_some_and(|e| e <= now) {
            let e = unauthenticated(&format!("token {:?} has expired", token.name));
            self.log_refusal(&token.name, "Authenticate", "", &peer, "expired");
            return Err(e);
        }
        self.record_use(&token.name, now);
        Ok(Caller {
            principal: Principal {
                name: token.name,
                role: token.role,
                scope: token.scope,
            },
            peer,
        })
    }

    /// The token cached under `key`, or looked up: by hash, or for a `cert:` key by `what`,
    /// its name. A store that cannot answer is `UNAVAILABLE`: the caller may try again.
    async fn lookup(&self, key: &str, what: &str) -> Result<Option<TokenRecord>, ApiError> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, t)) = cache.get(key)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(t.clone());
        }
        let found = if key.starts_with("cert:") {
            self.store.token_by_name(what).await
        } else {
            self.store.token_by_hash(what).await
        };
        let t = found.map_err(|e| {
            ApiError::new(
                tonic::Code::Unavailable,
                format!("cannot check the token now: {e}"),
            )
        })?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(key.to_owned(), (Instant::now(), t.clone()));
        }
        Ok(t)
    }

    /// Forgets every cached lookup (after this node created or revoked a token).
    pub fn forget(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
    }

    fn record_use(&self, name: &str, now: Timestamp) {
        let due = self.used.lock().is_ok_and(|mut used| {
            let due = used
                .get(name)
                .is_none_or(|at| at.elapsed() >= USE_RECORD_EVERY);
            if due {
                if used.len() >= CACHE_MAX {
                    used.clear();
                }
                used.insert(name.to_owned(), Instant::now());
            }
            due
        });
        if due {
            self.store.token_used(name, now);
        }
    }

    /// Records an allowed mutating call.
    pub fn log_allowed(&self, caller: &Caller, call: &str, target: &str, detail: &str) {
        self.append(caller.name(), call, target, true, &caller.peer, detail);
    }

    /// Records a refused call, unless [`MAX_REFUSALS_LOGGED`] were recorded this second.
    pub fn log_refusal(&self, actor: &str, call: &str, target: &str, peer: &str, why: &str) {
        let (log, dropped) = {
            let Ok(mut r) = self.refusals.lock() else {
                return;
            };
            let mut dropped = 0;
            if r.0.elapsed() >= Duration::from_secs(1) {
                dropped = r.2;
                *r = (Instant::now(), 0, 0);
            }
            let log = r.1 < MAX_REFUSALS_LOGGED;
            if log {
                r.1 += 1;
            } else {
                r.2 += 1;
            }
            (log, dropped)
        };
        self.log_dropped(dropped);
        if log {
            self.append(actor, call, target, false, peer, why);
        }
    }

    /// Writes the count of refusals not logged one by one, once their second has passed: the
    /// node calls it every second, so that the count is written when a flood ends, not when
    /// the next refusal comes.
    pub fn flush_refusals(&self) {
        let dropped = {
            let Ok(mut r) = self.refusals.lock() else {
                return;
            };
            if r.2 == 0 || r.0.elapsed() < Duration::from_secs(1) {
                return;
            }
            let dropped = r.2;
            *r = (Instant::now(), 0, 0);
            dropped
        };
        self.log_dropped(dropped);
    }

    fn log_dropped(&self, dropped: u64) {
        if dropped == 0 {
            return;
        }
        tracing::warn!(
            refusals = dropped,
            "refusals over the access log's limit were not logged"
        );
        self.append(
            "-",
            "Refusals",
            "",
            false,
            "-",
            &format!("{dropped} refusals within a second over the limit of {MAX_REFUSALS_LOGGED} were not logged one by one"),
        );
    }

    fn append(
        &self,
        actor: &str,
        call: &str,
        target: &str,
        allowed: bool,
        peer: &str,
        detail: &str,
    ) {
        self.store.access_append(vec![AccessRecord {
            at: self.clock.now(),
            actor: actor.to_owned(),
            call: call.to_owned(),
            target: truncate(target, domain::limits::MAX_ESTOP_TARGET_LEN),
            allowed,
            peer: peer.to_owned(),
            detail: detail.to_owned(),
        }]);
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_hashed() {
        let (a, ha) = new_secret().unwrap();
        let (b, hb) = new_secret().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("stw_") && a.len() == 47, "{a}");
        assert_eq!(ha, hash(&a));
        assert_ne!(ha, hb);
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
