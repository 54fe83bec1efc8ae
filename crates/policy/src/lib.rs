//! Submit-time policies (docs/operating.md, Policies): the policy file, validated when it loads, and every
//! workflow spec checked against it. Pure: no I/O (the caller reads the file and hands over its
//! text), no async, no time. Policies get the spec read-only ([`PolicySet::check`] takes
//! `&WorkflowSpec`) and can never change it.
//!
//! # The policy file
//!
//! `policies.toml` holds one table, `workflows`, with one entry per workflow name. A workflow
//! whose name has no entry is refused; an entry with no rules accepts the workflow as it is.
//! Unknown keys anywhere are errors.
//!
//! ```toml
//! [workflows.hello]                 # no rules: accepted as it is
//!
//! [workflows.SatelliteDiskErase]
//! # Only these actions may appear (names are not checked against the engine's actions).
//! allowed_actions = ["token_bucket", "shell"]
//!
//! # Each rule: every job of `action` must have the value at `arg` set, to one value across
//! # the whole run (e.g. every erase targets the same site). Any number of rules.
//! same_args = [
//!   { action = "shell", arg = "argv[3]" },
//!   { action = "http", arg = "site" },
//! ]
//!
//! # Each rule: a job of `action` whose args hold these values (a subset match; the keys are
//! # arg paths) must open and/or close the run. `position`: "start", "end" or
//! # "start_or_end". "Among the first jobs" means: every job before it in run order (blocks
//! # in order, jobs in order) is an action listed in `allow_before` (default: none); likewise
//! # for the end with `allow_after`. Any number of rules.
//! start_or_end = [
//!   { action = "token_bucket", args = { bucket = "disk-erase-satellite" }, position = "start" },
//!   { action = "shell", args = { "argv[0]" = "./report.sh" }, position = "end", allow_after = ["http"] },
//! ]
//!
//! # Each limit is optional and at least 1. max_concurrency caps every block's `concurrency`.
//! limits = { max_blocks = 5, max_jobs = 200, max_jobs_per_block = 100, max_concurrency = 10 }
//!
//! # Required labels and their allowed values; an empty list accepts any value.
//! labels = { site = ["aap", "bbb"], team = [] }
//! ```
//!
//! The list kinds may also be written as arrays of tables (`[[workflows.X.same_args]]`), and
//! `limits` and `labels` as sub-tables (`[workflows.X.limits]`). A workflow name with `.` in
//! it is quoted: `[workflows."infra.erase"]`.
//!
//! **Arg paths** (`same_args.arg`, the keys of `start_or_end.args`) name a value inside a
//! job's `args`: an arg name (letters, digits, `_`, `-`), then any number of `[N]` (an array
//! element, from 0) or `.name` (a field of an object): `site`, `argv[3]`, `target.hosts[0]`.
//! A job lacking the value breaks a `same_args` rule and does not match a `start_or_end` one.
//!
//! Checked when the file loads, all problems at once, each naming the file, the key path and
//! the line ([`ConfigProblem`]): TOML syntax, unknown keys, wrong types, missing fields,
//! workflow names and label keys (domain's rules for spec names and label keys), empty action
//! names, an empty `allowed_actions`, a limit of 0, a bad `position`, `allow_before` with
//! `position = "end"` (and `allow_after` with `"start"`), bad arg paths.
//!
//! # Checking
//!
//! [`PolicySet::check`] gives every policy's [`Verdict`]; each violation names the policy
//! (`limits`, `same_args[0]`) and the place in the spec (`blocks[1].jobs[3].args.argv[3]`,
//! `blocks`, `labels.site`). Nothing stops at the first violation; within a policy they come
//! in run order, at most [`MAX_VIOLATIONS_PER_POLICY`] listed and the rest counted.
//!
//! ```
//! let policies = policy::PolicySet::parse(
//!     r#"
//! [workflows.SatelliteDiskErase]
//! allowed_actions = ["token_bucket", "shell"]
//! same_args = [{ action = "shell", arg = "argv[3]" }]
//! start_or_end = [{ action = "token_bucket", args = { bucket = "disk-erase-satellite" }, position = "start" }]
//! limits = { max_blocks = 5, max_jobs = 200, max_jobs_per_block = 100, max_concurrency = 10 }
//! labels = { site = ["aap", "bbb"], team = [] }
//! "#,
//!     "policies.toml",
//! )?;
//! let spec = domain::WorkflowSpec::parse(
//!     r#"
//! name: SatelliteDiskErase
//! labels: {site: aap, team: infra}
//! blocks:
//!   - jobs:
//!       - {action: token_bucket, args: {bucket: disk-erase-satellite}}
//!   - concurrency: 5
//!     jobs:
//!       - {action: shell, args: {argv: [erase, --machine, aap01, aap]}}
//!       - {action: shell, args: {argv: [erase, --machine, aap02, bbb]}}
//! "#,
//! )?;
//! let verdicts = policies.check(&spec);
//! assert!(!verdicts.passed());
//! assert_eq!(
//!     verdicts.violations()[0].to_string(),
//!     r#"policy same_args[0]: blocks[1].jobs[1].args.argv[3]: "bbb" differs from "aap" (blocks[1].jobs[0])"#,
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod arg_path;
mod check;
mod config;

use std::collections::BTreeMap;

use domain::WorkflowSpec;

pub use check::{
    MAX_VIOLATIONS_PER_POLICY, PolicyError, PolicyId, PolicyKind, Verdict, Verdicts, Violation,
};
pub use config::{ConfigError, ConfigProblem};

/// Every workflow's policies, as loaded from one policy file. Cheap to share behind an `Arc`;
/// a reload builds a new one and swaps it in only if it parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySet {
    origin: String,
    /// The file as it was read.
    text: std::sync::Arc<str>,
    workflows: BTreeMap<String, config::WorkflowPolicy>,
}

impl PolicySet {
    /// Parses and validates a policy file. `origin` names the file in every message (for
    /// instance its path). Every problem in the file is reported at once.
    pub fn parse(text: &str, origin: &str) -> Result<PolicySet, ConfigError> {
        Ok(PolicySet {
            origin: origin.to_owned(),
            text: text.into(),
            workflows: config::load(text, origin)?,
        })
    }

    /// No entries: every workflow is refused.
    pub fn empty() -> PolicySet {
        PolicySet {
            origin: "the policy file".to_owned(),
            text: "".into(),
            workflows: BTreeMap::new(),
        }
    }

    /// Every policy's verdict on `spec`. A name with no entry gets one violation, from policy
    /// `workflows`. Allocates only the verdict list when the spec complies.
    pub fn check(&self, spec: &WorkflowSpec) -> Verdicts {
        self.check_shown(spec, spec)
    }

    /// [`PolicySet::check`], quoting values in messages from `shown`: `spec` with what must
    /// not be shown hidden (the same shape).
    pub fn check_shown(&self, spec: &WorkflowSpec, shown: &WorkflowSpec) -> Verdicts {
        match self.workflows.get(spec.name.as_str()) {
            Some(policy) => check::check(policy, spec, shown),
            // The e-stop drill's canary runs one `sleep` and nothing else: it needs no entry.
            None if domain::drill::is_canary(spec) => check::passed(),
            None => check::no_entry(spec, &self.origin),
        }
    }

    /// The user `workflow`'s `shell` jobs run as, if its entry names one.
    pub fn run_as(&self, workflow: &str) -> Option<&domain::RunAs> {
        self.workflows.get(workflow)?.run_as.as_ref()
    }

    /// Every workflow whose entry names a `run_as` user, with it.
    pub fn run_as_entries(&self) -> impl Iterator<Item = (&str, &domain::RunAs)> {
        self.workflows
            .iter()
            .filter_map(|(name, p)| Some((name.as_str(), p.run_as.as_ref()?)))
    }

    /// The workflow names with an entry, sorted.
    pub fn workflow_names(&self) -> impl Iterator<Item = &str> {
        self.workflows.keys().map(String::as_str)
    }

    /// The number of workflow entries.
    pub fn len(&self) -> usize {
        self.workflows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workflows.is_empty()
    }

    /// The policy file's text, as it was read.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The file the policies came from, as given to [`PolicySet::parse`].
    pub fn origin(&self) -> &str {
        &self.origin
    }
}
