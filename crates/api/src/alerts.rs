//! Alerts that pull the e-stop (docs/operating.md, Alerts): `POST /v1/alerts/alertmanager`
//! takes Prometheus Alertmanager's webhook payload. A firing alert labelled
//! `steward_estop=TARGET` and `steward_state=stop|pause` sets that entry, with the alert's
//! name, summary and fingerprint as the reason, as the token Alertmanager sends (give it the
//! responder role: it can stop, never release). A resolved alert changes nothing: a person
//! restores.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Extension, State};
use domain::auth::Call;
use domain::estop::{EStopState, Snapshot, Target};
use proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::auth::Caller;
use crate::service::{ApiError, Service};

/// The label naming the e-stop target an alert stops.
pub const TARGET_LABEL: &str = "steward_estop";
/// The label naming the state it sets (`stop` or `pause`).
pub const STATE_LABEL: &str = "steward_state";
/// The source recorded in the audit trail for entries set by alerts.
pub const ALERTMANAGER_SOURCE: &str = "alertmanager";
/// Alerts read from one payload.
pub const MAX_ALERTS: usize = 1000;

/// Alertmanager's webhook payload: the fields Steward reads (the rest are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct Payload {
    #[serde(default)]
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Alert {
    /// `firing` or `resolved`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub fingerprint: String,
}

/// What became of each alert.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    /// Entries set.
    pub applied: Vec<Applied>,
    /// Entries already in that state: nothing written (Alertmanager repeats firing alerts).
    pub unchanged: Vec<Applied>,
    /// Alerts that change nothing, and why.
    pub ignored: Vec<Ignored>,
}

#[derive(Debug, Serialize)]
pub struct Applied {
    pub alert: String,
    pub fingerprint: String,
    pub target: String,
    pub state: String,
}

#[derive(Debug, Serialize)]
pub struct Ignored {
    pub alert: String,
    pub fingerprint: String,
    pub why: String,
}

impl Alert {
    fn name(&self) -> String {
        self.labels.get("alertname").cloned().unwrap_or_default()
    }

    /// The entry this alert asks for, or why it asks for none.
    fn wants(&self) -> Result<(Target, EStopState), String> {
        let target = self
            .labels
            .get(TARGET_LABEL)
            .ok_or_else(|| format!("no {TARGET_LABEL} label: not an alert for Steward"))?;
        if self.status != "firing" {
            return Err(format!(
                "{}: only firing alerts stop; a person restores",
                if self.status.is_empty() {
                    "no status"
                } else {
                    self.status.as_str()
                }
            ));
        }
        let target: Target = target
            .parse()
            .map_err(|e: String| format!("{TARGET_LABEL}: {e}"))?;
        let state = match self.labels.get(STATE_LABEL).map(String::as_str) {
            Some("stop") => EStopState::Stop,
            Some("pause") => EStopState::Pause,
            Some(other) => {
                return Err(format!(
                    "{STATE_LABEL} is {}: an alert may set stop or pause, never release",
                    domain::limits::clip(other)
                ));
            }
            None => return Err(format!("no {STATE_LABEL} label (stop or pause)")),
        };
        Ok((target, state))
    }

    /// The reason recorded: the alert's name, summary and fingerprint.
    fn reason(&self) -> String {
        let summary = self
            .annotations
            .get("summary")
            .or_else(|| self.annotations.get("description"))
            .map(String::as_str)
            .unwrap_or("");
        let mut r = format!("alert {}", self.name());
        if !summary.is_empty() {
            r.push_str(": ");
            r.push_str(summary);
        }
        r.push_str(&format!(" (fingerprint {})", self.fingerprint));
        if r.len() > domain::limits::MAX_REASON_LEN {
            let mut end = domain::limits::MAX_REASON_LEN - 3;
            while !r.is_char_boundary(end) {
                end -= 1;
            }
            r.truncate(end);
            r.push_str("...");
        }
        r
    }
}

impl Service {
    /// Applies an Alertmanager payload. The caller must be allowed to stop (responder, operator,
    /// admin), or nothing is read; each entry is then set as through `EStopSet`, within the
    /// caller's scope.
    pub async fn alertmanager(&self, caller: &Caller, p: Payload) -> Result<Outcome, ApiError> {
        self.authorize(
            caller,
            &Call::EStopSet {
                state: EStopState::Stop,
            },
            "alertmanager",
        )?;
        if p.alerts.len() > MAX_ALERTS {
            return Err(ApiError::new(
                tonic::Code::InvalidArgument,
                format!(
                    "alerts: {} in one payload; the limit is {MAX_ALERTS} (Alertmanager's max_alerts)",
                    p.alerts.len()
                ),
            ));
        }
        let mut out = Outcome::default();
        for alert in &p.alerts {
            let (target, state) = match alert.wants() {
                Ok(w) => w,
                Err(why) => {
                    out.ignored.push(Ignored {
                        alert: alert.name(),
                        fingerprint: alert.fingerprint.clone(),
                        why,
                    });
                    continue;
                }
            };
            let state = self.not_weaker(&target, state);
            let applied = Applied {
                alert: alert.name(),
                fingerprint: alert.fingerprint.clone(),
                target: target.to_string(),
                state: state.to_string(),
            };
            if self.in_force(&target, state) {
                out.unchanged.push(applied);
                continue;
            }
            let req = pb::EStopSetRequest {
                target: target.to_string(),
                state: state.to_string(),
                reason: alert.reason(),
            };
            match self.estop_set_from(caller, req, ALERTMANAGER_SOURCE).await {
                Ok(_) => out.applied.push(applied),
                Err(e) if e.code == tonic::Code::PermissionDenied => {
                    out.ignored.push(Ignored {
                        alert: alert.name(),
                        fingerprint: alert.fingerprint.clone(),
                        why: e.message,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// `state`, or `estop_unlisted` where that is stricter and would be what the target's runs
    /// get now (no entry for the target, none for `*`): an alert's `pause` there is recorded
    /// as `stop`, so that its runs stay stopped, even once a `*` entry is added, rather than
    /// being refused as a release and lost.
    fn not_weaker(&self, target: &Target, state: EStopState) -> EStopState {
        let Some(h) = self.estop.as_ref() else {
            return state;
        };
        match &*h.snapshot() {
            Snapshot::Ok(list) => list
                .unlisted_for(target, h.unlisted())
                .map_or(state, |unlisted| unlisted.max(state)),
            Snapshot::Unreadable(_) => state,
        }
    }

    /// Whether the target's entry is already this state or a stricter one: a `pause` alert
    /// never weakens a person's `stop`.
    fn in_force(&self, target: &Target, state: EStopState) -> bool {
        self.estop.as_ref().is_some_and(|h| match &*h.snapshot() {
            Snapshot::Ok(list) => list.get(target).is_some_and(|e| e.state >= state),
            Snapshot::Unreadable(_) => false,
        })
    }
}

/// `POST /v1/alerts/alertmanager`.
pub(crate) async fn alertmanager(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    // Who may not stop is refused before the body is read.
    if let Err(e) = st.service.authorize(
        &who,
        &Call::EStopSet {
            state: EStopState::Stop,
        },
        "alertmanager",
    ) {
        return e.into_response();
    }
    let body =
        match <crate::http::Text as axum::extract::FromRequest<_>>::from_request(req, &st).await {
            Ok(crate::http::Text(body)) => body,
            Err(refused) => return refused,
        };
    let p: Payload = match serde_json::from_str(&body) {
        Ok(p) => p,
        Err(e) => {
            return ApiError::new(
                tonic::Code::InvalidArgument,
                format!("not an Alertmanager webhook payload: {e}"),
            )
            .into_response();
        }
    };
    st.service
        .alertmanager(&who, p)
        .await
        .map(Json)
        .into_response()
}
