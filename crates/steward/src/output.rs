//! What the CLI prints. stdout carries results; stderr carries errors.

#![allow(clippy::print_stdout, clippy::print_stderr)] // the CLI's one place to print

use proto::v1 as pb;

pub fn line(s: &str) {
    println!("{s}");
}

pub fn error(s: &str) {
    // One write: `eprintln!` writes its pieces one by one, and the server's log lines, written
    // without stderr's lock, could land between them.
    let line = format!("error: {s}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

pub fn json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => error(&format!("encoding JSON: {e}")),
    }
}

/// One compact JSON document per line (for streams).
pub fn json_line<T: serde::Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        Err(e) => error(&format!("encoding JSON: {e}")),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub fn run(r: &pb::Run) {
    println!("run      {}", r.id);
    println!("name     {}", r.name);
    if !r.desc.is_empty() {
        println!("desc     {}", r.desc);
    }
    if !r.labels.is_empty() {
        let mut labels: Vec<_> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        println!("labels   {}", labels.join(", "));
    }
    if !r.schedule.is_empty() {
        println!("schedule {} (the fire at {})", r.schedule, r.nominal_time);
    }
    println!("state    {}", r.state);
    println!(
        "times    created {}  started {}  ended {}",
        r.created_at,
        or_dash(&r.started_at),
        or_dash(&r.ended_at)
    );
    if r.state == "submitted" && !r.expires_at.is_empty() {
        println!("expires  {} unless executed", r.expires_at);
    }
    if !r.error.is_empty() {
        println!("error    {}", r.error);
    }
    if let Some(c) = &r.stop_cause {
        println!("cause    {}", c.message);
    }
    if !r.cloned_from.is_empty() {
        println!("clone of {}", r.cloned_from);
    }
    let finished = matches!(
        r.state.as_str(),
        "completed" | "failed" | "cancelled" | "expired"
    );
    if let Some(v) = r.estop.as_ref().filter(|v| v.state != "go" || !finished) {
        println!("e-stop   {}: {}", v.state, v.message);
    }
    for b in &r.blocks {
        let desc = if b.desc.is_empty() {
            String::new()
        } else {
            format!(" ({})", b.desc)
        };
        println!("block {}{desc}: {}", b.index, b.state);
        for j in &b.jobs {
            let desc = if j.desc.is_empty() {
                String::new()
            } else {
                format!(" {}", j.desc)
            };
            let mut extra = String::new();
            if j.attempts > 1 {
                extra.push_str(&format!("  attempts {}", j.attempts));
            }
            if let Some(code) = j.exit_code.filter(|c| *c != 0) {
                extra.push_str(&format!("  exit {code}"));
            }
            if !j.error.is_empty() {
                extra.push_str(&format!("  error: {}", j.error));
            }
            println!(
                "  job {:<3} {:<12} {:<10}{desc}{extra}",
                j.index, j.action, j.state
            );
        }
    }
}

pub fn runs(list: &pb::ListResponse) {
    println!("{:<36}  {:<24}  {:<9}  CREATED", "ID", "NAME", "STATE");
    for r in &list.runs {
        println!(
            "{:<36}  {:<24}  {:<9}  {}",
            r.id, r.name, r.state, r.created_at
        );
    }
    if !list.next_page_token.is_empty() {
        println!("(more: --page-token {})", list.next_page_token);
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "(none)" } else { s }
}

pub fn estop_list(l: &pb::EStopListResponse) {
    println!("source   {}", l.source);
    if !l.readable {
        println!(
            "ALERT    the list cannot be read, so everything is stopped: {}",
            l.error
        );
        return;
    }
    println!("unlisted runs: {}", l.unlisted);
    println!(
        "{:<28}  {:<6}  {:<12}  {:<24}  REASON",
        "TARGET", "STATE", "SET BY", "SET AT"
    );
    for e in &l.entries {
        println!(
            "{:<28}  {:<6}  {:<12}  {:<24}  {}",
            e.target,
            e.state,
            or_dash(&e.set_by),
            or_dash(&e.set_at),
            e.reason
        );
    }
}

pub fn audit_line(r: &pb::AuditRecord) {
    println!(
        "{}  {}: {} -> {}  by {} ({})  {}",
        r.at,
        r.target,
        or_none(&r.old_state),
        or_none(&r.new_state),
        r.set_by,
        r.source,
        r.reason
    );
}

pub fn token_line(t: &pb::Token) {
    let scopes = if t.scopes.is_empty() {
        "*".to_owned()
    } else {
        t.scopes.join(",")
    };
    let expires = if t.expires_at.is_empty() {
        "never"
    } else {
        &t.expires_at
    };
    let used = if t.last_used_at.is_empty() {
        "never"
    } else {
        &t.last_used_at
    };
    line(&format!(
        "{}  role {}  scope {scopes}  created {} by {}  expires {expires}  last used {used}",
        t.name, t.role, t.created_at, t.created_by
    ));
}

pub fn access_line(a: &pb::AccessRecord) {
    let verdict = if a.allowed { "allowed" } else { "REFUSED" };
    let target = if a.target.is_empty() { "-" } else { &a.target };
    let detail = if a.detail.is_empty() {
        String::new()
    } else {
        format!("  ({})", a.detail)
    };
    line(&format!(
        "{}  {verdict}  {}  {}  {target}  from {}{detail}",
        a.at, a.actor, a.call, a.peer
    ));
}

pub fn schedules(list: &pb::ScheduleListResponse) {
    if list.schedules.is_empty() {
        println!("no schedules");
        return;
    }
    println!(
        "{:<32} {:<8} {:<25} {:>7} {:>7} {:>7}",
        "SCHEDULE", "STATE", "NEXT FIRE", "FIRED", "MISSED", "SKIPPED"
    );
    for s in &list.schedules {
        let name = s.spec.as_ref().map_or("", |sp| sp.schedule.as_str());
        let next = s.upcoming.first().map_or("-", |u| u.nominal_time.as_str());
        println!(
            "{:<32} {:<8} {:<25} {:>7} {:>7} {:>7}",
            name,
            if s.paused { "paused" } else { "active" },
            next,
            s.fired,
            s.missed,
            s.skipped
        );
    }
}

pub fn schedule(s: &pb::Schedule) {
    let Some(spec) = &s.spec else {
        return;
    };
    println!("schedule  {}", spec.schedule);
    let when = if spec.cron.is_empty() {
        format!("every {}", spec.every)
    } else {
        format!("cron {:?} in {}", spec.cron, spec.timezone)
    };
    println!("when      {when}");
    println!(
        "rules     catch-up window {}, overlap {}{}",
        spec.catchup_window,
        spec.overlap,
        if spec.jitter.is_empty() {
            String::new()
        } else {
            format!(", jitter {}", spec.jitter)
        }
    );
    if let Some(w) = &spec.workflow {
        println!("workflow  {}", w.name);
    }
    if s.paused {
        println!(
            "state     paused by {} at {}: {}",
            or_dash(&s.paused_by),
            s.paused_at,
            or_dash(&s.pause_reason)
        );
    } else {
        println!("state     active");
    }
    println!(
        "counts    fired {}, missed {}, skipped {}",
        s.fired, s.missed, s.skipped
    );
    if !s.last_run.is_empty() {
        println!("last run  {}", s.last_run);
    }
    if !s.buffered.is_empty() {
        println!(
            "waiting   the fire at {} waits for the last run",
            s.buffered
        );
    }
    if !s.backfill_next.is_empty() {
        println!(
            "backfill  next {}, up to {}",
            s.backfill_next, s.backfill_to
        );
    }
    if !s.upcoming.is_empty() {
        println!("next fires");
        for u in &s.upcoming {
            println!("  {}  ({})", u.nominal_time, u.local_time);
        }
    }
    if !s.history.is_empty() {
        println!("latest");
        for h in s.history.iter().rev() {
            println!("  {}  {}", h.nominal_time, h.detail);
        }
    }
}
