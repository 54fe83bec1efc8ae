//! Schedules (docs/schedules.md): a workflow spec and when to run it, and the pure rules that
//! say which fires are due, which were missed, and when to look again.
//!
//! A schedule's *fires* have nominal times: the instants its `cron` expression or `every`
//! interval names. A cron expression is read on the wall clock of the schedule's time zone,
//! and daylight-saving changes follow one rule:
//! - a wall-clock time that does not exist (spring forward) fires at the first instant after
//!   the gap;
//! - a wall-clock time that occurs twice (fall back) fires once, at its first occurrence;
//! - `every` intervals are in absolute time, counted from the Unix epoch.
//!
//! Nominal times only move forward from a schedule's *cursor* (the last nominal time it
//! handled), so a clock that jumps backwards never fires a nominal time twice.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::spec::{FieldError, HumanDuration, SpecError, WorkflowSpec};
use crate::{RunId, RunState, Timestamp};

/// The window when a schedule does not set one.
pub const DEFAULT_CATCHUP_WINDOW: Duration = Duration::from_secs(3600);
/// The shortest catch-up window: a fire a little late must still run.
pub const MIN_CATCHUP_WINDOW: Duration = Duration::from_secs(10);
pub const MAX_CATCHUP_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);
pub const MAX_JITTER: Duration = Duration::from_secs(3600);
pub const MIN_EVERY: Duration = Duration::from_secs(1);
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 24 * 3600);
/// Catch-up fires of one schedule are at least this far apart.
pub const CATCHUP_SPACING: Duration = Duration::from_secs(1);
/// Fires a `backfill` may ask for at once.
pub const MAX_BACKFILL_FIRES: usize = 10_000;
/// Outcomes a schedule remembers (`steward schedule show`); counters keep the totals.
pub const MAX_HISTORY: usize = 20;
/// Missed fires counted one by one after downtime before the rest are skipped over in bulk
/// (the count then says "at least").
pub const MAX_MISSED_SCAN: u64 = 100_000;
pub const MAX_SCHEDULE_BYTES: usize = crate::spec::MAX_SPEC_BYTES;
const MAX_CRON_LEN: usize = 256;
const MAX_TIMEZONE_LEN: usize = 64;

/// What a fire does when the schedule's previous run has not finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// The fire is recorded as skipped.
    #[default]
    Skip,
    /// The fire waits for the previous run to end; one waits at most, later ones are skipped.
    BufferOne,
    /// The fire starts a run alongside.
    Allow,
    /// The previous run is cancelled and the fire starts a run.
    CancelPrevious,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::BufferOne => "buffer_one",
            Overlap::Allow => "allow",
            Overlap::CancelPrevious => "cancel_previous",
        }
    }
}

impl FromStr for Overlap {
    type Err = String;
    fn from_str(s: &str) -> Result<Overlap, String> {
        match s {
            "skip" => Ok(Overlap::Skip),
            "buffer_one" => Ok(Overlap::BufferOne),
            "allow" => Ok(Overlap::Allow),
            "cancel_previous" => Ok(Overlap::CancelPrevious),
            _ => Err(format!(
                "unknown overlap policy {:?}: expected skip, buffer_one, allow or cancel_previous",
                crate::limits::clip(s)
            )),
        }
    }
}

fn default_timezone() -> String {
    "UTC".into()
}

fn default_window() -> HumanDuration {
    HumanDuration(DEFAULT_CATCHUP_WINDOW)
}

fn zero() -> HumanDuration {
    HumanDuration(Duration::ZERO)
}

fn is_zero(d: &HumanDuration) -> bool {
    d.0.is_zero()
}

/// A schedule as its file says it (YAML or JSON), and as it is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// The schedule's unique name.
    pub schedule: String,
    /// 5 fields (minute first) or 6 (second first); exclusive with `every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// A fixed interval in absolute time; exclusive with `cron`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<HumanDuration>,
    /// IANA name; the wall clock `cron` is read on.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default = "default_window")]
    pub catchup_window: HumanDuration,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default = "zero", skip_serializing_if = "is_zero")]
    pub jitter: HumanDuration,
    pub workflow: WorkflowSpec,
}

/// When a schedule fires, ready to compute with.
#[derive(Clone, Debug)]
pub enum Timing {
    Cron {
        cron: Box<croner::Cron>,
        tz: chrono_tz::Tz,
    },
    Every {
        millis: i64,
    },
}

impl ScheduleSpec {
    /// Parses a YAML or JSON document and checks it.
    pub fn parse(text: &str) -> Result<ScheduleSpec, SpecError> {
        let one = |path: &str, m: String| SpecError(vec![FieldError::new(path, m)]);
        if text.len() > MAX_SCHEDULE_BYTES {
            return Err(one(
                "schedule",
                format!("is {} bytes; the limit is {MAX_SCHEDULE_BYTES}", text.len()),
            ));
        }
        crate::limits::check_depth(text, crate::limits::MAX_SPEC_DEPTH)
            .map_err(|e| one("schedule", e))?;
        let value: serde_json::Value = serde_norway::from_str(text)
            .map_err(|e| one("schedule", format!("not valid YAML or JSON: {e}")))?;
        ScheduleSpec::from_value(value)
    }

    /// Builds and checks a schedule from a JSON value, naming the field of any error.
    pub fn from_value(value: serde_json::Value) -> Result<ScheduleSpec, SpecError> {
        let one = |path: &str, m: &str| SpecError(vec![FieldError::new(path, m)]);
        let Some(map) = value.as_object() else {
            return Err(one(
                "schedule",
                "must be a mapping with at least `schedule`, `cron` or `every`, and `workflow`",
            ));
        };
        if map.contains_key("workflow_file") {
            return Err(one(
                "workflow_file",
                "is read by the steward CLI, which sends the workflow inline; send `workflow` instead",
            ));
        }
        let spec: ScheduleSpec = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "schedule".to_owned()
            } else {
                path
            };
            SpecError(vec![FieldError::new(path, e.into_inner().to_string())])
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Every problem with the schedule, the workflow's structure included.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut errs = Vec::new();
        let mut err = |p: &str, m: String| errs.push(FieldError::new(p, m));
        if self.schedule.is_empty() {
            err("schedule", "required: the schedule's unique name".into());
        } else if let Some(m) = crate::spec::check_name(&self.schedule) {
            err("schedule", m.replace("workflow name", "schedule name"));
        }
        match (&self.cron, &self.every) {
            (Some(_), Some(_)) => err("every", "give either `cron` or `every`, not both".into()),
            (None, None) => err("cron", "required: a cron expression, or `every`".into()),
            (Some(c), None) => match parse_cron(c) {
                Err(m) => err("cron", m),
                // Matching is on the wall clock, whatever the zone: from the epoch, a match
                // is a match.
                Ok(cron) if next_cron(&cron, chrono_tz::UTC, Timestamp(0)).is_none() => err(
                    "cron",
                    format!(
                        "{} matches no date (such as the 30th of February): the schedule would never fire",
                        crate::limits::clip(c)
                    ),
                ),
                Ok(_) => {}
            },
            (None, Some(d)) => {
                if d.0 < MIN_EVERY || d.0 > MAX_EVERY {
                    err("every", format!("must be between 1s and 366d (is {d})"));
                } else if d.0.subsec_nanos() != 0 {
                    err("every", format!("must be whole seconds (is {d})"));
                }
            }
        }
        if let Err(m) = parse_timezone(&self.timezone) {
            err("timezone", m);
        }
        let w = self.catchup_window.0;
        if w < MIN_CATCHUP_WINDOW || w > MAX_CATCHUP_WINDOW {
            err(
                "catchup_window",
                format!("must be between 10s and 366d (is {})", self.catchup_window),
            );
        }
        if self.jitter.0 > MAX_JITTER {
            err("jitter", format!("must be at most 1h (is {})", self.jitter));
        }
        if self.workflow.idempotency_key.is_some() {
            err(
                "workflow.idempotency_key",
                "is set by the schedule for each fire (schedule/NAME/NOMINAL_TIME); leave it out"
                    .into(),
            );
        }
        let mut inner = Vec::new();
        self.workflow.validate_into(&mut inner);
        errs.extend(
            inner
                .into_iter()
                .map(|e| FieldError::new(format!("workflow.{}", e.path), e.message)),
        );
        if errs.is_empty() {
            Ok(())
        } else {
            Err(SpecError(errs))
        }
    }

    /// The schedule's timing. Fails only for a spec that never passed [`ScheduleSpec::validate`].
    pub fn timing(&self) -> Result<Timing, String> {
        match (&self.cron, &self.every) {
            (Some(c), _) => Ok(Timing::Cron {
                cron: Box::new(parse_cron(c)?),
                tz: parse_timezone(&self.timezone)?,
            }),
            (None, Some(d)) => Ok(Timing::Every {
                millis: i64::try_from(d.0.as_millis()).map_err(|_| "interval too long")?,
            }),
            (None, None) => Err("neither cron nor every is set".into()),
        }
    }

    /// The idempotency key of the run for the fire at `nominal`.
    pub fn fire_key(&self, nominal: Timestamp) -> String {
        format!("schedule/{}/{}", self.schedule, nominal.to_rfc3339())
    }

    /// How far after its nominal time the fire at `nominal` is due: fixed for each fire, spread
    /// over `[0, jitter)`.
    pub fn jitter_for(&self, nominal: Timestamp) -> Duration {
        let max = u64::try_from(self.jitter.0.as_millis()).unwrap_or(u64::MAX);
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(mix(self.schedule.as_bytes(), nominal.0) % max)
    }

    /// When the fire at `nominal` is due.
    pub fn due_at(&self, nominal: Timestamp) -> Timestamp {
        nominal.plus(self.jitter_for(nominal))
    }

    /// The workflow a fire at `nominal` runs: the schedule's, under the fire's idempotency key.
    pub fn workflow_for(&self, nominal: Timestamp) -> WorkflowSpec {
        let mut w = self.workflow.clone();
        w.idempotency_key = Some(self.fire_key(nominal));
        w
    }
}

/// A stable 64-bit hash of a name and an instant. Hand-written (FNV-1a, then a SplitMix64
/// finish) because the value must never change between releases or platforms, which the
/// standard library's hashers do not promise.
fn mix(bytes: &[u8], n: i64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes.iter().chain(n.to_le_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    if expr.len() > MAX_CRON_LEN {
        return Err(format!(
            "is {} bytes; the limit is {MAX_CRON_LEN}",
            expr.len()
        ));
    }
    let fields = expr.split_whitespace().count();
    if !(fields == 5 || fields == 6) {
        return Err(format!(
            "{:?} has {fields} fields; give 5 (minute hour day month weekday) or 6 (second first)",
            crate::limits::clip(expr)
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| {
            format!(
                "{:?} is not a cron expression: {e}",
                crate::limits::clip(expr)
            )
        })
}

fn parse_timezone(name: &str) -> Result<chrono_tz::Tz, String> {
    if name.len() > MAX_TIMEZONE_LEN {
        return Err(format!(
            "is {} bytes; the limit is {MAX_TIMEZONE_LEN}",
            name.len()
        ));
    }
    chrono_tz::Tz::from_str(name).map_err(|_| {
        format!(
            "unknown time zone {:?}: give an IANA name such as UTC or Europe/Paris",
            crate::limits::clip(name)
        )
    })
}

impl Timing {
    /// The first nominal time strictly after `after`; `None` when there is none (a cron
    /// expression that never matches again, such as the 30th of February).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            Timing::Every { millis } => {
                let k = after.0.div_euclid(*millis).checked_add(1)?;
                k.checked_mul(*millis).map(Timestamp)
            }
            Timing::Cron { cron, tz } => next_cron(cron, *tz, after),
        }
    }

    /// The next `n` nominal times after `after`.
    pub fn upcoming(&self, after: Timestamp, n: usize) -> Vec<Timestamp> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    /// `t` on the schedule's wall clock, for people (`2026-03-08T03:00:00-04:00`).
    pub fn local(&self, t: Timestamp) -> String {
        let Some(utc) = DateTime::<Utc>::from_timestamp_millis(t.0) else {
            return t.to_rfc3339();
        };
        match self {
            Timing::Cron { tz, .. } => utc
                .with_timezone(tz)
                .format("%Y-%m-%dT%H:%M:%S%:z %Z")
                .to_string(),
            Timing::Every { .. } => t.to_rfc3339(),
        }
    }
}

/// Steps a cron search may take before giving up: a repeated hour of a one-second schedule
/// needs 3,600.
const MAX_CRON_STEPS: usize = 10_000;

fn next_cron(cron: &croner::Cron, tz: chrono_tz::Tz, after: Timestamp) -> Option<Timestamp> {
    // Matches are found on the wall clock alone (a calendar without daylight saving: UTC
    // stands in for it), then placed in the zone by the rule in the module docs. Each wall
    // time is visited once, so a repeated one cannot fire twice.
    let mut civil = DateTime::<Utc>::from_timestamp_millis(after.0)?
        .with_timezone(&tz)
        .naive_local();
    for _ in 0..MAX_CRON_STEPS {
        let next = cron
            .find_next_occurrence(&civil.and_utc(), false)
            .ok()?
            .naive_utc();
        let instant = place(tz, next)?;
        if instant > after {
            return Some(instant);
        }
        civil = next;
    }
    None
}

/// The instant of wall time `civil` in `tz`: the first of two, or, in a gap, the first instant
/// after the gap.
fn place(tz: chrono_tz::Tz, civil: NaiveDateTime) -> Option<Timestamp> {
    if let Some(dt) = tz.from_local_datetime(&civil).earliest() {
        return Some(Timestamp(dt.timestamp_millis()));
    }
    // In a gap: the first wall time that exists after it is where the gap ends. Gaps are
    // whole minutes in every zone in use; the walk is bounded by a day (Samoa skipped one).
    let minute = chrono::TimeDelta::minutes(1);
    let mut m = civil;
    for _ in 0..(25 * 60) {
        m += minute;
        if tz.from_local_datetime(&m).earliest().is_some() {
            let mut s = m - chrono::TimeDelta::seconds(59);
            while s <= m {
                if let Some(dt) = tz.from_local_datetime(&s).earliest() {
                    return Some(Timestamp(dt.timestamp_millis()));
                }
                s += chrono::TimeDelta::seconds(1);
            }
        }
    }
    None
}

/// Why a fire ran no workflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FireOutcome {
    /// A run was created (and started, or held by an e-stop `pause`).
    Started { run: RunId },
    /// `steward schedule trigger`: a run now, outside the schedule.
    Triggered { run: RunId },
    /// Waiting for the previous run (`overlap: buffer_one`).
    Buffered,
    /// Past the catch-up window: counted, not run. `count` fires, the newest at `nominal`.
    Missed {
        count: u64,
        #[serde(default)]
        at_least: bool,
    },
    /// Not run, and never run later.
    Skipped { reason: SkipReason },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum SkipReason {
    /// The e-stop says `stop` for the workflow: `target` is the entry's (empty when no entry
    /// matched and the default applied, or the list could not be read); `reason` says it all.
    EStop { target: String, reason: String },
    /// The previous run had not finished (`overlap: skip`, or a second fire under
    /// `buffer_one`).
    Overlap { run: RunId },
    /// A policy refused the workflow at the fire.
    Policy { message: String },
    /// The workflow no longer passes Submit's checks (a secret or bucket removed).
    Invalid { message: String },
}

impl SkipReason {
    /// The metric label: bounded.
    pub fn label(&self) -> &'static str {
        match self {
            SkipReason::EStop { .. } => "estop",
            SkipReason::Overlap { .. } => "overlap",
            SkipReason::Policy { .. } => "policy",
            SkipReason::Invalid { .. } => "invalid",
        }
    }
}

impl fmt::Display for FireOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FireOutcome::Started { run } => write!(f, "started run {run}"),
            FireOutcome::Triggered { run } => write!(f, "triggered run {run}"),
            FireOutcome::Buffered => write!(f, "waiting for the previous run"),
            FireOutcome::Missed { count, at_least } => {
                let more = if *at_least { "at least " } else { "" };
                let s = if *count == 1 { "" } else { "s" };
                write!(f, "missed {more}{count} fire{s} (past the catch-up window)")
            }
            FireOutcome::Skipped { reason } => match reason {
                SkipReason::EStop { reason, .. } => write!(f, "skipped: {reason}"),
                SkipReason::Overlap { run } => {
                    write!(f, "skipped: run {run} had not finished")
                }
                SkipReason::Policy { message } => write!(f, "skipped: {message}"),
                SkipReason::Invalid { message } => write!(f, "skipped: {message}"),
            },
        }
    }
}

/// One fire's outcome, as `steward schedule show` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FireRecord {
    pub nominal: Timestamp,
    /// When it was decided.
    pub at: Timestamp,
    pub outcome: FireOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseInfo {
    pub reason: String,
    pub by: String,
    pub at: Timestamp,
}

/// A `backfill` in progress: every nominal time from `next` to `to` runs, one after another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backfill {
    pub next: Timestamp,
    pub to: Timestamp,
}

/// Everything about a schedule that changes as it fires.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleState {
    pub created_at: Timestamp,
    pub created_by: String,
    pub updated_at: Timestamp,
    pub updated_by: String,
    pub paused: Option<PauseInfo>,
    /// The last nominal time handled (run, missed or skipped); fires come after it.
    pub cursor: Timestamp,
    /// When the scheduler next looks at the schedule; `None` while paused or when it never
    /// fires again.
    pub next_check: Option<Timestamp>,
    /// A fire waiting for the previous run (`overlap: buffer_one`).
    pub buffered: Option<Timestamp>,
    pub backfill: Option<Backfill>,
    /// The newest run it created, and that run's fire.
    pub last_run: Option<RunId>,
    pub last_nominal: Option<Timestamp>,
    pub fired: u64,
    pub missed: u64,
    pub skipped: u64,
    /// The newest outcomes, newest last, at most [`MAX_HISTORY`].
    pub history: Vec<FireRecord>,
}

impl ScheduleState {
    pub fn record(&mut self, nominal: Timestamp, at: Timestamp, outcome: FireOutcome) {
        match &outcome {
            FireOutcome::Started { .. } | FireOutcome::Triggered { .. } => self.fired += 1,
            FireOutcome::Missed { count, .. } => self.missed += count,
            FireOutcome::Skipped { .. } => self.skipped += 1,
            FireOutcome::Buffered => {}
        }
        self.history.push(FireRecord {
            nominal,
            at,
            outcome,
        });
        if self.history.len() > MAX_HISTORY {
            let extra = self.history.len() - MAX_HISTORY;
            self.history.drain(..extra);
        }
    }
}

/// A schedule as stored, with the version every change increments.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRecord {
    pub spec: ScheduleSpec,
    pub state: ScheduleState,
    pub version: i64,
}

/// The newest run of a schedule, as the scheduler needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastRun {
    pub id: RunId,
    pub state: RunState,
    /// It has started a job (a run held by an e-stop `pause` before its first job has not).
    pub started: bool,
}

/// What the regular fires due at `now` come to, from `cursor` on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Fires past the catch-up window: how many, whether the count stopped early, the newest.
    pub missed: u64,
    pub missed_at_least: bool,
    pub newest_missed: Option<Timestamp>,
    /// The fire to make now, if one is due within the window.
    pub fire: Option<Timestamp>,
    /// The cursor after these.
    pub cursor: Timestamp,
}

/// The fires due at `now` after `cursor`: the missed ones counted, the first one inside the
/// catch-up window to fire (catch-up goes one fire at a time; see [`next_check`]).
pub fn due(spec: &ScheduleSpec, timing: &Timing, cursor: Timestamp, now: Timestamp) -> Due {
    let window = spec.catchup_window.0;
    let mut out = Due {
        cursor,
        ..Due::default()
    };
    let mut scanned = 0u64;
    while let Some(n) = timing.next_after(out.cursor) {
        if spec.due_at(n) > now {
            break;
        }
        if n.plus(window) >= now {
            out.fire = Some(n);
            out.cursor = n;
            break;
        }
        out.missed += 1;
        out.newest_missed = Some(n);
        out.cursor = n;
        scanned += 1;
        if scanned >= MAX_MISSED_SCAN {
            // Skip over the rest of the downtime without counting each fire.
            let edge = Timestamp(now.0.saturating_sub(duration_ms(window)).saturating_sub(1));
            if edge > out.cursor {
                out.missed_at_least = true;
                out.cursor = edge;
            }
        }
    }
    out
}

/// When the scheduler must look at a schedule next, given its state after a pass at `now`.
pub fn next_check(
    spec: &ScheduleSpec,
    timing: &Timing,
    state: &ScheduleState,
    now: Timestamp,
    fired_now: bool,
) -> Option<Timestamp> {
    if state.paused.is_some() {
        return None;
    }
    let poll = now.plus(CATCHUP_SPACING);
    if state.buffered.is_some() || state.backfill.is_some() {
        // Waiting on a run to end: look again shortly.
        return Some(poll);
    }
    let next = spec.due_at(timing.next_after(state.cursor)?);
    if fired_now && next <= poll {
        // Catching up: at most one fire per CATCHUP_SPACING.
        return Some(poll);
    }
    Some(next)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The nominal times a backfill from `from` to `to` (both included) covers, if it is within
/// [`MAX_BACKFILL_FIRES`].
pub fn backfill_count(timing: &Timing, from: Timestamp, to: Timestamp) -> Result<usize, String> {
    if to < from {
        return Err("--to is before --from".into());
    }
    let mut n = 0;
    let mut t = Timestamp(from.0.saturating_sub(1));
    while let Some(next) = timing.next_after(t) {
        if next > to {
            break;
        }
        n += 1;
        if n > MAX_BACKFILL_FIRES {
            return Err(format!(
                "covers more than {MAX_BACKFILL_FIRES} fires; backfill a shorter range at a time"
            ));
        }
        t = next;
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
