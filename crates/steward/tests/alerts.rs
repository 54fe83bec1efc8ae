//! Alerts that pull the e-stop (docs/operating.md, Alerts): Alertmanager's webhook against the
//! real binary.

use serde_json::{Value, json};

use crate::harness::*;

/// POSTs `body` to the Alertmanager receiver with a bearer token: the status and the body.
async fn post_alerts(addr: &str, token: &str, body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (code, _, body) = http(
        addr,
        "POST",
        "/v1/alerts/alertmanager",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body.to_string(),
    )
    .await
    .unwrap();
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// An Alertmanager payload of one alert.
fn payload(status: &str, labels: Value) -> Value {
    json!({
        "version": "4",
        "groupKey": "{}:{alertname=\"DiskEraseErrors\"}",
        "status": status,
        "receiver": "steward",
        "groupLabels": {},
        "commonLabels": labels.clone(),
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": [{
            "status": status,
            "labels": labels,
            "annotations": {"summary": "erase errors above 5% at aap"},
            "startsAt": "2026-11-30T03:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph",
            "fingerprint": "c0ffee1234"
        }]
    })
}

async fn audit(addr: &str, admin: &str) -> Vec<Value> {
    let (code, body) = http_get_as(addr, "/v1/estop/audit", Some(admin))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["records"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_stops_its_target_and_nothing_else_changes_anything() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let addr = &server.addr;
    let admin = server.admin_token().unwrap();
    let alertmanager = server.token("alertmanager", "responder");
    let labels = json!({"alertname": "DiskEraseErrors", "steward_estop": "site=aap", "steward_state": "stop", "severity": "page"});
    let before = audit(addr, &admin).await.len();
    let mut c = server.client().await;
    let pidfile = dir.path().join("pid");
    let running = start_long_job(&mut c, &pidfile, "erase", "aap").await;
    let pid = read_pid(&pidfile);

    // Tokens that may not stop are refused, and nothing is read.
    for role in ["viewer", "submitter"] {
        let t = server.token(&format!("am-{role}"), role);
        let (code, body) = post_alerts(addr, &t, &payload("firing", labels.clone())).await;
        assert_eq!(code, 403, "{role}: {body}");
    }
    let (code, _) = post_alerts(addr, "stw_nope", &payload("firing", labels.clone())).await;
    assert_eq!(code, 401);
    assert_eq!(audit(addr, &admin).await.len(), before);

    // Firing: the entry is set, the audit says by whom and why.
    let (code, body) = post_alerts(addr, &alertmanager, &payload("firing", labels.clone())).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["applied"][0]["target"], "site=aap", "{body}");
    let records = audit(addr, &admin).await;
    assert_eq!(records.len(), before + 1);
    let rec = &records[0];
    assert_eq!(rec["target"], "site=aap");
    assert_eq!(rec["new_state"], "stop", "{rec}");
    assert_eq!(rec["set_by"], "alertmanager");
    assert_eq!(rec["source"], "alertmanager", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("DiskEraseErrors")
            && reason.contains("erase errors above 5% at aap")
            && reason.contains("c0ffee1234"),
        "{reason}"
    );

    // The run of that site is stopped, its job's process gone.
    let run = wait_terminal(&mut c, &running, std::time::Duration::from_secs(60)).await;
    assert_eq!(run.state, "stopped", "{run:?}");
    eventually(
        "the job's process to be gone",
        std::time::Duration::from_secs(60),
        || process_gone(pid),
    )
    .await;

    // Repeated (Alertmanager re-sends firing alerts): unchanged, no new record.
    let (code, body) = post_alerts(addr, &alertmanager, &payload("firing", labels.clone())).await;
    assert_eq!(code, 200);
    assert_eq!(body["unchanged"][0]["target"], "site=aap", "{body}");
    // Resolved: nothing changes; a person restores.
    let (code, body) = post_alerts(addr, &alertmanager, &payload("resolved", labels.clone())).await;
    assert_eq!(code, 200);
    assert!(
        body["ignored"][0]["why"]
            .as_str()
            .unwrap()
            .contains("a person restores"),
        "{body}"
    );
    // A pause alert for the same target does not weaken the stop.
    let pause =
        json!({"alertname": "SlowErase", "steward_estop": "site=aap", "steward_state": "pause"});
    let (_, body) = post_alerts(addr, &alertmanager, &payload("firing", pause)).await;
    assert_eq!(body["unchanged"][0]["target"], "site=aap", "{body}");
    // An alert cannot release, and one without Steward's labels is not Steward's.
    let go = json!({"alertname": "AllClear", "steward_estop": "site=aap", "steward_state": "go"});
    let (code, body) = post_alerts(addr, &alertmanager, &payload("firing", go)).await;
    assert_eq!(code, 200);
    assert!(
        body["ignored"][0]["why"]
            .as_str()
            .unwrap()
            .contains("never release"),
        "{body}"
    );
    let other = json!({"alertname": "HighLatency"});
    let (_, body) = post_alerts(addr, &alertmanager, &payload("firing", other)).await;
    assert!(
        body["ignored"][0]["why"]
            .as_str()
            .unwrap()
            .contains("not an alert for Steward"),
        "{body}"
    );
    assert_eq!(audit(addr, &admin).await.len(), before + 1);
    let (code, list) = http_get_as(addr, "/v1/estop", Some(&admin)).await.unwrap();
    assert_eq!(code, 200);
    assert!(
        list.contains("\"site=aap\"") && list.contains("\"stop\""),
        "{list}"
    );

    // Counted once, by source.
    let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "steward_estop_changes_total{source=\"alertmanager\",state=\"stop\"} 1"),
        "{metrics}"
    );

    // Not a payload: a clear error; but a token that may not stop hears only that.
    let viewer = server.token("am-v2", "viewer");
    let (code, _) = post_alerts(addr, &viewer, &json!({"alerts": "x"})).await;
    assert_eq!(code, 403);
    let (code, body) = post_alerts(addr, &alertmanager, &json!({"alerts": "x"})).await;
    assert_eq!(code, 400, "{body}");
    // Refused before the body is read: a viewer announcing a body it never sends hears 403 at
    // once, not when the body would have come.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/alerts/alertmanager HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {viewer}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut head))
        .await
        .expect("the refusal comes before the body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

/// Where a target's runs get `estop_unlisted` (`stop`: no entry for it, none for `*`), an
/// alert's `pause` is recorded as `stop`: a `pause` entry would release them, and a responder
/// may not; refusing it would lose the alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_alert_where_unlisted_runs_stop_is_recorded_as_stop() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let addr = &server.addr;
    let admin = server.admin_token().unwrap();
    let alertmanager = server.token("alertmanager", "responder");
    let auth = format!("Bearer {admin}");
    let (code, _, body) = http(
        addr,
        "POST",
        "/v1/estop/clear",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        r#"{"target": "*", "reason": "no default entry"}"#,
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let labels =
        json!({"alertname": "QueueStuck", "steward_estop": "queue", "steward_state": "pause"});
    let (code, body) = post_alerts(addr, &alertmanager, &payload("firing", labels)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["applied"][0]["state"], "stop", "{body}");
    let (_, list) = http_get_as(addr, "/v1/estop", Some(&admin)).await.unwrap();
    let list: Value = serde_json::from_str(&list).unwrap();
    let entry = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["target"] == "queue")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(entry["state"], "stop", "{list}");
}
