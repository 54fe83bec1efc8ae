#![allow(clippy::unwrap_used)]

//! A read of a file Steward depends on that hangs (a hung network mount), with the fail point
//! `estop::read_capped` sleeping: it fails after `READ_TIMEOUT`, and while it has not
//! returned, the next reads of that file fail at once instead of stacking stuck threads. A
//! process of its own: the fail point is global.

use std::time::{Duration, Instant};

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_read_fails_in_time_and_is_not_stacked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("estop.json");
    std::fs::write(&path, "[]").unwrap();
    let hang = estop::READ_TIMEOUT + Duration::from_secs(2);
    fail::cfg(
        "estop::read_capped",
        &format!("1*sleep({})", hang.as_millis()),
    )
    .unwrap();
    let started = Instant::now();
    let err = estop::read_capped_async(&path, 1024).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    let took = started.elapsed();
    assert!(
        took >= estop::READ_TIMEOUT && took < estop::READ_TIMEOUT + Duration::from_secs(1),
        "{took:?}"
    );
    // The first read still hangs: the next one does not start another.
    let started = Instant::now();
    let err = estop::read_capped_async(&path, 1024).await.unwrap_err();
    assert!(err.to_string().contains("has not returned"), "{err}");
    assert!(started.elapsed() < Duration::from_millis(100));
    // Once it returns, the file is read again.
    tokio::time::sleep(hang - estop::READ_TIMEOUT + Duration::from_millis(300)).await;
    assert_eq!(estop::read_capped_async(&path, 1024).await.unwrap(), b"[]");
    fail::remove("estop::read_capped");
}
