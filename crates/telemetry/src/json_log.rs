//! The JSON log: one object per line, in the shape of `tracing-subscriber`'s own JSON format
//! with the event's fields flattened and the span's under `span`:
//!
//! ```json
//! {"timestamp":"…Z","level":"INFO","message":"run finished","state":"completed","target":"engine::driver","span":{"run_id":"…","workflow":"erase","name":"run"}}
//! ```
//!
//! `span` holds the fields of every span the line is in, outermost first, and the innermost
//! span's name: a line inside a job attempt carries the run's fields and the job's.
//!
//! Written here, as a formatter for `tracing-subscriber`'s fmt layer, because the crate's JSON
//! format keeps each span's fields as a JSON text that it parses back into a map on every line
//! and on every field recorded later, and builds a map of every event's fields before writing
//! it: at a few runs a second that was most of what the log cost. Here a span's fields are kept
//! as the members of a JSON object (`"k":v,…`), appended to when a field is recorded, and
//! copied as they are into each line.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime as _;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// A span's fields as JSON object members, kept by the fmt layer in the span's extensions.
#[derive(Debug, Default)]
pub(crate) struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        // Written here first and then copied whole: the span's own buffer starts empty, and
        // growing it piece by piece reallocates it several times per span.
        let mut buf = String::with_capacity(128);
        let mut members = Members::new(&mut buf, true, false);
        fields.record(&mut members);
        members.result?;
        writer.write_str(&buf)
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        let len = current.fields.len();
        let mut members = Members::new(&mut current.fields, first, false);
        fields.record(&mut members);
        let result = members.result;
        if result.is_err() {
            // A value whose formatting failed halfway: keep the span's members whole.
            current.fields.truncate(len);
        }
        result
    }
}

/// One JSON object per event, with the fields of the spans it is in.
#[derive(Debug, Default)]
pub(crate) struct JsonEvents;

impl<S> FormatEvent<S, JsonSpanFields> for JsonEvents
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonSpanFields>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A record from the `log` crate: its own target, not `log`.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        w.write_str("{\"timestamp\":\"")?;
        // RFC 3339 in UTC with microseconds, as `tracing_subscriber`'s `SystemTime` writes it,
        // at a tenth of the cost: humantime writes the digits into a buffer, then the buffer.
        #[expect(
            clippy::disallowed_methods,
            reason = "a log line's timestamp is the wall clock's"
        )]
        let now = std::time::SystemTime::now();
        // humantime writes the years 1970 to 9999 (it panics before 1970): a clock outside
        // them gets the formatter of before.
        match now.duration_since(std::time::UNIX_EPOCH) {
            Ok(t) if t.as_secs() < YEAR_10000 => {
                write!(w, "{}", humantime::format_rfc3339_micros(now))?;
            }
            _ => tracing_subscriber::fmt::time::SystemTime.format_time(&mut w)?,
        }
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_str("\"")?;
        let mut members = Members::new(&mut w, false, true);
        event.record(&mut members);
        members.result?;
        w.write_str(",\"target\":")?;
        string(&mut w, meta.target())?;
        if let Some(scope) = ctx.event_scope() {
            w.write_str(",\"span\":{")?;
            let mut name = "";
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<JsonSpanFields>>()
                    && !fields.fields.is_empty()
                {
                    w.write_str(&fields.fields)?;
                    w.write_char(',')?;
                }
                name = span.name();
            }
            w.write_str("\"name\":")?;
            string(&mut w, name)?;
            w.write_char('}')?;
        }
        w.write_str("}\n")
    }
}

/// 10000-01-01T00:00:00Z in seconds since the epoch.
const YEAR_10000: u64 = 253_402_300_800;

/// The members every line has of its own: an event's field of the same name is written as
/// `fields.NAME`, so that no line holds a name twice.
const LINE_KEYS: [&str; 4] = ["timestamp", "level", "target", "span"];

/// Writes each field it visits as a JSON object member, a comma before all but the first.
struct Members<'a> {
    out: &'a mut dyn fmt::Write,
    first: bool,
    /// An event's fields, whose names must not be the line's own ([`LINE_KEYS`]).
    event: bool,
    result: fmt::Result,
}

impl<'a> Members<'a> {
    fn new(out: &'a mut dyn fmt::Write, first: bool, event: bool) -> Self {
        Self {
            out,
            first,
            event,
            result: Ok(()),
        }
    }

    /// Writes `"name":` and then the value, unless the field is one to leave out.
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result) {
        let name = field.name();
        // A `log` record's metadata, already used for the line's target.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let renamed = self.event && LINE_KEYS.contains(&name);
        let out = &mut *self.out;
        let comma = !std::mem::take(&mut self.first);
        self.result = (|| {
            if comma {
                out.write_char(',')?;
            }
            if renamed {
                out.write_str("\"fields.")?;
                Escaped(out).write_str(name)?;
                out.write_char('"')?;
            } else {
                string(out, name)?;
            }
            out.write_char(':')?;
            value(out)
        })();
    }
}

impl Visit for Members<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| string(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those are written as strings.
        if value.is_finite() {
            self.member(field, |w| write!(w, "{value}"));
        } else {
            self.member(field, |w| write!(w, "\"{value}\""));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value}")?;
            w.write_char('"')
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn string(w: &mut dyn fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// The bytes that are, or start, a character [`Escaped`] escapes: every control character is
/// below 0x20, 0x7f, or (U+0080 to U+009F) starts with the byte 0xc2; U+2028 and U+2029 start
/// with 0xe2; and the quote and the backslash.
const MAY_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[0x7f] = true;
    t[0xc2] = true;
    t[0xe2] = true;
    t
};

/// Escapes what it is given for the inside of a JSON string as it writes it: quotes,
/// backslashes, every control character and the Unicode line and paragraph separators (so
/// that no value can break a line in two, whatever splits the lines).
struct Escaped<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Most pieces need nothing escaped: one pass over the bytes, a table lookup each,
        // finds out.
        if !s.bytes().any(|b| MAY_ESCAPE[usize::from(b)]) {
            return self.0.write_str(s);
        }
        let mut plain = 0;
        for (i, c) in s.char_indices() {
            let escape = match c {
                '"' => "\\\"",
                '\\' => "\\\\",
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{:04x}", u32::from(c))?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + c.len_utf8();
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// The lines a subscriber with this format writes while `f` runs, parsed.
    fn lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonSpanFields)
            .event_format(JsonEvents)
            .with_writer(move || out.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn a_line_carries_its_fields_and_every_enclosing_span_s() {
        let got = lines(|| {
            let run = tracing::info_span!("run", run_id = "r1", workflow = tracing::field::Empty);
            run.record("workflow", "erase");
            let _run = run.enter();
            let job = tracing::info_span!("job", job = "r1/b0/j0", attempt = 2u32);
            let _job = job.enter();
            tracing::info!(
                state = "completed",
                code = -3,
                ok = true,
                ratio = 0.5,
                target = "site=a",
                "run finished"
            );
        });
        assert_eq!(got.len(), 1);
        let v = &got[0];
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "run finished");
        assert_eq!(v["state"], "completed");
        assert_eq!(v["code"], -3);
        assert_eq!(v["ok"], true);
        assert_eq!(v["ratio"], 0.5);
        assert!(
            v["target"].as_str().unwrap().starts_with("telemetry"),
            "{v}"
        );
        assert_eq!(
            v["fields.target"], "site=a",
            "a field named like the line's own"
        );
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{v}");
        let span = &v["span"];
        assert_eq!(span["run_id"], "r1");
        assert_eq!(span["workflow"], "erase");
        assert_eq!(span["job"], "r1/b0/j0");
        assert_eq!(span["attempt"], 2);
        assert_eq!(span["name"], "job");
    }

    #[test]
    fn a_line_outside_any_span_has_none_and_odd_values_stay_valid_json() {
        let got = lines(|| {
            tracing::warn!(
                reason = "a \"quoted\"\nline\u{1b}[31m\\",
                nan = f64::NAN,
                debug = ?vec!["x\ty"],
                "two\nlines"
            );
            let empty = tracing::info_span!("empty");
            let _e = empty.enter();
            tracing::info!("inside");
        });
        assert_eq!(got.len(), 2);
        let v = &got[0];
        assert_eq!(v["reason"], "a \"quoted\"\nline\u{1b}[31m\\");
        assert_eq!(v["nan"], "NaN");
        assert_eq!(v["debug"], "[\"x\\ty\"]");
        assert_eq!(v["message"], "two\nlines");
        assert!(v.get("span").is_none(), "{v}");
        assert_eq!(got[1]["span"], serde_json::json!({"name": "empty"}));
    }

    #[test]
    fn escaping_leaves_no_raw_control_character() {
        let mut out = String::new();
        string(&mut out, "é\u{7f}\u{0}\"\u{85}¢\u{2028}…").unwrap();
        assert_eq!(out, "\"é\\u007f\\u0000\\\"\\u0085¢\\u2028…\"");
    }
}
