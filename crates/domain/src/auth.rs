//! Who may do what: roles, the calls each allows, and the scopes that narrow a token to some
//! workflows and labels. Pure: tokens are stored by `store`, checked by `api`.
//!
//! | call | viewer | submitter | responder | operator | admin |
//! |---|---|---|---|---|---|
//! | Status, List, Watch, Validate, schedules, e-stop list and audit | Y | Y | Y | Y | Y |
//! | Submit, Exec, Clone; Cancel of its own runs | – | Y | – | Y | Y |
//! | Schedules: create, update, trigger, backfill | – | Y | – | Y | Y |
//! | Cancel any run; schedules: pause, resume, delete | – | – | – | Y | Y |
//! | E-stop `stop` / `pause` | – | – | Y | Y | Y |
//! | E-stop `go` / clear | – | – | – | Y | Y |
//! | Tokens, the access log, pruning runs | – | – | – | – | Admin |

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::estop::{EStopState, Target};

/// What a token may do; each role may do all a viewer may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Submitter,
    /// A first responder, an alerting system: may pull the cord, not release it.
    Responder,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Submitter,
        Role::Responder,
        Role::Operator,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Responder => "responder",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may make `call`.
    pub fn allows(self, call: &Call) -> bool {
        use Role::*;
        match call {
            Call::Status | Call::List | Call::Watch | Call::Validate | Call::ScheduleRead => true,
            Call::ScheduleWrite => matches!(self, Submitter | Operator | Admin),
            Call::ScheduleControl => matches!(self, Operator | Admin),
            Call::EStopList | Call::EStopAudit => true,
            Call::Submit | Call::Exec | Call::Clone => matches!(self, Submitter | Operator | Admin),
            Call::Cancel { own: true } => matches!(self, Submitter | Operator | Admin),
            Call::Cancel { own: false } => matches!(self, Operator | Admin),
            Call::EStopSet {
                state: EStopState::Stop | EStopState::Pause,
            } => matches!(self, Responder | Operator | Admin),
            Call::EStopSet {
                state: EStopState::Go,
            }
            | Call::EStopClear => matches!(self, Operator | Admin),
            Call::Tokens | Call::AccessLog | Call::Prune => self == Admin,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "role {:?} is not one of: viewer, submitter, responder, operator, admin",
                    crate::limits::clip(s)
                )
            })
    }
}

/// A call as the role table sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Status,
    List,
    Watch,
    Validate,
    EStopList,
    EStopAudit,
    Submit,
    Exec,
    Clone,
    /// `own`: the run was submitted by the caller's token.
    Cancel {
        own: bool,
    },
    EStopSet {
        state: EStopState,
    },
    EStopClear,
    /// Listing and showing schedules.
    ScheduleRead,
    /// Creating, updating, triggering and backfilling a schedule.
    ScheduleWrite,
    /// Pausing, resuming and deleting a schedule.
    ScheduleControl,
    /// Creating, listing and revoking tokens.
    Tokens,
    AccessLog,
    /// Deleting finished runs by hand.
    Prune,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Status => f.write_str("Status"),
            Call::List => f.write_str("List"),
            Call::Watch => f.write_str("Watch"),
            Call::Validate => f.write_str("Validate"),
            Call::EStopList => f.write_str("EStopList"),
            Call::EStopAudit => f.write_str("EStopAudit"),
            Call::Submit => f.write_str("Submit"),
            Call::Exec => f.write_str("Exec"),
            Call::Clone => f.write_str("Clone"),
            Call::Cancel { own: true } => f.write_str("Cancel of its own run"),
            Call::Cancel { own: false } => f.write_str("Cancel of another's run"),
            Call::EStopSet { state } => write!(f, "EStopSet {state}"),
            Call::EStopClear => f.write_str("EStopClear"),
            Call::ScheduleRead => f.write_str("ScheduleRead"),
            Call::ScheduleWrite => f.write_str("ScheduleWrite"),
            Call::ScheduleControl => f.write_str("ScheduleControl"),
            Call::Tokens => f.write_str("Tokens"),
            Call::AccessLog => f.write_str("AccessLog"),
            Call::Prune => f.write_str("Prune"),
        }
    }
}

/// What narrows a token: the workflow names it may act on (any, when empty) and label
/// selectors the runs must carry (a key given more than once: any of its values).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workflows: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, Vec<String>>,
}

impl Scope {
    /// No narrowing: everything the role allows.
    pub fn is_unlimited(&self) -> bool {
        self.workflows.is_empty() && self.labels.is_empty()
    }

    /// Adds `workflow=NAME` or `LABEL=VALUE`, as `--scope` takes it.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        let (k, v) = text
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| {
                format!(
                    "scope {:?}: expected workflow=NAME or LABEL=VALUE",
                    crate::limits::clip(text)
                )
            })?;
        crate::limits::check_len("scope", text, crate::limits::MAX_ESTOP_TARGET_LEN)?;
        if k == "workflow" {
            self.workflows.push(v.to_owned());
        } else {
            self.labels
                .entry(k.to_owned())
                .or_default()
                .push(v.to_owned());
        }
        Ok(())
    }

    /// Whether a run of workflow `name` with `labels` is inside the scope.
    pub fn covers_run(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.workflows.is_empty() || self.workflows.iter().any(|w| w == name))
            && self
                .labels
                .iter()
                .all(|(k, vs)| labels.get(k).is_some_and(|v| vs.contains(v)))
    }

    /// Whether an e-stop entry on `target` is inside the scope: every run it selects must be.
    /// A scoped token may set `site=aap` when scoped to `site=aap`, never `*`.
    pub fn covers_target(&self, target: &Target) -> bool {
        if self.is_unlimited() {
            return true;
        }
        match target {
            Target::All => false,
            Target::Workflow(w) => self.labels.is_empty() && self.workflows.contains(w),
            Target::Label { key, value } => {
                self.workflows.is_empty()
                    && self.labels.len() == 1
                    && self.labels.get(key).is_some_and(|vs| vs.contains(value))
            }
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("*");
        }
        let mut parts: Vec<String> = self
            .workflows
            .iter()
            .map(|w| format!("workflow={w}"))
            .collect();
        for (k, vs) in &self.labels {
            parts.extend(vs.iter().map(|v| format!("{k}={v}")));
        }
        f.write_str(&parts.join(","))
    }
}

/// The caller of a call, once its token is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's name: the actor recorded for everything it does.
    pub name: String,
    pub role: Role,
    pub scope: Scope,
}

impl Principal {
    /// The refusal of `call`, if the role does not allow it.
    pub fn check(&self, call: &Call) -> Result<(), String> {
        if self.role.allows(call) {
            Ok(())
        } else {
            Err(format!(
                "token {:?} has role {}, which may not call {call}",
                self.name, self.role
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_role_table() {
        use EStopState::*;
        let calls = [
            (Call::Status, "VSROA"),
            (Call::List, "VSROA"),
            (Call::Watch, "VSROA"),
            (Call::Validate, "VSROA"),
            (Call::EStopList, "VSROA"),
            (Call::EStopAudit, "VSROA"),
            (Call::Submit, "S OA"),
            (Call::Exec, "S OA"),
            (Call::Clone, "S OA"),
            (Call::Cancel { own: true }, "S OA"),
            (Call::Cancel { own: false }, "OA"),
            (Call::EStopSet { state: Stop }, "ROA"),
            (Call::EStopSet { state: Pause }, "ROA"),
            (Call::EStopSet { state: Go }, "OA"),
            (Call::EStopClear, "OA"),
            (Call::ScheduleRead, "VSROA"),
            (Call::ScheduleWrite, "S OA"),
            (Call::ScheduleControl, "OA"),
            (Call::Tokens, "A"),
            (Call::AccessLog, "A"),
            (Call::Prune, "A"),
        ];
        for (call, allowed) in calls {
            for role in Role::ALL {
                let letter = role.as_str().chars().next().unwrap().to_ascii_uppercase();
                assert_eq!(
                    role.allows(&call),
                    allowed.contains(letter),
                    "{role} × {call}"
                );
            }
        }
    }

    #[test]
    fn roles_parse_and_refuse_unknown_ones() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        let err = "root".parse::<Role>().unwrap_err();
        assert!(err.contains("not one of"), "{err}");
    }

    #[test]
    fn scopes_narrow_runs_and_estop_targets() {
        let mut ci = Scope::default();
        ci.add("workflow=deploy").unwrap();
        assert!(ci.covers_run("deploy", &labels(&[])));
        assert!(!ci.covers_run("SatelliteDiskErase", &labels(&[])));
        assert!(ci.covers_target(&Target::Workflow("deploy".into())));
        assert!(!ci.covers_target(&Target::All));

        let mut site = Scope::default();
        site.add("site=aap").unwrap();
        site.add("site=ams").unwrap();
        assert!(site.covers_run("erase", &labels(&[("site", "ams")])));
        assert!(!site.covers_run("erase", &labels(&[("site", "fra")])));
        assert!(!site.covers_run("erase", &labels(&[])));
        assert!(site.covers_target(&"site=aap".parse().unwrap()));
        assert!(!site.covers_target(&"site=fra".parse().unwrap()));
        assert!(!site.covers_target(&Target::All));
        assert!(!site.covers_target(&Target::Workflow("erase".into())));
        assert_eq!(site.to_string(), "site=aap,site=ams");

        assert!(Scope::default().covers_target(&Target::All));
        for bad in ["", "workflow", "=x", "site="] {
            assert!(Scope::default().add(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_refusal_names_the_token_the_role_and_the_call() {
        let p = Principal {
            name: "ci".into(),
            role: Role::Viewer,
            scope: Scope::default(),
        };
        let err = p.check(&Call::Submit).unwrap_err();
        assert_eq!(
            err,
            "token \"ci\" has role viewer, which may not call Submit"
        );
        assert!(p.check(&Call::Status).is_ok());
    }
}
