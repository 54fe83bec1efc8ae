//! Steward's own files, which no job may write (docs/security.md, Guardrails): the data
//! directory (database, tokens, the socket, the job ledger), the config, policy and e-stop
//! files, the TLS files. Automation that could rewrite its own policies or e-stop list would
//! have no guardrails.
//!
//! A path is checked as written (`..` folded) and as it resolves: the symlinks among its
//! existing directories followed. At Submit the check refuses what is plainly protected; the
//! `write_file` action checks again just before it writes, on the directory it opened (its
//! path as the kernel names it, and its identity, so a bind mount of a protected directory is
//! that directory), so a symlink another job made does not lead it into a protected place.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// The protected paths, each with what it is ("the policy file"), and the device and inode of
/// each that was a directory when it was listed.
#[derive(Clone, Debug, Default)]
pub struct Protected(
    Arc<[(PathBuf, &'static str)]>,
    Arc<[(u64, u64, &'static str)]>,
);

/// `path` with `.` and `..` folded, without touching the disk.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// `path` with the symlinks of its longest existing ancestor resolved; the rest as written.
pub(crate) fn resolved(path: &Path) -> PathBuf {
    let path = lexical(path);
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path,
        }
    }
}

impl Protected {
    /// Protects each of `entries` (a file or a directory and everything in it).
    pub fn new(entries: impl IntoIterator<Item = (PathBuf, &'static str)>) -> Protected {
        let mut all = Vec::new();
        let mut dirs = Vec::new();
        for (p, what) in entries {
            let abs = if p.is_absolute() {
                p
            } else {
                std::env::current_dir().unwrap_or_default().join(p)
            };
            if let Ok(meta) = std::fs::metadata(&abs)
                && meta.is_dir()
            {
                use std::os::unix::fs::MetadataExt as _;
                dirs.push((meta.dev(), meta.ino(), what));
            }
            let (lex, real) = (lexical(&abs), resolved(&abs));
            if real != lex {
                all.push((real, what));
            }
            all.push((lex, what));
        }
        Protected(all.into(), dirs.into())
    }

    /// What protected directory the directory with this device and inode is, whatever path
    /// reaches it.
    pub fn covering_dir(&self, dev: u64, ino: u64) -> Option<&'static str> {
        self.1
            .iter()
            .find(|(d, i, _)| *d == dev && *i == ino)
            .map(|(_, _, what)| *what)
    }

    /// What protected thing `path` is, or lies inside, as written or as it resolves: the
    /// closest one (the policy file rather than the data directory that holds it).
    pub fn covering(&self, path: &Path) -> Option<&'static str> {
        let candidates = [lexical(path), resolved(path)];
        self.0
            .iter()
            .filter(|(p, _)| candidates.iter().any(|c| c.starts_with(p)))
            .max_by_key(|(p, _)| p.components().count())
            .map(|(_, what)| *what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protected_directory_is_known_by_its_identity() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let p = Protected::new([(data.clone(), "the data directory")]);
        let m = std::fs::metadata(&data).unwrap();
        assert_eq!(p.covering_dir(m.dev(), m.ino()), Some("the data directory"));
        let other = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(p.covering_dir(other.dev(), other.ino()), None);
    }

    #[test]
    fn paths_inside_protected_ones_are_found_as_written_and_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let policies = dir.path().join("etc/policies.toml");
        let p = Protected::new([
            (data.clone(), "the data directory"),
            (policies.clone(), "the policy file"),
        ]);
        assert_eq!(
            p.covering(&data.join("estop.json")),
            Some("the data directory")
        );
        let inner = Protected::new([
            (data.clone(), "the data directory"),
            (data.join("policies.toml"), "the policy file"),
        ]);
        assert_eq!(
            inner.covering(&data.join("policies.toml")),
            Some("the policy file")
        );
        assert_eq!(p.covering(&policies), Some("the policy file"));
        assert_eq!(
            p.covering(&dir.path().join("x/../data/steward.db")),
            Some("the data directory")
        );
        assert_eq!(p.covering(&dir.path().join("elsewhere/file")), None);
        assert_eq!(p.covering(&dir.path().join("data2/file")), None);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        assert_eq!(
            p.covering(&link.join("estop.json")),
            Some("the data directory")
        );
    }
}
