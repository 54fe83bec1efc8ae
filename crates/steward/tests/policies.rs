//! Policies at submit (docs/operating.md, Policies) through the real binary, and reloading the policy file.

use std::time::{Duration, Instant};

use proto::v1 as pb;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

const ERASE: &str = "[workflows.Erase]\nallowed_actions = [\"shell\"]\nsame_args = [{ action = \"shell\", arg = \"argv[2]\" }]\nlimits = { max_jobs = 3 }\nlabels = { site = [\"aap\"] }\n";

fn erase_spec(site: &str, machines: &[&str]) -> String {
    let jobs: Vec<String> = machines
        .iter()
        .map(|m| format!("{{action: shell, args: {{argv: [echo, erase, {site}, {m}]}}}}"))
        .collect();
    format!(
        "name: Erase\nlabels: {{site: {site}}}\nblocks:\n  - jobs: [{}]\n",
        jobs.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_are_checked_against_every_policy_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("policies.toml"), ERASE).unwrap();
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;

    // Compliant: accepted and runs.
    let id = submit_and_exec(&mut c, &erase_spec("aap", &["aap01", "aap02"])).await;
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "completed");

    // No entry: refused.
    let err = c
        .submit(pb::SubmitRequest {
            spec: Some(spec("name: hello\nblocks:\n  - jobs: [{action: noop}]\n")),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("policy workflows")
            && err
                .message()
                .contains("no policy entry for workflow \"hello\""),
        "{}",
        err.message()
    );

    // Every violation at once, each naming its policy and the job.
    let bad = "name: Erase\nlabels: {site: bbb}\nblocks:\n  - jobs: [{action: shell, args: {argv: [echo, erase, aap]}}, {action: shell, args: {argv: [echo, erase, bbb]}}, {action: noop}, {action: noop}]\n";
    let err = c
        .submit(pb::SubmitRequest {
            spec: Some(spec(bad)),
            start: false,
        })
        .await
        .unwrap_err();
    let msg = err.message();
    for want in [
        "policy allowed_actions",
        "blocks[0].jobs[2]",
        "policy same_args[0]",
        "blocks[0].jobs[1].args.argv[2]",
        "policy limits",
        "policy labels",
        "labels.site",
    ] {
        assert!(msg.contains(want), "missing {want:?} in {msg}");
    }
    let list = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.runs.len(), 1, "refused submissions store nothing");

    // `steward validate` shows each policy's verdict, storing nothing.
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["validate", file.to_str().unwrap(), "--addr", &server.addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "policy workflows",
        "passed",
        "policy allowed_actions",
        "FAILED",
        "policy limits",
    ] {
        assert!(text.contains(want), "missing {want:?} in {text}");
    }
    let ok = dir.path().join("ok.yaml");
    std::fs::write(&ok, erase_spec("aap", &["aap01"])).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["validate", ok.to_str().unwrap(), "--addr", &server.addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        c.list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .runs
            .len(),
        1
    );
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_file_reloads_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let path = data.join("policies.toml");
    std::fs::write(&path, "[workflows.hello]\n").unwrap();
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let other = spec("name: Other\nblocks:\n  - jobs: [{action: noop}]\n");
    assert!(
        c.submit(pb::SubmitRequest {
            spec: Some(other.clone()),
            start: false,
        })
        .await
        .is_err()
    );

    // A valid change takes effect without a restart.
    std::fs::write(&path, "[workflows.hello]\n[workflows.Other]\n").unwrap();
    until("the new policies", async || {
        c.submit(pb::SubmitRequest {
            spec: Some(other.clone()),
            start: false,
        })
        .await
        .is_ok()
    })
    .await;

    // A broken change is refused: the old policies stay, and the alert is raised.
    std::fs::write(&path, "[workflows.hello]\nlimits = { max_jobs = 0 }\n").unwrap();
    let addr = server.addr.clone();
    until("the policy alert", async || {
        http_get(&addr, "/metrics")
            .await
            .is_some_and(|(_, m)| m.lines().any(|l| l == "steward_policy_alert 1"))
    })
    .await;
    let (code, body) = http_get(&server.addr, "/readyz").await.unwrap();
    assert_eq!(code, 200, "the old policies are in force: still ready");
    assert!(body.contains("max_jobs"), "{body}");
    assert!(
        c.submit(pb::SubmitRequest {
            spec: Some(other.clone()),
            start: false,
        })
        .await
        .is_ok(),
        "the old policies stay in force"
    );
    assert!(server.log_text().contains("refused a new policy file"));

    // Fixing it clears the alert.
    std::fs::write(&path, "[workflows.hello]\n").unwrap();
    until("the alert to clear", async || {
        http_get(&addr, "/metrics")
            .await
            .is_some_and(|(_, m)| m.lines().any(|l| l == "steward_policy_alert 0"))
    })
    .await;
    assert!(
        c.submit(pb::SubmitRequest {
            spec: Some(other),
            start: false
        })
        .await
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_install_writes_policies_that_accept_the_examples() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_as_is(&data, &[]).await;
    let text = std::fs::read_to_string(data.join("policies.toml")).unwrap();
    assert!(text.contains("[workflows.hello]"), "{text}");
    let mut c = server.client().await;
    let hello = std::fs::read_to_string(workspace_root().join("examples/hello.yaml")).unwrap();
    let id = submit_and_exec(&mut c, &hello).await;
    assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "completed");
    let erase = std::fs::read_to_string(
        workspace_root().join("examples/satellite-disk-erase/workflow.yaml"),
    )
    .unwrap();
    let v = c
        .validate(pb::ValidateRequest {
            spec: Some(spec(&erase)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.policies.iter().all(|p| p.passed), "{:?}", v.policies);
    assert!(
        v.policies.iter().any(|p| p.policy == "allowed_actions"),
        "{:?}",
        v.policies
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_that_does_not_load_stops_the_start_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("policies.toml"),
        "[workflows.hello]\nallowed_action = [\"shell\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policies.toml") && err.contains("allowed_action"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_policy_file_refuses_every_submission_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A first start creates the store; then the policy file goes missing.
    let mut server = Server::start(&data, &[]).await;
    server.stop().await;
    let path = data.join("policies.toml");
    std::fs::remove_file(&path).unwrap();

    let server = Server::start_as_is(&data, &[]).await;
    assert!(
        !path.exists(),
        "a later start does not write the template over a lost file"
    );
    let mut c = server.client().await;
    let hello = spec("name: hello\nblocks:\n  - jobs: [{action: noop}]\n");
    let err = c
        .submit(pb::SubmitRequest {
            spec: Some(hello.clone()),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("no policy entry for workflow \"hello\""),
        "{}",
        err.message()
    );
    let (_, body) = http_get(&server.addr, "/readyz").await.unwrap();
    assert!(body.contains("policies.toml"), "{body}");

    std::fs::write(&path, "[workflows.hello]\n").unwrap();
    until("the policy file to load", async || {
        c.submit(pb::SubmitRequest {
            spec: Some(hello.clone()),
            start: false,
        })
        .await
        .is_ok()
    })
    .await;
}
