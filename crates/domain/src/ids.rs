//! Identifiers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A run's ID: a UUIDv7, so IDs sort by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(uuid::Uuid);

impl RunId {
    pub fn new_v7() -> RunId {
        RunId(uuid::Uuid::now_v7())
    }

    /// When the ID was made (a UUIDv7 carries its millisecond); `None` for another kind of
    /// UUID.
    pub fn created_at(self) -> Option<crate::Timestamp> {
        let (secs, nanos) = self.0.get_timestamp()?.to_unix();
        let ms = secs
            .checked_mul(1000)?
            .checked_add(u64::from(nanos / 1_000_000))?;
        i64::try_from(ms).ok().map(crate::Timestamp)
    }

    /// The ID's 16 bytes (big-endian, as written).
    pub fn as_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

#[derive(Debug, thiserror::Error)]
/// Holds the input already clipped: an error never grows with what the client sent.
#[error("invalid run id {0}: expected a UUID such as 0192f0c1-8a4e-7d2b-9f3a-1c2d3e4f5a6b")]
pub struct ParseRunIdError(String);

impl FromStr for RunId {
    type Err = ParseRunIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s.trim())
            .map(RunId)
            .map_err(|_| ParseRunIdError(crate::limits::clip(s)))
    }
}

/// The identity of one `steward serve` node; leases name it as their owner.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
