//! Webhook notifications (docs/operating.md, Notifications) from the real binary to a real HTTP server.

use proto::v1 as pb;
use serde_json::Value;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_hear_of_failed_and_stopped_runs_and_every_estop_change() {
    // The first delivery fails: it is retried.
    let (base, got, server) = receiver(1).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("steward.toml"),
        format!(
            "kill_grace = \"1s\"\n\n[[notify]]\nurl = \"{base}/json\"\n\n[[notify]]\nurl = \"{base}/slack\"\nformat = \"slack\"\nevents = [\"run_failed\"]\n"
        ),
    )
    .unwrap();
    let node = Server::start(&data, &[("STEWARD_AUTH", "token")]).await;
    let mut c = node.client().await;
    let ana = node.token("ana", "operator");

    // A failed run.
    let failed = submit(
        &mut c,
        &format!("name: erase\nblocks:\n  - jobs: [{}]\n", sh("exit 3")),
    )
    .await;
    c.exec(pb::ExecRequest { id: failed.clone() })
        .await
        .unwrap();
    let (_, body) = wait_for(&got, "run_failed as JSON", |(p, v)| {
        p == "json" && v["event"] == "run_failed"
    })
    .await;
    assert_eq!(body["run_id"], failed.as_str());
    assert_eq!(body["workflow"], "erase");
    assert_eq!(body["state"], "failed");
    assert!(body["error"].as_str().unwrap().contains("exit"), "{body}");
    let (_, slack) = wait_for(&got, "run_failed for Slack", |(p, _)| p == "slack").await;
    let text = slack["text"].as_str().unwrap();
    assert!(
        text.contains(&failed) && text.contains("erase") && text.contains("failed"),
        "{text}"
    );

    // An operator's stop: the change, and the run it stopped.
    let pidfile = dir.path().join("pid");
    let running = start_long_job(&mut c, &pidfile, "erase", "aap").await;
    cli_as(
        Some(&ana),
        &node.addr,
        &["estop", "set", "site=aap", "stop", "--reason", "INC-9"],
    );
    let (_, change) = wait_for(&got, "the e-stop change", |(_, v)| {
        v["event"] == "estop" && v["target"] == "site=aap"
    })
    .await;
    assert_eq!(
        (
            &change["new_state"],
            &change["set_by"],
            &change["reason"],
            &change["source"]
        ),
        (
            &Value::from("stop"),
            &Value::from("ana"),
            &Value::from("INC-9"),
            &Value::from("api")
        )
    );
    let (_, stopped) = wait_for(&got, "run_stopped", |(_, v)| v["event"] == "run_stopped").await;
    assert_eq!(stopped["run_id"], running.as_str());
    assert_eq!(stopped["stop_cause"]["set_by"], "ana", "{stopped}");

    // A hand edit of the e-stop file.
    let list = std::fs::read_to_string(data.join("estop.json")).unwrap();
    let mut list: Value = serde_json::from_str(&list).unwrap();
    list["entries"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"target": "Other", "state": "pause", "reason": "maintenance", "set_by": "bob"}));
    let tmp = data.join("estop.json.edit");
    std::fs::write(&tmp, serde_json::to_string(&list).unwrap()).unwrap();
    std::fs::rename(&tmp, data.join("estop.json")).unwrap();
    let (_, edit) = wait_for(&got, "the hand edit", |(_, v)| {
        v["event"] == "estop" && v["target"] == "Other"
    })
    .await;
    assert_eq!(
        (&edit["new_state"], &edit["source"]),
        (&Value::from("pause"), &Value::from("file"))
    );

    // Slack was told of the failure only; every event reached the JSON hook once.
    let all = got.lock().unwrap().clone();
    assert_eq!(
        all.iter().filter(|(p, _)| p == "slack").count(),
        1,
        "{all:?}"
    );
    assert_eq!(
        all.iter()
            .filter(|(p, v)| p == "json" && v["event"] == "run_failed")
            .count(),
        1,
        "{all:?}"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_hear_of_schedule_fires_missed_while_down() {
    let (base, got, server) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("steward.toml"),
        format!("[[notify]]\nurl = \"{base}/json\"\nevents = [\"schedule_missed\"]\n"),
    )
    .unwrap();
    let mut node = Server::start(&data, &[]).await;
    let file = dir.path().join("tick.yaml");
    std::fs::write(
        &file,
        "schedule: tick\nevery: 1s\ncatchup_window: 10s\nworkflow: {name: hello, blocks: [{jobs: [{action: noop}]}]}\n",
    )
    .unwrap();
    cli_as(
        None,
        &node.addr,
        &["schedule", "create", file.to_str().unwrap()],
    );
    node.stop().await;
    // Down for 14 s: the fires older than 10 s are missed.
    tokio::time::sleep(std::time::Duration::from_secs(14)).await;
    let node = Server::start(&data, &[]).await;
    let (_, body) = wait_for(&got, "schedule_missed", |(_, v)| {
        v["event"] == "schedule_missed"
    })
    .await;
    assert_eq!(body["schedule"], "tick");
    assert_eq!(body["workflow"], "hello");
    assert!(body["missed"].as_u64().unwrap() >= 2, "{body}");
    let out = cli_as(None, &node.addr, &["schedule", "show", "tick"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("missed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    server.abort();
}
