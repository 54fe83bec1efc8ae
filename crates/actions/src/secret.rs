//! Secret references (docs/security.md, Secrets): a job field that may be sensitive takes
//! either its value or `{secret: NAME}`, resolved from the node's secret sources when the
//! attempt starts, never stored. Every value that must not be shown is collected in a
//! [`Sensitive`] set, which scrubs it from the attempt's output and error.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// What redacted text shows.
pub const MASK: &str = "***";

/// The longest secret name.
pub const MAX_SECRET_NAME_LEN: usize = 128;

/// The largest secret value (a key file, a certificate chain).
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// The prefix of the environment variables that hold secrets: `STEWARD_SECRET_DB_PASSWORD`
/// holds secret `db_password`, `db-password` or `DB_PASSWORD`.
pub const SECRET_ENV_PREFIX: &str = "STEWARD_SECRET_";

/// Values shorter than this are not scrubbed from output: hiding every `ab` in a log would
/// destroy it and hide nothing.
pub const MIN_SCRUB_LEN: usize = 4;

/// A string a job takes that may be sensitive: written out, or a secret's name.
#[derive(Clone, PartialEq, Eq)]
pub enum Text {
    Plain(String),
    Secret(SecretName),
}

/// Plain values may be sensitive too: only their length is shown.
impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Text::Plain(s) => write!(f, "Plain({} bytes)", s.len()),
            Text::Secret(n) => write!(f, "Secret({n})"),
        }
    }
}

impl Text {
    /// `Some(name)` for a reference written `{secret: NAME}`; `Err` for any other map.
    /// `Ok(None)`: not a map.
    pub(crate) fn reference(v: &Value) -> Result<Option<SecretName>, String> {
        let Value::Object(m) = v else { return Ok(None) };
        match (m.len(), m.get("secret")) {
            (1, Some(Value::String(name))) => SecretName::new(name).map(Some),
            (1, Some(other)) => Err(format!(
                "secret must name a secret (a string), not {}",
                crate::args::kind(other)
            )),
            _ => Err("must be a string or {secret: NAME}".to_owned()),
        }
    }

    /// How a message names it: a plain value as `show` renders it, a secret by name.
    pub fn describe(&self, show: impl FnOnce(&str) -> String) -> String {
        match self {
            Text::Plain(s) => show(s),
            Text::Secret(n) => format!("{{secret: {n}}}"),
        }
    }

    /// The plain value, if written out.
    pub fn plain(&self) -> Option<&str> {
        match self {
            Text::Plain(s) => Some(s),
            Text::Secret(_) => None,
        }
    }
}

/// A secret's name: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most [`MAX_SECRET_NAME_LEN`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretName(String);

impl SecretName {
    pub fn new(name: &str) -> Result<SecretName, String> {
        let ok_first = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
        let ok_rest = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok_first || !ok_rest || name.len() > MAX_SECRET_NAME_LEN {
            return Err(format!(
                "{name:?} is not a secret name: letters, digits, '_', '.' and '-', starting with a letter or digit, at most {MAX_SECRET_NAME_LEN} bytes"
            ));
        }
        Ok(SecretName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The environment variable that may hold it.
    pub fn env_var(&self) -> String {
        let mut v = String::from(SECRET_ENV_PREFIX);
        v.extend(self.0.chars().map(|c| match c {
            '.' | '-' => '_',
            c => c.to_ascii_uppercase(),
        }));
        v
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret that cannot be read, and why (never its value).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("secret {name}: {problem}")]
pub struct SecretError {
    pub name: String,
    pub problem: String,
}

/// The node's secret sources: files in a directory (`DATA_DIR/secrets`), read every time a
/// value is needed, so a changed file takes effect at the next attempt; then environment
/// variables `STEWARD_SECRET_*`. A node without a directory has environment secrets only.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    dir: Option<PathBuf>,
}

impl Secrets {
    pub fn new(dir: impl Into<PathBuf>) -> Secrets {
        Secrets {
            dir: Some(dir.into()),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The secret's value: the file `DIR/NAME` if there is one, else the variable.
    pub fn get(&self, name: &SecretName) -> Result<String, SecretError> {
        let err = |problem: String| SecretError {
            name: name.to_string(),
            problem,
        };
        if let Some(dir) = &self.dir {
            let path = dir.join(name.as_str());
            match read_secret_file(&path) {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(format!("{}: {e}", path.display()))),
            }
        }
        match std::env::var(name.env_var()) {
            Ok(v) => Ok(v),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(err(format!("variable {} is not UTF-8", name.env_var())))
            }
            Err(std::env::VarError::NotPresent) => Err(err(match &self.dir {
                Some(dir) => format!(
                    "not found: no file {} and no variable {}",
                    dir.join(name.as_str()).display(),
                    name.env_var()
                ),
                None => format!("not found: no variable {}", name.env_var()),
            })),
        }
    }
}

/// Reads a secret file: a regular file (a FIFO or a device is refused, not waited on), not
/// readable or writable by group or others, at most [`MAX_SECRET_BYTES`], UTF-8. One final
/// newline (`echo value > file`) is not part of the value.
fn read_secret_file(path: &Path) -> io::Result<String> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "its mode is {:04o}, open to group or others; make it 0600 (chmod 600)",
            meta.mode() & 0o7777
        )));
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(invalid(format!(
            "{} bytes, more than the limit of {MAX_SECRET_BYTES}",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_SECRET_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(invalid(format!(
            "more than the limit of {MAX_SECRET_BYTES} bytes"
        )));
    }
    let mut s = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8".into()))?;
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(s)
}

/// The values one attempt must not show: resolved secrets, and plain values the redaction
/// rule hides. [`Sensitive::scrub`] replaces each with [`MASK`].
#[derive(Default)]
pub(crate) struct Sensitive {
    values: Vec<String>,
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sensitive({} values)", self.values.len())
    }
}

impl Sensitive {
    /// Adds `value`, and each line of a multi-line value (a key file echoed line by line).
    pub(crate) fn add(&mut self, value: &str) {
        let mut add_one = |v: &str| {
            if v.len() >= MIN_SCRUB_LEN && !self.values.iter().any(|k| k == v) {
                self.values.push(v.to_owned());
            }
        };
        add_one(value);
        if value.contains('\n') {
            for line in value.lines() {
                add_one(line.trim());
            }
        }
    }

    /// Resolves `text` with `secrets`; the value is added to the set when it is a secret, or
    /// when `hidden` says the redaction rule hides it.
    pub(crate) fn resolve(
        &mut self,
        text: &Text,
        secrets: &Secrets,
        hidden: bool,
    ) -> Result<String, SecretError> {
        match text {
            Text::Plain(s) => {
                if hidden {
                    self.add(s);
                }
                Ok(s.clone())
            }
            Text::Secret(name) => {
                let v = secrets.get(name)?;
                self.add(&v);
                Ok(v)
            }
        }
    }

    /// Replaces every occurrence of a value with [`MASK`]. Occurrences are found in the
    /// original text and merged where they overlap, so two values that overlap are masked
    /// whole. A tail that starts in the middle of a value (the rest of it cut off with the
    /// older output) has that end masked too.
    pub(crate) fn scrub(&self, text: &mut String) {
        if self.values.is_empty() || text.is_empty() {
            return;
        }
        let mut hits: Vec<(usize, usize)> = Vec::new();
        for v in &self.values {
            hits.extend(
                text.match_indices(v.as_str())
                    .map(|(i, m)| (i, i + m.len())),
            );
            // The longest proper suffix of `v` that `text` starts with.
            if let Some(i) = (1..v.len())
                .filter(|&i| v.is_char_boundary(i))
                .find(|&i| v.len() - i >= MIN_SCRUB_LEN && text.starts_with(&v[i..]))
            {
                hits.push((0, v.len() - i));
            }
        }
        if hits.is_empty() {
            return;
        }
        hits.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        let mut i = 0;
        while i < hits.len() {
            let (start, mut end) = hits[i];
            i += 1;
            while i < hits.len() && hits[i].0 <= end {
                end = end.max(hits[i].1);
                i += 1;
            }
            out.push_str(&text[at..start]);
            out.push_str(MASK);
            at = end;
        }
        out.push_str(&text[at..]);
        *text = out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["db", "DB_PASSWORD", "db-password.v2", "0"] {
            SecretName::new(ok).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(SecretName::new(bad).is_err(), "{bad}");
        }
        assert_eq!(
            SecretName::new("db-password.v2").unwrap().env_var(),
            "STEWARD_SECRET_DB_PASSWORD_V2"
        );
    }

    #[test]
    fn references() {
        let r = |v: Value| Text::reference(&v);
        assert_eq!(r(Value::from("x")), Ok(None));
        assert_eq!(
            r(serde_json::json!({"secret": "db"})),
            Ok(Some(SecretName::new("db").unwrap()))
        );
        assert!(r(serde_json::json!({"secret": 1})).is_err());
        assert!(r(serde_json::json!({"secret": "db", "x": 1})).is_err());
        assert!(r(serde_json::json!({"value": "db"})).is_err());
        assert!(r(serde_json::json!({"secret": "../etc/passwd"})).is_err());
    }

    #[test]
    fn files_are_read_with_care() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::new(dir.path());
        let name = |n: &str| SecretName::new(n).unwrap();
        let write = |n: &str, v: &str, mode: u32| {
            let p = dir.path().join(n);
            std::fs::write(&p, v).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("a", "hunter2\n", 0o600);
        assert_eq!(secrets.get(&name("a")).unwrap(), "hunter2");
        write("a", "changed\r\n", 0o600);
        assert_eq!(secrets.get(&name("a")).unwrap(), "changed");
        write("open", "x", 0o644);
        let e = secrets.get(&name("open")).unwrap_err();
        assert!(e.to_string().contains("0644"), "{e}");
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = secrets.get(&name("fifo")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        write("big", &"x".repeat(70_000), 0o600);
        assert!(secrets.get(&name("big")).is_err());
        let e = secrets.get(&name("nowhere")).unwrap_err();
        assert!(e.to_string().contains("STEWARD_SECRET_NOWHERE"), "{e}");
    }

    #[test]
    fn scrubbing() {
        let mut s = Sensitive::default();
        s.add("hunter2");
        s.add("abc"); // too short to scrub
        s.add("-----BEGIN KEY-----\nAAAABBBB\n-----END KEY-----");
        let mut out = "pw=hunter2 abc line AAAABBBB end".to_owned();
        s.scrub(&mut out);
        assert_eq!(out, "pw=*** abc line *** end");
        // A tail cut inside a value.
        let mut out = "nter2 and more".to_owned();
        s.scrub(&mut out);
        assert_eq!(out, "*** and more");
        let mut out = "2 and more".to_owned();
        s.scrub(&mut out);
        assert_eq!(out, "2 and more");
        // Overlapping values, neither inside the other: masked whole.
        let mut s = Sensitive::default();
        s.add("abcdef");
        s.add("defghi");
        let mut out = "x abcdefghi y".to_owned();
        s.scrub(&mut out);
        assert_eq!(out, "x *** y");
    }
}
