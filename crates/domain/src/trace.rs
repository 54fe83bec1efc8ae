//! A run's place in distributed tracing (W3C Trace Context). A run is one trace, whose ID is
//! the run's ID: any node that drives the run, first or after a resume, and any webhook about
//! it, names the same trace without storing anything, and the trace is found by the run ID.
//! The trace's root is the run itself; its span ID is derived from the run ID too.

use std::fmt;

use crate::RunId;

/// The run's trace ID: the run ID's 16 bytes (a UUIDv7 is never all zero).
pub fn trace_id(run: RunId) -> [u8; 16] {
    run.as_bytes()
}

/// The span ID of the run's root: a mix of the run ID's two halves, never zero.
pub fn root_span_id(run: RunId) -> [u8; 8] {
    let b = run.as_bytes();
    let hi = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let lo = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    // splitmix64's finalizer: the run ID's timestamp and random bits both move every bit.
    let mut z = hi ^ lo.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 { 1 } else { z }.to_be_bytes()
}

/// A place in a trace, handed to a job: made into a `traceparent` value ([`fmt::Display`])
/// only where a job takes one (a `shell` job's `TRACEPARENT`, an `http` job's header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// The run's root.
    pub fn of_run(run: RunId) -> Self {
        Self {
            trace_id: trace_id(run),
            span_id: root_span_id(run),
            sampled: true,
        }
    }
}

/// The `traceparent` header value (version 00).
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        write_hex(f, &self.trace_id)?;
        f.write_str("-")?;
        write_hex(f, &self.span_id)?;
        f.write_str(if self.sampled { "-01" } else { "-00" })
    }
}

/// A `traceparent` header value (version 00).
pub fn traceparent(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> String {
    TraceParent {
        trace_id,
        span_id,
        sampled,
    }
    .to_string()
}

/// The `traceparent` of a run's root: what a webhook about the run carries.
pub fn run_traceparent(run: RunId) -> String {
    TraceParent::of_run(run).to_string()
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_trace_is_its_id() {
        let run: RunId = "0192f0c1-8a4e-7d2b-9f3a-1c2d3e4f5a6b".parse().unwrap();
        let tp = run_traceparent(run);
        assert!(
            tp.starts_with("00-0192f0c18a4e7d2b9f3a1c2d3e4f5a6b-"),
            "{tp}"
        );
        assert!(tp.ends_with("-01"));
        assert_eq!(tp.len(), 55);
        // Stable: every node derives the same root.
        assert_eq!(root_span_id(run), root_span_id(run));
        let other: RunId = "0192f0c1-8a4e-7d2b-9f3a-1c2d3e4f5a6c".parse().unwrap();
        assert_ne!(root_span_id(run), root_span_id(other));
        assert_ne!(root_span_id(run), [0; 8]);
        assert_eq!(TraceParent::of_run(run).to_string(), tp);
    }

    #[test]
    fn unsampled_parents_say_so() {
        assert_eq!(
            traceparent([0xab; 16], [1, 2, 3, 4, 5, 6, 7, 8], false),
            "00-abababababababababababababababab-0102030405060708-00"
        );
    }
}
