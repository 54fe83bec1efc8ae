//! The batching between the spans and the collector: a bounded queue that drops when full,
//! and a thread of its own that takes a batch when it is full or when the schedule delay has
//! passed, encodes it and hands it to the [`Transport`]. Nothing a run does waits on it.

use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use crate::{Attr, SpanRecord};

/// Sends one encoded `ExportTraceServiceRequest`. Called on the pipeline's thread only, one
/// batch at a time; a batch whose send fails with [`SendError::retry`] set is sent again.
pub trait Transport: Send + 'static {
    fn send(&mut self, body: &[u8]) -> Result<(), SendError>;
}

/// Why a batch was not taken, and whether sending it again may work.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    pub message: String,
    /// `None`: the collector refused the batch itself; it is dropped. `Some(after)`: the
    /// collector was unreachable or busy (`after`: how long it asked to be left alone).
    pub retry: Option<Option<Duration>>,
}

/// Sends of one batch at most (the first and its retries), and the waits between them
/// (OpenTelemetry's exporters wait about this long; a collector's `Retry-After` is honoured up
/// to [`MAX_RETRY_WAIT`]). Closing the pipeline stops retrying.
const RETRY_WAITS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1600),
];
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// How the pipeline batches: OpenTelemetry's batch span processor settings, with its
/// defaults and its environment variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The longest a span waits for its batch to leave (`OTEL_BSP_SCHEDULE_DELAY`, ms).
    pub schedule_delay: Duration,
    /// Spans held at most; more are dropped (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub max_queue: usize,
    /// Spans sent at most in one request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`); a full batch
    /// leaves at once.
    pub max_batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            schedule_delay: Duration::from_millis(5000),
            max_queue: 2048,
            max_batch: 512,
        }
    }
}

/// A batching setting that cannot be used, by its variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{var}={value:?}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub problem: &'static str,
}

/// The largest queue a setting may ask for: a span record is a few hundred bytes.
const MAX_QUEUE_LIMIT: usize = 1 << 20;
/// The longest schedule delay a setting may ask for: an hour.
const MAX_DELAY_MS: u64 = 3_600_000;

impl Config {
    /// The defaults, with what `var` (the process environment, or a test's) sets.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        // OpenTelemetry reads an empty variable as one that is not set.
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let number = |name: &'static str, max: u64| -> Result<Option<u64>, ConfigError> {
            let Some(value) = var(name) else {
                return Ok(None);
            };
            let err = |problem| ConfigError {
                var: name,
                value: value.clone(),
                problem,
            };
            let n: u64 = value
                .trim()
                .parse()
                .map_err(|_| err("not a whole number"))?;
            if n == 0 || n > max {
                return Err(err(if n == 0 {
                    "must be at least 1"
                } else {
                    "too large"
                }));
            }
            Ok(Some(n))
        };
        if let Some(ms) = number("OTEL_BSP_SCHEDULE_DELAY", MAX_DELAY_MS)? {
            c.schedule_delay = Duration::from_millis(ms);
        }
        let limit = MAX_QUEUE_LIMIT as u64;
        if let Some(n) = number("OTEL_BSP_MAX_QUEUE_SIZE", limit)? {
            c.max_queue = usize::try_from(n).unwrap_or(MAX_QUEUE_LIMIT);
        }
        if let Some(n) = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", limit)? {
            c.max_batch = usize::try_from(n).unwrap_or(MAX_QUEUE_LIMIT);
        }
        // As OpenTelemetry's SDKs do: a batch is never larger than the queue.
        c.max_batch = c.max_batch.min(c.max_queue);
        Ok(c)
    }
}

/// The pipeline did not finish sending within the time it was given.
#[derive(Debug, thiserror::Error)]
#[error("{0} spans were still queued or being sent when the time to send them ran out")]
pub struct ShutdownError(pub usize);

struct Queue {
    spans: Vec<SpanRecord>,
    /// Dropped since the last batch left (the queue was full).
    dropped: u64,
    /// Spans of the batch being sent.
    sending: usize,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    config: Config,
}

/// The queue and its thread. [`Pipeline::submit`] never blocks on the thread's work.
pub struct Pipeline {
    shared: Arc<Shared>,
    done: Mutex<Option<mpsc::Receiver<()>>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Starts the pipeline's thread. Every request carries `resource` (the resource's
    /// attributes) and the instrumentation scope `scope`.
    /// A setting out of its range is brought into it (at least one span, a batch no larger
    /// than the queue, a delay of at least 1 ms).
    pub fn start(
        mut config: Config,
        resource: Vec<Attr>,
        scope: &'static str,
        mut transport: impl Transport,
    ) -> std::io::Result<Arc<Self>> {
        config.max_queue = config.max_queue.max(1);
        config.max_batch = config.max_batch.clamp(1, config.max_queue);
        config.schedule_delay = config.schedule_delay.max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                spans: Vec::new(),
                dropped: 0,
                sending: 0,
                closing: false,
            }),
            wake: Condvar::new(),
            config,
        });
        let (done_tx, done) = mpsc::channel();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                lower_thread_priority();
                run(&s, &resource, scope, &mut transport);
                let _ = done_tx.send(());
            })?;
        Ok(Arc::new(Self {
            shared,
            done: Mutex::new(Some(done)),
        }))
    }

    /// Queues a finished span; drops it when the queue is full or the pipeline is closing.
    pub fn submit(&self, span: SpanRecord) {
        let mut q = self.lock();
        if q.closing {
            return;
        }
        if q.spans.len() >= self.shared.config.max_queue {
            q.dropped += 1;
            return;
        }
        q.spans.push(span);
        // Only a full batch wakes the thread before its time: one wake-up per batch.
        if q.spans.len() == self.shared.config.max_batch {
            self.shared.wake.notify_one();
        }
    }

    /// Sends what is queued and stops the thread, waiting at most `timeout` for it. Spans
    /// submitted after this are dropped.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), ShutdownError> {
        self.lock().closing = true;
        self.shared.wake.notify_one();
        let done = self
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(done) = done else {
            return Ok(());
        };
        match done.recv_timeout(timeout) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let q = self.lock();
                Err(ShutdownError(q.spans.len() + q.sending))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding the queue leaves it consistent (a push or a take).
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// How much lower than the rest of the process the export runs (`nice` steps).
pub const EXPORT_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority by [`EXPORT_NICE`] (on Linux a thread has
/// a priority of its own, and the threads it starts inherit it). Exporting is what gives way
/// when the CPUs are busy: a run's threads are not preempted by it, and a queue that its
/// thread cannot drain in time drops spans, never slowing runs. Where it cannot be lowered,
/// the thread runs as it is.
pub fn lower_thread_priority() {
    if let Err(e) = rustix::process::nice(EXPORT_NICE) {
        tracing::debug!(error = %e, "the span export's priority could not be lowered");
    }
}

/// The most memory the request buffer keeps between batches (a batch of 512 spans is
/// about 100 KiB).
const MAX_KEPT_BODY: usize = 1 << 20;

/// The thread: a batch leaves when it is full, when the delay since the last one has passed,
/// or when the pipeline closes (then everything queued leaves, a batch at a time).
fn run(shared: &Shared, resource: &[Attr], scope: &str, transport: &mut impl Transport) {
    let config = &shared.config;
    let mut due = Instant::now() + config.schedule_delay;
    // Sends fail in streaks (a collector down): one line at the first and one when it ends.
    let mut failing = false;
    // The batch and the request's bytes keep their memory from one batch to the next: the
    // queue's vector and this one trade places, so that neither grows again from nothing
    // (growing them anew at every batch faulted fresh pages in, at a measurable cost).
    let mut batch: Vec<SpanRecord> = Vec::new();
    let mut body = Vec::new();
    loop {
        let (dropped, closing) = {
            let mut q = wait_until(shared, due, |q| {
                q.closing || q.spans.len() >= config.max_batch
            });
            batch.clear();
            if q.spans.len() <= config.max_batch {
                std::mem::swap(&mut q.spans, &mut batch);
            } else {
                batch.extend(q.spans.drain(..config.max_batch));
            }
            q.sending = batch.len();
            (std::mem::take(&mut q.dropped), q.closing)
        };
        if dropped > 0 {
            tracing::warn!(
                dropped,
                queue = config.max_queue,
                "spans dropped: the export queue was full"
            );
        }
        let full = batch.len() == config.max_batch;
        if !batch.is_empty() {
            crate::encode_request_into(&mut body, resource, scope, &batch);
            batch.clear();
            // What a burst needed is not kept for good: a queue that grew past a batch while
            // a send hung, a request of spans full of events.
            batch.shrink_to(config.max_batch);
            match send(shared, transport, &body) {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("spans are exported again");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "exporting spans failed; spans are dropped until it works again");
                }
                Err(_) => {}
            }
            shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sending = 0;
            if body.capacity() > MAX_KEPT_BODY {
                body = Vec::new();
            }
        } else if closing {
            return;
        }
        if !full {
            due = Instant::now() + config.schedule_delay;
        }
    }
}

/// Sends `body`, and again after each wait of [`RETRY_WAITS`] while the collector is
/// unreachable or busy and the pipeline is not closing.
fn send(shared: &Shared, transport: &mut impl Transport, body: &[u8]) -> Result<(), SendError> {
    let mut waits = RETRY_WAITS.iter();
    loop {
        let err = match transport.send(body) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let (Some(after), Some(wait)) = (err.retry, waits.next()) else {
            return Err(err);
        };
        let wait = after.map_or(*wait, |a| a.min(MAX_RETRY_WAIT));
        // Waits on the queue, so that closing ends the wait (and the retries) at once.
        if wait_until(shared, Instant::now() + wait, |q| q.closing).closing {
            return Err(err);
        }
    }
}

/// The queue, locked, once `done` holds for it or `deadline` has passed, whichever is first.
fn wait_until(
    shared: &Shared,
    deadline: Instant,
    done: impl Fn(&Queue) -> bool,
) -> std::sync::MutexGuard<'_, Queue> {
    let mut q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let now = Instant::now();
        if done(&q) || now >= deadline {
            return q;
        }
        q = shared
            .wake
            .wait_timeout(q, deadline - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_settings_are_opentelemetrys_with_its_defaults() {
        assert_eq!(Config::from_env(env(&[])).unwrap(), Config::default());
        let c = Config::from_env(env(&[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
        ]))
        .unwrap();
        assert_eq!(c.schedule_delay, Duration::from_millis(100));
        assert_eq!(c.max_queue, 64);
        assert_eq!(c.max_batch, 64, "a batch is never larger than the queue");
    }

    #[test]
    fn a_bad_setting_is_refused_by_name() {
        for (var, value, problem) in [
            ("OTEL_BSP_SCHEDULE_DELAY", "soon", "not a whole number"),
            ("OTEL_BSP_SCHEDULE_DELAY", "0", "must be at least 1"),
            ("OTEL_BSP_SCHEDULE_DELAY", "3600001", "too large"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "-1", "not a whole number"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "1048577", "too large"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0", "must be at least 1"),
        ] {
            let e = Config::from_env(env(&[(var, value)])).unwrap_err();
            assert_eq!((e.var, e.value.as_str(), e.problem), (var, value, problem));
            assert!(e.to_string().starts_with(var), "{e}");
        }
    }

    #[test]
    fn an_empty_setting_is_an_unset_one() {
        let c = Config::from_env(env(&[
            ("OTEL_BSP_SCHEDULE_DELAY", ""),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "  "),
        ]))
        .unwrap();
        assert_eq!(c, Config::default());
    }

    type Sent = Arc<Mutex<Vec<Vec<u8>>>>;

    /// Answers each send with the next of `answers` (then `Ok`), keeping what it was sent
    /// when it answers `Ok`, and says on `calls` that it was called.
    struct Scripted {
        sent: Sent,
        answers: std::collections::VecDeque<Result<(), SendError>>,
        calls: mpsc::Sender<()>,
        /// Each send waits for a message here first, when set.
        gate: Option<mpsc::Receiver<()>>,
    }

    impl Transport for Scripted {
        fn send(&mut self, body: &[u8]) -> Result<(), SendError> {
            let _ = self.calls.send(());
            if let Some(g) = &self.gate {
                let _ = g.recv();
            }
            let answer = self.answers.pop_front().unwrap_or(Ok(()));
            if answer.is_ok() {
                self.sent.lock().unwrap().push(body.to_vec());
            }
            answer
        }
    }

    fn scripted(
        answers: Vec<Result<(), SendError>>,
        gate: Option<mpsc::Receiver<()>>,
    ) -> (Scripted, Sent, mpsc::Receiver<()>) {
        let sent = Sent::default();
        let (calls, called) = mpsc::channel();
        let t = Scripted {
            sent: sent.clone(),
            answers: answers.into(),
            calls,
            gate,
        };
        (t, sent, called)
    }

    fn busy() -> Result<(), SendError> {
        Err(SendError {
            message: "503".into(),
            retry: Some(Some(Duration::from_millis(1))),
        })
    }

    fn refused() -> Result<(), SendError> {
        Err(SendError {
            message: "400".into(),
            retry: None,
        })
    }

    fn span(i: u8) -> SpanRecord {
        SpanRecord {
            name: "run",
            trace_id: [i; 16],
            span_id: [i; 8],
            parent_span_id: [0; 8],
            parent_is_remote: true,
            start_unix_nano: 1,
            end_unix_nano: 2,
            attrs: crate::Attrs::new(),
            events: Vec::new(),
            dropped_events: 0,
            error: None,
        }
    }

    /// The trace IDs' first bytes of each request sent, in order.
    fn decoded(sent: &Sent) -> Vec<Vec<u8>> {
        use prost::Message as _;
        sent.lock()
            .unwrap()
            .iter()
            .map(|b| {
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                    b.as_slice(),
                )
                .unwrap()
                .resource_spans[0]
                    .scope_spans[0]
                    .spans
                    .iter()
                    .map(|s| s.trace_id[0])
                    .collect()
            })
            .collect()
    }

    const LONG: Duration = Duration::from_secs(30);

    fn config(max_queue: usize, max_batch: usize) -> Config {
        Config {
            schedule_delay: Duration::from_secs(3600),
            max_queue,
            max_batch,
        }
    }

    #[test]
    fn the_export_runs_below_the_rest_of_the_process() {
        /// Sends the priority of the thread it sends on.
        struct Nice(mpsc::Sender<i32>);
        impl Transport for Nice {
            fn send(&mut self, _: &[u8]) -> Result<(), SendError> {
                let _ = self
                    .0
                    .send(rustix::process::getpriority_process(None).unwrap());
                Ok(())
            }
        }
        let here = rustix::process::getpriority_process(None).unwrap();
        let (tx, rx) = mpsc::channel();
        let p = Pipeline::start(config(10, 1), Vec::new(), "steward", Nice(tx)).unwrap();
        p.submit(span(1));
        let there = rx.recv_timeout(LONG).unwrap();
        p.shutdown(LONG).unwrap();
        assert_eq!(there, (here + EXPORT_NICE).min(19));
        // This thread is as it was.
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), here);
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_the_rest_at_shutdown() {
        let (t, sent, called) = scripted(Vec::new(), None);
        let p = Pipeline::start(config(100, 4), Vec::new(), "steward", t).unwrap();
        for i in 0..6 {
            p.submit(span(i));
        }
        called.recv_timeout(LONG).unwrap();
        p.shutdown(LONG).unwrap();
        assert_eq!(decoded(&sent), vec![vec![0, 1, 2, 3], vec![4, 5]]);
        // Closed: nothing more is taken.
        p.submit(span(9));
        assert_eq!(p.lock().spans.len(), 0);
    }

    #[test]
    fn a_full_queue_drops_what_does_not_fit_while_a_send_hangs() {
        let (release, gate) = mpsc::channel();
        let (t, sent, called) = scripted(Vec::new(), Some(gate));
        let p = Pipeline::start(config(3, 1), Vec::new(), "steward", t).unwrap();
        p.submit(span(0));
        called.recv_timeout(LONG).unwrap();
        // The thread hangs in its send: three spans fit, two do not, and nothing waits.
        for i in 1..6 {
            p.submit(span(i));
        }
        {
            let q = p.lock();
            assert_eq!((q.spans.len(), q.dropped, q.sending), (3, 2, 1));
        }
        for _ in 0..4 {
            release.send(()).unwrap();
        }
        p.shutdown(LONG).unwrap();
        assert_eq!(decoded(&sent), vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn a_busy_collector_is_tried_again_and_a_refused_batch_is_dropped() {
        // The first batch: busy twice, then taken. The second: refused, never sent again.
        // The third: busy more often than it is retried.
        let answers = vec![
            busy(),
            busy(),
            Ok(()),
            refused(),
            busy(),
            busy(),
            busy(),
            busy(),
        ];
        let (t, sent, called) = scripted(answers, None);
        let p = Pipeline::start(config(10, 1), Vec::new(), "steward", t).unwrap();
        for i in 0..3 {
            p.submit(span(i));
            // One batch at a time, so that each meets its own answers.
            let calls = if i == 1 { 1 } else { 3 + usize::from(i == 2) };
            for _ in 0..calls {
                called.recv_timeout(LONG).unwrap();
            }
        }
        p.submit(span(3));
        p.shutdown(LONG).unwrap();
        assert_eq!(decoded(&sent), vec![vec![0], vec![3]]);
    }

    #[test]
    fn settings_out_of_range_are_brought_into_it() {
        let (t, sent, called) = scripted(Vec::new(), None);
        let bad = Config {
            schedule_delay: Duration::ZERO,
            max_queue: 0,
            max_batch: 0,
        };
        let p = Pipeline::start(bad, Vec::new(), "steward", t).unwrap();
        assert_eq!(
            p.shared.config,
            Config {
                schedule_delay: Duration::from_millis(1),
                max_queue: 1,
                max_batch: 1,
            }
        );
        p.submit(span(7));
        called.recv_timeout(LONG).unwrap();
        p.shutdown(LONG).unwrap();
        assert_eq!(decoded(&sent), vec![vec![7]]);
    }
}
