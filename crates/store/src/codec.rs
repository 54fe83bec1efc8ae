//! Domain values to stored text and back, for every backend: what does not parse is
//! [`Error::Corrupt`](crate::Error::Corrupt), naming what was found.

use domain::{JobState, RunId, RunState};

use crate::{Error, Result};

pub fn json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("{e}: {s}")))
}

pub fn run_state(s: &str) -> Result<RunState> {
    s.parse().map_err(Error::Corrupt)
}

pub fn job_state(s: &str) -> Result<JobState> {
    s.parse().map_err(Error::Corrupt)
}

pub fn run_id(s: &str) -> Result<RunId> {
    s.parse()
        .map_err(|e| Error::Corrupt(format!("run id {s:?}: {e}")))
}

/// JSON for a stored column. A value that does not encode is an error (nothing is written),
/// never a `null` in its place.
pub fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| Error::Corrupt(format!("cannot encode a value to store: {e}")))
}

/// The stored e-stop list.
pub fn estop_list(body: &str) -> Result<domain::estop::EStopList> {
    domain::estop::EStopList::parse(body)
        .map_err(|e| Error::Corrupt(format!("the stored e-stop list: {e}")))
}
