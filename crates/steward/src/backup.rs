//! `steward backup` and `steward restore`: the embedded SQLite database, copied online and put
//! back (docs/operating.md, Backups). With PostgreSQL, its own tools do this.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};

use crate::output;

fn database(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("steward.db")
}

fn describe(info: &store_sqlite::backup::BackupInfo) -> String {
    format!(
        "{} runs ({} unfinished, which resume when it is served), schema version {}, {} bytes",
        info.runs, info.unfinished, info.schema, info.bytes
    )
}

pub fn backup(data_dir: &Path, file: &Path) -> anyhow::Result<ExitCode> {
    let db = database(data_dir);
    if !db.is_file() {
        bail!(
            "there is no SQLite database at {}; with PostgreSQL, back up with pg_dump (docs/operating.md, Backups)",
            db.display()
        );
    }
    let info = store_sqlite::backup::backup(&db, file)
        .with_context(|| format!("backing up {} into {}", db.display(), file.display()))?;
    output::line(&format!(
        "backed up {} into {}: {}",
        db.display(),
        file.display(),
        describe(&info)
    ));
    Ok(ExitCode::SUCCESS)
}

pub fn restore(file: &Path, data_dir: &Path, replace: bool) -> anyhow::Result<ExitCode> {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Some(pid) = node::pidfile::live_pid(data_dir)? {
        bail!(
            "a steward server (pid {pid}) serves {}; stop it first (steward stop --data-dir {})",
            data_dir.display(),
            data_dir.display()
        );
    }
    // Readable by this user only, as `steward serve` makes it: it holds the database.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let db = database(data_dir);
    let info = store_sqlite::backup::restore(file, &db, replace)
        .map_err(|e| anyhow!("restoring {}: {e}", file.display()))?;
    output::line(&format!(
        "restored {} as {}: {}",
        file.display(),
        db.display(),
        describe(&info)
    ));
    Ok(ExitCode::SUCCESS)
}
