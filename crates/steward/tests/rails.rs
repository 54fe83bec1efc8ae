//! Safety rails (docs/operating.md, Policies) through the real binary: rate limits and error budgets.

use std::time::Duration;

use proto::v1 as pb;

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

fn example(rel: &str) -> String {
    std::fs::read_to_string(workspace_root().join(rel)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_satellite_erase_bucket_allows_one_run_per_30_minutes_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("steward.toml"), example("examples/steward.toml")).unwrap();
    let workflow = example("examples/satellite-disk-erase/workflow.yaml");

    let mut server = Server::start(&data, &[]).await;
    let mut c = server.client().await;

    // The example's policies (examples/policies.toml, named by the example config) hold: an
    // erase that spills over to a second site is refused before anything runs.
    let spilled = workflow.replacen(
        "aap03\"], env: {SITE: aap}",
        "aap03\"], env: {SITE: bbb}",
        1,
    );
    assert_ne!(spilled, workflow);
    let err = c
        .submit(pb::SubmitRequest {
            spec: Some(spec(&spilled)),
            start: false,
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("policy same_args[0]")
            && err.message().contains("blocks[1].jobs[2].args.env.SITE"),
        "{}",
        err.message()
    );

    let first = submit(&mut c, &workflow).await;
    c.exec(pb::ExecRequest { id: first.clone() }).await.unwrap();
    let run = wait_terminal(&mut c, &first, LONG).await;
    assert_eq!(run.state, "completed", "{run:?}");
    assert!(
        run.blocks[0].jobs[0].output.contains("took a token"),
        "{:?}",
        run.blocks[0].jobs[0]
    );

    let second = submit(&mut c, &workflow).await;
    c.exec(pb::ExecRequest { id: second.clone() })
        .await
        .unwrap();
    let run = wait_terminal(&mut c, &second, LONG).await;
    assert_eq!(run.state, "failed");
    let job = &run.blocks[0].jobs[0];
    assert_eq!(
        (job.action.as_str(), job.state.as_str()),
        ("token_bucket", "failed")
    );
    assert!(
        job.error.contains("rate limit") && job.error.contains("disk-erase-satellite"),
        "{}",
        job.error
    );
    assert!(
        run.error.contains("blocks[0].jobs[0]"),
        "the run says which rule failed it: {}",
        run.error
    );
    assert_eq!(run.blocks[1].jobs[0].state, "skipped", "no disk was erased");

    // A restart neither refills nor forgets the bucket.
    server.stop().await;
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let third = submit(&mut c, &workflow).await;
    c.exec(pb::ExecRequest { id: third.clone() }).await.unwrap();
    let run = wait_terminal(&mut c, &third, LONG).await;
    assert_eq!(run.state, "failed");
    assert!(run.blocks[0].jobs[0].error.contains("rate limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_error_budget_stops_the_workflow_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("steward.toml"),
        "[error_budgets.Flaky]\nfailures = 3\nwindow = \"10m\"\n",
    )
    .unwrap();
    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    let failing =
        "name: Flaky\nblocks:\n  - jobs: [{action: shell, args: {argv: [sh, -c, 'exit 1']}}]\n";
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = submit_and_exec(&mut c, failing).await;
        assert_eq!(wait_terminal(&mut c, &id, LONG).await.state, "failed");
        ids.push(id);
    }
    // The third failure trips the e-stop for the workflow, recorded like an operator change.
    let mut e = proto::v1::e_stop_client::EStopClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + LONG;
    let entry = loop {
        let list = e.list(pb::EStopListRequest {}).await.unwrap().into_inner();
        if let Some(entry) = list.entries.into_iter().find(|x| x.target == "Flaky") {
            break entry;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the budget never tripped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(entry.state, "stop");
    assert_eq!(entry.set_by, "error_budget");
    assert!(
        entry.reason.contains("3 failed runs within 10m"),
        "{}",
        entry.reason
    );
    for id in &ids {
        assert!(
            entry.reason.contains(id.as_str()),
            "the reason names the runs: {}",
            entry.reason
        );
    }
    let audit = e
        .audit(pb::EStopAuditRequest {
            target: "Flaky".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(audit.records.len(), 1);
    assert_eq!(audit.records[0].source, "error_budget");
    assert_eq!(audit.records[0].new_state, "stop");

    let err = c
        .submit(pb::SubmitRequest {
            spec: Some(spec(failing)),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("error budget of workflow Flaky exhausted"),
        "{}",
        err.message()
    );
    // Other workflows go on.
    let ok = submit(&mut c, "name: Other\nblocks:\n  - jobs: [{action: noop}]\n").await;
    c.exec(pb::ExecRequest { id: ok.clone() }).await.unwrap();
    assert_eq!(wait_terminal(&mut c, &ok, LONG).await.state, "completed");
}

/// The budget counts failures from the store: a restart between them forgets nothing, and after
/// a trip (and an operator's go) the budget starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_budget_counts_across_restarts_and_starts_afresh_after_a_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("steward.toml"),
        "[error_budgets.Flaky]\nfailures = 3\nwindow = \"10m\"\n[error_budgets.Other]\nfailures = 1\nwindow = \"10m\"\n",
    )
    .unwrap();
    let failing =
        "name: Flaky\nblocks:\n  - jobs: [{action: shell, args: {argv: [sh, -c, 'exit 1']}}]\n";
    let fail_as = async |c: &mut Client, name: &str| {
        let id = submit_and_exec(c, &failing.replace("Flaky", name)).await;
        assert_eq!(wait_terminal(c, &id, LONG).await.state, "failed");
    };
    let fail = async |c: &mut Client| {
        fail_as(c, "Flaky").await;
    };
    let entry_of = async |addr: &str, target: &str| {
        let mut e = proto::v1::e_stop_client::EStopClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let list = e.list(pb::EStopListRequest {}).await.unwrap().into_inner();
        list.entries.into_iter().find(|x| x.target == target)
    };
    let entry = async |addr: &str| entry_of(addr, "Flaky").await;

    let mut server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    fail(&mut c).await;
    fail(&mut c).await;
    server.stop().await;

    let server = Server::start(&data, &[]).await;
    let mut c = server.client().await;
    fail(&mut c).await;
    let deadline = std::time::Instant::now() + LONG;
    let tripped = loop {
        if let Some(e) = entry(&server.addr).await {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the budget never tripped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(tripped.state, "stop");
    assert_eq!(tripped.set_by, "error_budget");

    // An operator lets the workflow run again: the failures before the trip are spent.
    cli_as(None, &server.addr, &["estop", "set", "Flaky", "go"]);
    fail(&mut c).await;
    // Failures are counted one at a time, in the order the runs ended: once the failure of a
    // later run (of a workflow whose budget is one failure) has tripped its budget, the
    // Flaky failure has been counted.
    fail_as(&mut c, "Other").await;
    let deadline = std::time::Instant::now() + LONG;
    while entry_of(&server.addr, "Other").await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the later budget never tripped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        entry(&server.addr).await.unwrap().state,
        "go",
        "one new failure is within budget"
    );
}
