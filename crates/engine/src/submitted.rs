//! Runs this node has just stored by Submit, kept until their Exec: the Exec of a handshake
//! starts the run from what its Submit stored instead of reading it back (on SQLite a read on
//! another thread, on PostgreSQL a round trip). The Exec's write moves only a `submitted` run,
//! and nothing changes a `submitted` run but ending it (a cancel, an expiry) or that write, so
//! a run cancelled, expired or started by another node in between is answered as before.
//! Bounded in bytes, since a spec may weigh megabytes: the oldest go first, and a run that is
//! never executed is dropped in time.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use domain::{Run, RunId};

/// What the kept runs may weigh together (by [`weight`]).
const BUDGET_BYTES: usize = 4 * 1024 * 1024;
/// A run heavier than this is not kept: its Exec reads it.
const MAX_RUN_BYTES: usize = 256 * 1024;

#[derive(Default)]
pub(crate) struct SubmittedRuns(Mutex<Kept>);

#[derive(Default)]
struct Kept {
    runs: HashMap<RunId, (Run, usize)>,
    /// Oldest first; may still name runs taken since (skipped when reached, compacted when
    /// they outnumber the kept ones).
    order: VecDeque<RunId>,
    bytes: usize,
}

impl SubmittedRuns {
    /// Keeps `run`, as its Submit stored it.
    pub(crate) fn keep(&self, run: Run) {
        let size = weight(&run);
        if size > MAX_RUN_BYTES {
            return;
        }
        let Ok(mut k) = self.0.lock() else {
            return;
        };
        while k.bytes + size > BUDGET_BYTES {
            let Some(oldest) = k.order.pop_front() else {
                break;
            };
            if let Some((_, s)) = k.runs.remove(&oldest) {
                k.bytes -= s;
            }
        }
        k.bytes += size;
        k.order.push_back(run.id);
        if let Some((_, s)) = k.runs.insert(run.id, (run, size)) {
            k.bytes -= s;
        }
    }

    /// The run as its Submit stored it, if this node kept it; it is kept no longer.
    pub(crate) fn take(&self, id: RunId) -> Option<Run> {
        let mut k = self.0.lock().ok()?;
        let (run, size) = k.runs.remove(&id)?;
        k.bytes -= size;
        if k.order.len() > 2 * k.runs.len() + 64 {
            let Kept { runs, order, .. } = &mut *k;
            order.retain(|id| runs.contains_key(id));
        }
        Some(run)
    }

    #[cfg(test)]
    fn kept(&self) -> (usize, usize, usize) {
        let k = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (k.runs.len(), k.order.len(), k.bytes)
    }
}

/// About what a run weighs in memory: its spec's text and a margin for each part of it.
fn weight(run: &Run) -> usize {
    let s = &run.spec;
    let mut n = 512
        + s.name.len()
        + s.desc.len()
        + s.idempotency_key.as_ref().map_or(0, String::len)
        + run.submitted_by.len();
    n += s
        .labels
        .iter()
        .map(|(k, v)| 48 + k.len() + v.len())
        .sum::<usize>();
    for b in &s.blocks {
        n += 96 + b.desc.len();
        for j in &b.jobs {
            n += 192 + j.action.len() + j.desc.len();
            n += j
                .args
                .iter()
                .map(|(k, v)| 48 + k.len() + value_weight(v))
                .sum::<usize>();
        }
    }
    n
}

fn value_weight(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::String(s) => 24 + s.len(),
        serde_json::Value::Array(a) => 24 + a.iter().map(value_weight).sum::<usize>(),
        serde_json::Value::Object(o) => {
            24 + o
                .iter()
                .map(|(k, v)| 48 + k.len() + value_weight(v))
                .sum::<usize>()
        }
        _ => 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(arg_bytes: usize) -> Run {
        let spec = domain::WorkflowSpec::parse(&format!(
            "name: w\nblocks:\n  - jobs: [{{action: noop, args: {{pad: \"{}\"}}}}]\n",
            "x".repeat(arg_bytes)
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let now = domain::Timestamp(0);
        Run::created(RunId::new_v7(), spec, now, now)
    }

    #[test]
    fn a_kept_run_is_taken_once() {
        let kept = SubmittedRuns::default();
        let r = run(10);
        let id = r.id;
        kept.keep(r);
        assert_eq!(kept.take(id).map(|r| r.id), Some(id));
        assert!(kept.take(id).is_none());
        assert_eq!(kept.kept().0, 0);
        assert_eq!(kept.kept().2, 0);
    }

    #[test]
    fn the_oldest_go_first_when_the_budget_is_spent() {
        let kept = SubmittedRuns::default();
        let ids: Vec<RunId> = (0..40)
            .map(|_| {
                let r = run(200 * 1024);
                let id = r.id;
                kept.keep(r);
                id
            })
            .collect();
        let (n, _, bytes) = kept.kept();
        assert!(bytes <= BUDGET_BYTES, "{bytes}");
        assert!((10..40).contains(&n), "{n}");
        assert!(kept.take(ids[0]).is_none(), "the oldest went first");
        assert!(kept.take(ids[39]).is_some(), "the newest stays");
    }

    #[test]
    fn a_heavy_run_is_not_kept() {
        let kept = SubmittedRuns::default();
        let r = run(MAX_RUN_BYTES);
        let id = r.id;
        kept.keep(r);
        assert!(kept.take(id).is_none());
        assert_eq!(kept.kept(), (0, 0, 0));
    }

    #[test]
    fn taken_runs_do_not_pile_up_in_the_order() {
        let kept = SubmittedRuns::default();
        for _ in 0..10_000 {
            let r = run(10);
            let id = r.id;
            kept.keep(r);
            assert!(kept.take(id).is_some());
        }
        let (n, order, bytes) = kept.kept();
        assert_eq!((n, bytes), (0, 0));
        assert!(order <= 64 + 1, "{order}");
    }
}
