//! The emergency-stop list (docs/operating.md, The emergency stop): targets, states, and how a run's effective state
//! is decided. Pure: the sources that load and watch the list live in crate `estop`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// What an entry selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Every run.
    All,
    /// Runs of one workflow name.
    Workflow(String),
    /// Runs whose labels contain `key=value`.
    Label { key: String, value: String },
}

impl Target {
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Target::All => true,
            Target::Workflow(n) => n == name,
            Target::Label { key, value } => labels.get(key) == Some(value),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::All => f.write_str("*"),
            Target::Workflow(n) => f.write_str(n),
            Target::Label { key, value } => write!(f, "{key}={value}"),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    /// `*`, a workflow name, or `key=value`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        crate::limits::check_len("target", s, crate::limits::MAX_ESTOP_TARGET_LEN)?;
        if s == "*" {
            return Ok(Target::All);
        }
        if s.is_empty() {
            return Err("target must not be empty: use a workflow name, key=value, or *".into());
        }
        if let Some((k, v)) = s.split_once('=') {
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                return Err(format!(
                    "target {s:?}: a label selector needs both a key and a value (key=value)"
                ));
            }
            if !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
            {
                return Err(format!(
                    "target {s:?}: label key {k:?} may hold only letters, digits, '_', '-', '.' and '/'"
                ));
            }
            return Ok(Target::Label {
                key: k.to_owned(),
                value: v.to_owned(),
            });
        }
        if s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            Ok(Target::Workflow(s.to_owned()))
        } else {
            Err(format!(
                "target {s:?} is not a workflow name, a key=value label selector, or *"
            ))
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Ordered from least to most restrictive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EStopState {
    Go,
    Pause,
    Stop,
}

impl EStopState {
    pub fn as_str(self) -> &'static str {
        match self {
            EStopState::Go => "go",
            EStopState::Pause => "pause",
            EStopState::Stop => "stop",
        }
    }
}

impl fmt::Display for EStopState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EStopState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "go" => Ok(EStopState::Go),
            "pause" => Ok(EStopState::Pause),
            "stop" => Ok(EStopState::Stop),
            other => Err(format!(
                "state {} is not one of: go, pause, stop",
                crate::limits::clip(other)
            )),
        }
    }
}

/// One line of the list. `reason`, `set_by`, `set_at` may be missing in hand edits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub target: Target,
    pub state: EStopState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub set_by: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub set_at: String,
}

/// The whole list, as the JSON file holds it: `{"entries": [...]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EStopList {
    #[serde(default)]
    pub entries: Vec<Entry>,
}

/// Why a run is in its effective state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Because {
    /// The most restrictive matching entry.
    Entry { entry: Entry },
    /// No entry matched: the configured default applies (fail closed: `stop`).
    Unlisted,
    /// The list could not be read: everything stops.
    Unreadable { error: String },
}

/// A run's effective e-stop state and the reason for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub state: EStopState,
    pub because: Because,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.because {
            Because::Entry { entry } => {
                write!(
                    f,
                    "e-stop entry {:?} is {}",
                    entry.target.to_string(),
                    entry.state
                )?;
                if !entry.set_by.is_empty() {
                    write!(f, ", set by {}", entry.set_by)?;
                }
                if !entry.set_at.is_empty() {
                    write!(f, " at {}", entry.set_at)?;
                }
                if entry.reason.is_empty() {
                    f.write_str(" (no reason given)")
                } else {
                    write!(f, ": {}", entry.reason)
                }
            }
            Because::Unlisted => write!(
                f,
                "no e-stop entry matches this run, and unlisted runs are {} (fail closed); add an entry with state go",
                self.state
            ),
            Because::Unreadable { error } => {
                write!(
                    f,
                    "the e-stop list cannot be read, so everything is stopped: {error}"
                )
            }
        }
    }
}

/// The list as the engine sees it at one moment: readable or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Snapshot {
    Ok(EStopList),
    Unreadable(String),
}

impl Snapshot {
    /// The most restrictive matching entry wins; ties go to the earliest entry. Unlisted runs
    /// get `unlisted`; an unreadable list stops everything.
    pub fn verdict(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        unlisted: EStopState,
    ) -> Verdict {
        let list = match self {
            Snapshot::Ok(l) => l,
            Snapshot::Unreadable(e) => {
                return Verdict {
                    state: EStopState::Stop,
                    because: Because::Unreadable { error: e.clone() },
                };
            }
        };
        let mut best: Option<&Entry> = None;
        for e in list
            .entries
            .iter()
            .filter(|e| e.target.matches(name, labels))
        {
            if best.is_none_or(|b| e.state > b.state) {
                best = Some(e);
            }
        }
        match best {
            Some(e) => Verdict {
                state: e.state,
                because: Because::Entry { entry: e.clone() },
            },
            None => Verdict {
                state: unlisted,
                because: Because::Unlisted,
            },
        }
    }
}

impl EStopList {
    /// Parses the JSON file format, naming the entry of any problem. Duplicate targets are
    /// refused: each target has one state.
    pub fn parse(text: &str) -> Result<EStopList, String> {
        // An object, nothing else: serde would take `[]` or `[[]]` for a struct's fields.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a valid e-stop list: {e}"))?;
        if !value.is_object() {
            return Err(format!(
                "not a valid e-stop list: the file must hold a JSON object {{\"entries\": [...]}}, not {}",
                match value {
                    serde_json::Value::Array(_) => "a list",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            ));
        }
        let list: EStopList =
            serde_json::from_value(value).map_err(|e| format!("not a valid e-stop list: {e}"))?;
        list.check()?;
        Ok(list)
    }

    pub fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, e) in self.entries.iter().enumerate() {
            if !seen.insert(&e.target) {
                return Err(format!("entries[{i}].target: {} is listed twice", e.target));
            }
            if !e.set_at.is_empty() && Timestamp::parse_rfc3339(&e.set_at).is_none() {
                return Err(format!(
                    "entries[{i}].set_at: {:?} is not an RFC 3339 time",
                    e.set_at
                ));
            }
        }
        Ok(())
    }

    pub fn get(&self, target: &Target) -> Option<&Entry> {
        self.entries.iter().find(|e| &e.target == target)
    }

    /// `unlisted`, when it is what some of `target`'s runs get now: the target has no entry and
    /// no `*` entry covers everything, so its runs that match no other entry fall to it. An
    /// entry for `target` less strict than that would release them.
    pub fn unlisted_for(&self, target: &Target, unlisted: EStopState) -> Option<EStopState> {
        (self.get(target).is_none() && self.get(&Target::All).is_none()).then_some(unlisted)
    }

    /// Sets (or replaces) the entry for `entry.target`; returns the entry it replaced.
    pub fn set(&mut self, entry: Entry) -> Option<Entry> {
        match self.entries.iter_mut().find(|e| e.target == entry.target) {
            Some(old) => Some(std::mem::replace(old, entry)),
            None => {
                self.entries.push(entry);
                None
            }
        }
    }

    /// Removes the entry for `target`; returns it.
    pub fn clear(&mut self, target: &Target) -> Option<Entry> {
        let i = self.entries.iter().position(|e| &e.target == target)?;
        Some(self.entries.remove(i))
    }
}

/// One change to the list, for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at: String,
    pub target: Target,
    /// `None`: there was no entry.
    pub old_state: Option<EStopState>,
    /// `None`: the entry was cleared.
    pub new_state: Option<EStopState>,
    pub set_by: String,
    pub reason: String,
    /// Where the change came from: `api`, `file` (a hand edit), `error_budget`...
    pub source: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(t: &str, s: EStopState) -> Entry {
        Entry {
            target: t.parse().unwrap(),
            state: s,
            reason: String::new(),
            set_by: String::new(),
            set_at: String::new(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn targets_parse_and_match() {
        let aap = labels(&[("site", "aap")]);
        assert!("*".parse::<Target>().unwrap().matches("X", &aap));
        assert!("X".parse::<Target>().unwrap().matches("X", &aap));
        assert!(!"Y".parse::<Target>().unwrap().matches("X", &aap));
        assert!("site=aap".parse::<Target>().unwrap().matches("X", &aap));
        assert!(!"site=bbb".parse::<Target>().unwrap().matches("X", &aap));
        for bad in ["", "site=", "=aap", "a b", "si te=aap"] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_most_restrictive_entry_wins_and_unlisted_fails_closed() {
        let list = EStopList {
            entries: vec![
                entry("*", EStopState::Go),
                entry("site=aap", EStopState::Pause),
                entry("Erase", EStopState::Stop),
            ],
        };
        let snap = Snapshot::Ok(list);
        let aap = labels(&[("site", "aap")]);
        assert_eq!(
            snap.verdict("Other", &aap, EStopState::Stop).state,
            EStopState::Pause
        );
        assert_eq!(
            snap.verdict("Erase", &aap, EStopState::Stop).state,
            EStopState::Stop
        );
        assert_eq!(
            snap.verdict("Other", &labels(&[]), EStopState::Stop).state,
            EStopState::Go
        );

        let empty = Snapshot::Ok(EStopList::default());
        let v = empty.verdict("Other", &aap, EStopState::Stop);
        assert_eq!((v.state, v.because), (EStopState::Stop, Because::Unlisted));
        assert_eq!(
            empty.verdict("Other", &aap, EStopState::Go).state,
            EStopState::Go
        );

        let broken = Snapshot::Unreadable("bad json".into());
        assert_eq!(
            broken.verdict("Other", &aap, EStopState::Go).state,
            EStopState::Stop
        );
    }

    #[test]
    fn the_file_format_parses_and_rejects_bad_entries() {
        let list = EStopList::parse(
            r#"{"entries": [{"target": "site=aap", "state": "stop", "reason": "INC-42", "set_by": "ana", "set_at": "2026-11-21T10:00:00Z"},
                            {"target": "*", "state": "go"}]}"#,
        )
        .unwrap();
        assert_eq!(list.entries.len(), 2);
        for (bad, want) in [
            ("{", "not a valid"),
            (r#"{"entries": [{"target": "*", "state": "halt"}]}"#, "halt"),
            (r#"{"entries": [{"target": "a b", "state": "go"}]}"#, "a b"),
            (
                r#"{"entries": [{"target": "*", "state": "go"}, {"target": "*", "state": "stop"}]}"#,
                "listed twice",
            ),
            (
                r#"{"entries": [{"target": "*", "state": "go", "set_at": "yesterday"}]}"#,
                "entries[0].set_at",
            ),
            (
                r#"{"entries": [{"target": "*", "state": "go", "colour": "red"}]}"#,
                "colour",
            ),
            (r#"{"entrys": []}"#, "entrys"),
        ] {
            let err = EStopList::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
