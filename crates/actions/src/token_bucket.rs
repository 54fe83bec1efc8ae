//! The `token_bucket` action: takes a token from a named, shared, persisted bucket. Its args
//! are checked here; the engine runs it, since the buckets live in the store.

use std::time::Duration;

use domain::{FieldError, HumanDuration};
use serde_json::{Map, Value};

use crate::args::{Args, kind};

/// `token_bucket` args: `{bucket: disk-erase-satellite, wait: 5m}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucketArgs {
    pub bucket: String,
    /// How long to wait for a token before failing; none: fail at once.
    pub wait: Option<Duration>,
}

impl TokenBucketArgs {
    pub(crate) fn parse(
        map: &Map<String, Value>,
        job_path: &str,
    ) -> Result<TokenBucketArgs, Vec<FieldError>> {
        let mut a = Args::new(map, job_path, &["bucket", "wait"]);
        let bucket = a.string("bucket", true).map(str::to_owned);
        if let Some(b) = &bucket
            && (b.is_empty()
                || !b
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            a.error(
                "bucket",
                format!("{b:?} is not a bucket name: letters, digits, '_', '-', '.'"),
            );
        }
        let wait = match a.get("wait") {
            None => None,
            Some(Value::String(s)) => match HumanDuration::parse(s) {
                Ok(d) => Some(d.0),
                Err(m) => {
                    a.error("wait", m);
                    None
                }
            },
            Some(other) => {
                a.error(
                    "wait",
                    format!(
                        "must be a duration such as \"30s\" or \"5m\", not {}",
                        kind(other)
                    ),
                );
                None
            }
        };
        a.finish(bucket.map(|bucket| TokenBucketArgs { bucket, wait }))
    }
}
