//! `--suite schedules`: 10,000 schedules on one node (a separate `steward serve` on SQLite):
//! the CPU they cost while none is due, and how late their fires are when they fire every
//! minute, spread over the minute and all in the same second. A fire's lateness is its run's
//! `created_at` (when the fire was decided) minus its nominal time (no jitter).

use std::time::{Duration, Instant};

use futures::StreamExt;
use proto::v1 as pb;

use crate::external::External;
use crate::{ms, percentile};

const SCHEDULES: usize = 10_000;
const CLIENTS: usize = 16;

fn spec(name: String, cron: &str) -> pb::ScheduleSpec {
    pb::ScheduleSpec {
        schedule: name,
        cron: cron.to_owned(),
        catchup_window: "10m".into(),
        overlap: "allow".into(),
        workflow: Some(crate::noop_spec(1)),
        ..Default::default()
    }
}

/// Creates (or, with `update`, replaces) schedule `s-{i}` for every `i` with `cron(i)`.
async fn put_all(
    x: &External,
    update: bool,
    cron: impl Fn(usize) -> String,
) -> anyhow::Result<Duration> {
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(x.schedules().await?);
    }
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..SCHEDULES)
        .map(|i| {
            let mut c = clients[i % CLIENTS].clone();
            let req = pb::ScheduleRequest {
                spec: Some(spec(format!("s-{i}"), &cron(i))),
            };
            async move {
                if update {
                    c.update(req).await?;
                } else {
                    c.create(req).await?;
                }
                Ok(())
            }
        })
        .buffer_unordered(CLIENTS * 4)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(started.elapsed())
}

/// The lateness of every fire whose nominal time is in `[from, to)`, sorted.
async fn lateness(x: &External, from: i64, to: i64) -> anyhow::Result<Vec<Duration>> {
    let mut c = x.client().await?;
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list(pb::ListRequest {
                name: "bench".into(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        for r in &page.runs {
            let (Some(n), Some(c)) = (
                domain::Timestamp::parse_rfc3339(&r.nominal_time),
                domain::Timestamp::parse_rfc3339(&r.created_at),
            ) else {
                continue;
            };
            if n.0 >= from && n.0 < to {
                out.push(Duration::from_millis(u64::try_from(c.0 - n.0).unwrap_or(0)));
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    out.sort();
    Ok(out)
}

fn now_ms() -> i64 {
    domain::Clock::now(&domain::SystemClock).0
}

/// Sleeps until the wall clock's next minute plus `plus`; that minute's start, in ms.
async fn next_minute(plus: Duration) -> i64 {
    let now = now_ms();
    let minute = (now / 60_000 + 1) * 60_000;
    let wait =
        u64::try_from(minute - now).unwrap_or(0) + u64::try_from(plus.as_millis()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait)).await;
    minute
}

fn report(what: &str, fires: &[Duration], expected: usize) {
    println!(
        "  {what}: {} fires of {expected} expected; lateness p50 {}, p99 {}, max {}",
        fires.len(),
        ms(percentile(fires, 0.5)),
        ms(percentile(fires, 0.99)),
        ms(fires.last().copied().unwrap_or_default()),
    );
}

pub(crate) async fn schedules_suite() -> anyhow::Result<()> {
    println!(
        "\n## schedules: {SCHEDULES} schedules, one `steward serve` process (SQLite), {CLIENTS} gRPC clients"
    );
    let x = External::start(&[], None).await?;

    // Idle: none due for a year.
    let took = put_all(&x, false, |_| "0 0 1 1 *".into()).await?;
    println!(
        "  created {SCHEDULES} schedules in {:.1} s ({:.0}/s)",
        took.as_secs_f64(),
        SCHEDULES as f64 / took.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let window = Duration::from_secs(30);
    let cpu0 = x.cpu()?;
    tokio::time::sleep(window).await;
    let idle = x.cpu()?.saturating_sub(cpu0);
    println!(
        "  idle, none due: server CPU {:.3}% of a core ({} in {} s), RSS {} MiB",
        idle.as_secs_f64() / window.as_secs_f64() * 100.0,
        ms(idle),
        window.as_secs(),
        x.rss_kb()? / 1024
    );

    // Every minute, spread over it: schedule i at second i % 60.
    let took = put_all(&x, true, |i| format!("{} * * * * *", i % 60)).await?;
    println!(
        "  updated to fire every minute, spread over the minute, in {:.1} s",
        took.as_secs_f64()
    );
    let start = next_minute(Duration::ZERO).await;
    let cpu0 = x.cpu()?;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let busy = x.cpu()?.saturating_sub(cpu0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let fires = lateness(&x, start, start + 120_000).await?;
    report("every minute, spread (167 fires/s)", &fires, 2 * SCHEDULES);
    println!(
        "  server CPU while firing: {:.1}% of a core, {} per fire (the run included)",
        busy.as_secs_f64() / 120.0 * 100.0,
        ms(busy / u32::try_from(fires.len().max(1)).unwrap_or(u32::MAX))
    );

    // Every minute, all in the same second.
    put_all(&x, true, |_| "0 * * * * *".into()).await?;
    let start = next_minute(Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(55)).await;
    let fires = lateness(&x, start, start + 1000).await?;
    report("every minute, all in second 0", &fires, SCHEDULES);
    x.stop().await;
    Ok(())
}
