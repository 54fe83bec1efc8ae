//! Why something stopped. One value per way a run or the process can stop; the first one wins.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopCause {
    /// A client called Cancel.
    Cancelled {
        #[serde(default)]
        by: String,
        #[serde(default)]
        reason: String,
    },
    /// The process received a signal.
    Signal { signal: String, mode: ShutdownMode },
    /// `steward stop` asked the process to stop.
    StopCommand { mode: ShutdownMode },
    /// An e-stop entry matched the run.
    EStop {
        target: String,
        state: String,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        set_by: String,
    },
    /// A component failed and took the process down.
    Fatal { component: String, message: String },
    /// The store could not be reached or written.
    LostStore { message: String },
    /// Submitted, never executed within the submit TTL.
    Expired { ttl_secs: u64 },
}

/// How the process stops (docs/operating.md, Stopping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// Start nothing new; let in-flight jobs finish within the grace period.
    Drain,
    /// Let each run finish its current block.
    EndOfRound,
    /// Cancel in-flight jobs at once.
    Now,
}

impl fmt::Display for ShutdownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShutdownMode::Drain => "drain",
            ShutdownMode::EndOfRound => "end_of_round",
            ShutdownMode::Now => "now",
        })
    }
}

impl fmt::Display for StopCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopCause::Cancelled { by, reason } => {
                write!(f, "cancelled")?;
                if !by.is_empty() {
                    write!(f, " by {by}")?;
                }
                if !reason.is_empty() {
                    write!(f, ": {reason}")?;
                }
                Ok(())
            }
            StopCause::Signal { signal, mode } => write!(f, "{signal} ({mode})"),
            StopCause::StopCommand { mode } => write!(f, "steward stop ({mode})"),
            StopCause::EStop {
                target,
                state,
                reason,
                set_by,
            } => write!(
                f,
                "e-stop entry {target:?} = {state} (set by {}: {})",
                if set_by.is_empty() { "unknown" } else { set_by },
                if reason.is_empty() {
                    "no reason given"
                } else {
                    reason
                }
            ),
            StopCause::Fatal { component, message } => {
                write!(f, "fatal error in {component}: {message}")
            }
            StopCause::LostStore { message } => write!(f, "lost the store: {message}"),
            StopCause::Expired { ttl_secs } => {
                write!(f, "not executed within the submit TTL of {ttl_secs}s")
            }
        }
    }
}

impl StopCause {
    /// A short machine name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StopCause::Cancelled { .. } => "cancelled",
            StopCause::Signal { .. } => "signal",
            StopCause::StopCommand { .. } => "stop_command",
            StopCause::EStop { .. } => "estop",
            StopCause::Fatal { .. } => "fatal",
            StopCause::LostStore { .. } => "lost_store",
            StopCause::Expired { .. } => "expired",
        }
    }
}
