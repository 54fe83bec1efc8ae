//! Parsing a job's `args` into a typed [`ActionCall`], and running it.

use serde_json::{Map, Value};

use crate::args::Args;
use crate::secret::{SecretName, Sensitive, Text};
use crate::*;

/// One job's action with its checked, typed args.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionCall {
    Shell(ShellArgs),
    Http(HttpArgs),
    WriteFile(WriteFileArgs),
    Sleep(SleepArgs),
    /// Takes a token from a shared bucket; run by the engine, which holds the buckets.
    TokenBucket(TokenBucketArgs),
    /// Does nothing and succeeds at once (benchmarks, placeholders).
    Noop,
}

impl ActionCall {
    /// Checks `args` for `action`; every problem is reported, each at a path under
    /// `{job_path}.args` (or `{job_path}.action` for an unknown action).
    pub fn parse(
        action: &str,
        args: &Map<String, Value>,
        job_path: &str,
    ) -> Result<ActionCall, Vec<FieldError>> {
        match action {
            "shell" => ShellArgs::parse(args, job_path).map(ActionCall::Shell),
            "http" => HttpArgs::parse(args, job_path).map(ActionCall::Http),
            "write_file" => WriteFileArgs::parse(args, job_path).map(ActionCall::WriteFile),
            "sleep" => SleepArgs::parse(args, job_path).map(ActionCall::Sleep),
            "token_bucket" => TokenBucketArgs::parse(args, job_path).map(ActionCall::TokenBucket),
            "noop" => Args::new(args, job_path, &[]).finish(Some(ActionCall::Noop)),
            other => Err(vec![FieldError::new(
                format!("{job_path}.action"),
                format!(
                    "unknown action {other:?}; expected one of: {}",
                    BUILTIN.join(", ")
                ),
            )]),
        }
    }

    /// The action's name, as written in specs.
    pub fn action(&self) -> &'static str {
        match self {
            ActionCall::Shell(_) => "shell",
            ActionCall::Http(_) => "http",
            ActionCall::WriteFile(_) => "write_file",
            ActionCall::Sleep(_) => "sleep",
            ActionCall::TokenBucket(_) => "token_bucket",
            ActionCall::Noop => "noop",
        }
    }

    /// Every secret the call names, with its field under `args` (`env.DB_PASSWORD`).
    pub fn secret_refs(&self) -> Vec<(String, &SecretName)> {
        let mut refs = Vec::new();
        match self {
            ActionCall::Shell(a) => {
                for (k, v) in &a.env {
                    if let Text::Secret(n) = v {
                        refs.push((format!("env.{k}"), n));
                    }
                }
            }
            ActionCall::Http(a) => {
                if let Text::Secret(n) = &a.url {
                    refs.push(("url".into(), n));
                }
                for (k, v) in &a.headers {
                    if let Text::Secret(n) = v {
                        refs.push((format!("headers.{k}"), n));
                    }
                }
                if let Some(Text::Secret(n)) = &a.body {
                    refs.push(("body".into(), n));
                }
            }
            ActionCall::WriteFile(a) => {
                if let Text::Secret(n) = &a.content {
                    refs.push(("content".into(), n));
                }
            }
            ActionCall::Sleep(_) | ActionCall::TokenBucket(_) | ActionCall::Noop => {}
        }
        refs
    }

    /// Runs one attempt (see the crate docs for the contract).
    pub async fn run(&self, ctx: &JobContext) -> Result<JobOutput, ActionError> {
        use tracing::Instrument as _;
        let mut sensitive = Sensitive::default();
        // Lines an attempt writes (a process group that cannot be signalled, a ledger entry
        // that cannot be written...) carry its job key, action and attempt, through a `job`
        // span around it. `sleep` and `noop` write none, and go without one: a span costs
        // about 5,000 instructions to make, enter and close (BENCHMARKS.md, "Spans of our
        // own").
        let span = || {
            tracing::info_span!(
                "job",
                job = ctx.idempotency_key.as_str(),
                action = self.action(),
                attempt = ctx.attempt
            )
        };
        let mut result = match self {
            ActionCall::Shell(a) => shell::run(a, ctx, &mut sensitive).instrument(span()).await,
            ActionCall::Http(a) => http::run(a, ctx, &mut sensitive).instrument(span()).await,
            ActionCall::WriteFile(a) => {
                write_file::run(a, ctx, &mut sensitive)
                    .instrument(span())
                    .await
            }
            ActionCall::Sleep(a) => sleep::run(a, ctx).await,
            ActionCall::TokenBucket(a) => Err(ActionError::Fatal {
                message: format!(
                    "token_bucket {:?} must be run by the engine, which holds the buckets",
                    a.bucket
                ),
                output: String::new(),
            }),
            ActionCall::Noop => Ok(JobOutput::default()),
        };
        match &mut result {
            Ok(out) => sensitive.scrub(&mut out.output),
            Err(e) => {
                for t in e.texts_mut().into_iter().flatten() {
                    sensitive.scrub(t);
                }
            }
        }
        result
    }
}

/// Structural checks of `domain`, then every job's args; on success, each block's calls.
pub fn validate_spec(spec: &WorkflowSpec) -> Result<Vec<Vec<ActionCall>>, SpecError> {
    let mut errs = Vec::new();
    spec.validate_into(&mut errs);
    let mut calls = Vec::new();
    for (bi, b) in spec.blocks.iter().enumerate() {
        let mut row = Vec::new();
        for (ji, j) in b.jobs.iter().enumerate() {
            if j.action.is_empty() {
                continue;
            }
            match ActionCall::parse(&j.action, &j.args, &format!("blocks[{bi}].jobs[{ji}]")) {
                Ok(c) => row.push(c),
                Err(e) => errs.extend(e),
            }
        }
        calls.push(row);
    }
    if errs.is_empty() {
        Ok(calls)
    } else {
        Err(SpecError(errs))
    }
}
