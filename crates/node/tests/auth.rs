#![allow(clippy::unwrap_used)]

//! Access control end to end: a node started by `Node::start` with tokens on (the default),
//! called over TCP by real gRPC (tonic) and HTTP (reqwest) clients. The role table of
//! docs/security.md, call by call and role by role, over both; scopes; tokens that are missing,
//! garbage, expired or revoked; identity in what is recorded; the access log.

use std::time::Duration;

use proto::v1 as pb;
use proto::v1::admin_client::AdminClient;
use proto::v1::e_stop_client::EStopClient;
use proto::v1::steward_client::StewardClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

const POLICIES: &str = "[workflows.t]\n[workflows.deploy]\n[workflows.SatelliteDiskErase]\n";
const ROLES: [&str; 5] = ["viewer", "submitter", "responder", "operator", "admin"];

struct Node {
    dir: tempfile::TempDir,
    addr: String,
    channel: Channel,
    http: reqwest::Client,
    admin: String,
    _node: node::Node,
}

async fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policies.toml"), POLICIES).unwrap();
    let env = [("STEWARD_KILL_GRACE".to_owned(), "200ms".to_owned())];
    let cfg = node::config::load(dir.path(), None, Some("127.0.0.1:0"), &env).unwrap();
    let n = node::Node::start(cfg, None).await.unwrap();
    let addr = n.addr().to_string();
    let admin = std::fs::read_to_string(dir.path().join(node::ADMIN_TOKEN_FILE))
        .unwrap()
        .trim()
        .to_owned();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Node {
        dir,
        addr,
        channel,
        http: actions::shared_client().unwrap().clone(),
        admin,
        _node: n,
    }
}

fn req<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn spec(name: &str, labels: &[(&str, &str)]) -> pb::WorkReq {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    serde_json::from_value(json!({
        "name": name,
        "labels": labels,
        "blocks": [{"jobs": [{"action": "sleep", "args": {"duration": "30s"}}]}],
    }))
    .unwrap()
}

/// The code of a gRPC result.
fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// An HTTP status as the gRPC code the API maps it from.
fn http_code(status: u16) -> Code {
    match status {
        200..=299 => Code::Ok,
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::FailedPrecondition,
        _ => Code::Unknown,
    }
}

impl Node {
    fn steward(&self) -> StewardClient<Channel> {
        StewardClient::new(self.channel.clone())
    }

    fn estop(&self) -> EStopClient<Channel> {
        EStopClient::new(self.channel.clone())
    }

    fn admin_client(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// Creates a token through the API as the admin; its secret.
    async fn token(&self, name: &str, role: &str, scopes: &[&str], expires_in: &str) -> String {
        self.admin_client()
            .create_token(req(
                pb::CreateTokenRequest {
                    name: name.into(),
                    role: role.into(),
                    scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    expires_in: expires_in.into(),
                },
                Some(&self.admin),
            ))
            .await
            .unwrap()
            .into_inner()
            .secret
    }

    async fn submit_as(&self, token: &str, name: &str) -> String {
        self.steward()
            .submit(req(
                pb::SubmitRequest {
                    spec: Some(spec(name, &[])),
                    start: false,
                },
                Some(token),
            ))
            .await
            .unwrap()
            .into_inner()
            .id
    }

    async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .request(
                method.parse().unwrap(),
                format!("http://{}{path}", self.addr),
            )
            .timeout(Duration::from_secs(20));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if !body.is_null() {
            r = r.json(&body);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// Every call of the role table, over gRPC or HTTP, as `token`: the code it got.
async fn call(n: &Node, over_http: bool, what: &str, token: &str, fresh_run: &str) -> Code {
    let t = Some(token);
    if over_http && what == "Watch" {
        // An event stream: the status line is the answer.
        let mut r = n
            .http
            .get(format!("http://{}/v1/runs/{fresh_run}/watch", n.addr))
            .bearer_auth(token)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let _ = r.chunk().await;
        return http_code(status);
    }
    if over_http {
        let (method, path, body) = match what {
            "Status" => ("GET", format!("/v1/runs/{fresh_run}"), Value::Null),
            "List" => ("GET", "/v1/runs".to_owned(), Value::Null),
            "Validate" => (
                "POST",
                "/v1/validate".to_owned(),
                json!({"spec": spec("t", &[])}),
            ),
            "EStopList" => ("GET", "/v1/estop".to_owned(), Value::Null),
            "EStopAudit" => ("GET", "/v1/estop/audit".to_owned(), Value::Null),
            "Submit" => (
                "POST",
                "/v1/runs".to_owned(),
                json!({"spec": spec("t", &[])}),
            ),
            "Exec" => ("POST", format!("/v1/runs/{fresh_run}/exec"), Value::Null),
            "Clone" => ("POST", format!("/v1/runs/{fresh_run}/clone"), Value::Null),
            "CancelOther" => (
                "POST",
                format!("/v1/runs/{fresh_run}/cancel"),
                json!({"reason": "t"}),
            ),
            "EStopStop" => (
                "POST",
                "/v1/estop".to_owned(),
                json!({"target": "site=x", "state": "stop", "reason": "t"}),
            ),
            // Not over the stop above: a responder may not weaken a stop.
            "EStopPause" => (
                "POST",
                "/v1/estop".to_owned(),
                json!({"target": "site=y", "state": "pause", "reason": "t"}),
            ),
            "EStopGo" => (
                "POST",
                "/v1/estop".to_owned(),
                json!({"target": "site=x", "state": "go", "reason": "t"}),
            ),
            "EStopClear" => (
                "POST",
                "/v1/estop/clear".to_owned(),
                json!({"target": "site=x", "reason": "t"}),
            ),
            "CreateToken" => (
                "POST",
                "/v1/tokens".to_owned(),
                json!({"name": format!("made-{}", fresh_run), "role": "viewer"}),
            ),
            "ListTokens" => ("GET", "/v1/tokens".to_owned(), Value::Null),
            "RevokeToken" => ("DELETE", "/v1/tokens/nobody".to_owned(), Value::Null),
            "AccessLog" => ("GET", "/v1/access".to_owned(), Value::Null),
            other => panic!("{other}"),
        };
        return http_code(n.http(method, &path, t, body).await.0);
    }
    let id = fresh_run.to_owned();
    match what {
        "Status" => code(n.steward().status(req(pb::StatusRequest { id }, t)).await),
        "List" => code(n.steward().list(req(pb::ListRequest::default(), t)).await),
        "Watch" => match n.steward().watch(req(pb::WatchRequest { id }, t)).await {
            Ok(mut s) => code(s.get_mut().message().await),
            Err(e) => e.code(),
        },
        "Validate" => code(
            n.steward()
                .validate(req(
                    pb::ValidateRequest {
                        spec: Some(spec("t", &[])),
                    },
                    t,
                ))
                .await,
        ),
        "EStopList" => code(n.estop().list(req(pb::EStopListRequest {}, t)).await),
        "EStopAudit" => code(
            n.estop()
                .audit(req(pb::EStopAuditRequest::default(), t))
                .await,
        ),
        "Submit" => code(
            n.steward()
                .submit(req(
                    pb::SubmitRequest {
                        spec: Some(spec("t", &[])),
                        start: false,
                    },
                    t,
                ))
                .await,
        ),
        "Exec" => code(n.steward().exec(req(pb::ExecRequest { id }, t)).await),
        "Clone" => {
            code(StewardClient::clone(&mut n.steward(), req(pb::CloneRequest { id }, t)).await)
        }
        "CancelOther" => code(
            n.steward()
                .cancel(req(
                    pb::CancelRequest {
                        id,
                        reason: "t".into(),
                    },
                    t,
                ))
                .await,
        ),
        "EStopStop" | "EStopPause" | "EStopGo" => {
            let state = what.trim_start_matches("EStop").to_ascii_lowercase();
            // Not over the stop: a responder may not weaken a stop.
            let target = if state == "pause" { "site=y" } else { "site=x" };
            code(
                n.estop()
                    .set(req(
                        pb::EStopSetRequest {
                            target: target.into(),
                            state,
                            reason: "t".into(),
                        },
                        t,
                    ))
                    .await,
            )
        }
        "EStopClear" => code(
            n.estop()
                .clear(req(
                    pb::EStopClearRequest {
                        target: "site=x".into(),
                        reason: "t".into(),
                    },
                    t,
                ))
                .await,
        ),
        "CreateToken" => code(
            n.admin_client()
                .create_token(req(
                    pb::CreateTokenRequest {
                        name: format!("made-{fresh_run}"),
                        role: "viewer".into(),
                        ..Default::default()
                    },
                    t,
                ))
                .await,
        ),
        "ListTokens" => code(
            n.admin_client()
                .list_tokens(req(pb::ListTokensRequest {}, t))
                .await,
        ),
        "RevokeToken" => code(
            n.admin_client()
                .revoke_token(req(
                    pb::RevokeTokenRequest {
                        name: "nobody".into(),
                    },
                    t,
                ))
                .await,
        ),
        "AccessLog" => code(
            n.admin_client()
                .access_log(req(pb::AccessLogRequest::default(), t))
                .await,
        ),
        other => panic!("{other}"),
    }
}

/// The role table: for each call, the roles (by first letter) that may make it.
const TABLE: &[(&str, &str)] = &[
    ("Status", "VSROA"),
    ("List", "VSROA"),
    ("Watch", "VSROA"),
    ("Validate", "VSROA"),
    ("EStopList", "VSROA"),
    ("EStopAudit", "VSROA"),
    ("Submit", "S OA"),
    ("Exec", "S OA"),
    ("Clone", "S OA"),
    ("CancelOther", "OA"),
    ("EStopStop", "ROA"),
    ("EStopPause", "ROA"),
    ("EStopGo", "OA"),
    ("EStopClear", "OA"),
    ("CreateToken", "A"),
    ("ListTokens", "A"),
    ("RevokeToken", "A"),
    ("AccessLog", "A"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_by_every_role_over_grpc_and_http() {
    let n = node().await;
    let mut tokens = Vec::new();
    for role in ROLES {
        tokens.push((role, n.token(&format!("t-{role}"), role, &[], "").await));
    }
    for over_http in [false, true] {
        for (what, allowed) in TABLE {
            for (role, token) in &tokens {
                // A run of the admin's, not started: each call gets its own.
                let run = n.submit_as(&n.admin, "t").await;
                let got = call(&n, over_http, what, token, &run).await;
                let letter = role.chars().next().unwrap().to_ascii_uppercase();
                let face = if over_http { "HTTP" } else { "gRPC" };
                if allowed.contains(letter) {
                    assert!(
                        !matches!(got, Code::PermissionDenied | Code::Unauthenticated),
                        "{face}: {role} may call {what}, got {got:?}"
                    );
                } else {
                    assert_eq!(got, Code::PermissionDenied, "{face}: {role} × {what}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_cancels_its_own_runs_only() {
    let n = node().await;
    let sub = n.token("ci", "submitter", &[], "").await;
    let other = n.token("ci2", "submitter", &[], "").await;
    let mine = n.submit_as(&sub, "t").await;
    let theirs = n.submit_as(&other, "t").await;
    let cancel = |id: &str, t: &str| {
        let mut c = n.steward();
        let r = req(
            pb::CancelRequest {
                id: id.into(),
                reason: "done".into(),
            },
            Some(t),
        );
        async move { c.cancel(r).await }
    };
    let err = cancel(&theirs, &sub).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("\"ci\"") && err.message().contains("submitter"),
        "names the token and its role: {err:?}"
    );
    cancel(&mine, &sub).await.unwrap();
    let run = n
        .steward()
        .status(req(pb::StatusRequest { id: mine }, Some(&sub)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.state, "cancelled");
    assert_eq!(run.submitted_by, "ci");
    assert_eq!(run.stop_cause.unwrap().details["by"], "ci");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_are_refused_outside_their_scope() {
    let n = node().await;
    let ci = n.token("ci", "submitter", &["workflow=deploy"], "").await;
    let err = n
        .steward()
        .submit(req(
            pb::SubmitRequest {
                spec: Some(spec("SatelliteDiskErase", &[])),
                start: false,
            },
            Some(&ci),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("workflow=deploy"), "{err:?}");
    n.submit_as(&ci, "deploy").await;
    // Runs outside the scope cannot be executed or cloned either.
    let other = n.submit_as(&n.admin, "t").await;
    let err = n
        .steward()
        .exec(req(pb::ExecRequest { id: other }, Some(&ci)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let pager = n.token("pager", "responder", &["site=aap"], "").await;
    let set = |target: &str| {
        let mut c = n.estop();
        let r = req(
            pb::EStopSetRequest {
                target: target.into(),
                state: "stop".into(),
                reason: "INC-1".into(),
            },
            Some(&pager),
        );
        async move { c.set(r).await }
    };
    let rec = set("site=aap").await.unwrap().into_inner();
    assert_eq!(rec.set_by, "pager");
    for outside in ["*", "site=ams", "t"] {
        assert_eq!(
            set(outside).await.unwrap_err().code(),
            Code::PermissionDenied,
            "{outside}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_cannot_weaken_a_stop_to_pause() {
    let n = node().await;
    let pager = n.token("pager", "responder", &[], "").await;
    let op = n.token("op", "operator", &[], "").await;
    let set = |token: &str, target: &str, state: &str| {
        let mut c = n.estop();
        let r = req(
            pb::EStopSetRequest {
                target: target.into(),
                state: state.into(),
                reason: "INC-7".into(),
            },
            Some(token),
        );
        async move { c.set(r).await }
    };
    set(&op, "t", "stop").await.unwrap();
    // Pause over a stop would let queued runs wait instead of being refused: a release.
    let err = set(&pager, "t", "pause").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("t is set to stop") && err.message().contains("responder"),
        "{err:?}"
    );
    let (status, body) = n
        .http(
            "POST",
            "/v1/estop",
            Some(&pager),
            json!({"target": "t", "state": "pause", "reason": "INC-7"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let list = n
        .estop()
        .list(req(pb::EStopListRequest {}, Some(&pager)))
        .await
        .unwrap()
        .into_inner();
    let entry = list.entries.iter().find(|e| e.target == "t").unwrap();
    assert_eq!(entry.state, "stop", "the stop holds");
    let err = n
        .steward()
        .submit(req(
            pb::SubmitRequest {
                spec: Some(spec("t", &[])),
                start: false,
            },
            Some(&n.admin),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // What only tightens is the responder's to do: pause where nothing is set, then stop
    // over its own pause, and stop again over a stop.
    set(&pager, "site=aap", "pause").await.unwrap();
    set(&pager, "site=aap", "stop").await.unwrap();
    set(&pager, "t", "stop").await.unwrap();
    assert_eq!(
        set(&pager, "site=aap", "pause").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // An operator may release part of it.
    set(&op, "t", "pause").await.unwrap();

    // Without a `*` entry, a target with no entry falls to estop_unlisted (stop): pause would
    // release it.
    n.estop()
        .clear(req(
            pb::EStopClearRequest {
                target: "*".into(),
                reason: "INC-7".into(),
            },
            Some(&op),
        ))
        .await
        .unwrap();
    let err = set(&pager, "deploy", "pause").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("estop_unlisted (stop)"), "{err:?}");
    set(&pager, "deploy", "stop").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_garbage_expired_and_revoked_tokens_are_refused() {
    let n = node().await;
    let short = n.token("short", "viewer", &[], "1s").await;
    let gone = n.token("gone", "viewer", &[], "").await;
    let list = |t: Option<String>| {
        let mut c = n.steward();
        async move {
            c.list(req(pb::ListRequest::default(), t.as_deref()))
                .await
                .map(|_| ())
        }
    };
    list(Some(short.clone())).await.unwrap();
    list(Some(gone.clone())).await.unwrap();
    for (what, token) in [
        ("none", None),
        ("garbage", Some("stw_garbage".to_owned())),
        ("not bearer", Some(String::new())),
    ] {
        let err = list(token).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
    }
    // A value too long to be a token: refused before any lookup.
    let mut r = tonic::Request::new(pb::ListRequest::default());
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", "x".repeat(1000)).parse().unwrap(),
    );
    let err = n.steward().list(r).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("bytes; the limit is 256"), "{err:?}");
    // A value that is not `Bearer ...`.
    let mut r = tonic::Request::new(pb::ListRequest::default());
    r.metadata_mut()
        .insert("authorization", format!("Basic {gone}").parse().unwrap());
    assert_eq!(
        n.steward().list(r).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let (code, body) = n.http("GET", "/v1/runs", None, Value::Null).await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["code"], "UNAUTHENTICATED", "{body}");
    let (code, _) = n
        .http("GET", "/v1/runs", Some("stw_nope"), Value::Null)
        .await;
    assert_eq!(code, 401);

    let revoked = n
        .admin_client()
        .revoke_token(req(
            pb::RevokeTokenRequest {
                name: "gone".into(),
            },
            Some(&n.admin),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    // This node forgets at once; every node within the cache's lifetime.
    let err = list(Some(gone)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = list(Some(short)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");

    // Health, readiness and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = n
            .http
            .get(format!("http://{}{path}", n.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(n.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_not_a_header_is_who_acts_and_the_access_log_says_so() {
    let n = node().await;
    let op = n.token("oncall", "operator", &[], "").await;
    let mut r = req(
        pb::EStopSetRequest {
            target: "deploy".into(),
            state: "stop".into(),
            reason: "INC-7".into(),
        },
        Some(&op),
    );
    r.metadata_mut()
        .insert("x-steward-actor", "someone-else".parse().unwrap());
    let rec = n.estop().set(r).await.unwrap().into_inner();
    assert_eq!(rec.set_by, "oncall");
    let (code, body) = n
        .http(
            "GET",
            "/v1/estop/audit?target=deploy",
            Some(&op),
            Value::Null,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["records"][0]["set_by"], "oncall", "{body}");

    let viewer = n.token("looker", "viewer", &[], "").await;
    let _ = n
        .steward()
        .submit(req(
            pb::SubmitRequest {
                spec: Some(spec("t", &[])),
                start: false,
            },
            Some(&viewer),
        ))
        .await
        .unwrap_err();
    let _ = n
        .steward()
        .list(req(pb::ListRequest::default(), Some("stw_guess")))
        .await
        .unwrap_err();
    let id = n.submit_as(&op, "t").await;

    let log = n
        .admin_client()
        .access_log(req(pb::AccessLogRequest { limit: 0 }, Some(&n.admin)))
        .await
        .unwrap()
        .into_inner()
        .records;
    let find = |actor: &str, call: &str| {
        log.iter()
            .find(|a| a.actor == actor && a.call == call)
            .unwrap_or_else(|| panic!("no {actor} {call} in {log:#?}"))
    };
    let set = find("oncall", "EStopSet stop");
    assert!(set.allowed && set.target == "deploy", "{set:?}");
    assert!(set.peer.starts_with("127.0.0.1:"), "{set:?}");
    let refused = find("looker", "Submit");
    assert!(
        !refused.allowed && refused.detail.contains("viewer"),
        "{refused:?}"
    );
    let guess = find("-", "Authenticate");
    assert!(!guess.allowed, "{guess:?}");
    assert_eq!(find("oncall", "Submit").target, id);
    // The secret is never stored or shown.
    let listed = n
        .admin_client()
        .list_tokens(req(pb::ListTokensRequest {}, Some(&n.admin)))
        .await
        .unwrap()
        .into_inner();
    let text = format!("{listed:?}{log:?}");
    assert!(!text.contains(&op) && !text.contains(&n.admin));
    for file in ["steward.db", "steward.db-wal"] {
        let bytes = std::fs::read(n.dir.path().join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(op.len()).any(|w| w == op.as_bytes()),
            "a secret in {file}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_requests_name_the_field() {
    let n = node().await;
    for (body, want) in [
        (json!({"name": "", "role": "viewer"}), "name: required"),
        (json!({"name": "a b", "role": "viewer"}), "name:"),
        (
            json!({"name": "x".repeat(200), "role": "viewer"}),
            "name: is 200 bytes",
        ),
        (json!({"name": "ok", "role": "root"}), "role:"),
        (
            json!({"name": "ok", "role": "viewer", "scopes": ["nope"]}),
            "scopes[0]",
        ),
        (
            json!({"name": "ok", "role": "viewer", "expires_in": "soon"}),
            "expires_in",
        ),
        (
            json!({"name": "ok", "role": "viewer", "expires_in": "0s"}),
            "expires_in",
        ),
    ] {
        let (code, got) = n
            .http("POST", "/v1/tokens", Some(&n.admin), body.clone())
            .await;
        assert_eq!(code, 400, "{body}: {got}");
        assert!(
            got["message"].as_str().unwrap().contains(want),
            "{body}: {got}"
        );
    }
    n.token("dup", "viewer", &[], "").await;
    let (code, got) = n
        .http(
            "POST",
            "/v1/tokens",
            Some(&n.admin),
            json!({"name": "dup", "role": "admin"}),
        )
        .await;
    assert_eq!(code, 409, "{got}");
    let (_, list) = n
        .http("GET", "/v1/tokens", Some(&n.admin), Value::Null)
        .await;
    let dup = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "dup")
        .unwrap();
    assert_eq!(dup["role"], "viewer", "nothing changed: {list}");
}

#[test]
fn auth_none_is_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("STEWARD_AUTH".to_owned(), "none".to_owned())];
    let err = node::config::load(dir.path(), None, Some("0.0.0.0:7420"), &env).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("loopback") && msg.contains("auth"), "{msg}");
    node::config::load(dir.path(), None, Some("127.0.0.1:7420"), &env).unwrap();
    node::config::load(dir.path(), None, Some("[::1]:7420"), &env).unwrap();
    // Tokens (the default) may listen anywhere.
    node::config::load(dir.path(), None, Some("0.0.0.0:7420"), &[]).unwrap();
}

/// Two nodes on one PostgreSQL database: a token created through one works on the other, and
/// a token revoked through one is refused by the other within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_on_one_node_is_refused_by_another_within_a_second() {
    let pg = store_postgres::testing::PgServer::start().await;
    let url = pg.fresh_db().await;
    let start = |dir: &std::path::Path| {
        std::fs::write(dir.join("policies.toml"), POLICIES).unwrap();
        let env = [
            ("STEWARD_DATABASE".to_owned(), url.clone()),
            ("STEWARD_ESTOP_SOURCE".to_owned(), "file".to_owned()),
        ];
        let cfg = node::config::load(dir, None, Some("127.0.0.1:0"), &env).unwrap();
        node::Node::start(cfg, None)
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path()).await.unwrap();
    let b = start(db.path()).await.unwrap();
    let admin_a = std::fs::read_to_string(da.path().join(node::ADMIN_TOKEN_FILE)).unwrap();
    let admin_b = std::fs::read_to_string(db.path().join(node::ADMIN_TOKEN_FILE)).unwrap();
    assert_ne!(
        admin_a, admin_b,
        "each data directory gets its own admin token"
    );
    let channel = |addr: std::net::SocketAddr| {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy()
    };
    let (ca, cb) = (channel(a.addr()), channel(b.addr()));
    let secret = AdminClient::new(ca.clone())
        .create_token(req(
            pb::CreateTokenRequest {
                name: "ci".into(),
                role: "viewer".into(),
                ..Default::default()
            },
            Some(admin_a.trim()),
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let list_on_b = || {
        let mut c = StewardClient::new(cb.clone());
        let r = req(pb::ListRequest::default(), Some(&secret));
        async move { c.list(r).await.map(|_| ()) }
    };
    list_on_b().await.unwrap();
    let names: Vec<String> = AdminClient::new(cb.clone())
        .list_tokens(req(pb::ListTokensRequest {}, Some(admin_b.trim())))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.contains(&"admin".to_owned()) && names.contains(&"ci".to_owned()));

    AdminClient::new(ca)
        .revoke_token(req(
            pb::RevokeTokenRequest { name: "ci".into() },
            Some(admin_a.trim()),
        ))
        .await
        .unwrap();
    let revoked = std::time::Instant::now();
    loop {
        match list_on_b().await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            other => assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "node B still takes the revoked token after {:?}: {other:?}",
                revoked.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A flood of bad tokens cannot grow the access log without bound: at most
/// `MAX_REFUSALS_LOGGED` refusals a second are written one by one, and the rest as a count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_is_logged_as_a_count() {
    let n = node().await;
    let flood = 3 * api::auth::MAX_REFUSALS_LOGGED;
    let started = std::time::Instant::now();
    for _ in 0..flood {
        let err = n
            .steward()
            .list(req(pb::ListRequest::default(), Some("stw_guess")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let took = started.elapsed();
    // The count is written once the flood's last second has passed, with no refusal after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (one_by_one, counted) = loop {
        let log = n
            .admin_client()
            .access_log(req(pb::AccessLogRequest { limit: 1000 }, Some(&n.admin)))
            .await
            .unwrap()
            .into_inner()
            .records;
        let one_by_one = log.iter().filter(|a| a.call == "Authenticate").count();
        let counted: u64 = log
            .iter()
            .filter(|a| a.call == "Refusals")
            .map(|a| a.detail.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        if one_by_one as u64 + counted == u64::from(flood) || std::time::Instant::now() > deadline {
            break (one_by_one, counted);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seconds = u32::try_from(took.as_secs()).unwrap() + 2;
    assert!(
        one_by_one <= (seconds * api::auth::MAX_REFUSALS_LOGGED) as usize,
        "{one_by_one} refusals logged one by one in {took:?}"
    );
    assert_eq!(
        one_by_one as u64 + counted,
        u64::from(flood),
        "every refusal is logged or counted"
    );
}
