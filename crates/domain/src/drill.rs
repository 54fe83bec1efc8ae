//! The e-stop drill's canary (`steward drill estop`): a run that does nothing but keep one
//! process alive until the drill's stop ends it. Its shape is fixed, so that it needs no policy
//! entry of its own: a spec of exactly this shape is accepted without one, and nothing else
//! under its name is.

use std::collections::BTreeMap;

use crate::{BlockSpec, JobSpec, WorkflowSpec};

/// The canary's workflow name.
pub const WORKFLOW: &str = "steward-drill";
/// The label that names the drill a canary belongs to: the drill's own e-stop target.
pub const LABEL: &str = "steward_drill";
/// What the canary runs: one process, for at most this long.
const ARGV: [&str; 2] = ["sleep", "3600"];

/// The canary of drill `id`, also labelled `extra` (`KEY=VALUE`) when the drill's target is a
/// label of the operator's choosing.
pub fn canary(id: &str, extra: Option<(&str, &str)>) -> WorkflowSpec {
    let mut labels = BTreeMap::from([(LABEL.to_owned(), id.to_owned())]);
    if let Some((k, v)) = extra {
        labels.insert(k.to_owned(), v.to_owned());
    }
    let mut args = serde_json::Map::new();
    args.insert("argv".into(), serde_json::json!(ARGV));
    WorkflowSpec {
        name: WORKFLOW.into(),
        desc: format!("e-stop drill {id}: a canary the drill's stop ends"),
        labels,
        idempotency_key: None,
        blocks: vec![BlockSpec {
            jobs: vec![JobSpec {
                action: "shell".into(),
                args,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Whether `spec` is a drill canary: the canary's name, its one job exactly, the drill label
/// and at most one other label.
pub fn is_canary(spec: &WorkflowSpec) -> bool {
    let [block] = spec.blocks.as_slice() else {
        return false;
    };
    let [job] = block.jobs.as_slice() else {
        return false;
    };
    let expected = canary("", None);
    let expected_job = &expected.blocks[0].jobs[0];
    spec.name == WORKFLOW
        && spec.labels.contains_key(LABEL)
        && spec.labels.len() <= 2
        && job.action == expected_job.action
        && job.args == expected_job.args
        && job.retry.is_none()
        && job.timeout.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canary_is_a_canary() {
        assert!(is_canary(&canary("d1", None)));
        assert!(is_canary(&canary("d1", Some(("site", "aap")))));
        let mut other = canary("d1", None);
        other.blocks[0].jobs[0]
            .args
            .insert("argv".into(), serde_json::json!(["rm", "-rf", "/"]));
        assert!(!is_canary(&other));
        let mut named = canary("d1", None);
        named.name = "erase".into();
        assert!(!is_canary(&named));
        let mut more = canary("d1", Some(("site", "aap")));
        more.labels.insert("x".into(), "y".into());
        assert!(!is_canary(&more));
        let mut two = canary("d1", None);
        two.blocks.push(two.blocks[0].clone());
        assert!(!is_canary(&two));
    }
}
