//! The operator console (docs/console.md) in a real browser: Debian's Chromium driven through
//! chromedriver (both started here, on loopback), against the real binary. Screenshots of each
//! page go to `target/console-screenshots/`; accessibility is checked with axe-core (vendored
//! in `tests/vendor`).

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);

/// WebDriver's codes for the Tab and Enter keys.
const TAB: char = '\u{e004}';
const ENTER: char = '\u{e007}';

/// chromedriver and a headless Chromium session; both end when this is dropped.
struct Session {
    browser: Option<Browser>,
    driver: Child,
    base: String,
    shots: std::path::PathBuf,
}

impl Session {
    async fn start(base: &str, javascript: bool) -> Session {
        let port = free_port();
        // In a process group of its own, with the browsers it starts: all of them end with
        // the test, even one that panics before closing its session.
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) must be installed");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut prefs = json!({});
        if !javascript {
            prefs = json!({"profile.managed_default_content_settings.javascript": 2});
        }
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000", "--no-proxy-server"],
                "prefs": prefs,
            }
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a Chromium session");
        let shots = workspace_root().join("target/console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Session {
            browser: Some(browser),
            driver,
            base: format!("http://{base}"),
            shots,
        }
    }

    fn b(&self) -> &Browser {
        self.browser.as_ref().unwrap()
    }

    async fn goto(&self, path: &str) {
        self.b()
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap();
    }

    async fn page(&self) -> String {
        self.b().source().await.unwrap()
    }

    /// The input whose `<label>` reads `label`.
    async fn field(&self, label: &str) -> fantoccini::elements::Element {
        let xpath = format!("//*[@id=//label[normalize-space()='{label}']/@for]");
        self.b()
            .find(Locator::XPath(&xpath))
            .await
            .unwrap_or_else(|e| panic!("no field labelled {label:?}: {e}"))
    }

    async fn button(&self, name: &str) -> fantoccini::elements::Element {
        let xpath = format!("//button[normalize-space()='{name}']");
        self.b()
            .find(Locator::XPath(&xpath))
            .await
            .unwrap_or_else(|e| panic!("no button {name:?}: {e}"))
    }

    async fn has_button(&self, name: &str) -> bool {
        let xpath = format!("//button[normalize-space()='{name}']");
        !self
            .b()
            .find_all(Locator::XPath(&xpath))
            .await
            .unwrap()
            .is_empty()
    }

    async fn sign_in(&self, token: &str) {
        self.goto("/signin").await;
        self.field("Token").await.send_keys(token).await.unwrap();
        self.button("Sign in").await.click().await.unwrap();
        self.wait_page("<h1>Overview</h1>").await;
    }

    /// Waits until the page (after a click that navigates) holds `needle`; returns it.
    async fn wait_page(&self, needle: &str) -> String {
        let deadline = Instant::now() + LONG;
        loop {
            let page = self.page().await;
            if page.contains(needle) {
                return page;
            }
            assert!(Instant::now() < deadline, "never showed {needle:?}: {page}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Presses and releases one key, wherever the focus is.
    async fn press(&self, key: char) {
        use fantoccini::actions::{InputSource as _, KeyAction, KeyActions};
        let a = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: key })
            .then(KeyAction::Up { value: key });
        self.b().perform_actions(a).await.unwrap();
    }

    async fn type_text(&self, text: &str) {
        for c in text.chars() {
            self.press(c).await;
        }
    }

    /// Presses Tab until the focused element is `what` (its id, or its text); at most 60 times.
    async fn tab_to(&self, what: &str) {
        for _ in 0..60 {
            self.press(TAB).await;
            let el = self.b().active_element().await.unwrap();
            let id = el.attr("id").await.unwrap().unwrap_or_default();
            let text = el.text().await.unwrap_or_default();
            if id == what || text.trim() == what {
                return;
            }
        }
        panic!("Tab never reached {what:?}: {}", self.page().await);
    }

    async fn shot(&self, name: &str) {
        let png = self.b().screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// axe-core on the page: no serious or critical violation.
    async fn accessible(&self, what: &str) {
        let axe = include_str!("vendor/axe.min.js");
        self.b().execute(axe, vec![]).await.unwrap();
        let result = self
            .b()
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, {resultTypes: ['violations']})
                    .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.html)}))))
                    .catch(e => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));",
                vec![],
            )
            .await
            .unwrap();
        let bad: Vec<&Value> = result
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .collect();
        assert!(bad.is_empty(), "accessibility of {what}: {bad:#?}");
    }

    /// Waits until the current page (not reloaded) shows `text` in element `id`.
    async fn wait_text(&self, id: &str, text: &str) {
        let deadline = Instant::now() + LONG;
        loop {
            if let Ok(el) = self.b().find(Locator::Id(id)).await
                && el.text().await.is_ok_and(|t| t.contains(text))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "#{id} never showed {text:?}: {}",
                self.page().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn end(mut self) {
        if let Some(b) = self.browser.take() {
            let _ = b.close().await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.wait();
    }
}

/// The stop from the issue's story: a responder signs in, presses Emergency stop, stops
/// `site=aap` with a reason while a run of that site has a running job. The job's process is
/// gone, the run page (open in another window, never reloaded) shows `stopped`, the banner is
/// red, the audit page names the responder. Every page passes axe-core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_stops_a_site_from_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let mut c = server.client().await;
    let responder = server.token("resp-ana", "responder");
    let pidfile = dir.path().join("pid");
    let id = start_long_job(&mut c, &pidfile, "erase", "aap").await;
    let pid = read_pid(&pidfile);

    let s = Session::start(&server.addr, true).await;
    s.goto("/signin").await;
    s.shot("signin").await;
    s.accessible("the sign-in page").await;
    s.sign_in(&responder).await;
    s.shot("overview").await;
    s.accessible("the overview").await;
    let page = s.page().await;
    assert!(page.contains("site=aap"), "{page}");

    // The run page, in a window of its own that is never reloaded.
    s.goto(&format!("/runs/{id}")).await;
    s.wait_text("run-state", "running").await;
    s.shot("run").await;
    s.accessible("a run page").await;
    let run_window = s.b().window().await.unwrap();
    let other = s.b().new_window(false).await.unwrap();
    s.b().switch_to_window(other.handle).await.unwrap();

    // By keyboard alone: Tab to the button and press Enter; Tab to each field and type; Enter
    // sends the form.
    s.goto("/").await;
    s.tab_to("Emergency stop").await;
    s.press(ENTER).await;
    s.wait_page("Review the stop").await;
    s.shot("estop-form").await;
    s.accessible("the stop form").await;
    // A responder may stop and pause, never release.
    let options = s.b().find_all(Locator::Css("#state option")).await.unwrap();
    let mut values = Vec::new();
    for o in options {
        values.push(o.attr("value").await.unwrap().unwrap_or_default());
    }
    assert_eq!(values, ["stop", "pause"]);
    s.tab_to("target").await;
    s.type_text("site=aap").await;
    s.tab_to("reason").await;
    s.type_text("INC-7 smoke from aap").await;
    s.press(ENTER).await;
    s.wait_page("<strong>1</strong> running").await;
    s.shot("estop-review").await;
    s.accessible("the review page").await;
    s.tab_to("confirm-button").await;
    s.press(ENTER).await;
    s.wait_page("class=\"banner stop\"").await;

    // The run page, untouched since it was opened, follows by itself.
    s.b().switch_to_window(run_window).await.unwrap();
    s.wait_text("run-state", "stopped").await;
    s.wait_text("banner", "site=aap").await;
    s.shot("run-stopped").await;
    eventually("the job's process to be gone", LONG, || process_gone(pid)).await;

    s.goto("/audit").await;
    let audit = s.page().await;
    assert!(
        audit.contains("resp-ana") && audit.contains("INC-7 smoke from aap"),
        "{audit}"
    );
    s.shot("audit").await;
    s.accessible("the audit page").await;
    s.goto("/estop").await;
    assert!(!s.has_button("Set go").await, "a responder cannot release");
    s.shot("estop").await;
    s.accessible("the e-stop page").await;
    s.goto("/runs").await;
    s.shot("runs").await;
    s.accessible("/runs").await;
    // The configuration is for operators and admins.
    s.goto("/health").await;
    s.wait_page("This page is for operators and admins").await;

    // A viewer sees no Emergency stop, and cannot reach its form.
    let viewer = server.token("vic", "viewer");
    s.goto("/").await;
    s.button("Sign out").await.click().await.unwrap();
    s.wait_page("<label for=\"token\">Token</label>").await;
    s.sign_in(&viewer).await;
    assert!(!s.has_button("Emergency stop").await);
    s.goto("/estop/new").await;
    s.wait_page("may not set e-stop entries").await;

    // An admin sees the policies and the health of the node.
    s.goto("/").await;
    s.button("Sign out").await.click().await.unwrap();
    s.wait_page("<label for=\"token\">Token</label>").await;
    s.sign_in(&server.admin_token().unwrap()).await;
    for (path, name) in [("/policies", "policies"), ("/health", "health")] {
        s.goto(path).await;
        s.shot(name).await;
        s.accessible(path).await;
    }
    s.end().await;
}

/// The same stop with JavaScript off: plain forms, POST and redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_works_without_javascript() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let mut c = server.client().await;
    let responder = server.token("resp-bo", "responder");
    let pidfile = dir.path().join("pid");
    let id = start_long_job(&mut c, &pidfile, "erase", "aap").await;
    let pid = read_pid(&pidfile);

    let s = Session::start(&server.addr, false).await;
    s.sign_in(&responder).await;
    s.goto(&format!("/runs/{id}")).await;
    s.button("Emergency stop").await.click().await.unwrap();
    s.wait_page("Review the stop").await;
    s.field("Target").await.send_keys("site=aap").await.unwrap();
    s.field("Reason")
        .await
        .send_keys("INC-8 no js")
        .await
        .unwrap();
    s.button("Review the stop").await.click().await.unwrap();
    s.wait_page("<strong>1</strong> running").await;
    s.button("Set stop on site=aap")
        .await
        .click()
        .await
        .unwrap();
    // Back on the run page it came from, with the banner.
    s.wait_page("class=\"banner stop\"").await;
    let url = s.b().current_url().await.unwrap();
    assert_eq!(url.path(), format!("/runs/{id}"));
    eventually("the job's process to be gone", LONG, || process_gone(pid)).await;
    let run = wait_terminal(&mut c, &id, LONG).await;
    assert_eq!(run.state, "stopped");
    s.b().refresh().await.unwrap();
    s.wait_text("run-state", "stopped").await;
    s.end().await;
}

// ---- over plain HTTP: escaping, CSRF, confirmation, roles ----

/// A GET or POST (a form) with the session cookie and `extra` headers: the status, the
/// response head and the body.
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    form: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> (u16, String, String) {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let cookie = format!("steward_session={token}");
    let mut headers = vec![("Cookie", cookie.as_str())];
    if method == "POST" {
        headers.push(("Content-Type", "application/x-www-form-urlencoded"));
    }
    headers.extend_from_slice(extra);
    http(addr, method, path, &headers, &body).await.unwrap()
}

/// The CSRF value of the signed-in session, from a page's sign-out form.
async fn csrf(addr: &str, token: &str) -> String {
    let (_, _, page) = call(addr, "GET", "/", token, &[], &[]).await;
    let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
    page[at..at + 32].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_escape_what_they_show() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let mut c = server.client().await;
    let admin = server.admin_token().unwrap();
    let id = submit_and_exec(
        &mut c,
        "name: x\ndesc: '<script>alert(1)</script>'\nlabels: {site: '\"><img src=x onerror=alert(2)>'}\nblocks:\n  - jobs: [{action: shell, args: {argv: [sh, -c, 'echo \"<b>bold</b>\"; exit 3']}}]\n",
    )
    .await;
    wait_terminal(&mut c, &id, LONG).await;
    let token = csrf(&server.addr, &admin).await;
    let (code, _, _) = call(
        &server.addr,
        "POST",
        "/estop/set",
        &admin,
        &[
            ("csrf", &token),
            ("target", "site=aap"),
            ("state", "pause"),
            ("reason", "<script>alert(3)</script>"),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 303);
    for path in [
        format!("/runs/{id}"),
        "/runs".to_owned(),
        "/".to_owned(),
        "/audit".to_owned(),
        "/estop".to_owned(),
    ] {
        let (code, _, page) = call(&server.addr, "GET", &path, &admin, &[], &[]).await;
        assert_eq!(code, 200, "{path}: {page}");
        for raw in ["<script>alert", "<img src=x", "<b>bold"] {
            assert!(!page.contains(raw), "{raw} unescaped on {path}:\n{page}");
        }
    }
    let (_, _, run) = call(
        &server.addr,
        "GET",
        &format!("/runs/{id}"),
        &admin,
        &[],
        &[],
    )
    .await;
    // Shown, as text.
    assert!(
        run.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{run}"
    );
    assert!(run.contains("&#60;b&#62;bold&#60;/b&#62;"), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_need_their_csrf_value_and_big_stops_a_second_typing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let responder = server.token("resp-cy", "responder");
    let addr = &server.addr;
    let token = csrf(addr, &responder).await;
    let stop_all = [
        ("target", "*"),
        ("state", "stop"),
        ("reason", "drill"),
        ("csrf", token.as_str()),
    ];
    // No CSRF value, a wrong one, or a POST from another site: refused, nothing set.
    for (form, extra) in [
        (&stop_all[..3], &[][..]),
        (
            &[
                ("target", "*"),
                ("state", "stop"),
                ("reason", "drill"),
                ("csrf", "0000"),
            ][..],
            &[][..],
        ),
        (&stop_all[..], &[("Sec-Fetch-Site", "cross-site")][..]),
    ] {
        let (code, _, page) = call(addr, "POST", "/estop/set", &responder, form, extra).await;
        assert_eq!(code, 403, "{page}");
    }
    // `*` needs the target typed again.
    let (code, _, page) = call(addr, "POST", "/estop/set", &responder, &stop_all, &[]).await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("Type the target to confirm"), "{page}");
    let (code, _, page) = call(
        addr,
        "POST",
        "/estop/set",
        &responder,
        &[&stop_all[..], &[("confirm", "site=x")]].concat(),
        &[],
    )
    .await;
    assert_eq!(code, 400, "{page}");
    let admin = server.admin_token().unwrap();
    let (_, _, list) = call(addr, "GET", "/estop", &admin, &[], &[]).await;
    assert!(!list.contains("drill"), "{list}");
    // Typed: set.
    let (code, head, _) = call(
        addr,
        "POST",
        "/estop/set",
        &responder,
        &[&stop_all[..], &[("confirm", "*")]].concat(),
        &[],
    )
    .await;
    assert_eq!(code, 303, "{head}");
    // A responder cannot set go, even by crafting the form.
    let (code, _, page) = call(
        addr,
        "POST",
        "/estop/set",
        &responder,
        &[
            ("target", "*"),
            ("state", "go"),
            ("reason", "x"),
            ("csrf", &token),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("may not set go"), "{page}");
    // The session cookie: HttpOnly and SameSite=Strict.
    let (_, head, _) = call(addr, "POST", "/signin", "", &[("token", &responder)], &[]).await;
    let cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie"))
        .unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    // A wrong token: refused, and no cookie.
    let (code, head, _) = call(addr, "POST", "/signin", "", &[("token", "stw_nope")], &[]).await;
    assert_eq!(code, 401);
    assert!(!head.to_ascii_lowercase().contains("set-cookie"));
}

/// Past 50 matching runs, running, paused or queued alike, the review asks for the target
/// typed again, exactly when the set will: a target whose runs are all paused can be stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_stop_of_paused_runs_asks_for_the_typing_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let admin = server.admin_token().unwrap();
    let operator = server.token("op-cy", "operator");
    let addr = &server.addr;
    let token = csrf(addr, &operator).await;
    let pause = [
        ("target", "queue"),
        ("state", "pause"),
        ("reason", "INC-9"),
        ("csrf", token.as_str()),
    ];
    let (code, head, _) = call(addr, "POST", "/estop/set", &operator, &pause, &[]).await;
    assert_eq!(code, 303, "{head}");
    let mut c = proto::v1::steward_client::StewardClient::new(channel_as(addr, Some(&admin)).await);
    for _ in 0..51 {
        submit_and_exec(
            &mut c,
            "name: queue\nblocks:\n  - jobs: [{action: noop, args: {}}]\n",
        )
        .await;
    }
    let stop = [
        ("target", "queue"),
        ("state", "stop"),
        ("reason", "INC-9"),
        ("csrf", token.as_str()),
    ];
    let (code, _, page) = call(addr, "POST", "/estop/review", &operator, &stop, &[]).await;
    assert_eq!(code, 200, "{page}");
    // None running (some may still be queued, on their way to paused): the old rule, which
    // counted running runs alone, asked for no typing here.
    assert!(page.contains("<strong>0</strong> running"), "{page}");
    assert!(
        page.contains("name=\"confirm\""),
        "the review asks for the typing: {page}"
    );
    let (code, _, page) = call(addr, "POST", "/estop/set", &operator, &stop, &[]).await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("name=\"confirm\""), "{page}");
    let (code, head, _) = call(
        addr,
        "POST",
        "/estop/set",
        &operator,
        &[&stop[..], &[("confirm", "queue")]].concat(),
        &[],
    )
    .await;
    assert_eq!(code, 303, "{head}");
}

/// An open page's live updates end when its token is revoked: no change reaches a session
/// that is no longer signed in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_sessions_live_updates_end() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let admin = server.admin_token().unwrap();
    let viewer = server.token("live-v", "viewer");
    let addr = &server.addr;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "GET /ui/events HTTP/1.1\r\nHost: {addr}\r\nCookie: steward_session={viewer}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let set = |reason: &'static str| {
        let body = format!(r#"{{"target": "site=x", "state": "pause", "reason": "{reason}"}}"#);
        let auth = format!("Bearer {admin}");
        async move {
            let (code, _, body) = http(
                addr,
                "POST",
                "/v1/estop",
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                &body,
            )
            .await
            .unwrap();
            assert_eq!(code, 200, "{body}");
        }
    };
    // Signed in, the page hears of a change.
    let mut seen = Vec::new();
    set("before").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("event: change") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline.into(), conn.read(&mut buf))
            .await
            .expect("a change event while signed in")
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    cli_as(Some(&admin), addr, &["token", "revoke", "live-v"]);
    // Past the authenticator's cache.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    set("after").await;
    // The feed ends (the response's last chunk, or the connection closed), with no change
    // after the revocation.
    let mut after = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => after.extend_from_slice(&buf[..n]),
            }
            if after.ends_with(b"0\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    let after = String::from_utf8_lossy(&after);
    assert!(ended.is_ok(), "the feed is still open: {after}");
    assert!(!after.contains("event: change"), "{after}");
}

/// A form that is too large or does not parse gets a page saying so, not a line of plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_that_cannot_be_read_gets_a_page_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[("STEWARD_AUTH", "token")]).await;
    let addr = &server.addr;
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    for (what, body, status, says) in [
        (
            "a field given twice",
            "token=a&token=b".to_owned(),
            422,
            "The form could not be read: Failed to deserialize form body: duplicate field `token`",
        ),
        (
            "a form of 65 KiB",
            format!("token={}", "a".repeat(65 * 1024)),
            413,
            "The form is larger than 64 KiB",
        ),
    ] {
        let (code, head, page) = http(addr, "POST", "/signin", &form, &body).await.unwrap();
        assert_eq!(code, status, "{what}: {}", &page[..page.len().min(300)]);
        assert!(
            head.contains("text/html") && page.contains("Something went wrong"),
            "{what}: not a page: {head}\n{}",
            &page[..page.len().min(600)]
        );
        assert!(page.contains(says), "{what}: {page}");
        assert!(
            page.len() < 8192,
            "{what}: the page repeats the form: {} bytes",
            page.len()
        );
    }
    // And it still serves.
    let (code, _) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(code, 200);
}

/// What a page offers follows the role: a viewer gets no buttons; a submitter can Exec and
/// Clone; an operator can Cancel and release or clear e-stop entries. The configuration shown
/// keeps its secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_offer_what_the_role_allows() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("steward.toml"),
        "[[notify]]\nurl = \"http://127.0.0.1:9/hook?token=hook-secret-123\"\n",
    )
    .unwrap();
    let server = Server::start(&data, &[("STEWARD_AUTH", "token")]).await;
    let addr = &server.addr;
    let mut c = server.client().await;
    let id = submit(&mut c, "name: x\nblocks:\n  - jobs: [{action: noop}]\n").await;
    let viewer = server.token("v", "viewer");
    let submitter = server.token("s", "submitter");
    let operator = server.token("o", "operator");
    let run_page = format!("/runs/{id}");

    let (_, _, page) = call(addr, "GET", &run_page, &viewer, &[], &[]).await;
    for b in ["Emergency stop", ">Exec<", ">Cancel<", ">Clone<"] {
        assert!(!page.contains(b), "a viewer sees {b}");
    }
    let (_, _, page) = call(addr, "GET", &run_page, &submitter, &[], &[]).await;
    assert!(
        page.contains(">Exec<") && page.contains(">Clone<"),
        "{page}"
    );
    let csrf_s = csrf(addr, &submitter).await;
    let (code, head, _) = call(
        addr,
        "POST",
        &format!("{run_page}/exec"),
        &submitter,
        &[("csrf", &csrf_s)],
        &[],
    )
    .await;
    assert_eq!(code, 303, "{head}");
    wait_terminal(&mut c, &id, LONG).await;
    let (code, head, _) = call(
        addr,
        "POST",
        &format!("{run_page}/clone"),
        &submitter,
        &[("csrf", &csrf_s)],
        &[],
    )
    .await;
    assert_eq!(code, 303, "{head}");
    assert!(head.contains("?done=clone"), "{head}");

    // A viewer's POST is refused by the API's own role check.
    let csrf_v = csrf(addr, &viewer).await;
    let (code, _, page) = call(
        addr,
        "POST",
        &format!("{run_page}/clone"),
        &viewer,
        &[("csrf", &csrf_v)],
        &[],
    )
    .await;
    assert_eq!(code, 403, "{page}");

    // An operator releases and clears.
    let csrf_o = csrf(addr, &operator).await;
    let (code, _, _) = call(
        addr,
        "POST",
        "/estop/set",
        &operator,
        &[
            ("csrf", &csrf_o),
            ("target", "x"),
            ("state", "pause"),
            ("reason", "maintenance"),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 303);
    let (_, _, page) = call(addr, "GET", "/estop", &operator, &[], &[]).await;
    assert!(
        page.contains(">Set go<") && page.contains(">Clear<"),
        "{page}"
    );
    let (_, _, banner) = call(addr, "GET", "/", &operator, &[], &[]).await;
    assert!(banner.contains("class=\"banner pause\""), "{banner}");
    let (code, _, _) = call(
        addr,
        "POST",
        "/estop/clear",
        &operator,
        &[("csrf", &csrf_o), ("target", "x"), ("reason", "done")],
        &[],
    )
    .await;
    assert_eq!(code, 303);
    let (_, _, page) = call(addr, "GET", "/estop", &operator, &[], &[]).await;
    assert!(!page.contains("maintenance"), "{page}");

    // Health shows operators the configuration without its secrets; viewers not at all.
    let (_, _, health) = call(addr, "GET", "/health", &operator, &[], &[]).await;
    assert!(health.contains("notify"), "{health}");
    assert!(!health.contains("hook-secret-123"), "{health}");
    for path in ["/health", "/policies"] {
        let (code, _, page) = call(addr, "GET", path, &viewer, &[], &[]).await;
        assert_eq!(code, 403, "{path}: {page}");
    }
    // Unknown pages are a page, and the API's paths stay the API's.
    let (code, _, _) = call(addr, "GET", "/runs/not-a-run", &viewer, &[], &[]).await;
    assert_eq!(code, 400);
    let (code, head, _) = call(addr, "GET", "/v1/nope", &viewer, &[], &[]).await;
    assert_eq!(code, 401, "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &[("STEWARD_AUTH", "token"), ("STEWARD_CONSOLE", "false")],
    )
    .await;
    let admin = server.admin_token().unwrap();
    for path in ["/", "/signin", "/estop/new"] {
        let (code, _, body) = call(&server.addr, "GET", path, &admin, &[], &[]).await;
        assert_eq!(code, 401, "{path}: {body}");
    }
    let (code, _, body) = http_get_as(&server.addr, "/estop", Some(&admin))
        .await
        .map(|(c, b)| (c, (), b))
        .unwrap();
    assert_eq!(code, 404, "{body}");
}
