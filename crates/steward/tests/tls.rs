//! TLS with the real binary and clients that are not Steward's: curl with `--cacert`, a
//! Python grpcio client, and the `steward` CLI with `--tls-ca` and an `https://` address.

use std::process::Command;
use std::time::{Duration, Instant};

use api::tls::testing::Ca;

use crate::harness::*;

/// Waits until the TLS listener answers `/readyz`, checked with curl and the test's CA.
async fn wait_ready_tls(server: &Server, ca: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(ca)
            .arg(format!("https://{}/readyz", server.addr))
            .output()
            .await
            .unwrap();
        if String::from_utf8_lossy(&out.stdout) == "200" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no TLS answer in 30 s; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A CA of the test's own and a server certificate it signed, written in `dir`: the CA's file,
/// and the certificate's and key's paths.
fn certificates(dir: &std::path::Path) -> (std::path::PathBuf, String, String) {
    let ca = Ca::new();
    let leaf = ca.leaf("steward");
    let (ca_file, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca_file, &ca.pem).unwrap();
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    (
        ca_file,
        cert.display().to_string(),
        key.display().to_string(),
    )
}

/// The Python client: List through `steward.v1.Steward` with the token, trusting `ca`. The
/// messages go as bytes (an empty ListRequest is zero bytes), so no generated code is needed.
const PY_CLIENT: &str = r#"
import sys, grpc
addr, ca, token = sys.argv[1], sys.argv[2], sys.argv[3]
creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
ch = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])
grpc.channel_ready_future(ch).result(timeout=20)
list_runs = ch.unary_unary("/steward.v1.Steward/List")
answer = list_runs(b"", metadata=[("authorization", "Bearer " + token)], timeout=20)
print("ok", len(answer))
try:
    list_runs(b"", timeout=20)
    print("answered without a token")
except grpc.RpcError as e:
    print("refused", e.code().name)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_python_grpc_and_the_cli_speak_tls_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (ca_file, cert_s, key_s) = certificates(dir.path());
    let server = Server::start(
        &data,
        &[
            ("STEWARD_AUTH", "token"),
            ("STEWARD_TLS_CERT", &cert_s),
            ("STEWARD_TLS_KEY", &key_s),
        ],
    )
    .await;
    wait_ready_tls(&server, &ca_file).await;
    let token = server.admin_token().unwrap();

    // curl, trusting the CA: the HTTP API with the token.
    let out = Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(&ca_file)
        .args(["-H", &format!("authorization: Bearer {token}")])
        .arg(format!("https://{}/v1/runs", server.addr))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && body.contains("\"runs\""), "{body}");
    // curl that does not trust the CA: refused by curl itself (exit 60).
    let out = Command::new("curl")
        .args(["-s", &format!("https://{}/readyz", server.addr)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(60), "{out:?}");
    // Plaintext: no answer.
    assert_eq!(http_get(&server.addr, "/readyz").await, None);

    // The CLI, with --tls-ca and an https:// address; without the CA it fails.
    let https = format!(
        "https://127.0.0.1:{}",
        server.addr.rsplit(':').next().unwrap()
    );
    let cli = |extra: &[&str]| {
        Command::new(BIN)
            .args(["list", "--addr", &https])
            .args(extra)
            .env("STEWARD_TOKEN", &token)
            .env_remove("STEWARD_TLS_CA")
            .output()
            .unwrap()
    };
    let out = cli(&["--tls-ca", ca_file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[]);
    assert!(!out.status.success(), "the CLI trusted an unknown CA");

    // A Python grpcio client.
    let python = "/usr/bin/python3";
    let has_grpc = Command::new(python)
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_grpc {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install python3-grpcio (.ci/run)"
        );
        eprintln!("skipping the Python client: python3-grpcio is not installed");
        return;
    }
    let out = Command::new(python)
        .args(["-c", PY_CLIENT, &server.addr])
        .arg(&ca_file)
        .arg(&token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok "), "{text}");
    assert!(text.contains("refused UNAUTHENTICATED"), "{text}");
}

/// Connections that never start their TLS handshake cannot run the server out of file
/// descriptors either: handshakes in progress are bounded like connections served, so the
/// e-stop file stays readable and the break-glass socket and jobs keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_tls_connections_runs_nothing_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ca_file, cert_s, key_s) = certificates(dir.path());
    // 128 open files: fewer than the flood below.
    let server = Server::start_limited(
        &data,
        &[("STEWARD_TLS_CERT", &cert_s), ("STEWARD_TLS_KEY", &key_s)],
        (128, 128),
    )
    .await;
    wait_ready_tls(&server, &ca_file).await;
    let flood = silent_connections(&server.addr, 200, 128).await;
    // Past the e-stop's re-read and staleness periods, within the handshakes' 10 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    break_glass_still_works(&data, dir.path(), "during-the-tls-flood");
    drop(flood);
    wait_ready_tls(&server, &ca_file).await;
    let log = server.log_text();
    for bad in ["Too many open files", "cannot be read"] {
        assert!(!log.contains(bad), "the log says {bad:?}:\n{log}");
    }
}
