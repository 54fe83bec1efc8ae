#![allow(clippy::unwrap_used)]
#![cfg(feature = "failpoints")]

//! Watch against a change that lands while the stream is being opened. A test binary of its
//! own: the fail point it sets is process-wide.

use std::time::{Duration, Instant};

use proto::v1 as pb;
use proto::v1::steward_client::StewardClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_opened_just_before_a_change_sees_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policies.toml"), "[workflows.w]\n").unwrap();
    let env = [("STEWARD_AUTH".to_owned(), "none".to_owned())];
    let cfg = node::config::load(dir.path(), None, Some("127.0.0.1:0"), &env).unwrap();
    let node = node::Node::start(cfg, None).await.unwrap();
    let mut c = StewardClient::connect(format!("http://{}", node.addr()))
        .await
        .unwrap();
    let tasks = tokio_util::task::TaskTracker::new();
    let spec: pb::WorkReq =
        serde_json::from_str(r#"{"name": "w", "blocks": [{"jobs": [{"action": "noop"}]}]}"#)
            .unwrap();
    let id = c
        .submit(pb::SubmitRequest {
            spec: Some(spec),
            start: false,
        })
        .await
        .unwrap()
        .into_inner()
        .id;

    // Opening a Watch pauses 400 ms between its two steps; the run completes in that pause.
    fail::cfg("api::watch_subscribed", "sleep(400)").unwrap();
    let opened = Instant::now();
    let mut wc = c.clone();
    let wid = id.clone();
    let watch = tasks.spawn(async move { wc.watch(pb::WatchRequest { id: wid }).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.exec(pb::ExecRequest { id: id.clone() }).await.unwrap();
    let mut stream = watch.await.unwrap().into_inner();
    fail::remove("api::watch_subscribed");
    let mut states = Vec::new();
    loop {
        let run = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap()
            .unwrap()
            .expect("the stream ends only after a terminal state");
        states.push(run.state.clone());
        if run.state == "completed" {
            break;
        }
    }
    // Missing the change would leave the stream at `submitted` until its 1 s re-poll.
    let took = opened.elapsed();
    assert!(
        took < Duration::from_millis(900),
        "the change was missed and found by the re-poll: {took:?}, states {states:?}"
    );
}
