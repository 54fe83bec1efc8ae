//! Online backups of the database, and checking a backup before it is restored
//! (docs/operating.md, Backups).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use store::{Error, Result};

use crate::{MIGRATIONS, db_err};

/// What a backup holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    /// Its schema version (`PRAGMA user_version`).
    pub schema: usize,
    pub runs: u64,
    /// Runs not finished: they resume when the copy is served.
    pub unfinished: u64,
    pub bytes: u64,
}

/// Copies the database at `db` into a new file `to`, consistent as of one instant, while a
/// server may be writing it: SQLite's backup API in one step, inside one read transaction.
pub fn backup(db: &Path, to: &Path) -> Result<BackupInfo> {
    if to.exists() {
        return Err(Error::Unavailable(format!(
            "{} exists; a backup never overwrites a file",
            to.display()
        )));
    }
    let src = crate::open_reader(db)?;
    // Written next to the target and renamed at the end: a failed backup leaves no file that
    // looks like one.
    let partial = beside(to, ".partial");
    let result = (|| {
        copy_into(&src, &partial)?;
        std::fs::rename(&partial, to)
            .map_err(|e| Error::Unavailable(format!("renaming into {}: {e}", to.display())))?;
        if let Some(dir) = to.parent() {
            sync(dir)?;
        }
        check(to)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// `path` with `suffix` appended to its file name (`x.db` → `x.db.partial`).
fn beside(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    std::path::PathBuf::from(p)
}

/// Copies the database `src` reads into a new file `to` (mode 0600: it holds what the
/// database holds), consistent as of one instant, as one file without a write-ahead log, and
/// synced. A file at `to` (left by a copy that was interrupted: the name is Steward's) is
/// replaced.
fn copy_into(src: &Connection, to: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(to);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| Error::Unavailable(format!("creating {}: {e}", to.display())))?;
    let mut dst = Connection::open(to).map_err(db_err)?;
    {
        use rusqlite::backup::StepResult;
        let b = rusqlite::backup::Backup::new(src, &mut dst).map_err(db_err)?;
        // Every page in one step: one read transaction, so one instant. In WAL mode a
        // reader never waits for the writer; the source's busy timeout covers the rest.
        loop {
            match b.step(-1).map_err(db_err)? {
                StepResult::Done => break,
                StepResult::More => {}
                other => {
                    return Err(Error::Unavailable(format!(
                        "the database stayed busy ({other:?}); try again"
                    )));
                }
            }
        }
    }
    // One file, no write-ahead log beside it.
    dst.execute_batch("PRAGMA journal_mode = DELETE")
        .map_err(db_err)?;
    drop(dst);
    sync(to)
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::Unavailable(format!("syncing {}: {e}", path.display())))
}

/// Checks that `file` is a whole Steward database this release can serve: SQLite's integrity
/// check, a schema version it knows, its tables.
pub fn check(file: &Path) -> Result<BackupInfo> {
    let meta = std::fs::metadata(file)
        .map_err(|e| Error::Unavailable(format!("reading {}: {e}", file.display())))?;
    if !meta.is_file() {
        return Err(Error::Corrupt(format!(
            "{} is not a regular file",
            file.display()
        )));
    }
    let c = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    let not_ours = |why: String| Error::Corrupt(format!("{} {why}", file.display()));
    let integrity: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| not_ours(format!("is not an SQLite database: {e}")))?;
    if integrity != "ok" {
        return Err(not_ours(format!(
            "fails SQLite's integrity check: {integrity}"
        )));
    }
    let schema: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    let schema = usize::try_from(schema).unwrap_or(0);
    if schema == 0 {
        return Err(not_ours(
            "is not a Steward database (no schema version)".into(),
        ));
    }
    if schema > MIGRATIONS.len() {
        return Err(not_ours(format!(
            "has schema version {schema}, newer than this steward ({}); restore it with a newer steward",
            MIGRATIONS.len()
        )));
    }
    let count = |sql: &str| -> Result<u64> {
        c.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| not_ours(format!("is not a Steward database: {e}")))
    };
    Ok(BackupInfo {
        schema,
        runs: count("SELECT COUNT(*) FROM runs")?,
        unfinished: count(
            "SELECT COUNT(*) FROM runs WHERE state IN ('submitted','queued','running','paused')",
        )?,
        bytes: meta.len(),
    })
}

/// Puts the checked backup `file` in place as the database `db` (whose server must not be
/// running): copied beside it (through SQLite, so that a write-ahead log beside `file` is
/// part of the copy), synced, renamed over it. A database already there is kept as
/// `DB.replaced` (with its write-ahead log) when `replace` is set, else refused. The copy is
/// made before anything is moved: `file` may be that `DB.replaced` (undoing a restore).
pub fn restore(file: &Path, db: &Path, replace: bool) -> Result<BackupInfo> {
    let side = |suffix: &str| beside(db, suffix);
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    for suffix in ["", "-wal", "-shm", ".restoring"] {
        if same(file, &side(suffix)) {
            return Err(Error::Unavailable(format!(
                "{} is the database's own file; restore a backup of it (steward backup)",
                file.display()
            )));
        }
    }
    if db.exists() && !replace {
        return Err(Error::Unavailable(format!(
            "{} exists; give --replace to keep it as {} and restore over it",
            db.display(),
            side(".replaced").display()
        )));
    }
    let info = check(file)?;
    let partial = side(".restoring");
    let copied = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)
    .and_then(|src| copy_into(&src, &partial));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    if db.exists() {
        // A log left beside an earlier `.replaced` must never be paired with this one.
        for suffix in [".replaced-wal", ".replaced-shm"] {
            let _ = std::fs::remove_file(side(suffix));
        }
        for suffix in ["", "-wal", "-shm"] {
            let from = side(suffix);
            if from.exists() {
                std::fs::rename(&from, side(&format!(".replaced{suffix}"))).map_err(|e| {
                    Error::Unavailable(format!("moving {} aside: {e}", from.display()))
                })?;
            }
        }
    } else {
        // A stale log of some earlier database must never be replayed into this one.
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(side(suffix));
        }
    }
    std::fs::rename(&partial, db)
        .map_err(|e| Error::Unavailable(format!("renaming into {}: {e}", db.display())))?;
    if let Some(dir) = db.parent() {
        sync(dir)?;
    }
    Ok(info)
}
