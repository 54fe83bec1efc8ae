//! The client commands: one gRPC call each (Watch for --wait and --watch).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use proto::v1 as pb;
use proto::v1::steward_client::StewardClient;
use tonic::transport::Channel;

use crate::ClientOpts;
use crate::output;

/// Exit code when `--wait` saw the run end other than `completed`.
const EXIT_NOT_COMPLETED: u8 = 2;

type Client = StewardClient<Channel>;

/// The server's URL from `--addr`.
fn url(opts: &ClientOpts) -> String {
    if opts.addr.contains("://") {
        opts.addr.clone()
    } else {
        format!("http://{}", opts.addr)
    }
}

pub(crate) async fn channel(opts: &ClientOpts) -> anyhow::Result<Channel> {
    set_token(opts)?;
    if let Some(path) = opts.addr.strip_prefix("unix:") {
        return local_channel(Path::new(path)).await;
    }
    let url = url(opts);
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("--addr {url:?}"))?;
    if url.starts_with("https://") {
        let tls = match &opts.tls_ca {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("reading --tls-ca {}", ca.display()))?;
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tonic::transport::ClientTlsConfig::new().with_native_roots(),
        };
        endpoint = endpoint.tls_config(tls).context("TLS settings")?;
    } else if opts.tls_ca.is_some() {
        anyhow::bail!("--tls-ca is for https:// addresses; --addr is {url}");
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to steward at {url} (set --addr or STEWARD_ADDR)"))
}

/// A channel over the break-glass socket (`--addr unix:PATH`): no token, no TLS; the server
/// knows the caller from the socket.
async fn local_channel(path: &Path) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    let shown = path.display().to_string();
    // The URI is required and unused: every connection goes to the socket.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to the break-glass socket {shown}"))
}

async fn connect(opts: &ClientOpts) -> anyhow::Result<Client> {
    Ok(StewardClient::new(channel(opts).await?))
}

/// The `authorization` value every request carries: `Bearer` and the token of `--token`
/// (`STEWARD_TOKEN`), else the one in the data directory's `admin.token` when it can be read,
/// else none (a server without authentication).
static AUTHORIZATION: std::sync::OnceLock<
    Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
> = std::sync::OnceLock::new();

fn set_token(opts: &ClientOpts) -> anyhow::Result<()> {
    let token = match opts.token.as_deref().map(str::trim) {
        Some(t) if !t.is_empty() => Some(t.to_owned()),
        _ => {
            let file = opts.data_dir.join(node::ADMIN_TOKEN_FILE);
            std::fs::read_to_string(&file)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
        }
    };
    let value = token
        .map(|t| {
            format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow!("the token holds characters a header cannot carry"))
        })
        .transpose()?;
    let _ = AUTHORIZATION.set(value);
    Ok(())
}

pub(crate) fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(Some(v)) = AUTHORIZATION.get() {
        req.metadata_mut().insert("authorization", v.clone());
    }
    req
}

/// Prints `v` as the API's JSON with `--json`, else as `text` prints it.
fn show<T: serde::Serialize>(opts: &ClientOpts, v: &T, text: impl FnOnce(&T)) {
    if opts.json {
        output::json(v);
    } else {
        text(v);
    }
}

pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", code_name(s.code()), s.message())
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code;
    match c {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Unavailable => "UNAVAILABLE",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::Internal => "INTERNAL",
        _ => "ERROR",
    }
}

pub fn read_spec(file: &Path) -> anyhow::Result<domain::WorkflowSpec> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let spec = domain::WorkflowSpec::parse_unchecked(&text)
        .and_then(|s| actions::validate_spec(&s).map(|_| s))
        .map_err(|e| anyhow!("{}: invalid spec: {e}", file.display()))?;
    Ok(spec)
}

pub async fn submit(
    opts: &ClientOpts,
    file: &Path,
    exec: bool,
    wait: bool,
) -> anyhow::Result<ExitCode> {
    let spec = read_spec(file)?;
    let mut c = connect(opts).await?;
    // A spec with an idempotency key is submitted and started in one call: the key finds the
    // run again if the answer is lost. Without one, the handshake: Submit, then Exec.
    let start = exec && spec.idempotency_key.is_some();
    let resp = c
        .submit(request(pb::SubmitRequest {
            spec: Some(api::convert::spec_to_wire(&spec)),
            start,
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    if opts.json && (!exec || (start && !wait)) {
        output::json(&resp);
    } else if !opts.json {
        output::line(&resp.id);
    }
    if !exec {
        return Ok(ExitCode::SUCCESS);
    }
    if start {
        return if wait {
            watch(opts, &mut c, &resp.id, false).await
        } else {
            Ok(ExitCode::SUCCESS)
        };
    }
    exec_inner(opts, &mut c, &resp.id, wait, !resp.created).await
}

async fn exec_inner(
    opts: &ClientOpts,
    c: &mut Client,
    id: &str,
    wait: bool,
    tolerate_started: bool,
) -> anyhow::Result<ExitCode> {
    match c.exec(request(pb::ExecRequest { id: id.to_owned() })).await {
        Ok(r) => {
            if opts.json && !wait {
                output::json(&r.into_inner());
            }
        }
        // Submitting the same idempotency key again finds the run started already: fine.
        Err(s) if tolerate_started && s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => return Err(status_err(s)),
    }
    if wait {
        watch(opts, c, id, false).await
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

pub async fn exec(opts: &ClientOpts, id: &str, wait: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(opts).await?;
    let code = exec_inner(opts, &mut c, id, wait, false).await?;
    if !opts.json && !wait {
        output::line(&format!("{id}: executing"));
    }
    Ok(code)
}

/// Follows a run to its end. `print_each` prints every change, else only the last.
async fn watch(
    opts: &ClientOpts,
    c: &mut Client,
    id: &str,
    print_each: bool,
) -> anyhow::Result<ExitCode> {
    let mut stream = c
        .watch(request(pb::WatchRequest { id: id.to_owned() }))
        .await
        .map_err(status_err)?
        .into_inner();
    let mut last: Option<pb::Run> = None;
    while let Some(msg) = stream.message().await.map_err(status_err)? {
        // After the first message, the server sends what changed: keep the whole run.
        let run = match last.take() {
            Some(mut run) => {
                api::convert::merge_run(&mut run, msg);
                run
            }
            None => msg,
        };
        if print_each {
            if opts.json {
                output::json_line(&run);
            } else {
                let done = run
                    .blocks
                    .iter()
                    .flat_map(|b| &b.jobs)
                    .filter(|j| j.state == "completed")
                    .count();
                let total: usize = run.blocks.iter().map(|b| b.jobs.len()).sum();
                output::line(&format!(
                    "{}  {}  {done}/{total} jobs completed",
                    run.id, run.state
                ));
            }
        }
        last = Some(run);
    }
    let run = last.ok_or_else(|| anyhow!("the server closed the watch without an answer"))?;
    if !print_each {
        show(opts, &run, |run| {
            output::run(run);
        });
    }
    if !is_terminal(&run.state) {
        return Err(anyhow!(
            "the server stopped before run {id} finished (it is {})",
            run.state
        ));
    }
    Ok(if run.state == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_COMPLETED)
    })
}

/// Whether a run in `state` is done.
pub(crate) fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "completed" | "failed" | "stopped" | "cancelled" | "expired"
    )
}

pub async fn status(opts: &ClientOpts, id: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(opts).await?;
    if follow {
        return watch(opts, &mut c, id, true).await;
    }
    let run = c
        .status(request(pb::StatusRequest { id: id.to_owned() }))
        .await
        .map_err(status_err)?
        .into_inner();
    show(opts, &run, |run| {
        output::run(run);
    });
    Ok(ExitCode::SUCCESS)
}

/// What `steward list` filters on.
#[derive(clap::Args)]
pub struct ListArgs {
    /// Only runs in this state (repeatable).
    #[arg(long = "state")]
    pub states: Vec<String>,
    /// Only runs of this workflow name.
    #[arg(long)]
    pub name: Option<String>,
    /// Only runs with this label, KEY=VALUE (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Runs per page (1..=1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Continue from a previous page.
    #[arg(long)]
    pub page_token: Option<String>,
    /// Only runs created by this schedule's fires.
    #[arg(long)]
    pub schedule: Option<String>,
}

pub async fn list(opts: &ClientOpts, args: ListArgs) -> anyhow::Result<ExitCode> {
    let ListArgs {
        states,
        name,
        labels,
        limit,
        page_token,
        schedule,
    } = args;
    let mut label_map = std::collections::HashMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow!("--label {l:?}: expected KEY=VALUE"))?;
        label_map.insert(k.to_owned(), v.to_owned());
    }
    let mut c = connect(opts).await?;
    let resp = c
        .list(request(pb::ListRequest {
            states,
            name: name.unwrap_or_default(),
            labels: label_map,
            page_size: limit,
            page_token: page_token.unwrap_or_default(),
            schedule: schedule.unwrap_or_default(),
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    show(opts, &resp, |resp| {
        output::runs(resp);
    });
    Ok(ExitCode::SUCCESS)
}

/// Cancels a run. A run that is executing ends once its node has stopped its running jobs
/// (SIGTERM, then SIGKILL after the kill grace): with `wait`, this follows it until then and
/// prints the state it ended in; without, it says the cancel was accepted.
pub async fn cancel(
    opts: &ClientOpts,
    id: &str,
    reason: &str,
    wait: bool,
) -> anyhow::Result<ExitCode> {
    let mut c = connect(opts).await?;
    let mut resp = c
        .cancel(request(pb::CancelRequest {
            id: id.to_owned(),
            reason: reason.to_owned(),
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    let ended = |state: &str| {
        matches!(
            state,
            "completed" | "failed" | "stopped" | "cancelled" | "expired"
        )
    };
    if wait && !ended(&resp.state) {
        let mut stream = c
            .watch(request(pb::WatchRequest { id: id.to_owned() }))
            .await
            .map_err(status_err)?
            .into_inner();
        while let Some(run) = stream.message().await.map_err(status_err)? {
            resp.state = run.state;
            if ended(&resp.state) {
                break;
            }
        }
    }
    if opts.json {
        output::json(&resp);
    } else if ended(&resp.state) {
        output::line(&format!("{} {}", resp.id, resp.state));
    } else {
        output::line(&format!(
            "{} cancel accepted; the run is {} until its node has stopped its running jobs",
            resp.id, resp.state
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn clone_run(opts: &ClientOpts, id: &str, exec: bool) -> anyhow::Result<ExitCode> {
    let mut c = connect(opts).await?;
    // The generated `clone` call, not `Clone::clone`.
    let resp = Client::clone(&mut c, request(pb::CloneRequest { id: id.to_owned() }))
        .await
        .map_err(status_err)?
        .into_inner();
    show(opts, &resp, |resp| {
        output::line(&resp.id);
    });
    if exec {
        return exec_inner(opts, &mut c, &resp.id, false, false).await;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn validate(opts: &ClientOpts, file: &Path, offline: bool) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let local = domain::WorkflowSpec::parse_unchecked(&text)
        .and_then(|s| actions::validate_spec(&s).map(|_| s));
    let resp = match (&local, offline) {
        (Err(e), _) => pb::ValidateResponse {
            valid: false,
            violations: api::convert::violations(e),
            policies: Vec::new(),
        },
        (Ok(_), true) => pb::ValidateResponse {
            valid: true,
            violations: vec![],
            policies: Vec::new(),
        },
        (Ok(spec), false) => {
            let mut c = connect(opts).await?;
            c.validate(request(pb::ValidateRequest {
                spec: Some(api::convert::spec_to_wire(spec)),
            }))
            .await
            .map_err(status_err)?
            .into_inner()
        }
    };
    if opts.json {
        output::json(&resp);
    } else {
        for p in &resp.policies {
            let verdict = if p.passed { "passed" } else { "FAILED" };
            output::line(&format!("policy {:<20} {verdict}", p.policy));
        }
        if resp.valid {
            output::line(&format!("{}: valid", file.display()));
        } else {
            for v in &resp.violations {
                output::line(&format!(
                    "{}: {}: {}",
                    file.display(),
                    v.field,
                    v.description
                ));
            }
        }
    }
    Ok(if resp.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub async fn estop(opts: &ClientOpts, cmd: crate::EstopCommand) -> anyhow::Result<ExitCode> {
    use proto::v1::e_stop_client::EStopClient;
    let mut c = EStopClient::new(channel(opts).await?);
    match cmd {
        crate::EstopCommand::List => {
            let l = c
                .list(request(pb::EStopListRequest {}))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &l, |l| {
                output::estop_list(l);
            });
            Ok(if l.readable {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        crate::EstopCommand::Set {
            target,
            state,
            reason,
        } => {
            let r = c
                .set(request(pb::EStopSetRequest {
                    target,
                    state,
                    reason,
                }))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &r, |r| {
                output::audit_line(r);
            });
            Ok(ExitCode::SUCCESS)
        }
        crate::EstopCommand::Clear { target, reason } => {
            let r = c
                .clear(request(pb::EStopClearRequest {
                    target: target.clone(),
                    reason,
                }))
                .await
                .map_err(status_err)?
                .into_inner();
            if opts.json {
                output::json(&r);
            } else if let Some(rec) = &r.record {
                output::audit_line(rec);
            } else {
                output::line(&format!("{target} had no entry; nothing changed"));
            }
            Ok(ExitCode::SUCCESS)
        }
        crate::EstopCommand::Audit { target, limit } => {
            let r = c
                .audit(request(pb::EStopAuditRequest {
                    target: target.unwrap_or_default(),
                    limit,
                }))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &r, |r| {
                for rec in &r.records {
                    output::audit_line(rec);
                }
            });
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn token(opts: &ClientOpts, cmd: crate::TokenCommand) -> anyhow::Result<ExitCode> {
    use proto::v1::admin_client::AdminClient;
    let mut c = AdminClient::new(channel(opts).await?);
    match cmd {
        crate::TokenCommand::Create {
            name,
            role,
            expires,
            scopes,
        } => {
            let r = c
                .create_token(request(pb::CreateTokenRequest {
                    name,
                    role,
                    scopes,
                    expires_in: expires.unwrap_or_default(),
                }))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &r, |r| {
                if let Some(t) = &r.token {
                    output::token_line(t);
                }
                output::line(&format!(
                    "secret (shown this once; send it as `authorization: Bearer SECRET`, or set STEWARD_TOKEN):\n{}",
                    r.secret
                ));
            });
        }
        crate::TokenCommand::List => {
            let r = c
                .list_tokens(request(pb::ListTokensRequest {}))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &r, |r| {
                for t in &r.tokens {
                    output::token_line(t);
                }
            });
        }
        crate::TokenCommand::Revoke { name } => {
            let r = c
                .revoke_token(request(pb::RevokeTokenRequest { name: name.clone() }))
                .await
                .map_err(status_err)?
                .into_inner();
            if opts.json {
                output::json(&r);
            } else if r.revoked {
                output::line(&format!("revoked {name}"));
            } else {
                output::line(&format!("there is no token named {name}; nothing changed"));
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(opts: &ClientOpts, limit: u32) -> anyhow::Result<ExitCode> {
    use proto::v1::admin_client::AdminClient;
    let mut c = AdminClient::new(channel(opts).await?);
    let r = c
        .access_log(request(pb::AccessLogRequest { limit }))
        .await
        .map_err(status_err)?
        .into_inner();
    show(opts, &r, |r| {
        for a in &r.records {
            output::access_line(a);
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// A schedule file, with its `workflow_file` (relative to the file) read in: the server never
/// reads a client's paths.
pub fn read_schedule(file: &Path) -> anyhow::Result<domain::schedule::ScheduleSpec> {
    let read = |f: &Path| -> anyhow::Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        domain::limits::check_depth(&text, domain::limits::MAX_SPEC_DEPTH)
            .map_err(|e| anyhow!("{}: {e}", f.display()))?;
        serde_norway::from_str(&text)
            .map_err(|e| anyhow!("{}: not valid YAML or JSON: {e}", f.display()))
    };
    let mut doc = read(file)?;
    if let Some(map) = doc.as_object_mut()
        && let Some(wf) = map.remove("workflow_file")
    {
        let rel = wf
            .as_str()
            .ok_or_else(|| anyhow!("{}: workflow_file: must be a path", file.display()))?;
        if map.contains_key("workflow") {
            bail!(
                "{}: give either workflow or workflow_file, not both",
                file.display()
            );
        }
        let path = file.parent().unwrap_or(Path::new(".")).join(rel);
        map.insert("workflow".into(), read(&path)?);
    }
    let spec = domain::schedule::ScheduleSpec::from_value(doc)
        .map_err(|e| anyhow!("{}: invalid schedule: {e}", file.display()))?;
    actions::validate_spec(&spec.workflow)
        .map_err(|e| anyhow!("{}: invalid workflow: {e}", file.display()))?;
    Ok(spec)
}

pub async fn schedule(opts: &ClientOpts, cmd: crate::ScheduleCommand) -> anyhow::Result<ExitCode> {
    use crate::ScheduleCommand as C;
    use proto::v1::schedules_client::SchedulesClient;
    let spec_req = |file: &Path| -> anyhow::Result<pb::ScheduleRequest> {
        Ok(pb::ScheduleRequest {
            spec: Some(api::convert::schedule_spec_to_wire(&read_schedule(file)?)),
        })
    };
    // Read the file before connecting: a bad file is reported as such.
    let req = match &cmd {
        C::Create { file } | C::Update { file } => Some(spec_req(file)?),
        _ => None,
    };
    let mut c = SchedulesClient::new(channel(opts).await?)
        .max_decoding_message_size(api::http::MAX_BODY_BYTES)
        .max_encoding_message_size(api::http::MAX_BODY_BYTES);
    let one = |opts: &ClientOpts, s: &pb::Schedule| show(opts, s, output::schedule);
    match (cmd, req) {
        (C::Create { .. }, Some(req)) => {
            let s = c
                .create(request(req))
                .await
                .map_err(status_err)?
                .into_inner();
            one(opts, &s);
        }
        (C::Update { .. }, Some(req)) => {
            let s = c
                .update(request(req))
                .await
                .map_err(status_err)?
                .into_inner();
            one(opts, &s);
        }
        (C::List, _) => {
            let r = c
                .list(request(pb::ScheduleListRequest {}))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &r, output::schedules);
        }
        (C::Show { name }, _) => {
            let s = c
                .get(request(pb::ScheduleNameRequest { name }))
                .await
                .map_err(status_err)?
                .into_inner();
            one(opts, &s);
        }
        (C::Pause { name, reason }, _) => {
            let s = c
                .pause(request(pb::SchedulePauseRequest { name, reason }))
                .await
                .map_err(status_err)?
                .into_inner();
            one(opts, &s);
        }
        (C::Resume { name }, _) => {
            let s = c
                .resume(request(pb::ScheduleNameRequest { name }))
                .await
                .map_err(status_err)?
                .into_inner();
            one(opts, &s);
        }
        (C::Delete { name }, _) => {
            let r = c
                .delete(request(pb::ScheduleNameRequest { name: name.clone() }))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &r, |_| {
                output::line(&format!("deleted schedule {name}; its runs stay"))
            });
        }
        (C::Trigger { name }, _) => {
            let r = c
                .trigger(request(pb::ScheduleNameRequest { name }))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &r, |r| output::line(&r.id));
        }
        (C::Backfill { name, from, to }, _) => {
            let r = c
                .backfill(request(pb::ScheduleBackfillRequest { name, from, to }))
                .await
                .map_err(status_err)?
                .into_inner();
            show(opts, &r, |r| {
                output::line(&format!("backfilling {} fires, one after another", r.fires));
            });
        }
        (C::Create { .. } | C::Update { .. }, None) => unreachable!("read above"),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn prune(
    opts: &ClientOpts,
    before: String,
    workflow: Option<String>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    use proto::v1::admin_client::AdminClient;
    let mut c = AdminClient::new(channel(opts).await?);
    let r = c
        .prune(request(pb::PruneRequest {
            before: before.clone(),
            workflow: workflow.clone().unwrap_or_default(),
            dry_run,
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    show(opts, &r, |r| {
        let scope = workflow.map_or(String::new(), |w| format!(" of {w}"));
        if r.dry_run {
            output::line(&format!(
                "{} finished runs{scope} ended before {before}; nothing deleted (--dry-run)",
                r.runs
            ));
        } else {
            output::line(&format!(
                "deleted {} finished runs{scope} that ended before {before}",
                r.runs
            ));
        }
    });
    Ok(ExitCode::SUCCESS)
}
