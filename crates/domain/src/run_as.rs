//! `run_as = "user[:group]"`: who a `shell` job runs as (docs/security.md, Guardrails).

use std::fmt;
use std::str::FromStr;

/// A user, and optionally a group, by name or number. Looked up when a job starts; without a
/// group, the user's primary group and supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub group: Option<String>,
}

impl FromStr for RunAs {
    type Err = String;

    fn from_str(s: &str) -> Result<RunAs, String> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let valid = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && !n.starts_with('-')
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'))
        };
        if !valid(user) || group.is_some_and(|g| !valid(g)) {
            return Err(format!(
                "{s:?} is not \"user\" or \"user:group\" (names or numeric ids)"
            ));
        }
        Ok(RunAs {
            user: user.to_owned(),
            group: group.map(str::to_owned),
        })
    }
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.user)?;
        if let Some(g) = &self.group {
            write!(f, ":{g}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let r: RunAs = "deploy:ops".parse().unwrap();
        assert_eq!(
            (r.user.as_str(), r.group.as_deref()),
            ("deploy", Some("ops"))
        );
        assert_eq!(r.to_string(), "deploy:ops");
        let r: RunAs = "1000".parse().unwrap();
        assert_eq!(r.group, None);
        for bad in ["", ":g", "u:", "a b", "-x", "u:g:h", "u/x"] {
            assert!(bad.parse::<RunAs>().is_err(), "{bad}");
        }
    }
}
