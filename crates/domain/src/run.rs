//! A run as the stores keep it and clients see it.

use serde::{Deserialize, Serialize};

use crate::{JobState, NodeId, RunId, RunState, StopCause, Timestamp, WorkflowSpec};

/// The position of a job in its run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobKey {
    pub block: u32,
    pub job: u32,
}

impl JobKey {
    /// The job's idempotency key: the same on every attempt, on every node, after restarts.
    pub fn idempotency_key(self, run: RunId) -> String {
        format!("{run}/b{}/j{}", self.block, self.job)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: RunId,
    pub spec: WorkflowSpec,
    pub state: RunState,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    /// When a `submitted` run expires if nobody calls Exec.
    pub expires_at: Option<Timestamp>,
    pub error: Option<String>,
    pub stop_cause: Option<StopCause>,
    pub lease_owner: Option<NodeId>,
    pub lease_expires_at: Option<Timestamp>,
    /// Where a clone came from.
    pub cloned_from: Option<RunId>,
    /// A Cancel that the node driving the run has yet to carry out.
    pub cancel_requested: Option<StopCause>,
    /// The name of the token that submitted it (empty when authentication is off).
    #[serde(default)]
    pub submitted_by: String,
    /// The schedule whose fire created it, and that fire's nominal time.
    #[serde(default)]
    pub schedule: Option<ScheduledBy>,
    pub blocks: Vec<BlockStatus>,
}

/// A run without its blocks: what List returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: RunId,
    pub name: String,
    pub desc: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub state: RunState,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub error: Option<String>,
    pub stop_cause: Option<StopCause>,
    /// The name of the token that submitted it (empty when authentication is off).
    #[serde(default)]
    pub submitted_by: String,
    #[serde(default)]
    pub schedule: Option<ScheduledBy>,
}

/// The schedule fire a run was created by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledBy {
    pub name: String,
    pub nominal_time: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockStatus {
    pub state: JobState,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub jobs: Vec<JobStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub state: JobState,
    pub attempts: u32,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    /// A bounded tail of the job's output.
    pub output: String,
}

impl JobStatus {
    pub fn pending() -> JobStatus {
        JobStatus {
            state: JobState::Pending,
            attempts: 0,
            started_at: None,
            ended_at: None,
            error: None,
            exit_code: None,
            output: String::new(),
        }
    }
}

impl Run {
    /// A run as it is stored the moment it is created: every block and job pending, no lease.
    pub fn created(
        id: RunId,
        spec: WorkflowSpec,
        created_at: Timestamp,
        expires_at: Timestamp,
    ) -> Run {
        let blocks = spec
            .blocks
            .iter()
            .map(|b| BlockStatus {
                state: JobState::Pending,
                started_at: None,
                ended_at: None,
                jobs: b.jobs.iter().map(|_| JobStatus::pending()).collect(),
            })
            .collect();
        Run {
            id,
            spec,
            state: RunState::Submitted,
            created_at,
            started_at: None,
            ended_at: None,
            expires_at: Some(expires_at),
            error: None,
            stop_cause: None,
            lease_owner: None,
            lease_expires_at: None,
            cloned_from: None,
            cancel_requested: None,
            submitted_by: String::new(),
            schedule: None,
            blocks,
        }
    }

    /// The first block that has not finished, where a resumed run goes on.
    pub fn first_unfinished_block(&self) -> Option<usize> {
        self.blocks.iter().position(|b| !b.state.is_terminal())
    }
}
