//! Workflow specs (docs/workflows.md): one schema for YAML, JSON and the protobuf `WorkReq`.
//!
//! Parsing and structural validation live here; each action checks its own `args`
//! (crate `actions`), and policies check the rest at submit.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The names of the built-in actions (`actions` implements them; policies may name only these).
pub const ACTIONS: &[&str] = &[
    "shell",
    "http",
    "write_file",
    "sleep",
    "token_bucket",
    "noop",
];

pub const MAX_NAME_LEN: usize = 128;
pub const MAX_DESC_LEN: usize = 4096;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
pub const MAX_BLOCKS: usize = 1_000;
pub const MAX_JOBS_PER_BLOCK: usize = 10_000;
pub const MAX_JOBS: usize = 100_000;
pub const MAX_CONCURRENCY: u32 = 10_000;
pub const MAX_RETRY_ATTEMPTS: u32 = 100;
pub const MAX_SPEC_BYTES: usize = 8 * 1024 * 1024;

/// A workflow: blocks run one after another; the jobs of a block run concurrently.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowSpec {
    /// The workflow *type*: policies and e-stop entries key on it.
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub desc: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub blocks: Vec<BlockSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockSpec {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub desc: String,
    /// Max jobs of this block running at once.
    pub concurrency: u32,
    /// Error budget: failures beyond this fail the block.
    pub max_failures: u32,
    pub jobs: Vec<JobSpec>,
}

impl Default for BlockSpec {
    fn default() -> Self {
        BlockSpec {
            desc: String::new(),
            concurrency: 1,
            max_failures: 0,
            jobs: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSpec {
    pub action: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub desc: String,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub args: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySpec {
    /// Total attempts, the first one included.
    pub attempts: u32,
    pub initial_backoff: HumanDuration,
    pub max_backoff: HumanDuration,
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec {
            attempts: 1,
            initial_backoff: HumanDuration(Duration::from_secs(1)),
            max_backoff: HumanDuration(Duration::from_secs(60)),
        }
    }
}

impl RetrySpec {
    /// Backoff before attempt `next_attempt` (2-based: the first retry is attempt 2).
    pub fn backoff_before(&self, next_attempt: u32) -> Duration {
        let exp = next_attempt.saturating_sub(2).min(30);
        let d = self.initial_backoff.0.saturating_mul(1u32 << exp);
        d.min(self.max_backoff.0)
    }
}

/// A duration written the human way (`1s`, `10m`, `1h30m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<HumanDuration, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|_| {
                format!(
                    "invalid duration {s:?}: expected a number and a unit, such as 30s, 10m or 1h"
                )
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&humantime::format_duration(self.0), f)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One problem with a spec, at a field path such as `blocks[1].jobs[0].args.argv`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a spec, in document order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecError(pub Vec<FieldError>);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl WorkflowSpec {
    /// Parses a YAML or JSON document (JSON is YAML) and checks its structure.
    pub fn parse(text: &str) -> Result<WorkflowSpec, SpecError> {
        let spec = WorkflowSpec::parse_unchecked(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a YAML or JSON document without the structural checks, so that a caller can run
    /// every check at once (`actions::validate_spec`) and report every problem together.
    pub fn parse_unchecked(text: &str) -> Result<WorkflowSpec, SpecError> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(SpecError(vec![FieldError::new(
                "spec",
                format!("is {} bytes; the limit is {MAX_SPEC_BYTES}", text.len()),
            )]));
        }
        crate::limits::check_depth(text, crate::limits::MAX_SPEC_DEPTH)
            .map_err(|e| SpecError(vec![FieldError::new("spec", e)]))?;
        let value: serde_json::Value = serde_norway::from_str(text).map_err(|e| {
            SpecError(vec![FieldError::new(
                "spec",
                format!("not valid YAML or JSON: {e}"),
            )])
        })?;
        // The text's nesting is checked above; YAML's aliases (`*a`, repeating what `&a`
        // marks) nest more than the text shows.
        crate::limits::check_value_depth(&value, crate::limits::MAX_SPEC_DEPTH)
            .map_err(|e| SpecError(vec![FieldError::new("spec", e)]))?;
        WorkflowSpec::from_value(value)
    }

    /// Builds a spec from a JSON value, naming the field of any type error. Does not validate.
    pub fn from_value(value: serde_json::Value) -> Result<WorkflowSpec, SpecError> {
        if !value.is_object() {
            return Err(SpecError(vec![FieldError::new(
                "spec",
                "must be a mapping with at least `name` and `blocks`",
            )]));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { "spec".to_owned() } else { path };
            SpecError(vec![FieldError::new(path, e.into_inner().to_string())])
        })
    }

    pub fn job_count(&self) -> usize {
        self.blocks.iter().map(|b| b.jobs.len()).sum()
    }

    /// Structural checks: what every spec must satisfy whatever its actions.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut errs = Vec::new();
        self.validate_into(&mut errs);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(SpecError(errs))
        }
    }

    pub fn validate_into(&self, errs: &mut Vec<FieldError>) {
        let mut err = |p: String, m: String| errs.push(FieldError::new(p, m));
        if self.name.is_empty() {
            err("name".into(), "required".into());
        } else if let Some(m) = check_name(&self.name) {
            err("name".into(), m);
        }
        if self.desc.len() > MAX_DESC_LEN {
            err(
                "desc".into(),
                format!("is {} bytes; the limit is {MAX_DESC_LEN}", self.desc.len()),
            );
        }
        if self.labels.len() > MAX_LABELS {
            err(
                "labels".into(),
                format!(
                    "has {} entries; the limit is {MAX_LABELS}",
                    self.labels.len()
                ),
            );
        }
        for (k, v) in &self.labels {
            if let Some(m) = check_label_key(k) {
                err(format!("labels.{k}"), m);
            }
            if v.len() > MAX_LABEL_VALUE_LEN {
                err(
                    format!("labels.{k}"),
                    format!(
                        "value is {} bytes; the limit is {MAX_LABEL_VALUE_LEN}",
                        v.len()
                    ),
                );
            } else if v.chars().any(|c| c.is_control()) {
                err(
                    format!("labels.{k}"),
                    "value must not contain control characters".into(),
                );
            }
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() {
                err(
                    "idempotency_key".into(),
                    "must not be empty when given".into(),
                );
            } else if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
                err(
                    "idempotency_key".into(),
                    format!(
                        "is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY_LEN}",
                        key.len()
                    ),
                );
            } else if key.chars().any(|c| c.is_control()) {
                err(
                    "idempotency_key".into(),
                    "must not contain control characters".into(),
                );
            }
        }
        if self.blocks.is_empty() {
            err("blocks".into(), "required: at least one block".into());
        }
        if self.blocks.len() > MAX_BLOCKS {
            err(
                "blocks".into(),
                format!(
                    "has {} blocks; the limit is {MAX_BLOCKS}",
                    self.blocks.len()
                ),
            );
        }
        let total = self.job_count();
        if total > MAX_JOBS {
            err(
                "blocks".into(),
                format!("have {total} jobs in all; the limit is {MAX_JOBS}"),
            );
        }
        for (bi, b) in self.blocks.iter().enumerate() {
            let bp = format!("blocks[{bi}]");
            if b.jobs.is_empty() {
                err(format!("{bp}.jobs"), "required: at least one job".into());
            }
            if b.jobs.len() > MAX_JOBS_PER_BLOCK {
                err(
                    format!("{bp}.jobs"),
                    format!(
                        "has {} jobs; the limit is {MAX_JOBS_PER_BLOCK}",
                        b.jobs.len()
                    ),
                );
            }
            if b.concurrency == 0 {
                err(format!("{bp}.concurrency"), "must be at least 1".into());
            } else if b.concurrency > MAX_CONCURRENCY {
                err(
                    format!("{bp}.concurrency"),
                    format!("is {}; the limit is {MAX_CONCURRENCY}", b.concurrency),
                );
            }
            if b.desc.len() > MAX_DESC_LEN {
                err(
                    format!("{bp}.desc"),
                    format!("is {} bytes; the limit is {MAX_DESC_LEN}", b.desc.len()),
                );
            }
            for (ji, j) in b.jobs.iter().enumerate() {
                let jp = format!("{bp}.jobs[{ji}]");
                if j.action.is_empty() {
                    err(format!("{jp}.action"), "required".into());
                }
                if j.desc.len() > MAX_DESC_LEN {
                    err(
                        format!("{jp}.desc"),
                        format!("is {} bytes; the limit is {MAX_DESC_LEN}", j.desc.len()),
                    );
                }
                if j.timeout.is_some_and(|t| t.0.is_zero()) {
                    err(format!("{jp}.timeout"), "must be greater than 0".into());
                }
                if let Some(r) = &j.retry {
                    if r.attempts == 0 {
                        err(
                            format!("{jp}.retry.attempts"),
                            "must be at least 1 (the first attempt counts)".into(),
                        );
                    } else if r.attempts > MAX_RETRY_ATTEMPTS {
                        err(
                            format!("{jp}.retry.attempts"),
                            format!("is {}; the limit is {MAX_RETRY_ATTEMPTS}", r.attempts),
                        );
                    }
                    if r.max_backoff < r.initial_backoff {
                        err(
                            format!("{jp}.retry.max_backoff"),
                            format!(
                                "({}) must not be less than initial_backoff ({})",
                                r.max_backoff, r.initial_backoff
                            ),
                        );
                    }
                }
            }
        }
    }
}

pub(crate) fn check_name(name: &str) -> Option<String> {
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "is {} bytes; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Some(format!(
            "{name:?} is not a valid workflow name: start with a letter, then letters, digits, '_', '-' or '.'"
        ));
    }
    None
}

fn check_label_key(key: &str) -> Option<String> {
    if key.is_empty() {
        return Some("label keys must not be empty".into());
    }
    if key.len() > MAX_LABEL_KEY_LEN {
        return Some(format!(
            "key is {} bytes; the limit is {MAX_LABEL_KEY_LEN}",
            key.len()
        ));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
    {
        return Some(format!(
            "key {key:?} may hold only letters, digits, '_', '-', '.' and '/'"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_with_defaults() {
        let spec = WorkflowSpec::parse(
            "name: hello\nblocks:\n  - jobs:\n      - action: shell\n        args: {argv: [echo, hi]}\n        timeout: 10m\n",
        )
        .unwrap();
        assert_eq!(spec.blocks[0].concurrency, 1);
        assert_eq!(
            spec.blocks[0].jobs[0].timeout,
            Some(HumanDuration(Duration::from_secs(600)))
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = RetrySpec {
            attempts: 10,
            initial_backoff: HumanDuration(Duration::from_secs(1)),
            max_backoff: HumanDuration(Duration::from_secs(5)),
        };
        assert_eq!(r.backoff_before(2), Duration::from_secs(1));
        assert_eq!(r.backoff_before(3), Duration::from_secs(2));
        assert_eq!(r.backoff_before(4), Duration::from_secs(4));
        assert_eq!(r.backoff_before(5), Duration::from_secs(5));
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = WorkflowSpec::parse("name: x\nblocks:\n  - concurrency: five\n    jobs: []\n")
            .unwrap_err();
        assert_eq!(e.0[0].path, "blocks[0].concurrency");
    }
}
