//! A real etcd server for tests: Debian's `etcd` (package `etcd-server`) on free loopback ports,
//! its data in a temporary directory; it can be stopped, restarted on the same ports and data,
//! frozen (SIGSTOP: connections hang) and thawed. `STEWARD_ETCD_BIN` names another binary.

#![allow(clippy::unwrap_used, clippy::print_stderr)]
// Started and stopped synchronously, from test setup and `Drop`.
#![allow(clippy::disallowed_methods)]

use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) one-member etcd cluster.
pub struct EtcdServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    tls: Option<Tls>,
}

/// TLS on the client port: the server's certificate and key, and the CA whose client
/// certificates it requires (PEM files).
#[derive(Clone)]
pub struct Tls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl EtcdServer {
    /// Starts a server and waits until it answers `/health`.
    pub fn start() -> EtcdServer {
        EtcdServer::start_with(None)
    }

    /// Starts a server whose client port speaks TLS and requires a client certificate, and
    /// waits until it accepts connections.
    pub fn start_tls(tls: Tls) -> EtcdServer {
        EtcdServer::start_with(Some(tls))
    }

    fn start_with(tls: Option<Tls>) -> EtcdServer {
        let mut s = EtcdServer {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            tls,
        };
        s.restart();
        s
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Starts it again (after [`EtcdServer::stop`] or [`EtcdServer::kill`]) on the same ports
    /// and data, and waits until it is healthy.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let bin = std::env::var("STEWARD_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&bin);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.client_ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "steward-test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("steward-test={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("etcd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "the etcd tests need etcd: apt-get install etcd-server (or set STEWARD_ETCD_BIN): {bin}: {e}"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.healthy() {
            assert!(
                Instant::now() < deadline,
                "etcd not healthy in 30s; log:\n{}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Answers `/health` (with TLS, which this harness does not speak: accepts connections).
    fn healthy(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        if self.tls.is_some() {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// POSTs JSON to etcd's gateway (`/v3/...`, plain HTTP only) as etcd's own tools would;
    /// panics unless it answers 200.
    pub fn post(&self, path: &str, body: &str) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.client_port)).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{path}: {resp}");
        resp
    }

    /// Turns on etcd's password authentication, with `root` (password `password`) as its
    /// only user.
    pub fn enable_auth(&self, password: &str) {
        self.post(
            "/v3/auth/user/add",
            &format!(r#"{{"name":"root","password":"{password}"}}"#),
        );
        self.post("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#);
        self.post("/v3/auth/enable", "{}");
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGKILL, and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: it keeps its ports, and answers nothing.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`EtcdServer::freeze`].
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
