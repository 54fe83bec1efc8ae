//! The `sleep` action: waits, cancellably. Handy for tests, demos and pacing.

use std::time::Duration;

use domain::{FieldError, HumanDuration};
use serde_json::{Map, Value};

use crate::args::{Args, kind};
use crate::{ActionError, JobContext, JobOutput};

/// `sleep` args: `{duration: 30s}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SleepArgs {
    pub duration: Duration,
}

impl SleepArgs {
    pub(crate) fn parse(
        map: &Map<String, Value>,
        job_path: &str,
    ) -> Result<SleepArgs, Vec<FieldError>> {
        let mut a = Args::new(map, job_path, &["duration"]);
        let duration = match a.required("duration") {
            None => None,
            Some(Value::String(s)) => match HumanDuration::parse(s) {
                Ok(d) => Some(d.0),
                Err(m) => {
                    a.error("duration", m);
                    None
                }
            },
            Some(other) => {
                a.error(
                    "duration",
                    format!(
                        "must be a duration such as \"30s\" or \"5m\", not {}",
                        kind(other)
                    ),
                );
                None
            }
        };
        a.finish(duration.map(|duration| SleepArgs { duration }))
    }
}

pub(crate) async fn run(args: &SleepArgs, ctx: &JobContext) -> Result<JobOutput, ActionError> {
    tokio::select! {
        biased;
        () = ctx.cancel.cancelled() => Err(ActionError::Cancelled { output: String::new() }),
        () = tokio::time::sleep(args.duration) => Ok(JobOutput::default()),
    }
}
