//! Built-in job actions. The engine parses a job's `args` once at submit
//! ([`ActionCall::parse`]) and runs it with [`ActionCall::run`].
//!
//! INTERFACE CONTRACT (the engine relies on exactly this):
//! - `ActionCall::parse(action, args, job_path)` validates `args` and returns every problem as a
//!   `FieldError` whose path starts with `job_path` (e.g. `blocks[1].jobs[0]` + `.args.argv`).
//! - `ActionCall::run(&self, ctx)` runs one attempt. It returns when the work is done, failed,
//!   or `ctx.cancel` fired (then it must have stopped the work: a shell job's whole process
//!   group is gone) and returns `ActionError::Cancelled`. Timeouts are the engine's: it cancels
//!   `ctx.cancel` when a job's timeout passes.
//! - `validate_spec(spec)` = structural checks of `domain` + every job's args.
//! - Secret references are resolved when an attempt starts; whatever the attempt returns
//!   (output, error) has every resolved secret, and every value the redaction rule hides,
//!   replaced by `***` before the engine sees it.

use std::sync::Arc;
use std::time::Duration;

use domain::{FieldError, RunAs, RunId, SpecError, WorkflowSpec};
use tokio_util::sync::CancellationToken;

/// The names of the built-in actions.
pub const BUILTIN: &[&str] = domain::spec::ACTIONS;

/// What one attempt of a job is given.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub run_id: RunId,
    /// Stable across attempts and restarts; `STEWARD_IDEMPOTENCY_KEY` / `Idempotency-Key`.
    pub idempotency_key: String,
    /// 1-based.
    pub attempt: u32,
    /// Fires on cancel, e-stop, shutdown or timeout.
    pub cancel: CancellationToken,
    /// How long a cancelled process group gets between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Bytes of output kept (the tail).
    pub output_limit: usize,
    /// Keeps a `shell` job's processes together and records them in the node's ledger;
    /// `None`: a process group only, nothing recorded (embedded use, tests).
    pub supervisor: Option<Arc<Supervisor>>,
    /// What the node holds every job to.
    pub guardrails: Arc<Guardrails>,
    /// The user a `shell` job runs as: its workflow's policy's, else the node's; `None`: the
    /// server's own.
    pub run_as: Option<RunAs>,
    /// The W3C `traceparent` of this attempt: `TRACEPARENT` for a `shell` job, the
    /// `traceparent` header of an `http` job (unless the spec sets one).
    pub traceparent: Option<domain::trace::TraceParent>,
}

/// What a node holds every job to, and the secrets jobs may draw on; set once at start.
#[derive(Clone, Debug, Default)]
pub struct Guardrails {
    /// Steward's own files: `write_file` refuses to write them.
    pub protected: Protected,
    /// Where `{secret: NAME}` values come from.
    pub secrets: Secrets,
    /// Where `http` jobs may not connect.
    pub http_deny: HttpDeny,
}

impl From<SecretError> for ActionError {
    /// A secret that cannot be read now may be there at the next attempt.
    fn from(e: SecretError) -> ActionError {
        ActionError::Failed {
            message: e.to_string(),
            exit_code: None,
            output: String::new(),
        }
    }
}

impl ActionError {
    /// The texts a scrub must cover.
    fn texts_mut(&mut self) -> [Option<&mut String>; 2] {
        match self {
            ActionError::Failed {
                message, output, ..
            }
            | ActionError::Fatal { message, output } => [Some(message), Some(output)],
            ActionError::Cancelled { output } => [Some(output), None],
            ActionError::NotStarted { message } => [Some(message), None],
        }
    }
}

/// What a successful attempt produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobOutput {
    pub exit_code: Option<i32>,
    /// Tail of the output, at most `output_limit` bytes, lossy UTF-8.
    pub output: String,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ActionError {
    /// The attempt failed; a retry may succeed.
    #[error("{message}")]
    Failed {
        message: String,
        exit_code: Option<i32>,
        output: String,
    },
    /// The attempt failed in a way no retry can fix.
    #[error("{message}")]
    Fatal { message: String, output: String },
    /// `ctx.cancel` fired and the work was stopped.
    #[error("cancelled")]
    Cancelled { output: String },
    /// Nothing ran: this node cannot start the attempt now (its data directory is full, say).
    /// Not the job's failure: the engine tries again later without counting an attempt.
    #[error("{message}")]
    NotStarted { message: String },
}

pub use calls::*;
pub use contain::{Containment, ContainmentMode, Supervisor, SweepReport};
pub use deny::{DEFAULT_HTTP_DENY, Denied, HttpDeny};
pub use guard::Protected;
pub use http::{ExpectStatus, HttpArgs, HttpMethod, error_chain, shared_client, tls_config};
pub use identity::check_run_as;
pub use redact::{redact_args, redact_spec, redact_url};
pub use secret::{MASK, SecretError, SecretName, Secrets, Text};
pub use shell::{ShellArgs, raise_fd_limit};
pub use sleep::SleepArgs;
pub use token_bucket::TokenBucketArgs;
pub use write_file::WriteFileArgs;

mod args;
mod calls;
mod contain;
mod deny;
mod guard;
mod http;
mod identity;
mod redact;
mod secret;
mod shell;
mod sleep;
mod tail;
mod token_bucket;
mod write_file;
