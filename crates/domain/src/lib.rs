//! Steward's vocabulary. Everything here is plain data and pure functions: no I/O, no async.

pub mod auth;
pub mod clock;
pub mod drill;
pub mod estop;
pub mod ids;
pub mod limits;
pub mod run;
pub mod run_as;
pub mod schedule;
pub mod spec;
pub mod state;
pub mod stop;
pub mod trace;

pub use clock::{Clock, SystemClock, Timestamp};
pub use ids::{NodeId, RunId};
pub use run::{BlockStatus, JobKey, JobStatus, Run, RunSummary, ScheduledBy};
pub use run_as::RunAs;
pub use spec::{BlockSpec, FieldError, HumanDuration, JobSpec, RetrySpec, SpecError, WorkflowSpec};
pub use state::{JobState, RunState};
pub use stop::StopCause;
