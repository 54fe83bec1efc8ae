//! `steward stop`: finds the server by its PID file, signals it, waits for it to exit.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::output;
use node::pidfile::{STOP_REQUEST_FILE, live_pid};

pub async fn stop(
    data_dir: &Path,
    now: bool,
    end_of_round: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let Some(pid) = live_pid(data_dir)? else {
        output::line(&format!(
            "no steward is serving from {}; nothing to stop",
            data_dir.display()
        ));
        return Ok(ExitCode::SUCCESS);
    };
    let (mode, sig) = if now {
        ("now", Signal::SIGQUIT)
    } else if end_of_round {
        ("end_of_round", Signal::SIGUSR1)
    } else {
        ("drain", Signal::SIGTERM)
    };
    std::fs::write(data_dir.join(STOP_REQUEST_FILE), mode).context("recording the stop request")?;
    let started = Instant::now();
    kill(Pid::from_raw(pid), sig).with_context(|| format!("signalling pid {pid}"))?;
    output::line(&format!(
        "sent {sig} to steward (pid {pid}); stop mode {mode}; waiting up to {}",
        humantime::format_duration(timeout)
    ));
    while started.elapsed() < timeout {
        if live_pid(data_dir)?.is_none() {
            output::line(&format!(
                "steward (pid {pid}) stopped: steward stop ({mode}) after {:.1}s",
                started.elapsed().as_secs_f64()
            ));
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(anyhow!(
        "steward (pid {pid}) did not stop within {}; it is still running (steward stop --now to cancel in-flight jobs)",
        humantime::format_duration(timeout)
    ))
}
