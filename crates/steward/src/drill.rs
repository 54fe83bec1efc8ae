//! `steward drill estop`: proves, on a quiet day, that a stop reaches every node in time.
//!
//! On each node named, a canary run (`domain::drill`: one `sleep` process) is submitted and
//! executed, so that each node drives its own. Once every canary's job runs, the drill's
//! target is set to `stop` through the first node, and each node's Watch stream is read until
//! its canary is `stopped`: a run is `stopped` only once its job's processes are gone (the
//! engine kills the job's process group and reaps it before it records the outcome). The
//! entry is then cleared, so the drill leaves nothing behind but its two audit records, the
//! second of which holds the figures.
//!
//! The target is a label only the canaries carry (`steward_drill=DRILL_ID`), or one of the
//! operator's choosing that no unfinished run carries and no entry names: a drill never stops
//! real work and never changes an entry someone set.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use proto::v1 as pb;
use proto::v1::e_stop_client::EStopClient;
use proto::v1::steward_client::StewardClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::ClientOpts;
use crate::client::{channel, request, status_err};
use crate::output;

/// What the drill measured on one node.
#[derive(Serialize)]
struct NodeResult {
    node: String,
    run_id: String,
    /// The canary's last state seen: `stopped` when the drill worked.
    state: String,
    /// From the stop being set to the canary `stopped`, as this client saw it.
    stopped_after_ms: Option<f64>,
    /// The recorded stop cause.
    cause: String,
}

#[derive(Serialize)]
struct Report {
    drill: String,
    target: String,
    nodes: Vec<NodeResult>,
}

/// One node taking part: its address, its API and its canary.
struct Canary {
    node: String,
    runs: StewardClient<Channel>,
    run_id: String,
}

pub async fn estop(
    opts: &ClientOpts,
    nodes: Vec<String>,
    target: Option<String>,
    timeout: &str,
) -> anyhow::Result<ExitCode> {
    let timeout = humantime::parse_duration(timeout)
        .map_err(|e| anyhow!("--timeout {timeout:?}: {e} (e.g. 30s)"))?;
    let nodes = if nodes.is_empty() {
        vec![opts.addr.clone()]
    } else {
        nodes
    };
    let id = drill_id();
    let (target, extra) = match &target {
        None => (format!("{}={id}", domain::drill::LABEL), None),
        Some(t) => {
            let Some((k, v)) = t.split_once('=').map(|(k, v)| (k.trim(), v.trim())) else {
                bail!(
                    "--target {t:?}: a drill stops a label (KEY=VALUE) that only its canaries carry"
                );
            };
            if k == domain::drill::LABEL || k.is_empty() || v.is_empty() {
                bail!(
                    "--target {t:?}: give KEY=VALUE with a key other than {}",
                    domain::drill::LABEL
                );
            }
            (format!("{k}={v}"), Some((k.to_owned(), v.to_owned())))
        }
    };
    let first = on(opts, &nodes[0]);
    let mut estop = EStopClient::new(channel(&first).await?);
    let mut runs = StewardClient::new(channel(&first).await?);
    refuse_real_work(&mut estop, &mut runs, &target, extra.as_ref()).await?;

    // A canary on every node, each executed through its node so that the node drives it.
    let mut canaries = Vec::new();
    let spec = domain::drill::canary(&id, extra.as_ref().map(|(k, v)| (k.as_str(), v.as_str())));
    for node in &nodes {
        let started = start_canary(opts, node, &spec).await;
        match started {
            Ok(c) => canaries.push(c),
            Err(e) => {
                cleanup(&mut canaries, &id).await;
                return Err(e.context(format!("starting the canary on {node}")));
            }
        }
    }
    if let Err(e) = wait_running(&mut canaries, timeout).await {
        cleanup(&mut canaries, &id).await;
        return Err(e);
    }
    // Watching before the stop: the first message of each stream is the running canary.
    let mut streams = Vec::new();
    for c in &mut canaries {
        match c
            .runs
            .watch(request(pb::WatchRequest {
                id: c.run_id.clone(),
            }))
            .await
        {
            Ok(s) => streams.push(s.into_inner()),
            Err(s) => {
                cleanup(&mut canaries, &id).await;
                return Err(status_err(s).context("watching a canary"));
            }
        }
    }

    let set_at = Instant::now();
    let set = estop
        .set(request(pb::EStopSetRequest {
            target: target.clone(),
            state: "stop".into(),
            reason: format!("e-stop drill {id}: canaries on {} node(s)", nodes.len()),
        }))
        .await;
    if let Err(s) = set {
        cleanup(&mut canaries, &id).await;
        return Err(status_err(s).context(format!("setting {target} to stop")));
    }
    let results = futures::future::join_all(canaries.iter().zip(streams).map(
        |(c, mut stream)| async move {
            let mut last = None;
            let waited = tokio::time::timeout(timeout, async {
                while let Ok(Some(run)) = stream.message().await {
                    let terminal = crate::client::is_terminal(&run.state);
                    last = Some(run);
                    if terminal {
                        return Some(set_at.elapsed());
                    }
                }
                None
            })
            .await;
            let elapsed = waited.ok().flatten();
            let state = last
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |r| r.state.clone());
            let cause = last
                .as_ref()
                .and_then(|r| r.stop_cause.as_ref())
                .map_or_else(String::new, |c| c.message.clone());
            NodeResult {
                node: c.node.clone(),
                run_id: c.run_id.clone(),
                stopped_after_ms: elapsed
                    .filter(|_| state == "stopped")
                    .map(|d| d.as_secs_f64() * 1000.0),
                state,
                cause,
            }
        },
    ))
    .await;

    let summary = results
        .iter()
        .map(|r| match r.stopped_after_ms {
            Some(ms) => format!("{} {ms:.0} ms", r.node),
            None => format!("{} not stopped ({})", r.node, r.state),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let cleared = estop
        .clear(request(pb::EStopClearRequest {
            target: target.clone(),
            reason: format!("e-stop drill {id} done: {summary}"),
        }))
        .await;
    // Canaries that did not stop are cancelled: the drill leaves nothing running.
    let mut left: Vec<Canary> = canaries
        .into_iter()
        .zip(&results)
        .filter(|(_, r)| r.stopped_after_ms.is_none())
        .map(|(c, _)| c)
        .collect();
    cleanup(&mut left, &id).await;
    cleared
        .map_err(status_err)
        .with_context(|| format!("clearing {target} after the drill: clear it by hand"))?;

    let ok = results.iter().all(|r| r.stopped_after_ms.is_some());
    let report = Report {
        drill: id,
        target,
        nodes: results,
    };
    if opts.json {
        output::json(&report);
    } else {
        output::line(&format!(
            "e-stop drill {} on {}: stop set, then restored",
            report.drill, report.target
        ));
        output::line(&format!(
            "{:<28} {:<38} {:>14}  {}",
            "NODE", "CANARY", "STOPPED AFTER", "STATE"
        ));
        for r in &report.nodes {
            let after = r
                .stopped_after_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms"));
            output::line(&format!(
                "{:<28} {:<38} {after:>14}  {}",
                r.node, r.run_id, r.state
            ));
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A drill's ID: 12 hex digits.
fn drill_id() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 12..].to_owned()
}

fn on(opts: &ClientOpts, node: &str) -> ClientOpts {
    ClientOpts {
        addr: node.to_owned(),
        ..opts.clone()
    }
}

/// Refuses a target that an entry names or that unfinished runs other than canaries carry.
async fn refuse_real_work(
    estop: &mut EStopClient<Channel>,
    runs: &mut StewardClient<Channel>,
    target: &str,
    label: Option<&(String, String)>,
) -> anyhow::Result<()> {
    let list = estop
        .list(request(pb::EStopListRequest {}))
        .await
        .map_err(status_err)?
        .into_inner();
    if !list.readable {
        bail!(
            "the e-stop list cannot be read ({}): nothing runs, so there is nothing to drill",
            list.error
        );
    }
    if let Some(e) = list.entries.iter().find(|e| e.target == target) {
        bail!(
            "{target} has an e-stop entry ({} by {}: {}): a drill must not change it; pick another --target",
            e.state,
            e.set_by,
            e.reason
        );
    }
    let Some((k, v)) = label else {
        return Ok(());
    };
    let found = runs
        .list(request(pb::ListRequest {
            states: ["submitted", "queued", "running", "paused"]
                .map(String::from)
                .to_vec(),
            labels: [(k.clone(), v.clone())].into(),
            page_size: 100,
            ..Default::default()
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    let real: Vec<_> = found
        .runs
        .iter()
        .filter(|r| r.name != domain::drill::WORKFLOW)
        .collect();
    if let Some(r) = real.first() {
        bail!(
            "--target {target} matches {} unfinished run(s) (run {} of {} among them): a drill must not stop real work",
            real.len(),
            r.id,
            r.name
        );
    }
    Ok(())
}

async fn start_canary(
    opts: &ClientOpts,
    node: &str,
    spec: &domain::WorkflowSpec,
) -> anyhow::Result<Canary> {
    let mut runs = StewardClient::new(channel(&on(opts, node)).await?);
    let run_id = runs
        .submit(request(pb::SubmitRequest {
            spec: Some(api::convert::spec_to_wire(spec)),
            start: false,
        }))
        .await
        .map_err(status_err)?
        .into_inner()
        .id;
    runs.exec(request(pb::ExecRequest { id: run_id.clone() }))
        .await
        .map_err(status_err)?;
    Ok(Canary {
        node: node.to_owned(),
        runs,
        run_id,
    })
}

/// Waits until every canary's job runs.
async fn wait_running(canaries: &mut [Canary], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for c in canaries {
        loop {
            let run = c
                .runs
                .status(request(pb::StatusRequest {
                    id: c.run_id.clone(),
                }))
                .await
                .map_err(status_err)?
                .into_inner();
            let job_running = run
                .blocks
                .first()
                .and_then(|b| b.jobs.first())
                .is_some_and(|j| j.state == "running");
            if run.state == "running" && job_running {
                break;
            }
            if crate::client::is_terminal(&run.state) || Instant::now() > deadline {
                let why = run
                    .stop_cause
                    .map(|c| c.message)
                    .filter(|m| !m.is_empty())
                    .unwrap_or(run.error);
                bail!(
                    "the canary on {} did not start running (it is {}{}): the drill needs it running",
                    c.node,
                    run.state,
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(": {why}")
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Cancels canaries that are still unfinished.
async fn cleanup(canaries: &mut [Canary], id: &str) {
    for c in canaries {
        if let Err(s) = c
            .runs
            .cancel(request(pb::CancelRequest {
                id: c.run_id.clone(),
                reason: format!("e-stop drill {id} ended"),
            }))
            .await
        {
            output::error(&format!(
                "cancelling the canary {} on {}: {}",
                c.run_id,
                c.node,
                s.message()
            ));
        }
    }
}
