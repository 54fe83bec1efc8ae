//! Wire <-> domain, by hand, in one place.

use std::collections::BTreeMap;

use domain::{
    BlockSpec, FieldError, HumanDuration, JobSpec, RetrySpec, Run, RunSummary, SpecError,
    StopCause, Timestamp, WorkflowSpec,
};
use proto::v1 as pb;

fn ts(t: Option<Timestamp>) -> String {
    t.map(|t| t.to_rfc3339()).unwrap_or_default()
}

fn duration(s: &str, path: String, errs: &mut Vec<FieldError>) -> Option<HumanDuration> {
    if s.is_empty() {
        return None;
    }
    match HumanDuration::parse(s) {
        Ok(d) => Some(d),
        Err(m) => {
            errs.push(FieldError::new(path, m));
            None
        }
    }
}

/// `google.protobuf.Struct` carries every number as a double: give whole numbers back their
/// integer form (`200.0` → `200`), at any depth, so args read the same as in a YAML file.
fn whole_numbers(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
                #[allow(clippy::cast_possible_truncation)] // whole and within 2^53: exact
                Value::from(f as i64)
            }
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(whole_numbers).collect()),
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, whole_numbers(v))).collect())
        }
        other => other,
    }
}

/// A `WorkReq` as a domain spec; durations that do not parse are reported by field path.
pub fn spec_from_wire(w: pb::WorkReq) -> Result<WorkflowSpec, SpecError> {
    // The limit on a spec's text, applied to the message: a spec sent as a message (gRPC, or
    // HTTP's `{"spec": ...}`) is no larger than as a file.
    let size = prost::Message::encoded_len(&w);
    if size > domain::spec::MAX_SPEC_BYTES {
        return Err(SpecError(vec![FieldError::new(
            "spec",
            format!(
                "is {size} bytes (as a protobuf message); the limit is {}",
                domain::spec::MAX_SPEC_BYTES
            ),
        )]));
    }
    let mut errs = Vec::new();
    let mut blocks = Vec::with_capacity(w.blocks.len());
    for (bi, b) in w.blocks.into_iter().enumerate() {
        let mut jobs = Vec::with_capacity(b.jobs.len());
        for (ji, j) in b.jobs.into_iter().enumerate() {
            let jp = format!("blocks[{bi}].jobs[{ji}]");
            let args = match j.args {
                None => serde_json::Map::new(),
                Some(s) => match serde_json::to_value(&s).map(whole_numbers) {
                    Ok(serde_json::Value::Object(m)) => m,
                    _ => {
                        errs.push(FieldError::new(format!("{jp}.args"), "must be a mapping"));
                        serde_json::Map::new()
                    }
                },
            };
            let retry = j.retry.map(|r| {
                let d = RetrySpec::default();
                RetrySpec {
                    attempts: r.attempts,
                    initial_backoff: duration(
                        &r.initial_backoff,
                        format!("{jp}.retry.initial_backoff"),
                        &mut errs,
                    )
                    .unwrap_or(d.initial_backoff),
                    max_backoff: duration(
                        &r.max_backoff,
                        format!("{jp}.retry.max_backoff"),
                        &mut errs,
                    )
                    .unwrap_or(d.max_backoff),
                }
            });
            jobs.push(JobSpec {
                action: j.action,
                desc: j.desc,
                args,
                retry,
                timeout: duration(&j.timeout, format!("{jp}.timeout"), &mut errs),
            });
        }
        blocks.push(BlockSpec {
            desc: b.desc,
            concurrency: b.concurrency.unwrap_or(1),
            max_failures: b.max_failures,
            jobs,
        });
    }
    let spec = WorkflowSpec {
        name: w.name,
        desc: w.desc,
        labels: w.labels.into_iter().collect(),
        idempotency_key: (!w.idempotency_key.is_empty()).then_some(w.idempotency_key),
        blocks,
    };
    if errs.is_empty() {
        Ok(spec)
    } else {
        Err(SpecError(errs))
    }
}

pub fn spec_to_wire(s: &WorkflowSpec) -> pb::WorkReq {
    pb::WorkReq {
        name: s.name.clone(),
        desc: s.desc.clone(),
        labels: s.labels.clone().into_iter().collect(),
        idempotency_key: s.idempotency_key.clone().unwrap_or_default(),
        blocks: s
            .blocks
            .iter()
            .map(|b| pb::Block {
                desc: b.desc.clone(),
                concurrency: Some(b.concurrency),
                max_failures: b.max_failures,
                jobs: b
                    .jobs
                    .iter()
                    .map(|j| pb::Job {
                        action: j.action.clone(),
                        desc: j.desc.clone(),
                        args: if j.args.is_empty() {
                            None
                        } else {
                            serde_json::from_value(serde_json::Value::Object(j.args.clone())).ok()
                        },
                        retry: j.retry.as_ref().map(|r| pb::Retry {
                            attempts: r.attempts,
                            initial_backoff: r.initial_backoff.to_string(),
                            max_backoff: r.max_backoff.to_string(),
                        }),
                        timeout: j.timeout.map(|t| t.to_string()).unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub fn stop_cause_to_wire(c: &StopCause) -> pb::StopCause {
    let mut details = BTreeMap::new();
    if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(c) {
        for (k, v) in m {
            if k == "kind" {
                continue;
            }
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            details.insert(k, v);
        }
    }
    pb::StopCause {
        kind: c.kind().to_owned(),
        message: c.to_string(),
        details: details.into_iter().collect(),
    }
}

pub fn run_to_wire(r: &Run) -> pb::Run {
    pb::Run {
        id: r.id.to_string(),
        name: r.spec.name.clone(),
        desc: r.spec.desc.clone(),
        labels: r.spec.labels.clone().into_iter().collect(),
        state: r.state.to_string(),
        created_at: r.created_at.to_rfc3339(),
        started_at: ts(r.started_at),
        ended_at: ts(r.ended_at),
        expires_at: ts(r.expires_at),
        error: r.error.clone().unwrap_or_default(),
        stop_cause: r.stop_cause.as_ref().map(stop_cause_to_wire),
        idempotency_key: r.spec.idempotency_key.clone().unwrap_or_default(),
        cloned_from: r.cloned_from.map(|c| c.to_string()).unwrap_or_default(),
        lease_owner: r
            .lease_owner
            .as_ref()
            .map(|n| n.0.clone())
            .unwrap_or_default(),
        blocks: r
            .blocks
            .iter()
            .zip(&r.spec.blocks)
            .enumerate()
            .map(|(bi, (b, bs))| pb::BlockStatus {
                index: u32::try_from(bi).unwrap_or(u32::MAX),
                desc: bs.desc.clone(),
                state: b.state.to_string(),
                started_at: ts(b.started_at),
                ended_at: ts(b.ended_at),
                jobs: b
                    .jobs
                    .iter()
                    .zip(&bs.jobs)
                    .enumerate()
                    .map(|(ji, (j, js))| pb::JobStatus {
                        index: u32::try_from(ji).unwrap_or(u32::MAX),
                        action: js.action.clone(),
                        desc: js.desc.clone(),
                        state: j.state.to_string(),
                        attempts: j.attempts,
                        started_at: ts(j.started_at),
                        ended_at: ts(j.ended_at),
                        error: j.error.clone().unwrap_or_default(),
                        exit_code: j.exit_code,
                        output: j.output.clone(),
                        idempotency_key: domain::JobKey {
                            block: u32::try_from(bi).unwrap_or(u32::MAX),
                            job: u32::try_from(ji).unwrap_or(u32::MAX),
                        }
                        .idempotency_key(r.id),
                    })
                    .collect(),
            })
            .collect(),
        // As every surface shows it: values the redaction rule hides are `***`.
        spec: Some(spec_to_wire(&actions::redact_spec(&r.spec))),
        // Filled by the caller, which knows the e-stop list.
        estop: None,
        submitted_by: r.submitted_by.clone(),
        schedule: scheduled_name(r.schedule.as_ref()),
        nominal_time: ts(r.schedule.as_ref().map(|s| s.nominal_time)),
        partial: false,
    }
}

/// The schedule of a run its fire created; empty for any other run.
fn scheduled_name(s: Option<&domain::ScheduledBy>) -> String {
    s.map(|s| s.name.clone()).unwrap_or_default()
}

pub fn summary_to_wire(r: &RunSummary) -> pb::RunSummary {
    pb::RunSummary {
        id: r.id.to_string(),
        name: r.name.clone(),
        desc: r.desc.clone(),
        labels: r.labels.clone().into_iter().collect(),
        state: r.state.to_string(),
        created_at: r.created_at.to_rfc3339(),
        started_at: ts(r.started_at),
        ended_at: ts(r.ended_at),
        error: r.error.clone().unwrap_or_default(),
        stop_cause: r.stop_cause.as_ref().map(stop_cause_to_wire),
        submitted_by: r.submitted_by.clone(),
        schedule: scheduled_name(r.schedule.as_ref()),
        nominal_time: ts(r.schedule.as_ref().map(|s| s.nominal_time)),
    }
}

/// A schedule from the wire, checked as its file would be (the same field names).
pub fn schedule_from_wire(
    s: Option<pb::ScheduleSpec>,
) -> Result<domain::schedule::ScheduleSpec, domain::SpecError> {
    let one = |path: &str, m: &str| domain::SpecError(vec![domain::FieldError::new(path, m)]);
    let s = s.ok_or_else(|| one("spec", "required"))?;
    let workflow =
        spec_from_wire(s.workflow.ok_or_else(|| one("workflow", "required"))?).map_err(|e| {
            domain::SpecError(
                e.0.into_iter()
                    .map(|f| domain::FieldError::new(format!("workflow.{}", f.path), f.message))
                    .collect(),
            )
        })?;
    let workflow = serde_json::to_value(&workflow).map_err(|e| one("workflow", &e.to_string()))?;
    let mut doc = serde_json::Map::new();
    doc.insert("schedule".into(), s.schedule.into());
    for (key, value) in [
        ("cron", s.cron),
        ("every", s.every),
        ("timezone", s.timezone),
        ("catchup_window", s.catchup_window),
        ("overlap", s.overlap),
        ("jitter", s.jitter),
    ] {
        if !value.is_empty() {
            doc.insert(key.into(), value.into());
        }
    }
    doc.insert("workflow".into(), workflow);
    domain::schedule::ScheduleSpec::from_value(serde_json::Value::Object(doc))
}

/// A schedule's spec on the wire, as a client sends it.
pub fn schedule_spec_to_wire(s: &domain::schedule::ScheduleSpec) -> pb::ScheduleSpec {
    pb::ScheduleSpec {
        schedule: s.schedule.clone(),
        cron: s.cron.clone().unwrap_or_default(),
        every: s.every.map(|d| d.to_string()).unwrap_or_default(),
        timezone: s.timezone.clone(),
        catchup_window: s.catchup_window.to_string(),
        overlap: s.overlap.as_str().to_owned(),
        jitter: if s.jitter.0.is_zero() {
            String::new()
        } else {
            s.jitter.to_string()
        },
        workflow: Some(spec_to_wire(&s.workflow)),
    }
}

pub fn schedule_to_wire(v: &engine::ScheduleView) -> pb::Schedule {
    use domain::schedule::FireOutcome;
    let st = &v.record.state;
    let paused = st.paused.as_ref();
    pb::Schedule {
        // As every surface shows it: its workflow through the redaction rule.
        spec: Some(schedule_spec_to_wire(&domain::schedule::ScheduleSpec {
            workflow: actions::redact_spec(&v.record.spec.workflow).into_owned(),
            ..v.record.spec.clone()
        })),
        paused: paused.is_some(),
        pause_reason: paused.map(|p| p.reason.clone()).unwrap_or_default(),
        paused_by: paused.map(|p| p.by.clone()).unwrap_or_default(),
        paused_at: ts(paused.map(|p| p.at)),
        created_at: st.created_at.to_rfc3339(),
        created_by: st.created_by.clone(),
        updated_at: st.updated_at.to_rfc3339(),
        updated_by: st.updated_by.clone(),
        cursor: st.cursor.to_rfc3339(),
        upcoming: v
            .upcoming
            .iter()
            .map(|(t, local)| pb::UpcomingFire {
                nominal_time: t.to_rfc3339(),
                local_time: local.clone(),
            })
            .collect(),
        buffered: ts(st.buffered),
        backfill_next: ts(st.backfill.map(|b| b.next)),
        backfill_to: ts(st.backfill.map(|b| b.to)),
        last_run: st.last_run.map(|r| r.to_string()).unwrap_or_default(),
        fired: st.fired,
        missed: st.missed,
        skipped: st.skipped,
        history: st
            .history
            .iter()
            .map(|h| {
                let (outcome, run) = match &h.outcome {
                    FireOutcome::Started { run } => ("started", Some(*run)),
                    FireOutcome::Triggered { run } => ("triggered", Some(*run)),
                    FireOutcome::Buffered => ("buffered", None),
                    FireOutcome::Missed { .. } => ("missed", None),
                    FireOutcome::Skipped { .. } => ("skipped", None),
                };
                pb::FireRecord {
                    nominal_time: h.nominal.to_rfc3339(),
                    at: h.at.to_rfc3339(),
                    outcome: outcome.to_owned(),
                    run_id: run.map(|r| r.to_string()).unwrap_or_default(),
                    detail: h.outcome.to_string(),
                }
            })
            .collect(),
    }
}

pub fn token_to_wire(t: &store::TokenRecord) -> pb::Token {
    pb::Token {
        name: t.name.clone(),
        role: t.role.to_string(),
        scopes: scopes_to_wire(&t.scope),
        created_by: t.created_by.clone(),
        created_at: t.created_at.to_rfc3339(),
        expires_at: ts(t.expires_at),
        last_used_at: ts(t.last_used_at),
    }
}

fn scopes_to_wire(s: &domain::auth::Scope) -> Vec<String> {
    let mut out: Vec<String> = s
        .workflows
        .iter()
        .map(|w| format!("workflow={w}"))
        .collect();
    for (k, vs) in &s.labels {
        out.extend(vs.iter().map(|v| format!("{k}={v}")));
    }
    out
}

pub fn access_to_wire(a: &store::AccessRecord) -> pb::AccessRecord {
    pb::AccessRecord {
        at: a.at.to_rfc3339(),
        actor: a.actor.clone(),
        call: a.call.clone(),
        target: a.target.clone(),
        allowed: a.allowed,
        peer: a.peer.clone(),
        detail: a.detail.clone(),
    }
}

pub fn violations(e: &SpecError) -> Vec<pb::FieldViolation> {
    e.0.iter()
        .map(|f| pb::FieldViolation {
            field: f.path.clone(),
            description: f.message.clone(),
        })
        .collect()
}

pub fn entry_to_wire(e: &domain::estop::Entry) -> pb::EStopEntry {
    pb::EStopEntry {
        target: e.target.to_string(),
        state: e.state.to_string(),
        reason: e.reason.clone(),
        set_by: e.set_by.clone(),
        set_at: e.set_at.clone(),
    }
}

pub fn verdict_to_wire(v: &domain::estop::Verdict) -> pb::EStopVerdict {
    pb::EStopVerdict {
        state: v.state.to_string(),
        message: v.to_string(),
        entry: match &v.because {
            domain::estop::Because::Entry { entry } => Some(entry_to_wire(entry)),
            _ => None,
        },
    }
}

pub fn audit_to_wire(r: &domain::estop::AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        at: r.at.clone(),
        target: r.target.to_string(),
        old_state: r.old_state.map(|s| s.to_string()).unwrap_or_default(),
        new_state: r.new_state.map(|s| s.to_string()).unwrap_or_default(),
        set_by: r.set_by.clone(),
        reason: r.reason.clone(),
        source: r.source.clone(),
    }
}

/// Applies a `partial` Watch message to the run it follows: its header replaces the run's,
/// its blocks and jobs replace those of the same index. A whole message replaces the run.
pub fn merge_run(run: &mut pb::Run, delta: pb::Run) {
    if !delta.partial {
        *run = delta;
        return;
    }
    let blocks = std::mem::take(&mut run.blocks);
    let spec = run.spec.take();
    let changed = delta.blocks;
    *run = pb::Run {
        blocks,
        spec,
        partial: false,
        ..delta
    };
    for b in changed {
        let Some(old) = run.blocks.iter_mut().find(|o| o.index == b.index) else {
            run.blocks.push(b);
            continue;
        };
        old.state = b.state;
        old.started_at = b.started_at;
        old.ended_at = b.ended_at;
        for j in b.jobs {
            match old.jobs.iter_mut().find(|o| o.index == j.index) {
                Some(o) => *o = j,
                None => old.jobs.push(j),
            }
        }
    }
}
