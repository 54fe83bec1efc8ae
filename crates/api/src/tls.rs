//! TLS on the one listener (gRPC and HTTP alike), with rustls and the `ring` provider.
//!
//! The certificate and key are read from PEM files and read again when either file changes,
//! without a restart: connections made after the change get the new certificate, open ones
//! keep theirs. A change that does not load (a half-written file, a key that does not match)
//! leaves the certificate in force and is logged; the next change is tried again.
//!
//! Handshakes run on tasks of their own, each bounded by [`HANDSHAKE_TIMEOUT`], so a client
//! that connects and says nothing holds up no one else. A client that does not speak TLS
//! (plain HTTP or gRPC) fails its handshake and its connection is closed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a client has to finish its handshake, and the server to take the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the certificate files are looked at for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// The largest certificate or key file read.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("the key {key} does not belong to the certificate {cert}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = estop::read_capped(path, MAX_PEM_BYTES).map_err(|e| file_err(path, e))?;
    Ok(bytes)
}

/// The certificate chain and key in `cert` and `key` (PEM), checked to belong together.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read_pem(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(
            cert,
            "holds no certificate (PEM `CERTIFICATE` block)",
        ));
    }
    let der = PrivateKeyDer::from_pem_slice(&read_pem(key)?)
        .map_err(|e| file_err(key, format!("not a PEM private key: {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| file_err(key, format!("an unsupported key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    })?;
    Ok(ck)
}

/// What tells a file changed: its modification time, size and inode.
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The certificate in force, read again when its files change.
#[derive(Debug)]
pub struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Loads the files now: a start with certificate files that do not load fails.
    pub fn open(cert: &Path, key: &Path) -> Result<Arc<Certificate>, TlsError> {
        Ok(Arc::new(Certificate {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(load(cert, key)?)),
        }))
    }

    /// The server configuration that serves this certificate, offering HTTP/2 and HTTP/1.1.
    /// With `client_ca`, clients may present a certificate that CA signed (and none other);
    /// its subject's common name then names the caller's token.
    pub fn server_config(
        self: &Arc<Self>,
        client_ca: Option<&Path>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&read_pem(ca)?) {
                    let cert =
                        cert.map_err(|e| file_err(ca, format!("not a PEM certificate: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| file_err(ca, format!("not a CA certificate: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(file_err(ca, "holds no certificate"));
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| file_err(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reads the files again whenever they change, until `cancel`.
    pub async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        let mut seen = (stamp(&self.cert), stamp(&self.key));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            let now = (stamp(&self.cert), stamp(&self.key));
            if now == seen {
                continue;
            }
            seen = now;
            let (cert, key) = (self.cert.clone(), self.key.clone());
            match tokio::task::spawn_blocking(move || load(&cert, &key)).await {
                Ok(Ok(ck)) => {
                    if let Ok(mut cur) = self.current.write() {
                        *cur = Arc::new(ck);
                    }
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the new TLS certificate does not load; the one in force stays");
                }
                Err(e) => tracing::error!(error = %e, "reading the TLS certificate failed"),
            }
        }
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// Who is on the other end of a TLS connection, as `axum`'s connect info.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The common name of the client certificate the connection was made with, verified
    /// against `tls_client_ca`.
    pub client: Option<String>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// The subject's common name of a certificate.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// TCP connections that finished a TLS handshake, for [`crate::conn::serve`].
pub struct TlsListener {
    rx: mpsc::Receiver<(Held<TlsStream<TcpStream>>, Peer)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` until `cancel`; each connection's handshake runs on a task of its own.
    /// Both are tracked by `tracker`. A connection takes one of `limits`' places when it is
    /// accepted, before its handshake, and holds it until it closes: handshakes in progress
    /// count against the limit like connections served, none lasts longer than
    /// [`HANDSHAKE_TIMEOUT`], and when the listener is full new clients wait in the kernel's
    /// queue, as on plain TCP. (So [`crate::serve_tls`] counts nothing itself.)
    pub fn new(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        limits: crate::conn::Limits,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(1);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let handshakes = tracker.clone();
        let places = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        tracker.spawn(async move {
            loop {
                let place = tokio::select! {
                    () = cancel.cancelled() => return,
                    p = places.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let (stream, peer) = tokio::select! {
                    () = cancel.cancelled() => return,
                    r = tcp.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::warn!(error = %e, "could not set TCP_NODELAY");
                }
                crate::conn::keepalive(&stream);
                let (acceptor, tx, stop) = (acceptor.clone(), tx.clone(), cancel.clone());
                handshakes.spawn(async move {
                    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
                    let done = tokio::select! {
                        r = handshake => r,
                        () = stop.cancelled() => return,
                    };
                    match done {
                        Ok(Ok(tls)) => {
                            let client = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(common_name);
                            let held = Held { io: tls, _place: place };
                            let taken = tokio::time::timeout_at(
                                deadline,
                                tx.send((held, Peer { addr: peer, client })),
                            );
                            if taken.await.is_err() {
                                tracing::debug!(%peer, "a handshaken connection was not taken in time");
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

/// A connection with the place it takes in the listener's limit, given back when it closes.
pub struct Held<I> {
    io: I,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Held<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Held<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Held<TlsStream<TcpStream>>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor stopped: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            client: None,
        })
    }
}

/// A certificate authority of a test's own, and server certificates it signs (feature
/// `testing`).
#[cfg(feature = "testing")]
pub mod testing {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::CertificateDer;

    pub struct Ca {
        /// The CA's certificate, for clients to trust.
        pub pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    /// A server certificate and its key.
    pub struct Leaf {
        pub cert_pem: String,
        pub key_pem: String,
        pub der: CertificateDer<'static>,
    }

    impl Ca {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "steward test CA");
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().expect("a CA key");
            let cert = params.self_signed(&key).expect("the CA certificate");
            Ca {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A client certificate whose subject's common name is `name`.
        pub fn client(&self, name: &str) -> Leaf {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            self.sign(params, name)
        }

        /// A certificate for `127.0.0.1` and `localhost`, named `name`.
        pub fn leaf(&self, name: &str) -> Leaf {
            let params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .expect("leaf params");
            self.sign(params, name)
        }

        fn sign(&self, mut params: CertificateParams, name: &str) -> Leaf {
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().expect("a key");
            let cert = params.signed_by(&key, &self.issuer).expect("a certificate");
            Leaf {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                der: cert.der().clone(),
            }
        }
    }
}
