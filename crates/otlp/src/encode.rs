//! Span records written as an OTLP `ExportTraceServiceRequest` (opentelemetry-proto's
//! `collector/trace/v1`), field by field. The field numbers are OTLP's; the tests decode the
//! result with the generated types.

use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use crate::{Attr, Event, SpanRecord, Value};

/// `Span.SpanKind.SPAN_KIND_INTERNAL`: a run's spans are work inside Steward.
const SPAN_KIND_INTERNAL: u64 = 1;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: u64 = 2;
/// `SpanFlags`: sampled (the W3C trace flag), and whether the parent is remote is known.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;

/// One request holding `spans`: one resource (`resource`'s attributes), one scope (`scope`).
pub fn encode_request(resource: &[Attr], scope: &str, spans: &[SpanRecord]) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_request_into(&mut buf, resource, scope, spans);
    buf
}

/// [`encode_request`] into `buf`, cleared first: a caller that encodes batch after batch
/// keeps one buffer.
pub fn encode_request_into(
    buf: &mut Vec<u8>,
    resource: &[Attr],
    scope: &str,
    spans: &[SpanRecord],
) {
    buf.clear();
    buf.reserve(256 + spans.len() * 192);
    // ExportTraceServiceRequest.resource_spans = 1
    nested(buf, 1, |b| {
        // ResourceSpans.resource = 1: Resource.attributes = 1
        nested(b, 1, |b| {
            for a in resource {
                key_value(b, 1, a);
            }
        });
        // ResourceSpans.scope_spans = 2
        nested(b, 2, |b| {
            // ScopeSpans.scope = 1: InstrumentationScope.name = 1, version = 2
            nested(b, 1, |b| {
                string(b, 1, scope);
                string(b, 2, env!("CARGO_PKG_VERSION"));
            });
            // ScopeSpans.spans = 2
            for s in spans {
                nested(b, 2, |b| span(b, s));
            }
        });
    });
}

fn span(b: &mut Vec<u8>, s: &SpanRecord) {
    bytes(b, 1, &s.trace_id);
    bytes(b, 2, &s.span_id);
    bytes(b, 4, &s.parent_span_id);
    string(b, 5, s.name);
    varint(b, 6, SPAN_KIND_INTERNAL);
    fixed64(b, 7, s.start_unix_nano);
    fixed64(b, 8, s.end_unix_nano);
    for a in &s.attrs {
        key_value(b, 9, a);
    }
    for e in &s.events {
        nested(b, 11, |b| event(b, e));
    }
    if s.dropped_events > 0 {
        // Span.dropped_events_count = 12
        varint(b, 12, u64::from(s.dropped_events));
    }
    if let Some(message) = &s.error {
        // Status.message = 2, code = 3
        nested(b, 15, |b| {
            string(b, 2, message);
            varint(b, 3, STATUS_CODE_ERROR);
        });
    }
    let remote = if s.parent_is_remote {
        FLAG_CONTEXT_IS_REMOTE
    } else {
        0
    };
    // Span.flags = 16 (fixed32)
    encode_key(16, WireType::ThirtyTwoBit, b);
    b.extend_from_slice(&(FLAG_SAMPLED | FLAG_CONTEXT_HAS_IS_REMOTE | remote).to_le_bytes());
}

fn event(b: &mut Vec<u8>, e: &Event) {
    fixed64(b, 1, e.time_unix_nano);
    string(b, 2, &e.name);
    for a in &e.attrs {
        key_value(b, 3, a);
    }
}

/// A `KeyValue` (key = 1, value = 2: an `AnyValue`, string_value = 1 or int_value = 3). Its
/// lengths are known before it is written: a span has several, so they are not written
/// through [`nested`].
fn key_value(b: &mut Vec<u8>, field: u32, (key, value): &Attr) {
    // The AnyValue's body: one field.
    let value_len = match value {
        Value::Str(s) => str_field_len(s.len()),
        Value::Shared(s) => str_field_len(s.len()),
        Value::Uuid(_) => str_field_len(UUID_LEN),
        Value::Int(i) => 1 + encoded_len_varint(int64(*i)),
    };
    let kv_len = str_field_len(key.len()) + 1 + varint_len(value_len) + value_len;
    tag(b, field, WireType::LengthDelimited);
    length(b, kv_len);
    string(b, 1, key);
    tag(b, 2, WireType::LengthDelimited);
    length(b, value_len);
    match value {
        Value::Str(s) => string(b, 1, s),
        Value::Shared(s) => string(b, 1, s),
        Value::Uuid(u) => {
            tag(b, 1, WireType::LengthDelimited);
            length(b, UUID_LEN);
            uuid(b, u);
        }
        Value::Int(i) => varint(b, 3, int64(*i)),
    }
}

/// A field's key. The fields written here are numbered below 16, whose key is one byte:
/// pushed as it is, without `prost`'s general varint loop (a span's attributes write several
/// keys each).
fn tag(b: &mut Vec<u8>, field: u32, wire: WireType) {
    if field < 16 {
        b.push(u8::try_from((field << 3) | wire as u32).unwrap_or(0));
    } else {
        encode_key(field, wire, b);
    }
}

/// A length, as a varint: one byte below 128, as most are here.
fn length(b: &mut Vec<u8>, n: usize) {
    match u8::try_from(n) {
        Ok(small) if small < 0x80 => b.push(small),
        _ => encode_varint(n as u64, b),
    }
}

/// The length of a hyphenated UUID.
const UUID_LEN: usize = uuid::fmt::Hyphenated::LENGTH;

/// `u` in its hyphenated form, lower case.
fn uuid(b: &mut Vec<u8>, u: &[u8; 16]) {
    let mut text = [0u8; UUID_LEN];
    let text = uuid::Uuid::from_bytes(*u)
        .hyphenated()
        .encode_lower(&mut text);
    b.extend_from_slice(text.as_bytes());
}

/// int64 on the wire: its two's complement as a varint.
fn int64(i: i64) -> u64 {
    u64::from_ne_bytes(i.to_ne_bytes())
}

fn varint_len(n: usize) -> usize {
    encoded_len_varint(n as u64)
}

/// The length of a string field of `len` bytes (field numbers below 16: a one-byte key).
fn str_field_len(len: usize) -> usize {
    1 + varint_len(len) + len
}

/// A length-delimited field whose body `f` writes. One byte is set aside for the length; a
/// body of 128 bytes or more moves up to make room for the longer length.
fn nested(b: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
    encode_key(field, WireType::LengthDelimited, b);
    let at = b.len();
    b.push(0);
    f(b);
    let len = b.len() - at - 1;
    let len64 = len as u64;
    let n = encoded_len_varint(len64);
    if n == 1 {
        b[at] = len as u8;
        return;
    }
    let mut head = [0u8; 10];
    encode_varint(len64, &mut &mut head[..]);
    b.splice(at..=at, head[..n].iter().copied());
}

fn string(b: &mut Vec<u8>, field: u32, s: &str) {
    bytes(b, field, s.as_bytes());
}

fn bytes(b: &mut Vec<u8>, field: u32, v: &[u8]) {
    tag(b, field, WireType::LengthDelimited);
    length(b, v.len());
    b.extend_from_slice(v);
}

fn varint(b: &mut Vec<u8>, field: u32, v: u64) {
    tag(b, field, WireType::Varint);
    encode_varint(v, b);
}

fn fixed64(b: &mut Vec<u8>, field: u32, v: u64) {
    tag(b, field, WireType::SixtyFourBit);
    b.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    use opentelemetry_proto::tonic::common::v1::{AnyValue as Any, KeyValue};
    use prost::Message as _;

    use super::*;

    fn kv(key: &str, v: AnyValue) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(Any { value: Some(v) }),
            ..KeyValue::default()
        }
    }

    fn record(i: u8) -> SpanRecord {
        SpanRecord {
            name: "job",
            trace_id: [i; 16],
            span_id: [i + 1; 8],
            parent_span_id: [i + 2; 8],
            parent_is_remote: i.is_multiple_of(2),
            start_unix_nano: 1_700_000_000_000_000_000 + u64::from(i),
            end_unix_nano: 1_700_000_000_000_000_999,
            attrs: smallvec::smallvec![
                ("job", Value::Str(Cow::Owned(format!("run/{i}/0/1")))),
                ("action", Value::from("shell")),
                ("node", Value::from(std::sync::Arc::<str>::from("node-a"))),
                (
                    "run",
                    Value::Uuid([
                        0x01, 0xa2, 0x2c, 0xae, 0xed, 0x6f, 0x73, 0x35, 0xb0, 0x6c, 0x70, 0x7b,
                        0x19, 0x93, 0x1b, 0x7c,
                    ]),
                ),
                ("attempt", Value::Int(-7)),
                // Long enough that its lengths take two bytes, and three.
                ("long", Value::Str(Cow::Owned("é".repeat(300)))),
                ("longer", Value::Str(Cow::Owned("x".repeat(20_000)))),
            ],
            events: vec![Event {
                time_unix_nano: 5,
                name: Cow::Borrowed("job attempt failed; retrying"),
                attrs: vec![("attempt", Value::Int(1))],
            }],
            dropped_events: u32::from(i),
            error: (i == 1).then(|| "exit status 3".to_owned()),
        }
    }

    #[test]
    fn a_request_decodes_as_otlp_with_every_field_in_place() {
        let spans: Vec<SpanRecord> = (0..3).map(record).collect();
        let resource = vec![
            ("service.name", Value::from("steward")),
            ("service.instance.id", Value::from("node-a")),
        ];
        let body = encode_request(&resource, "steward", &spans);
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();

        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().unwrap().attributes,
            vec![
                kv("service.name", AnyValue::StringValue("steward".into())),
                kv(
                    "service.instance.id",
                    AnyValue::StringValue("node-a".into())
                ),
            ]
        );
        assert_eq!(rs.scope_spans.len(), 1);
        let ss = &rs.scope_spans[0];
        let scope = ss.scope.as_ref().unwrap();
        assert_eq!(scope.name, "steward");
        assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(ss.spans.len(), 3);
        for (i, (got, want)) in ss.spans.iter().zip(&spans).enumerate() {
            assert_eq!(got.trace_id, want.trace_id);
            assert_eq!(got.span_id, want.span_id);
            assert_eq!(got.parent_span_id, want.parent_span_id);
            assert_eq!(got.name, "job");
            assert_eq!(got.kind, 1);
            assert_eq!(got.start_time_unix_nano, want.start_unix_nano);
            assert_eq!(got.end_time_unix_nano, want.end_unix_nano);
            assert_eq!(
                got.attributes,
                vec![
                    kv("job", AnyValue::StringValue(format!("run/{i}/0/1"))),
                    kv("action", AnyValue::StringValue("shell".into())),
                    kv("node", AnyValue::StringValue("node-a".into())),
                    kv(
                        "run",
                        AnyValue::StringValue("01a22cae-ed6f-7335-b06c-707b19931b7c".into()),
                    ),
                    kv("attempt", AnyValue::IntValue(-7)),
                    kv("long", AnyValue::StringValue("é".repeat(300))),
                    kv("longer", AnyValue::StringValue("x".repeat(20_000))),
                ]
            );
            assert_eq!(got.events.len(), 1);
            assert_eq!(got.events[0].time_unix_nano, 5);
            assert_eq!(got.dropped_events_count, u32::try_from(i).unwrap());
            assert_eq!(got.events[0].name, "job attempt failed; retrying");
            assert_eq!(
                got.events[0].attributes,
                vec![kv("attempt", AnyValue::IntValue(1))]
            );
            match &want.error {
                Some(m) => {
                    let st = got.status.as_ref().unwrap();
                    assert_eq!((st.code, st.message.as_str()), (2, m.as_str()));
                }
                None => assert_eq!(got.status, None),
            }
            let remote = if i.is_multiple_of(2) { 0x200 } else { 0 };
            assert_eq!(got.flags, 0x101 | remote);
        }
    }

    #[test]
    fn an_empty_batch_is_still_a_request() {
        let body = encode_request(&[], "steward", &[]);
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(req.resource_spans[0].scope_spans[0].spans.len(), 0);
    }
}
