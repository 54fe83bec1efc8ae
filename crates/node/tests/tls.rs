#![allow(clippy::unwrap_used)]

//! TLS on the listener, end to end: a node started by `Node::start` with `tls_cert` and
//! `tls_key`, certificates made for the test by a CA of its own (rcgen), and real clients: a
//! tonic client trusting that CA, a plaintext one (refused), a rustls client that reads the
//! certificate served, and the certificate replaced on disk while the node runs.

use std::path::Path;
use std::time::{Duration, Instant};

use proto::v1 as pb;
use proto::v1::steward_client::StewardClient;
use rustls::pki_types::CertificateDer;

use api::tls::testing::Ca;

fn leaf(ca: &Ca, name: &str) -> (String, String, CertificateDer<'static>) {
    let l = ca.leaf(name);
    (l.cert_pem, l.key_pem, l.der)
}

/// Writes `text` to `path` whole, as a deploy tool would (a new file renamed over the old).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn node(dir: &Path, extra: &[(&str, &str)]) -> anyhow::Result<node::Node> {
    std::fs::write(dir.join("policies.toml"), "[workflows.t]\n").unwrap();
    let mut env = vec![
        (
            "STEWARD_TLS_CERT".to_owned(),
            dir.join("cert.pem").display().to_string(),
        ),
        (
            "STEWARD_TLS_KEY".to_owned(),
            dir.join("key.pem").display().to_string(),
        ),
        ("STEWARD_AUTH".to_owned(), "none".to_owned()),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let cfg = node::config::load(dir, None, Some("127.0.0.1:0"), &env)?;
    node::Node::start(cfg, None).await
}

/// The certificate a fresh TLS connection to `addr` is served, trusting `ca`.
async fn served(addr: std::net::SocketAddr, ca: &Ca) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

async fn tls_client(
    addr: std::net::SocketAddr,
    ca: &Ca,
) -> anyhow::Result<StewardClient<tonic::transport::Channel>> {
    client_with_certificate(addr, ca, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_works_plaintext_is_refused_and_a_new_certificate_is_served_without_a_restart()
 {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key, first) = leaf(&ca, "first");
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    let n = node(dir.path(), &[]).await.unwrap();
    let addr = n.addr();

    let mut c = tls_client(addr, &ca).await.unwrap();
    c.list(pb::ListRequest::default()).await.unwrap();
    assert_eq!(served(addr, &ca).await, first);

    // A client that does not speak TLS gets nothing.
    let plain = async {
        let mut p = StewardClient::connect(format!("http://{addr}")).await?;
        p.list(pb::ListRequest::default()).await?;
        anyhow::Ok(())
    };
    let res = tokio::time::timeout(Duration::from_secs(20), plain)
        .await
        .unwrap();
    assert!(res.is_err(), "a plaintext call was answered");

    // The certificate is replaced on disk: new connections get the new one.
    let (cert2, key2, second) = leaf(&ca, "second");
    replace(&dir.path().join("key.pem"), &key2);
    replace(&dir.path().join("cert.pem"), &cert2);
    let replaced = Instant::now();
    loop {
        if served(addr, &ca).await == second {
            break;
        }
        assert!(
            replaced.elapsed() < Duration::from_secs(10),
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection made before still works.
    c.list(pb::ListRequest::default()).await.unwrap();
    tls_client(addr, &ca)
        .await
        .unwrap()
        .list(pb::ListRequest::default())
        .await
        .unwrap();

    // A replacement that does not load leaves the certificate in force.
    replace(&dir.path().join("cert.pem"), "not a certificate");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(served(addr, &ca).await, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_the_start_with_a_clear_error() {
    let ca = Ca::new();
    let (cert, key, _) = leaf(&ca, "x");
    let (_, other_key, _) = leaf(&ca, "y");
    for (what, cert_text, key_text, want) in [
        ("garbage certificate", "junk", key.as_str(), "cert.pem"),
        ("garbage key", cert.as_str(), "junk", "key.pem"),
        (
            "a key of another certificate",
            cert.as_str(),
            other_key.as_str(),
            "does not belong",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert_text).unwrap();
        std::fs::write(dir.path().join("key.pem"), key_text).unwrap();
        let err = format!("{:#}", node(dir.path(), &[]).await.err().unwrap());
        assert!(err.contains(want), "{what}: {err}");
    }
    // One of the two alone.
    let dir = tempfile::tempdir().unwrap();
    let env = [("STEWARD_TLS_CERT".to_owned(), "/x/cert.pem".to_owned())];
    let err = format!(
        "{:#}",
        node::config::load(dir.path(), None, None, &env).unwrap_err()
    );
    assert!(err.contains("tls_key"), "{err}");
    // A FIFO where the key should be: refused, not waited on.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    nix::unistd::mkfifo(
        &dir.path().join("key.pem"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let started = Instant::now();
    let err = format!("{:#}", node(dir.path(), &[]).await.err().unwrap());
    assert!(err.contains("key.pem"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A client certificate from `ca`, for a tonic client.
async fn client_with_certificate(
    addr: std::net::SocketAddr,
    ca: &Ca,
    client: Option<&api::tls::testing::Leaf>,
) -> anyhow::Result<StewardClient<tonic::transport::Channel>> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem));
    if let Some(c) = client {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            &c.cert_pem,
            &c.key_pem,
        ));
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(StewardClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_the_token_it_acts_as() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key, _) = leaf(&ca, "server");
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let ca_file = dir.path().join("ca.pem").display().to_string();
    let n = node(
        dir.path(),
        &[
            ("STEWARD_AUTH", "token"),
            ("STEWARD_TLS_CLIENT_CA", &ca_file),
        ],
    )
    .await
    .unwrap();
    let addr = n.addr();
    let admin = std::fs::read_to_string(dir.path().join(node::ADMIN_TOKEN_FILE)).unwrap();
    let mut create = tonic::Request::new(pb::CreateTokenRequest {
        name: "ci-bot".into(),
        role: "viewer".into(),
        ..Default::default()
    });
    create.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", admin.trim()).parse().unwrap(),
    );
    let admin_client = proto::v1::admin_client::AdminClient::new(
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem)),
            )
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    admin_client.clone().create_token(create).await.unwrap();

    // The certificate of "ci-bot": no token sent, the viewer's rights.
    let bot = ca.client("ci-bot");
    let mut c = client_with_certificate(addr, &ca, Some(&bot))
        .await
        .unwrap();
    c.list(pb::ListRequest::default()).await.unwrap();
    let err = c
        .submit(pb::SubmitRequest {
            spec: Some(
                serde_json::from_str(
                    r#"{"name": "t", "blocks": [{"jobs": [{"action": "noop"}]}]}"#,
                )
                .unwrap(),
            ),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("ci-bot"), "{err:?}");

    // A certificate naming no token, and none at all: refused.
    let stranger = ca.client("stranger");
    let err = client_with_certificate(addr, &ca, Some(&stranger))
        .await
        .unwrap()
        .list(pb::ListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let err = client_with_certificate(addr, &ca, None)
        .await
        .unwrap()
        .list(pb::ListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // A certificate another CA signed: the handshake fails.
    let other = Ca::new().client("ci-bot");
    let res = async {
        client_with_certificate(addr, &ca, Some(&other))
            .await?
            .list(pb::ListRequest::default())
            .await?;
        anyhow::Ok(())
    }
    .await;
    assert!(res.is_err(), "a certificate of an unknown CA was taken");
}
