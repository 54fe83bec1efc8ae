//! Pure rate decisions (docs/operating.md, Policies): token buckets and per-workflow error budgets. No I/O,
//! no clock: every call takes `now`. The stores persist [`BucketState`]; the engine asks.

use std::time::Duration;

use domain::{RunId, Timestamp};
use serde::{Deserialize, Serialize};

/// A named bucket as configured: holds at most `size` tokens; `refill` tokens are added every
/// `every`, up to `size`. A bucket starts full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSpec {
    pub size: u64,
    pub refill: u64,
    pub every: Duration,
}

/// What a store keeps of a bucket between calls (and restarts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketState {
    pub tokens: u64,
    /// The last refill boundary: refills are due at `refilled_at + k * every`.
    pub refilled_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Take {
    pub granted: bool,
    pub state: BucketState,
    /// When the next token is due (meaningful when not granted).
    pub next_token_at: Timestamp,
}

impl BucketSpec {
    fn every_ms(&self) -> i64 {
        i64::try_from(self.every.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// The bucket at `now`: refills due since `state.refilled_at` added, capped at `size`.
    pub fn refilled(&self, state: Option<BucketState>, now: Timestamp) -> BucketState {
        let Some(s) = state else {
            return BucketState {
                tokens: self.size,
                refilled_at: now,
            };
        };
        let every = self.every_ms();
        let periods = (now.0 - s.refilled_at.0).max(0) / every;
        let added = u64::try_from(periods)
            .unwrap_or(0)
            .saturating_mul(self.refill);
        let tokens = s.tokens.saturating_add(added).min(self.size);
        BucketState {
            tokens,
            refilled_at: if tokens >= self.size {
                now
            } else {
                Timestamp(s.refilled_at.0 + periods * every)
            },
        }
    }

    /// Takes one token at `now` if there is one.
    pub fn take(&self, state: Option<BucketState>, now: Timestamp) -> Take {
        let s = self.refilled(state, now);
        if s.tokens > 0 {
            let state = BucketState {
                tokens: s.tokens - 1,
                refilled_at: s.refilled_at,
            };
            Take {
                granted: true,
                state,
                next_token_at: now,
            }
        } else {
            Take {
                granted: false,
                state: s,
                next_token_at: Timestamp(s.refilled_at.0 + self.every_ms()),
            }
        }
    }
}

/// N failed runs of one workflow within a window trips the e-stop for that workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorBudget {
    pub failures: u32,
    pub window: Duration,
}

/// A budget that ran out: which runs used it up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tripped {
    pub workflow: String,
    pub budget: ErrorBudget,
    pub runs: Vec<RunId>,
}

impl std::fmt::Display for Tripped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let runs: Vec<String> = self.runs.iter().map(ToString::to_string).collect();
        write!(
            f,
            "error budget of workflow {} exhausted: {} failed runs within {} (runs {})",
            self.workflow,
            self.runs.len(),
            domain::HumanDuration(self.budget.window),
            runs.join(", ")
        )
    }
}

impl ErrorBudget {
    /// Whether the failed runs of `workflow` (when each ended, and which run it was) exhaust
    /// this budget at `now`. A failure counts if it ended within the window and after
    /// `last_trip` (after a trip the budget starts afresh); each run counts once. The trip
    /// names the runs, oldest first.
    pub fn check(
        &self,
        workflow: &str,
        failures: &[(Timestamp, RunId)],
        now: Timestamp,
        last_trip: Option<Timestamp>,
    ) -> Option<Tripped> {
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let mut counted: Vec<(Timestamp, RunId)> = failures
            .iter()
            .copied()
            .filter(|(t, _)| now.0.saturating_sub(t.0) <= window_ms)
            .filter(|(t, _)| last_trip.is_none_or(|trip| t.0 > trip.0))
            .collect();
        counted.sort();
        counted.dedup_by_key(|(_, r)| *r);
        (counted.len() >= self.failures.max(1) as usize).then(|| Tripped {
            workflow: workflow.to_owned(),
            budget: self.clone(),
            runs: counted.into_iter().map(|(_, r)| r).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn a_bucket_starts_full_refills_by_interval_and_caps_at_size() {
        let b = BucketSpec {
            size: 2,
            refill: 1,
            every: Duration::from_secs(60),
        };
        let t0 = Timestamp(1_000_000);
        let t = b.take(None, t0);
        assert!(t.granted);
        let t = b.take(Some(t.state), t0);
        assert!(t.granted);
        let t = b.take(Some(t.state), Timestamp(t0.0 + MIN - 1));
        assert!(!t.granted);
        assert_eq!(t.next_token_at, Timestamp(t0.0 + MIN));
        let t = b.take(Some(t.state), Timestamp(t0.0 + MIN));
        assert!(t.granted, "one refill after one interval");
        let t = b.take(Some(t.state), Timestamp(t0.0 + MIN + 1));
        assert!(!t.granted);
        let s = b.refilled(Some(t.state), Timestamp(t0.0 + 100 * MIN));
        assert_eq!(s.tokens, 2, "never over size");
    }

    #[test]
    fn one_token_per_30_minutes() {
        let b = BucketSpec {
            size: 1,
            refill: 1,
            every: Duration::from_secs(1800),
        };
        let t0 = Timestamp(5_000_000);
        let first = b.take(None, t0);
        assert!(first.granted);
        assert!(
            !b.take(Some(first.state), Timestamp(t0.0 + 29 * MIN))
                .granted
        );
        assert!(
            b.take(Some(first.state), Timestamp(t0.0 + 30 * MIN))
                .granted
        );
    }

    #[test]
    fn a_budget_trips_on_the_nth_failure_within_the_window() {
        let b = ErrorBudget {
            failures: 3,
            window: Duration::from_secs(600),
        };
        let r: Vec<RunId> = (0..5).map(|_| RunId::new_v7()).collect();
        let at = |m: i64| Timestamp(m * MIN);
        let mut failed = vec![(at(0), r[0]), (at(11), r[1]), (at(12), r[2])];
        assert!(
            b.check("Erase", &failed, at(12), None).is_none(),
            "the first fell out of the window: two count"
        );
        failed.push((at(11), r[1]));
        assert!(
            b.check("Erase", &failed, at(12), None).is_none(),
            "the same run counts once"
        );
        failed.push((at(13), r[3]));
        let trip = b.check("Erase", &failed, at(13), None).unwrap();
        assert_eq!(trip.runs, vec![r[1], r[2], r[3]]);
        assert!(trip.to_string().contains("3 failed runs within 10m"));
        // After a trip at 13 min the budget starts afresh.
        failed.push((at(14), r[4]));
        assert!(b.check("Erase", &failed, at(14), Some(at(13))).is_none());
    }
}
