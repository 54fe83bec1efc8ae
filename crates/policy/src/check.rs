//! Checking a spec against one workflow's policies. Read-only: every check takes `&WorkflowSpec`.
//! A compliant spec costs one allocation (the verdict list); strings are built only for
//! violations.

use std::fmt;

use domain::{FieldError, JobSpec, WorkflowSpec};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::config::{Limits, Position, SameArgs, StartOrEnd, WorkflowPolicy, key_path};

/// At most this many violations are listed per policy; the rest are counted in one more.
pub const MAX_VIOLATIONS_PER_POLICY: usize = 100;

/// The kind of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// The workflow name must have an entry in the policy file.
    Workflows,
    AllowedActions,
    SameArgs,
    StartOrEnd,
    Limits,
    Labels,
    /// The secrets a workflow's jobs may name (`{secret: NAME}`); none unless listed.
    Secrets,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Workflows => "workflows",
            PolicyKind::AllowedActions => "allowed_actions",
            PolicyKind::SameArgs => "same_args",
            PolicyKind::StartOrEnd => "start_or_end",
            PolicyKind::Limits => "limits",
            PolicyKind::Labels => "labels",
            PolicyKind::Secrets => "secrets",
        }
    }
}

/// One policy of a workflow entry: its kind, and its index for the kinds written as lists
/// (`same_args[0]`, `start_or_end[1]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyId {
    pub kind: PolicyKind,
    pub index: Option<usize>,
}

impl PolicyId {
    const fn one(kind: PolicyKind) -> PolicyId {
        PolicyId { kind, index: None }
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_str())?;
        if let Some(i) = self.index {
            write!(f, "[{i}]")?;
        }
        Ok(())
    }
}

impl Serialize for PolicyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One way a spec breaks a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The policy, such as `limits` or `same_args[0]`.
    pub policy: String,
    /// Where in the spec, such as `blocks[1].jobs[3].args.argv[3]`, `blocks` or `labels.site`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {}: {}: {}", self.policy, self.path, self.message)
    }
}

/// A violation as a spec error at the same path, the message naming the policy; for callers
/// that report policy and structure problems together.
impl From<Violation> for FieldError {
    fn from(v: Violation) -> FieldError {
        FieldError::new(v.path, format!("policy {}: {}", v.policy, v.message))
    }
}

/// One policy's verdict on a spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub policy: PolicyId,
    /// Empty when the spec passed; in run order otherwise.
    pub violations: Vec<Violation>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Every policy's verdict on one spec: `workflows` (is there an entry) first, then the
/// entry's rules in a fixed order: `allowed_actions`, `same_args[i]`, `start_or_end[i]`,
/// `limits`, `labels`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Verdicts {
    verdicts: Vec<Verdict>,
}

impl Verdicts {
    /// True when no policy was violated: the spec may be submitted.
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(Verdict::passed)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Verdict> {
        self.verdicts.iter()
    }

    /// Every violation, policy by policy.
    pub fn violations(&self) -> Vec<&Violation> {
        self.verdicts.iter().flat_map(|v| &v.violations).collect()
    }

    pub fn into_violations(self) -> Vec<Violation> {
        self.verdicts
            .into_iter()
            .flat_map(|v| v.violations)
            .collect()
    }

    /// `Ok` when every policy passed; otherwise every violation.
    pub fn into_result(self) -> Result<(), PolicyError> {
        if self.passed() {
            Ok(())
        } else {
            Err(PolicyError(self.into_violations()))
        }
    }
}

impl<'a> IntoIterator for &'a Verdicts {
    type Item = &'a Verdict;
    type IntoIter = std::slice::Iter<'a, Verdict>;

    fn into_iter(self) -> Self::IntoIter {
        self.verdicts.iter()
    }
}

/// One line per policy, then its violations indented: what `steward validate` shows.
impl fmt::Display for Verdicts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for v in &self.verdicts {
            if v.passed() {
                writeln!(f, "{}: passed", v.policy)?;
            } else {
                let n = v.violations.len();
                let s = if n == 1 { "" } else { "s" };
                writeln!(f, "{}: failed, {n} violation{s}", v.policy)?;
                for x in &v.violations {
                    writeln!(f, "  {}: {}", x.path, x.message)?;
                }
            }
        }
        Ok(())
    }
}

/// A spec refused by its policies: every violation, in the order of [`Verdicts`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError(pub Vec<Violation>);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

// ---- the checks ----

/// The verdicts on a spec that needs no entry: nothing violated.
pub(crate) fn passed() -> Verdicts {
    Verdicts {
        verdicts: vec![Verdict {
            policy: PolicyId::one(PolicyKind::Workflows),
            violations: Vec::new(),
        }],
    }
}

pub(crate) fn no_entry(spec: &WorkflowSpec, origin: &str) -> Verdicts {
    let mut sink = Sink::new(PolicyId::one(PolicyKind::Workflows));
    sink.push(
        || "name".to_owned(),
        || {
            format!(
                "no policy entry for workflow {:?} in {origin}; add [{}]",
                spec.name,
                key_path("workflows", &spec.name)
            )
        },
    );
    Verdicts {
        verdicts: vec![sink.finish()],
    }
}

/// `shown` is `spec` as messages may show it (sensitive values hidden); same shape.
pub(crate) fn check(
    policy: &WorkflowPolicy,
    spec: &WorkflowSpec,
    shown: &WorkflowSpec,
) -> Verdicts {
    let mut verdicts = Vec::with_capacity(1 + policy.rule_count());
    verdicts.push(Verdict {
        policy: PolicyId::one(PolicyKind::Workflows),
        violations: Vec::new(),
    });
    if let Some(allowed) = &policy.allowed_actions {
        verdicts.push(allowed_actions(allowed, spec));
    }
    for (i, rule) in policy.same_args.iter().enumerate() {
        verdicts.push(same_args(i, rule, spec, shown));
    }
    for (i, rule) in policy.start_or_end.iter().enumerate() {
        verdicts.push(start_or_end(i, rule, spec));
    }
    if let Some(limits) = &policy.limits {
        verdicts.push(check_limits(limits, spec));
    }
    if let Some(labels) = &policy.labels {
        verdicts.push(check_labels(labels, spec));
    }
    if let Some(v) = check_secrets(policy.secrets.as_deref(), spec) {
        verdicts.push(v);
    }
    Verdicts { verdicts }
}

/// Collects one policy's violations, formatting only the first
/// [`MAX_VIOLATIONS_PER_POLICY`] and counting the rest.
struct Sink {
    policy: PolicyId,
    violations: Vec<Violation>,
    more: usize,
}

impl Sink {
    fn new(policy: PolicyId) -> Sink {
        Sink {
            policy,
            violations: Vec::new(),
            more: 0,
        }
    }

    fn push(&mut self, path: impl FnOnce() -> String, message: impl FnOnce() -> String) {
        if self.violations.len() < MAX_VIOLATIONS_PER_POLICY {
            self.violations.push(Violation {
                policy: self.policy.to_string(),
                path: path(),
                message: message(),
            });
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self) -> Verdict {
        if self.more > 0 {
            let more = self.more;
            self.violations.push(Violation {
                policy: self.policy.to_string(),
                path: "spec".to_owned(),
                message: format!("{more} more violations of this policy not listed"),
            });
        }
        Verdict {
            policy: self.policy,
            violations: self.violations,
        }
    }
}

/// Every job in run order: blocks in order, jobs in order.
fn jobs(spec: &WorkflowSpec) -> impl Iterator<Item = (usize, usize, &JobSpec)> {
    spec.blocks.iter().enumerate().flat_map(|(b, block)| {
        block
            .jobs
            .iter()
            .enumerate()
            .map(move |(j, job)| (b, j, job))
    })
}

fn allowed_actions(allowed: &[String], spec: &WorkflowSpec) -> Verdict {
    let mut sink = Sink::new(PolicyId::one(PolicyKind::AllowedActions));
    for (b, j, job) in jobs(spec) {
        if !allowed.contains(&job.action) {
            sink.push(
                || format!("blocks[{b}].jobs[{j}].action"),
                || {
                    format!(
                        "action {:?} is not allowed for this workflow; allowed: {}",
                        job.action,
                        quoted_list(allowed)
                    )
                },
            );
        }
    }
    sink.finish()
}

fn same_args(index: usize, rule: &SameArgs, spec: &WorkflowSpec, shown: &WorkflowSpec) -> Verdict {
    // A value as `shown` has it at the same place.
    // Never the real value, even when the shown spec has none at the place.
    let shown_at = |b: usize, j: usize| {
        shown
            .blocks
            .get(b)
            .and_then(|bl| bl.jobs.get(j))
            .and_then(|job| rule.arg.resolve(&job.args))
            .map_or_else(|| "\"***\"".to_owned(), show)
    };
    let mut sink = Sink::new(PolicyId {
        kind: PolicyKind::SameArgs,
        index: Some(index),
    });
    let mut first: Option<(&Value, usize, usize)> = None;
    for (b, j, job) in jobs(spec) {
        if job.action != rule.action {
            continue;
        }
        let path = || format!("blocks[{b}].jobs[{j}].args.{}", rule.arg);
        match (rule.arg.resolve(&job.args), first) {
            (None, _) => sink.push(path, || {
                format!(
                    "missing: every {} job must set {} to one value across the run",
                    rule.action, rule.arg
                )
            }),
            (Some(value), None) => first = Some((value, b, j)),
            (Some(value), Some((want, fb, fj))) => {
                if value != want {
                    sink.push(path, || {
                        format!(
                            "{} differs from {} (blocks[{fb}].jobs[{fj}])",
                            shown_at(b, j),
                            shown_at(fb, fj)
                        )
                    });
                }
            }
        }
    }
    sink.finish()
}

fn start_or_end(index: usize, rule: &StartOrEnd, spec: &WorkflowSpec) -> Verdict {
    let mut sink = Sink::new(PolicyId {
        kind: PolicyKind::StartOrEnd,
        index: Some(index),
    });
    let matches = |job: &JobSpec| {
        job.action == rule.action
            && rule
                .args
                .iter()
                .all(|(path, want)| path.resolve(&job.args) == Some(want))
    };
    // Positions in run order (a flat index) and in the spec, of the first and last match.
    let mut first = None;
    let mut last = None;
    for (n, (b, j, job)) in jobs(spec).enumerate() {
        if matches(job) {
            first.get_or_insert((n, b, j));
            last = Some((n, b, j));
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        sink.push(
            || "blocks".to_owned(),
            || {
                format!(
                    "no {} in the run; one must be {}",
                    describe(rule),
                    where_phrase(rule.position)
                )
            },
        );
        return sink.finish();
    };
    // Jobs before the first match that allow_before does not allow, likewise after the last.
    let before = match rule.position {
        Position::Start | Position::StartOrEnd => {
            offenders(jobs(spec).take(first.0), &rule.allow_before)
        }
        Position::End => None,
    };
    let after = match rule.position {
        Position::End | Position::StartOrEnd => {
            offenders(jobs(spec).skip(last.0 + 1), &rule.allow_after)
        }
        Position::Start => None,
    };
    let at = |(_, b, j): (usize, usize, usize)| format!("blocks[{b}].jobs[{j}]");
    match (rule.position, before, after) {
        (Position::Start, Some(off), _) => sink.push(
            || at(first),
            || {
                format!(
                    "the {} must be among the first jobs, but {} before it (allowed before it: {})",
                    describe(rule),
                    runs(off),
                    allowed_list(&rule.allow_before)
                )
            },
        ),
        (Position::End, _, Some(off)) => sink.push(
            || at(last),
            || {
                format!(
                    "the {} must be among the last jobs, but {} after it (allowed after it: {})",
                    describe(rule),
                    runs(off),
                    allowed_list(&rule.allow_after)
                )
            },
        ),
        (Position::StartOrEnd, Some(off_before), Some(off_after)) => sink.push(
            || at(first),
            || {
                format!(
                    "the {} must be among the first or the last jobs, but {} before the first one \
                     (allowed before it: {}) and {} after the last one, {} (allowed after it: {})",
                    describe(rule),
                    runs(off_before),
                    allowed_list(&rule.allow_before),
                    runs(off_after),
                    at(last),
                    allowed_list(&rule.allow_after)
                )
            },
        ),
        _ => {}
    }
    sink.finish()
}

fn check_limits(limits: &Limits, spec: &WorkflowSpec) -> Verdict {
    let mut sink = Sink::new(PolicyId::one(PolicyKind::Limits));
    let over = |n: usize, max: Option<u32>| max.filter(|&m| n > m as usize);
    if let Some(max) = over(spec.blocks.len(), limits.max_blocks) {
        sink.push(
            || "blocks".to_owned(),
            || format!("{} blocks; the limit is {max}", spec.blocks.len()),
        );
    }
    if let Some(max) = over(spec.job_count(), limits.max_jobs) {
        sink.push(
            || "blocks".to_owned(),
            || format!("{} jobs in all; the limit is {max}", spec.job_count()),
        );
    }
    for (b, block) in spec.blocks.iter().enumerate() {
        if let Some(max) = over(block.jobs.len(), limits.max_jobs_per_block) {
            sink.push(
                || format!("blocks[{b}].jobs"),
                || format!("{} jobs; the limit is {max} per block", block.jobs.len()),
            );
        }
        if let Some(max) = over(block.concurrency as usize, limits.max_concurrency) {
            sink.push(
                || format!("blocks[{b}].concurrency"),
                || format!("is {}; the limit is {max}", block.concurrency),
            );
        }
    }
    sink.finish()
}

/// Every secret reference (`{secret: NAME}`, anywhere in a job's args) must name a secret
/// the entry lists (`*`: any). Without a `secrets` key, no secret may be named. `None` when
/// there is nothing to judge (no key and no reference).
fn check_secrets(allowed: Option<&[String]>, spec: &WorkflowSpec) -> Option<Verdict> {
    let mut sink = Sink::new(PolicyId::one(PolicyKind::Secrets));
    let mut any = false;
    for (b, j, job) in jobs(spec) {
        for (k, v) in &job.args {
            secret_refs(v, &mut format!("args.{k}"), &mut |at, name| {
                any = true;
                let ok = allowed.is_some_and(|a| a.iter().any(|n| n == "*" || n == name));
                if !ok {
                    let path = || format!("blocks[{b}].jobs[{j}].{at}");
                    match allowed {
                        None => sink.push(path, || {
                            format!("secret {name:?}: this workflow's policy lists no secrets; add secrets = [{name:?}] to allow it")
                        }),
                        Some(list) => sink.push(path, || {
                            format!(
                                "secret {name:?} is not allowed for this workflow; allowed: {}",
                                quoted_list(list)
                            )
                        }),
                    }
                }
            });
        }
    }
    (any || allowed.is_some()).then(|| sink.finish())
}

/// Calls `each(path, name)` for every `{secret: NAME}` in `v`.
fn secret_refs(v: &Value, path: &mut String, each: &mut dyn FnMut(&str, &str)) {
    match v {
        Value::Object(m) => {
            if let (1, Some(Value::String(name))) = (m.len(), m.get("secret")) {
                each(path, name);
                return;
            }
            for (k, v) in m {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                secret_refs(v, path, each);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                secret_refs(v, path, each);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn check_labels(required: &[(String, Vec<String>)], spec: &WorkflowSpec) -> Verdict {
    let mut sink = Sink::new(PolicyId::one(PolicyKind::Labels));
    for (key, allowed) in required {
        let path = || format!("labels.{key}");
        match spec.labels.get(key) {
            None if allowed.is_empty() => sink.push(path, || "required label missing".to_owned()),
            None => sink.push(path, || {
                format!(
                    "required label missing; allowed values: {}",
                    quoted_list(allowed)
                )
            }),
            Some(value) if !allowed.is_empty() && !allowed.contains(value) => {
                sink.push(path, || {
                    format!(
                        "{value:?} is not an allowed value; allowed: {}",
                        quoted_list(allowed)
                    )
                });
            }
            Some(_) => {}
        }
    }
    sink.finish()
}

/// The first job of `jobs` whose action is not in `allowed`, and how many such jobs there are.
fn offenders<'a>(
    jobs: impl Iterator<Item = (usize, usize, &'a JobSpec)>,
    allowed: &[String],
) -> Option<((usize, usize, &'a str), usize)> {
    let mut found = None;
    let mut count = 0usize;
    for (b, j, job) in jobs {
        if !allowed.contains(&job.action) {
            found.get_or_insert((b, j, job.action.as_str()));
            count += 1;
        }
    }
    found.map(|f| (f, count))
}

// ---- message helpers (violations only) ----

/// `token_bucket job with bucket = "disk-erase-satellite"`.
fn describe(rule: &StartOrEnd) -> String {
    let mut s = format!("{} job", rule.action);
    for (i, (path, value)) in rule.args.iter().enumerate() {
        s.push_str(if i == 0 { " with " } else { ", " });
        s.push_str(path.as_str());
        s.push_str(" = ");
        s.push_str(&show(value));
    }
    s
}

fn where_phrase(p: Position) -> &'static str {
    match p {
        Position::Start => "among the first jobs",
        Position::End => "among the last jobs",
        Position::StartOrEnd => "among the first or the last jobs",
    }
}

/// `blocks[0].jobs[1] (shell) runs` or `blocks[0].jobs[1] (shell) and 3 more jobs run`.
fn runs(((b, j, action), count): ((usize, usize, &str), usize)) -> String {
    match count {
        0 | 1 => format!("blocks[{b}].jobs[{j}] ({action}) runs"),
        2 => format!("blocks[{b}].jobs[{j}] ({action}) and 1 more job run"),
        n => format!(
            "blocks[{b}].jobs[{j}] ({action}) and {} more jobs run",
            n - 1
        ),
    }
}

fn allowed_list(list: &[String]) -> String {
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

fn quoted_list(list: &[String]) -> String {
    let mut s = String::new();
    for (i, x) in list.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&format!("{x:?}"));
    }
    s
}

/// A value as compact JSON, cut to a readable length.
fn show(v: &Value) -> String {
    const MAX: usize = 80;
    let s = v.to_string();
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
