#![allow(clippy::unwrap_used)]

//! The e-stop sources against real files, real inotify and real SQLite in temporary
//! directories. Changes are awaited on a subscriber with a generous deadline; nothing asserts
//! on tight timings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use domain::estop::{EStopList, EStopState, Snapshot, Target};
use domain::{Clock, Timestamp};
use estop::{
    DbSource, EStop, EStopHandle, EStopOptions, FileSource, Source, SourceError,
    ensure_initial_file,
};
use store::{EStopStore, RunStore};
use store_sqlite::SqliteStore;
use tokio::sync::watch;

use EStopState::{Go, Pause, Stop};

const DEADLINE: Duration = Duration::from_secs(10);
const NOW: Timestamp = Timestamp(1_795_000_000_000);

struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        NOW
    }
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(FixedClock)
}

fn target(t: &str) -> Target {
    t.parse().unwrap()
}

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn aap() -> BTreeMap<String, String> {
    [("site".to_owned(), "aap".to_owned())].into()
}

/// A data directory with the e-stop file in `etc/` and the database in `db/`, and a service
/// on one of its sources.
struct Env {
    _dir: tempfile::TempDir,
    etc: PathBuf,
    file: PathBuf,
    db: PathBuf,
    store: Arc<SqliteStore>,
    tasks: tasks::Tasks,
    /// Where a failed e-stop task would be reported: none may fail here.
    _failures: tasks::Failures,
}

impl Env {
    fn new(initial: Option<&str>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let db = dir.path().join("db").join("steward.db");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(db.parent().unwrap()).unwrap();
        let file = etc.join("estop.json");
        if let Some(text) = initial {
            std::fs::write(&file, text).unwrap();
        }
        let store = Arc::new(SqliteStore::open(&db).unwrap());
        let (tasks, failures) = tasks::Tasks::new();
        Env {
            _dir: dir,
            etc,
            file,
            db,
            store,
            tasks,
            _failures: failures,
        }
    }

    fn file_source(&self) -> Arc<FileSource> {
        Arc::new(FileSource::new(&self.file, self.store.clone(), clock()))
    }

    async fn start(&self, source: Arc<dyn Source>, reread: Duration) -> EStopHandle {
        let opts = EStopOptions {
            unlisted: Stop,
            reread,
            ..Default::default()
        };
        EStop::start(source, clock(), opts, &self.tasks).await
    }

    /// The file source, watched with inotify; the periodic re-read is too slow to matter.
    async fn start_file(&self) -> EStopHandle {
        let src = self.file_source();
        assert!(src.is_watching());
        self.start(src, Duration::from_secs(3600)).await
    }

    fn read_file(&self) -> EStopList {
        EStopList::parse(&std::fs::read_to_string(&self.file).unwrap()).unwrap()
    }

    /// Replaces the file the way careful tools do: a new file renamed over the old one.
    fn replace_file(&self, text: &str) {
        let tmp = self.etc.join("estop.json.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn files_in_etc(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.etc)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    async fn shutdown(self) {
        tokio::time::timeout(DEADLINE, self.tasks.shutdown())
            .await
            .expect("the e-stop task stops when cancelled");
    }
}

/// Waits (with a generous deadline) until the subscriber sees a snapshot for which `f` holds.
async fn wait_for(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    f: impl FnMut(&Arc<Snapshot>) -> bool,
) -> Arc<Snapshot> {
    let got =
        tokio::time::timeout(DEADLINE, async { rx.wait_for(f).await.map(|s| s.clone()) }).await;
    match got {
        Ok(snap) => snap.unwrap(),
        Err(_) => panic!("timed out waiting for {what}; last seen: {:?}", rx.borrow()),
    }
}

fn state_of(snap: &Snapshot, t: &str) -> Option<EStopState> {
    match snap {
        Snapshot::Ok(l) => l.get(&target(t)).map(|e| e.state),
        Snapshot::Unreadable(_) => None,
    }
}

const GO_ALL: &str = r#"{"entries": [{"target": "*", "state": "go"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_are_published_and_audited() {
    let env = Env::new(Some(GO_ALL));
    let h = env.start_file().await;
    assert_eq!(state_of(&h.snapshot(), "*"), Some(Go));
    assert_eq!(h.verdict("Erase", &aap()).state, Go);
    let mut rx = h.subscribe();

    // A new file renamed over the old one (a new inode).
    env.replace_file(
        r#"{"entries": [{"target": "*", "state": "go"},
                        {"target": "site=aap", "state": "stop", "reason": "INC-42", "set_by": "ana"}]}"#,
    );
    wait_for(&mut rx, "the renamed file", |s| {
        state_of(s, "site=aap") == Some(Stop)
    })
    .await;
    assert_eq!(h.verdict("Erase", &aap()).state, Stop);
    assert_eq!(h.verdict("Erase", &no_labels()).state, Go);

    // Written in place (truncate, then write: the same inode).
    std::fs::write(
        &env.file,
        r#"{"entries": [{"target": "*", "state": "go"},
                        {"target": "site=aap", "state": "pause", "reason": "INC-42"}]}"#,
    )
    .unwrap();
    wait_for(&mut rx, "the file written in place", |s| {
        state_of(s, "site=aap") == Some(Pause)
    })
    .await;
    assert_eq!(h.verdict("Erase", &aap()).state, Pause);
    assert_eq!(h.alert(), None);

    let trail = h.audit(Some(target("site=aap")), 0).await.unwrap();
    let got: Vec<_> = trail
        .iter()
        .map(|r| {
            (
                r.old_state,
                r.new_state,
                r.set_by.as_str(),
                r.source.as_str(),
                r.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            // newest first; the in-place edit left set_by as it was: not ana's doing
            (Some(Stop), Some(Pause), "hand edit", "file", "INC-42"),
            (None, Some(Stop), "ana", "file", "INC-42"),
        ]
    );
    assert_eq!(trail[0].at, NOW.to_rfc3339());
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_file_stops_everything_until_fixed() {
    let env = Env::new(Some(GO_ALL));
    let h = env.start_file().await;
    let mut rx = h.subscribe();
    assert_eq!(h.alert(), None);
    assert_eq!(h.read_failures(), 0);

    env.replace_file(r#"{"entries": [{"target": "*", "state": "go"},"#);
    let snap = wait_for(&mut rx, "the unreadable snapshot", |s| {
        matches!(**s, Snapshot::Unreadable(_))
    })
    .await;
    let alert = h.alert().expect("an unreadable list raises the alert");
    assert!(alert.contains(&env.file.display().to_string()), "{alert}");
    assert!(alert.contains("malformed"), "{alert}");
    assert_eq!(*snap, Snapshot::Unreadable(alert.clone()));
    assert!(h.read_failures() >= 1);
    for (name, labels) in [("Erase", aap()), ("Other", no_labels())] {
        let v = h.verdict(name, &labels);
        assert_eq!(v.state, Stop, "{name}");
        assert!(v.to_string().contains("cannot be read"), "{v}");
    }

    // Changing it through the API is refused: nobody guesses what a damaged file held.
    let err = h
        .set(target("Erase"), Stop, "INC-7".into(), "ana".into())
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Malformed { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&env.file.display().to_string()), "{msg}");
    assert!(msg.contains("fix or replace it"), "{msg}");
    assert!(
        std::fs::read_to_string(&env.file)
            .unwrap()
            .ends_with("\"go\"},")
    );

    // An invalid entry is as unreadable as broken JSON.
    env.replace_file(r#"{"entries": [{"target": "*", "state": "halt"}]}"#);
    wait_for(
        &mut rx,
        "the new parse error",
        |s| matches!(&**s, Snapshot::Unreadable(e) if e.contains("halt")),
    )
    .await;

    env.replace_file(GO_ALL);
    wait_for(&mut rx, "the fixed file", |s| {
        matches!(**s, Snapshot::Ok(_))
    })
    .await;
    assert_eq!(h.alert(), None);
    assert_eq!(h.verdict("Erase", &aap()).state, Go);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_after_start_is_unreadable() {
    let env = Env::new(Some(GO_ALL));
    let h = env.start_file().await;
    let mut rx = h.subscribe();
    std::fs::remove_file(&env.file).unwrap();
    wait_for(
        &mut rx,
        "the missing file",
        |s| matches!(&**s, Snapshot::Unreadable(e) if e.contains("missing")),
    )
    .await;
    assert_eq!(h.verdict("Other", &no_labels()).state, Stop);
    let err = h
        .clear(target("*"), "ana".into(), String::new())
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Missing { .. }), "{err:?}");
    assert!(!env.file.exists(), "a refused change creates nothing");

    std::fs::write(&env.file, GO_ALL).unwrap();
    wait_for(&mut rx, "the restored file", |s| {
        matches!(**s, Snapshot::Ok(_))
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_with_an_unreadable_file_starts_anyway_and_stops_everything() {
    let env = Env::new(None);
    let h = env.start_file().await;
    assert!(matches!(*h.snapshot(), Snapshot::Unreadable(_)));
    let alert = h.alert().unwrap();
    assert!(alert.contains("missing"), "{alert}");
    assert_eq!(h.read_failures(), 1);
    assert_eq!(h.verdict("Anything", &aap()).state, Stop);

    let mut rx = h.subscribe();
    env.replace_file(GO_ALL);
    wait_for(&mut rx, "the file appearing", |s| {
        matches!(**s, Snapshot::Ok(_))
    })
    .await;
    assert_eq!(h.alert(), None);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_writes_atomically_publishes_at_once_and_audits() {
    let env = Env::new(Some(GO_ALL));
    let h = env.start_file().await;
    let mut rx = h.subscribe();
    rx.mark_unchanged();

    let rec = h
        .set(target("site=aap"), Stop, " INC-42 ".into(), "ana".into())
        .await
        .unwrap();
    // Published before set returns, without waiting for inotify.
    assert!(rx.has_changed().unwrap());
    assert_eq!(h.verdict("Erase", &aap()).state, Stop);
    assert_eq!(state_of(&h.snapshot(), "site=aap"), Some(Stop));

    assert_eq!(rec.target, target("site=aap"));
    assert_eq!((rec.old_state, rec.new_state), (None, Some(Stop)));
    assert_eq!(
        (
            rec.set_by.as_str(),
            rec.reason.as_str(),
            rec.source.as_str()
        ),
        ("ana", "INC-42", "api")
    );
    assert_eq!(rec.at, NOW.to_rfc3339());

    // The file: parses, holds the entry with who/when/why, and nothing else is left behind.
    assert_eq!(env.files_in_etc(), vec!["estop.json"]);
    let list = env.read_file();
    let e = list.get(&target("site=aap")).unwrap();
    assert_eq!(
        (e.state, e.reason.as_str(), e.set_by.as_str()),
        (Stop, "INC-42", "ana")
    );
    assert_eq!(e.set_at, NOW.to_rfc3339());
    assert_eq!(
        list.get(&target("*")).unwrap().state,
        Go,
        "other entries stay"
    );

    // Replacing an entry records the old state.
    let rec2 = h
        .set(target("site=aap"), Go, String::new(), "bob".into())
        .await
        .unwrap();
    assert_eq!((rec2.old_state, rec2.new_state), (Some(Stop), Some(Go)));
    assert_eq!(h.verdict("Erase", &aap()).state, Go);
    assert_eq!(env.files_in_etc(), vec!["estop.json"]);

    let trail = h.audit(None, 0).await.unwrap();
    assert_eq!(trail, vec![rec2, rec.clone()]);
    assert_eq!(h.audit(None, 1).await.unwrap().len(), 1);
    assert!(h.audit(Some(target("*")), 0).await.unwrap().is_empty());

    // Writes through the API are not mistaken for hand edits.
    h.reload().await;
    assert_eq!(h.audit(None, 0).await.unwrap().len(), 2);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_removes_the_entry_and_audits() {
    let env = Env::new(Some(
        r#"{"entries": [{"target": "*", "state": "go"}, {"target": "Erase", "state": "stop", "reason": "INC-1"}]}"#,
    ));
    let h = env.start_file().await;
    assert_eq!(h.verdict("Erase", &no_labels()).state, Stop);

    let rec = h
        .clear(target("Erase"), "ana".into(), "INC-1 resolved".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.old_state, rec.new_state), (Some(Stop), None));
    assert_eq!(
        (rec.set_by.as_str(), rec.reason.as_str()),
        ("ana", "INC-1 resolved")
    );
    assert_eq!(h.verdict("Erase", &no_labels()).state, Go);
    assert_eq!(env.read_file().entries.len(), 1);

    // Clearing what is not there changes and audits nothing.
    assert_eq!(
        h.clear(target("Erase"), "ana".into(), String::new())
            .await
            .unwrap(),
        None
    );
    assert_eq!(h.audit(None, 0).await.unwrap(), vec![rec]);

    // Clearing the last entry that matches leaves the run unlisted: stop (fail closed).
    h.clear(target("*"), "ana".into(), String::new())
        .await
        .unwrap()
        .unwrap();
    let v = h.verdict("Erase", &no_labels());
    assert_eq!(
        (v.state, v.because),
        (Stop, domain::estop::Because::Unlisted)
    );
    assert_eq!(env.read_file(), EStopList::default());
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_stop_need_a_reason_and_every_change_an_actor() {
    let env = Env::new(Some(GO_ALL));
    let h = env.start_file().await;
    for state in [Pause, Stop] {
        for reason in ["", "   "] {
            let err = h
                .set(target("Erase"), state, reason.into(), "ana".into())
                .await
                .unwrap_err();
            assert!(matches!(err, SourceError::InvalidArgument(_)), "{err:?}");
            assert!(err.to_string().starts_with("reason"), "{err}");
        }
    }
    let err = h
        .set(target("Erase"), Stop, "INC-1".into(), " ".into())
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("actor"), "{err}");
    let err = h
        .clear(target("*"), String::new(), String::new())
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("actor"), "{err}");
    assert_eq!(env.read_file(), EStopList::parse(GO_ALL).unwrap());
    assert!(h.audit(None, 0).await.unwrap().is_empty());

    // `go` needs no reason.
    h.set(target("Erase"), Go, String::new(), "ana".into())
        .await
        .unwrap();
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_reread_sees_changes_without_inotify() {
    let env = Env::new(Some(GO_ALL));
    let src = Arc::new(FileSource::poll_only(&env.file, env.store.clone(), clock()));
    assert!(!src.is_watching());
    let h = env.start(src, Duration::from_millis(100)).await;
    let mut rx = h.subscribe();
    std::fs::write(
        &env.file,
        r#"{"entries": [{"target": "*", "state": "stop", "reason": "INC-9"}]}"#,
    )
    .unwrap();
    wait_for(&mut rx, "the re-read", |s| state_of(s, "*") == Some(Stop)).await;
    std::fs::write(&env.file, "not json").unwrap();
    wait_for(&mut rx, "the re-read of a broken file", |s| {
        matches!(**s, Snapshot::Unreadable(_))
    })
    .await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_the_mode_and_follow_a_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(None);
    let real = env.etc.join("real.json");
    std::fs::write(&real, GO_ALL).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink(&real, &env.file).unwrap();
    let h = env.start_file().await;
    h.set(target("Erase"), Stop, "INC-3".into(), "ana".into())
        .await
        .unwrap();
    assert!(
        std::fs::symlink_metadata(&env.file)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let meta = std::fs::metadata(&real).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(env.read_file().entries.len(), 2);
    assert_eq!(env.files_in_etc(), vec!["estop.json", "real.json"]);
    env.shutdown().await;
}

#[test]
fn the_initial_file_is_created_only_on_a_fresh_install() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("estop.json");

    assert!(!ensure_initial_file(&path, false).unwrap());
    assert!(
        !path.exists(),
        "a later start leaves a missing file missing"
    );

    assert!(ensure_initial_file(&path, true).unwrap());
    let list = EStopList::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(list.entries.len(), 1);
    let e = &list.entries[0];
    assert_eq!((e.target.clone(), e.state), (Target::All, Go));
    assert_eq!(e.set_by, "steward");
    assert_eq!(e.reason, estop::INITIAL_REASON);

    std::fs::write(&path, r#"{"entries": []}"#).unwrap();
    assert!(
        !ensure_initial_file(&path, true).unwrap(),
        "never overwrites"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        r#"{"entries": []}"#
    );
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file left");
}

fn db_source(store: &Arc<SqliteStore>) -> Arc<DbSource> {
    Arc::new(DbSource::new(
        store.clone() as Arc<dyn EStopStore>,
        clock(),
        Duration::from_millis(50),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_db_source_sets_clears_audits_and_sees_other_writers() {
    let env = Env::new(None);
    // Never saved: an empty list, so every run is unlisted: stop.
    let h = env
        .start(db_source(&env.store), Duration::from_secs(3600))
        .await;
    assert_eq!(*h.snapshot(), Snapshot::Ok(EStopList::default()));
    assert_eq!(h.verdict("Erase", &aap()).state, Stop);

    let r1 = h
        .set(target("*"), Go, String::new(), "ana".into())
        .await
        .unwrap();
    assert_eq!(h.verdict("Erase", &aap()).state, Go);
    let r2 = h
        .set(target("site=aap"), Pause, "INC-5".into(), "ana".into())
        .await
        .unwrap();
    assert_eq!(h.verdict("Erase", &aap()).state, Pause);
    assert_eq!(env.store.estop_version().await.unwrap(), 2);

    // A second handle on the same database file (another node) changes the list: the first
    // sees it through the version.
    let other = Arc::new(SqliteStore::open(&env.db).unwrap());
    let other_src = db_source(&other);
    let r3 = other_src
        .set(
            domain::estop::Entry {
                target: target("site=aap"),
                state: Stop,
                reason: "INC-6".into(),
                set_by: "bob".into(),
                set_at: NOW.to_rfc3339(),
            },
            "api",
        )
        .await
        .unwrap();
    assert_eq!((r3.old_state, r3.new_state), (Some(Pause), Some(Stop)));
    let mut rx = h.subscribe();
    wait_for(&mut rx, "the other node's change", |s| {
        state_of(s, "site=aap") == Some(Stop)
    })
    .await;
    assert_eq!(h.verdict("Erase", &aap()).state, Stop);

    let r4 = h
        .clear(target("site=aap"), "ana".into(), "INC-6 resolved".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r4.old_state, r4.new_state), (Some(Stop), None));
    assert_eq!(h.verdict("Erase", &aap()).state, Go);
    assert_eq!(
        h.clear(target("site=aap"), "ana".into(), String::new())
            .await
            .unwrap(),
        None
    );

    assert_eq!(
        h.audit(None, 0).await.unwrap(),
        vec![r4.clone(), r3.clone(), r2.clone(), r1]
    );
    assert_eq!(
        other_src.audit(Some(target("site=aap")), 2).await.unwrap(),
        vec![r4, r3]
    );
    other.close().await.unwrap();
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_db_list_fails_closed() {
    let env = Env::new(None);
    let h = env
        .start(db_source(&env.store), Duration::from_secs(3600))
        .await;
    h.set(target("*"), Go, String::new(), "ana".into())
        .await
        .unwrap();
    let mut rx = h.subscribe();
    {
        let c = rusqlite_open(&env.db);
        c.execute(
            "UPDATE estop_list SET body = '{\"entries\": 7}', version = version + 1",
            [],
        )
        .unwrap();
    }
    wait_for(&mut rx, "the corrupt list", |s| {
        matches!(**s, Snapshot::Unreadable(_))
    })
    .await;
    let alert = h.alert().unwrap();
    assert!(alert.contains("database"), "{alert}");
    assert_eq!(h.verdict("Erase", &no_labels()).state, Stop);
    env.shutdown().await;
}

fn rusqlite_open(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// Counts the loads of the source it wraps; while `hang` is set, a load never answers (a file
/// on a hung network mount, a database that stopped answering).
struct Counting {
    inner: Arc<FileSource>,
    loads: std::sync::atomic::AtomicUsize,
    hang: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Source for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn load(&self) -> Result<EStopList, SourceError> {
        self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.load().await
    }
    async fn set(
        &self,
        entry: domain::estop::Entry,
        source: &str,
    ) -> Result<domain::estop::AuditRecord, SourceError> {
        self.inner.set(entry, source).await
    }
    async fn clear(
        &self,
        target: &Target,
        actor: &str,
        reason: &str,
        source: &str,
    ) -> Result<Option<domain::estop::AuditRecord>, SourceError> {
        self.inner.clear(target, actor, reason, source).await
    }
    async fn changed(&self) {
        self.inner.changed().await;
    }
    async fn audit(
        &self,
        target: Option<Target>,
        limit: u32,
    ) -> Result<Vec<domain::estop::AuditRecord>, SourceError> {
        self.inner.audit(target, limit).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_file_does_not_wake_the_watcher() {
    let env = Env::new(Some(GO_ALL));
    let src = Arc::new(Counting {
        inner: env.file_source(),
        loads: 0.into(),
        hang: false.into(),
    });
    let h = env.start(src.clone(), Duration::from_secs(3600)).await;
    h.set(target("Erase"), Stop, "INC-8".into(), "ana".into())
        .await
        .unwrap();
    // The write wakes the watcher once or twice; the reads that follow must not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loads = src.loads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        loads <= 5,
        "{loads} loads while idle: a read wakes the watcher"
    );
    env.shutdown().await;
}

/// What can stand where the e-stop file should be: each is malformed at once (everything
/// stops, the alert names it), a change through the API is refused with a clear error, and
/// nothing hangs or eats memory. Then a good file brings the list back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_things_in_place_of_the_file_fail_closed_at_once() {
    let env = Env::new(Some(GO_ALL));
    let h = env.start_file().await;
    let mut rx = h.subscribe();
    let place = |what: &str| {
        let _ = std::fs::remove_file(&env.file);
        let _ = std::fs::remove_dir(&env.file);
        match what {
            "fifo" => nix::unistd::mkfifo(&env.file, nix::sys::stat::Mode::S_IRWXU).unwrap(),
            "zero" => std::os::unix::fs::symlink("/dev/zero", &env.file).unwrap(),
            "dir" => std::fs::create_dir(&env.file).unwrap(),
            "huge" => {
                let f = std::fs::File::create(&env.file).unwrap();
                f.set_len(estop::MAX_ESTOP_FILE_BYTES + 1).unwrap();
            }
            text => env.replace_file(text),
        }
    };
    for (what, says) in [
        ("fifo", "not a regular file (a FIFO)"),
        ("zero", "not a regular file (a character device)"),
        ("dir", "not a regular file (a directory)"),
        ("huge", "the limit is 8388608"),
        ("[]", "not a list"),
        ("[[]]", "not a list"),
        ("\"entries\"", "not a string"),
        ("null", "not null"),
        (
            &format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            "recursion limit",
        ),
    ] {
        place(what);
        let started = std::time::Instant::now();
        let snap = wait_for(
            &mut rx,
            what,
            |s| matches!(&**s, Snapshot::Unreadable(e) if e.contains(says)),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: {:?}",
            started.elapsed()
        );
        assert!(matches!(*snap, Snapshot::Unreadable(_)));
        assert_eq!(
            h.verdict("Erase", &aap()).state,
            Stop,
            "{what}: fail closed"
        );
        let set = tokio::time::timeout(
            Duration::from_secs(3),
            h.set(target("Erase"), Stop, "INC-9".into(), "ana".into()),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: a set hangs"));
        assert!(
            set.is_err(),
            "{what}: a set over an unreadable file is refused"
        );
        // Back to a good file in between, so each case is a change the service must notice.
        place(GO_ALL);
        wait_for(&mut rx, "the good file", |s| matches!(**s, Snapshot::Ok(_))).await;
    }
    env.shutdown().await;
}

/// The e-stop file shares its directory with the database: a database writing all the time
/// next to it must not wake the watcher (each wake is a re-read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_other_files_in_the_directory_do_not_wake_the_watcher() {
    use std::io::Write;
    let env = Env::new(Some(GO_ALL));
    let wake = Arc::new(tokio::sync::Notify::new());
    let _watch = estop::watch_file(&env.file, wake.clone()).unwrap();
    // A file kept open and written, as SQLite writes its write-ahead log.
    // The watch is in place once `watch_file` returns: no need to wait for its thread.
    let mut wal = std::fs::File::create(env.etc.join("steward.db-wal")).unwrap();
    let woken = wake.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    for _ in 0..2000 {
        wal.write_all(&[0u8; 4096]).unwrap();
    }
    wal.sync_all().unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(600), woken.as_mut())
            .await
            .is_err(),
        "writes to another file woke the watcher"
    );
    // A change to the watched file does.
    env.replace_file(GO_ALL);
    tokio::time::timeout(DEADLINE, woken)
        .await
        .expect("a change to the file wakes the watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_stops_answering_stops_everything_within_the_staleness_limit() {
    let env = Env::new(Some(GO_ALL));
    let src = Arc::new(Counting {
        inner: env.file_source(),
        loads: 0.into(),
        hang: false.into(),
    });
    let stale_after = Duration::from_millis(800);
    let opts = EStopOptions {
        unlisted: Stop,
        reread: Duration::from_millis(100),
        stale_after,
    };
    let h = EStop::start(src.clone(), clock(), opts, &env.tasks).await;
    assert_eq!(h.verdict("Erase", &no_labels()).state, Go);
    src.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let hung = tokio::time::Instant::now();
    let mut rx = h.subscribe();
    tokio::time::timeout(DEADLINE, async {
        while matches!(**rx.borrow_and_update(), Snapshot::Ok(_)) {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the hung source is noticed");
    let after = hung.elapsed();
    assert!(
        after >= stale_after - Duration::from_millis(100) && after < stale_after * 3,
        "stopped after {after:?}"
    );
    assert_eq!(h.verdict("Erase", &no_labels()).state, Stop);
    let alert = h.alert().unwrap();
    assert!(alert.contains("confirmed current"), "{alert}");
    // Answering again, it recovers by itself.
    src.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(DEADLINE, async {
        while !matches!(**rx.borrow_and_update(), Snapshot::Ok(_)) {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the source answers again");
    assert!(h.alert().is_none());
    env.shutdown().await;
}
