//! A run's spans as plain records, sent over OTLP.
//!
//! The engine makes a [`Span`] for each time a node drives a run and for each job attempt;
//! dropping it ends it and hands its record to the process's [`Pipeline`] (installed once, by
//! [`install`]), which batches records on a thread of its own and gives each batch, encoded as
//! an OTLP `ExportTraceServiceRequest` (protobuf), to a [`Transport`]. Without a pipeline a
//! span records nothing and costs a branch.
//!
//! Why not the OpenTelemetry SDK and `tracing-opentelemetry`: a run's spans are few and of a
//! fixed shape, and through the SDK each one cost about 28 thousand instructions (a builder in
//! the `tracing` span's extensions, the SDK span, its `SpanData`, the conversion to the
//! generated OTLP messages, their encoding, and dropping all of it): the 4 spans of a `noop`
//! run added 14 % to its instructions. Recorded here, they add under 2 %.
//! Here a span is one allocation, its attributes borrowed or owned strings, and a batch is
//! written straight into OTLP's wire format with `prost`'s encoding primitives (`encode.rs`);
//! the tests decode what it writes with the generated OTLP types.

mod encode;
mod pipeline;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub use encode::{encode_request, encode_request_into};
pub use pipeline::{
    Config, ConfigError, EXPORT_NICE, Pipeline, SendError, ShutdownError, Transport,
    lower_thread_priority,
};

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(Cow<'static, str>),
    /// A string many spans carry (a node's ID): shared, not copied.
    Shared(Arc<str>),
    /// A UUID, sent in its hyphenated text form (`01a22cae-ed6f-7335-b06c-707b19931b7c`):
    /// written out only when the span is encoded.
    Uuid([u8; 16]),
    Int(i64),
}

impl From<Arc<str>> for Value {
    fn from(s: Arc<str>) -> Self {
        Self::Shared(s)
    }
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Self::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Str(Cow::Owned(s))
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Self::Int(i)
    }
}

impl From<u32> for Value {
    fn from(i: u32) -> Self {
        Self::Int(i64::from(i))
    }
}

/// An attribute: a key and its value.
pub type Attr = (&'static str, Value);

/// A span's attributes: as many as a run's spans have are held inline, without an allocation.
pub type Attrs = smallvec::SmallVec<[Attr; 4]>;

/// Something that happened inside a span, at a time.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub time_unix_nano: u64,
    pub name: Cow<'static, str>,
    pub attrs: Vec<Attr>,
}

/// A span as it is exported.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    pub name: &'static str,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: [u8; 8],
    /// The parent was made elsewhere (another process, or derived rather than exported).
    pub parent_is_remote: bool,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attrs: Attrs,
    /// At most [`MAX_EVENTS`]; the events left out are counted.
    pub events: Vec<Event>,
    pub dropped_events: u32,
    /// `Some`: the span's status is an error, with this message.
    pub error: Option<String>,
}

/// Events a span keeps at most (OpenTelemetry's default limit): a run retried many times
/// keeps its first events and counts the rest.
pub const MAX_EVENTS: usize = 128;

/// The longest text a span keeps as an event's attribute or its error message, in bytes: an
/// error can be a job's whole output.
pub const MAX_TEXT: usize = 4096;

static PIPELINE: OnceLock<Arc<Pipeline>> = OnceLock::new();

/// Makes `pipeline` the one every [`Span`] of this process goes to. Once only: a second call
/// gives the pipeline back.
pub fn install(pipeline: Arc<Pipeline>) -> Result<(), Arc<Pipeline>> {
    PIPELINE.set(pipeline)
}

/// Whether spans are recorded (a pipeline is installed).
pub fn exporting() -> bool {
    PIPELINE.get().is_some()
}

/// A span being recorded; dropping it ends it and queues it for export. Empty (recording
/// nothing) when no pipeline is installed.
#[derive(Debug, Default)]
pub struct Span(Option<SpanRecord>);

impl Span {
    /// Starts a span named `name` in the trace `trace_id`, under `parent`, when a pipeline is
    /// installed; else an empty span.
    pub fn start(
        name: &'static str,
        trace_id: [u8; 16],
        parent: [u8; 8],
        parent_is_remote: bool,
    ) -> Self {
        if !exporting() {
            return Self(None);
        }
        Self(Some(SpanRecord {
            name,
            trace_id,
            span_id: new_span_id(),
            parent_span_id: parent,
            parent_is_remote,
            start_unix_nano: now_unix_nano(),
            end_unix_nano: 0,
            attrs: Attrs::new(),
            events: Vec::new(),
            dropped_events: 0,
            error: None,
        }))
    }

    /// Whether this span records anything: check it before making an attribute that costs.
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// The span's ID, when it is recorded.
    pub fn id(&self) -> Option<[u8; 8]> {
        self.0.as_ref().map(|r| r.span_id)
    }

    /// Sets an attribute (a later value for the same key replaces the earlier one).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(r) = &mut self.0 {
            let value = value.into();
            match r.attrs.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => r.attrs.push((key, value)),
            }
        }
    }

    /// Adds an event, now; past [`MAX_EVENTS`] it is only counted. Its text attributes are
    /// cut to [`MAX_TEXT`].
    pub fn event(&mut self, name: impl Into<Cow<'static, str>>, mut attrs: Vec<Attr>) {
        if let Some(r) = &mut self.0 {
            if r.events.len() >= MAX_EVENTS {
                r.dropped_events = r.dropped_events.saturating_add(1);
                return;
            }
            for (_, v) in &mut attrs {
                if let Value::Str(Cow::Owned(s)) = v {
                    cut(s);
                }
            }
            r.events.push(Event {
                time_unix_nano: now_unix_nano(),
                name: name.into(),
                attrs,
            });
        }
    }

    /// Marks the span failed, with `message` cut to [`MAX_TEXT`] (the last one given wins).
    pub fn fail(&mut self, message: &str) {
        if let Some(r) = &mut self.0 {
            r.error = Some(message[..floor_char_boundary(message, MAX_TEXT)].to_owned());
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(mut r) = self.0.take() {
            r.end_unix_nano = now_unix_nano();
            if let Some(p) = PIPELINE.get() {
                p.submit(r);
            }
        }
    }
}

/// Cuts `s` to at most [`MAX_TEXT`] bytes, on a character boundary.
fn cut(s: &mut String) {
    s.truncate(floor_char_boundary(s, MAX_TEXT));
}

/// The largest character boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// Wall-clock time: a span's times are when it really began and ended, whatever clock the
/// engine is given.
#[expect(
    clippy::disallowed_methods,
    reason = "spans are stamped with the real time, not the engine's clock"
)]
fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A fresh span ID, never zero: splitmix64 over a counter from a random start, so that IDs
/// never repeat within a process and differ between processes.
fn new_span_id() -> [u8; 8] {
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut b = [0u8; 8];
        // Without the OS's randomness, the time still sets processes apart.
        if getrandom::fill(&mut b).is_err() {
            b = now_unix_nano().to_le_bytes();
        }
        u64::from_le_bytes(b)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 { 1 } else { z }.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_ids_do_not_repeat_and_are_never_zero() {
        let ids: std::collections::HashSet<[u8; 8]> = (0..10_000).map(|_| new_span_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(!ids.contains(&[0; 8]));
    }

    #[test]
    fn without_a_pipeline_a_span_records_nothing() {
        // No test in this binary installs one.
        let mut s = Span::start("run", [1; 16], [2; 8], true);
        assert!(!s.is_recording());
        assert_eq!(s.id(), None);
        s.set("k", "v");
        s.fail("x");
    }

    /// A span that records, whether a pipeline is installed or not.
    fn recording() -> Span {
        Span(Some(SpanRecord {
            name: "run",
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: [3; 8],
            parent_is_remote: false,
            start_unix_nano: 1,
            end_unix_nano: 0,
            attrs: Attrs::new(),
            events: Vec::new(),
            dropped_events: 0,
            error: None,
        }))
    }

    #[test]
    fn an_attribute_set_twice_keeps_the_last_value() {
        let mut s = recording();
        s.set("workflow", "a");
        s.set("attempt", 1u32);
        s.set("workflow", String::from("b"));
        let r = s.0.take().unwrap();
        assert_eq!(
            r.attrs.as_slice(),
            [("workflow", Value::from("b")), ("attempt", Value::Int(1))]
        );
    }

    #[test]
    fn events_and_texts_are_bounded() {
        let mut s = recording();
        let long = "é".repeat(MAX_TEXT);
        for _ in 0..MAX_EVENTS + 5 {
            s.event("retrying", vec![("error", long.clone().into())]);
        }
        s.fail(&long);
        let r = s.0.take().unwrap();
        assert_eq!((r.events.len(), r.dropped_events), (MAX_EVENTS, 5));
        let Value::Str(e) = &r.events[0].attrs[0].1 else {
            panic!("{:?}", r.events[0]);
        };
        assert_eq!(e.len(), MAX_TEXT, "cut on a character boundary");
        assert_eq!(r.error.as_deref().map(str::len), Some(MAX_TEXT));
    }
}
