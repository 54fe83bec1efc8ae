//! The policy file: raw serde structs (one per kind, `deny_unknown_fields`, spans kept) →
//! validated, typed [`WorkflowPolicy`] values. Every problem in the file is reported at once,
//! each with the file, the key path and the line.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use domain::WorkflowSpec;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::arg_path::ArgPath;

/// What one workflow name is held to. Every rule is optional; an entry with none accepts the
/// workflow as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct WorkflowPolicy {
    pub(crate) allowed_actions: Option<Vec<String>>,
    pub(crate) same_args: Vec<SameArgs>,
    pub(crate) start_or_end: Vec<StartOrEnd>,
    pub(crate) limits: Option<Limits>,
    /// Required labels and their allowed values (empty: any value).
    pub(crate) labels: Option<Vec<(String, Vec<String>)>>,
    /// The user its `shell` jobs run as (not a rule: nothing is checked at submit).
    pub(crate) run_as: Option<domain::RunAs>,
    /// The secrets its jobs may name (`*`: any); `None`: none.
    pub(crate) secrets: Option<Vec<String>>,
}

impl WorkflowPolicy {
    pub(crate) fn rule_count(&self) -> usize {
        usize::from(self.allowed_actions.is_some())
            + self.same_args.len()
            + self.start_or_end.len()
            + usize::from(self.limits.is_some())
            + usize::from(self.labels.is_some())
            + usize::from(self.secrets.is_some())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SameArgs {
    pub(crate) action: String,
    pub(crate) arg: ArgPath,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StartOrEnd {
    pub(crate) action: String,
    /// A job matches when every one of these is present with exactly this value.
    pub(crate) args: Vec<(ArgPath, serde_json::Value)>,
    pub(crate) position: Position,
    pub(crate) allow_before: Vec<String>,
    pub(crate) allow_after: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Position {
    Start,
    End,
    StartOrEnd,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_blocks: Option<u32>,
    pub(crate) max_jobs: Option<u32>,
    pub(crate) max_jobs_per_block: Option<u32>,
    pub(crate) max_concurrency: Option<u32>,
}

// ---- raw, as written in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSameArgs {
    action: Spanned<String>,
    arg: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStartOrEnd {
    action: Spanned<String>,
    #[serde(default)]
    args: BTreeMap<Spanned<String>, serde_json::Value>,
    position: Spanned<Position>,
    allow_before: Option<Spanned<Vec<Spanned<String>>>>,
    allow_after: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_blocks: Option<Spanned<u32>>,
    max_jobs: Option<Spanned<u32>>,
    max_jobs_per_block: Option<Spanned<u32>>,
    max_concurrency: Option<Spanned<u32>>,
}

type RawLabels = BTreeMap<Spanned<String>, Vec<String>>;

const RULE_KINDS: &str =
    "`allowed_actions`, `same_args`, `start_or_end`, `limits`, `labels`, `secrets` or `run_as`";

// ---- errors ----

/// One problem in the policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The file, as given to [`crate::PolicySet::parse`].
    pub origin: String,
    /// The key path, such as `workflows.SatelliteDiskErase.limits.max_jobs`; empty for a TOML
    /// syntax error.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known; shown for TOML syntax errors.
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (true, Some(line)) => {
                write!(f, "{}: line {line}", self.origin)?;
                if let Some(column) = self.column {
                    write!(f, ", column {column}")?;
                }
                write!(f, ": {}", self.message)
            }
            (true, None) => write!(f, "{}: {}", self.origin, self.message),
            (false, Some(line)) => write!(
                f,
                "{}: {}: {} (line {line})",
                self.origin, self.path, self.message
            ),
            (false, None) => write!(f, "{}: {}: {}", self.origin, self.path, self.message),
        }
    }
}

/// Every problem found in a policy file, in document order. The caller keeps the policies it
/// had (docs/operating.md, Policies: an invalid new file is refused and the one in force stays).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

// ---- loading ----

pub(crate) fn load(
    text: &str,
    origin: &str,
) -> Result<BTreeMap<String, WorkflowPolicy>, ConfigError> {
    let mut l = Loader {
        text,
        origin,
        problems: Vec::new(),
    };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            l.problem(e.span(), String::new(), e.message());
            return Err(l.into_error());
        }
    };
    let mut out = BTreeMap::new();
    for (key, value) in root.get_ref().iter() {
        if key.get_ref().as_ref() != "workflows" {
            l.problem(
                Some(key.span()),
                key_path("", key.get_ref()),
                format!("unknown field `{}`, expected `workflows`", key.get_ref()),
            );
            continue;
        }
        let DeValue::Table(workflows) = value.get_ref() else {
            l.problem(
                Some(value.span()),
                "workflows".into(),
                "must be a table with one entry per workflow name, e.g. [workflows.hello]",
            );
            continue;
        };
        for (name, entry) in workflows.iter() {
            if let Some(policy) = l.workflow(name, entry) {
                out.insert(name.get_ref().to_string(), policy);
            }
        }
    }
    if l.problems.is_empty() {
        Ok(out)
    } else {
        Err(l.into_error())
    }
}

struct Loader<'t> {
    text: &'t str,
    origin: &'t str,
    /// With the byte offset they were found at, to sort them into document order.
    problems: Vec<(usize, ConfigProblem)>,
}

type Node<'i> = Spanned<DeValue<'i>>;

impl Loader<'_> {
    fn problem(&mut self, span: Option<Range<usize>>, path: String, message: impl Into<String>) {
        let at = span.as_ref().map_or(usize::MAX, |s| s.start);
        self.problems.push((
            at,
            ConfigProblem {
                origin: self.origin.to_owned(),
                path,
                line: span.as_ref().map(|s| line_of(self.text, s.start)),
                column: span.map(|s| column_of(self.text, s.start)),
                message: message.into(),
            },
        ));
    }

    fn into_error(mut self) -> ConfigError {
        self.problems.sort_by_key(|(at, _)| *at);
        ConfigError {
            problems: self.problems.into_iter().map(|(_, p)| p).collect(),
        }
    }

    /// Deserializes `node` into `T`; a type error, a missing or an unknown field becomes a
    /// problem at the innermost key path holding it.
    fn de<T: DeserializeOwned>(&mut self, node: &Node<'_>, path: &str) -> Option<T> {
        match T::deserialize(ValueDeserializer::from(node.clone())) {
            Ok(v) => Some(v),
            Err(e) => {
                let mut path = path.to_owned();
                let span = e.span();
                if let Some(span) = &span {
                    locate(node, span, &mut path);
                }
                self.problem(span.or(Some(node.span())), path, e.message());
                None
            }
        }
    }

    fn workflow(
        &mut self,
        name: &Spanned<toml::de::DeString<'_>>,
        entry: &Node<'_>,
    ) -> Option<WorkflowPolicy> {
        let base = key_path("workflows", name.get_ref());
        let mut ok = true;
        if let Some(m) = name_problem(name.get_ref()) {
            self.problem(Some(name.span()), base.clone(), m);
            ok = false;
        }
        let DeValue::Table(rules) = entry.get_ref() else {
            self.problem(
                Some(entry.span()),
                base.clone(),
                format!(
                    "must be a table of rules; write [{base}] for a workflow accepted as it is"
                ),
            );
            return None;
        };
        let before = self.problems.len();
        let mut policy = WorkflowPolicy::default();
        for (key, node) in rules.iter() {
            let path = key_path(&base, key.get_ref());
            match key.get_ref().as_ref() {
                "allowed_actions" => {
                    if let Some(raw) = self.de::<Vec<Spanned<String>>>(node, &path) {
                        policy.allowed_actions = Some(self.allowed_actions(raw, node, &path));
                    }
                }
                "same_args" => {
                    for (i, item) in self.items(
                        node,
                        &path,
                        "same_args = [{ action = \"shell\", arg = \"site\" }]",
                    ) {
                        let path = format!("{path}[{i}]");
                        if let Some(raw) = self.de::<RawSameArgs>(item, &path)
                            && let Some(rule) = self.same_args(raw, &path)
                        {
                            policy.same_args.push(rule);
                        }
                    }
                }
                "start_or_end" => {
                    for (i, item) in self.items(
                        node,
                        &path,
                        "start_or_end = [{ action = \"token_bucket\", position = \"start\" }]",
                    ) {
                        let path = format!("{path}[{i}]");
                        if let Some(raw) = self.de::<RawStartOrEnd>(item, &path)
                            && let Some(rule) = self.start_or_end(raw, &path)
                        {
                            policy.start_or_end.push(rule);
                        }
                    }
                }
                "limits" => {
                    if let Some(raw) = self.de::<RawLimits>(node, &path) {
                        policy.limits = Some(self.limits(raw, &path));
                    }
                }
                "labels" => {
                    if let Some(raw) = self.de::<RawLabels>(node, &path) {
                        policy.labels = Some(self.labels(raw, &path));
                    }
                }
                "secrets" => {
                    if let Some(raw) = self.de::<Vec<Spanned<String>>>(node, &path) {
                        let mut names = Vec::with_capacity(raw.len());
                        for (i, n) in raw.into_iter().enumerate() {
                            let ok = n.get_ref() == "*"
                                || (!n.get_ref().is_empty()
                                    && n.get_ref().len() <= 128
                                    && n.get_ref().bytes().all(|b| {
                                        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
                                    }));
                            if ok {
                                names.push(n.into_inner());
                            } else {
                                self.problem(
                                    Some(n.span()),
                                    format!("{path}[{i}]"),
                                    format!(
                                        "{} is not a secret name (letters, digits, '_', '.', '-'; at most 128 bytes) or \"*\"",
                                        domain::limits::clip(n.get_ref())
                                    ),
                                );
                            }
                        }
                        policy.secrets = Some(names);
                    }
                }
                "run_as" => {
                    if let Some(raw) = self.de::<Spanned<String>>(node, &path) {
                        match raw.get_ref().parse() {
                            Ok(r) => policy.run_as = Some(r),
                            Err(m) => self.problem(Some(raw.span()), path, m),
                        }
                    }
                }
                other => self.problem(
                    Some(key.span()),
                    path,
                    format!("unknown field `{other}`, expected {RULE_KINDS}"),
                ),
            }
        }
        (ok && self.problems.len() == before).then_some(policy)
    }

    /// The elements of an array of tables (`x = [{..}, {..}]` or `[[..x]]`).
    fn items<'n, 'i>(
        &mut self,
        node: &'n Node<'i>,
        path: &str,
        example: &str,
    ) -> std::iter::Enumerate<std::slice::Iter<'n, Node<'i>>> {
        match node.get_ref() {
            DeValue::Array(items) => items.iter().enumerate(),
            _ => {
                self.problem(
                    Some(node.span()),
                    path.to_owned(),
                    format!(
                        "must be an array of tables, e.g. {example}; found {}",
                        node.get_ref().type_str()
                    ),
                );
                [].iter().enumerate()
            }
        }
    }

    /// A policy that names an action Steward does not have would never match anything: it is
    /// a typo, refused at load.
    fn action_name(&mut self, name: &Spanned<String>, path: String) -> bool {
        let n = name.get_ref();
        if n.trim().is_empty() {
            self.problem(Some(name.span()), path, "must be a non-empty action name");
            false
        } else if !domain::spec::ACTIONS.contains(&n.as_str()) {
            self.problem(
                Some(name.span()),
                path,
                format!(
                    "unknown action {}; the actions are: {}",
                    domain::limits::clip(n),
                    domain::spec::ACTIONS.join(", ")
                ),
            );
            false
        } else {
            true
        }
    }

    fn action_list(&mut self, raw: Vec<Spanned<String>>, path: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(raw.len());
        for (i, a) in raw.into_iter().enumerate() {
            if self.action_name(&a, format!("{path}[{i}]")) {
                out.push(a.into_inner());
            }
        }
        out
    }

    fn allowed_actions(
        &mut self,
        raw: Vec<Spanned<String>>,
        node: &Node<'_>,
        path: &str,
    ) -> Vec<String> {
        if raw.is_empty() {
            self.problem(
                Some(node.span()),
                path.to_owned(),
                "must list at least one action (to refuse this workflow, remove its entry)",
            );
        }
        self.action_list(raw, path)
    }

    fn arg_path(&mut self, raw: &Spanned<String>, path: String) -> Option<ArgPath> {
        match ArgPath::parse(raw.get_ref()) {
            Ok(p) => Some(p),
            Err(m) => {
                self.problem(Some(raw.span()), path, m);
                None
            }
        }
    }

    fn same_args(&mut self, raw: RawSameArgs, path: &str) -> Option<SameArgs> {
        let action_ok = self.action_name(&raw.action, format!("{path}.action"));
        let arg = self.arg_path(&raw.arg, format!("{path}.arg"));
        Some(SameArgs {
            action: action_ok.then(|| raw.action.into_inner())?,
            arg: arg?,
        })
    }

    fn start_or_end(&mut self, raw: RawStartOrEnd, path: &str) -> Option<StartOrEnd> {
        let mut ok = self.action_name(&raw.action, format!("{path}.action"));
        let mut args = Vec::with_capacity(raw.args.len());
        for (key, value) in raw.args {
            let key_at = key_path(&format!("{path}.args"), key.get_ref());
            if has_datetime(&value) {
                self.problem(
                    Some(key.span()),
                    key_at.clone(),
                    "TOML dates and times cannot match a job's args; write the value as a string",
                );
                ok = false;
            }
            match self.arg_path(&key, key_at) {
                Some(p) => args.push((p, value)),
                None => ok = false,
            }
        }
        let position = *raw.position.get_ref();
        let mut side = |list: Option<Spanned<Vec<Spanned<String>>>>, field: &str, allowed: bool| {
            let Some(list) = list else {
                return Vec::new();
            };
            let path = format!("{path}.{field}");
            if !allowed {
                let wanted = if field == "allow_before" {
                    "start"
                } else {
                    "end"
                };
                self.problem(
                    Some(list.span()),
                    path.clone(),
                    format!(
                        "applies only when position is \"{wanted}\" or \"start_or_end\" (here it is {})",
                        position.as_str()
                    ),
                );
                ok = false;
            }
            self.action_list(list.into_inner(), &path)
        };
        let allow_before = side(raw.allow_before, "allow_before", position != Position::End);
        let allow_after = side(raw.allow_after, "allow_after", position != Position::Start);
        ok.then(|| StartOrEnd {
            action: raw.action.into_inner(),
            args,
            position,
            allow_before,
            allow_after,
        })
    }

    fn limits(&mut self, raw: RawLimits, path: &str) -> Limits {
        let mut one = |v: Option<Spanned<u32>>, field: &str| {
            let v = v?;
            if *v.get_ref() == 0 {
                self.problem(
                    Some(v.span()),
                    format!("{path}.{field}"),
                    "must be at least 1",
                );
            }
            Some(v.into_inner())
        };
        Limits {
            max_blocks: one(raw.max_blocks, "max_blocks"),
            max_jobs: one(raw.max_jobs, "max_jobs"),
            max_jobs_per_block: one(raw.max_jobs_per_block, "max_jobs_per_block"),
            max_concurrency: one(raw.max_concurrency, "max_concurrency"),
        }
    }

    fn labels(&mut self, raw: RawLabels, path: &str) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::with_capacity(raw.len());
        for (key, values) in raw {
            if let Some(m) = label_key_problem(key.get_ref()) {
                self.problem(Some(key.span()), key_path(path, key.get_ref()), m);
            }
            out.push((key.into_inner(), values));
        }
        out
    }
}

impl Position {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Position::Start => "start",
            Position::End => "end",
            Position::StartOrEnd => "start_or_end",
        }
    }
}

/// Appends to `path` the keys and indexes leading from `node` to the innermost value (or
/// key) whose span holds `span`.
fn locate(node: &Node<'_>, span: &Range<usize>, path: &mut String) {
    let holds = |outer: Range<usize>| outer.start <= span.start && span.end <= outer.end;
    match node.get_ref() {
        DeValue::Table(table) => {
            for (k, v) in table.iter() {
                if holds(k.span()) {
                    *path = key_path(path, k.get_ref());
                    return;
                }
                if holds(v.span()) {
                    *path = key_path(path, k.get_ref());
                    return locate(v, span, path);
                }
            }
        }
        DeValue::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if holds(v.span()) {
                    path.push_str(&format!("[{i}]"));
                    return locate(v, span, path);
                }
            }
        }
        _ => {}
    }
}

/// `base.key`, with the key quoted the TOML way when it is not a bare key
/// (`workflows."infra.erase"`).
pub(crate) fn key_path(base: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let sep = if base.is_empty() { "" } else { "." };
    if bare {
        format!("{base}{sep}{key}")
    } else {
        format!("{base}{sep}{key:?}")
    }
}

/// A TOML date or time, which reaches `serde_json::Value` as toml's private marker object.
fn has_datetime(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(o) => {
            o.contains_key("$__toml_private_datetime") || o.values().any(has_datetime)
        }
        serde_json::Value::Array(a) => a.iter().any(has_datetime),
        _ => false,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn column_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    let start = text.as_bytes()[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    text.get(start..end)
        .map_or(end - start, |s| s.chars().count())
        + 1
}

/// Domain's rule for workflow names, applied by asking domain itself, so that the two can
/// never drift apart (load time only; the cost does not matter).
fn name_problem(name: &str) -> Option<String> {
    let spec = WorkflowSpec {
        name: name.to_owned(),
        ..WorkflowSpec::default()
    };
    let mut errs = Vec::new();
    spec.validate_into(&mut errs);
    errs.into_iter()
        .find(|e| e.path == "name")
        .map(|e| e.message)
}

/// Domain's rule for label keys, asked of domain the same way.
fn label_key_problem(key: &str) -> Option<String> {
    let spec = WorkflowSpec {
        name: "x".to_owned(),
        labels: BTreeMap::from([(key.to_owned(), String::new())]),
        ..WorkflowSpec::default()
    };
    let mut errs = Vec::new();
    spec.validate_into(&mut errs);
    let path = format!("labels.{key}");
    errs.into_iter().find(|e| e.path == path).map(|e| e.message)
}
