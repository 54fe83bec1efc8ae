//! Run and job states (docs/workflows.md) and the legal moves between them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown {} {}; expected one of: {}",
                        stringify!($name),
                        $crate::limits::clip(other),
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Stored, not executing; waits for Exec.
    Submitted,
    /// Exec accepted; waiting for a node to start its first job.
    Queued,
    Running,
    /// Starts no new jobs until its e-stop entry returns to `go`.
    Paused,
    Completed,
    Failed,
    /// Halted by the e-stop.
    Stopped,
    Cancelled,
    /// Submitted but never executed within the submit TTL.
    Expired,
}

string_enum!(RunState {
    Submitted => "submitted",
    Queued => "queued",
    Running => "running",
    Paused => "paused",
    Completed => "completed",
    Failed => "failed",
    Stopped => "stopped",
    Cancelled => "cancelled",
    Expired => "expired",
});

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Completed
                | RunState::Failed
                | RunState::Stopped
                | RunState::Cancelled
                | RunState::Expired
        )
    }

    /// Exec was accepted and the run has not finished: a node must drive it.
    pub fn is_executing(self) -> bool {
        matches!(
            self,
            RunState::Queued | RunState::Running | RunState::Paused
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
    /// Never started because its block or run ended first.
    Skipped,
    Stopped,
    Cancelled,
}

string_enum!(JobState {
    Pending => "pending",
    Running => "running",
    Completed => "completed",
    Failed => "failed",
    Skipped => "skipped",
    Stopped => "stopped",
    Cancelled => "cancelled",
});

impl JobState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Pending | JobState::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_strings() {
        for s in RunState::ALL {
            assert_eq!(s.as_str().parse::<RunState>(), Ok(*s));
        }
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(*s));
        }
        assert!(
            "nope"
                .parse::<RunState>()
                .unwrap_err()
                .contains("submitted")
        );
    }
}
