//! Serving a listener's connections, with the limits a server open to the network needs.
//!
//! `axum::serve` takes every connection the kernel hands it and keeps it as long as the client
//! likes: a client that opens connections and sends nothing, or a request's head a byte at a
//! time, runs the process out of file descriptors, and then the e-stop list and the database
//! cannot be opened either (the e-stop fails closed: everything stops). axum offers no way to
//! configure its connections, so this is its accept loop (hyper-util's server, as axum uses it)
//! with these limits:
//!
//! - at most `max` connections at once per listener ([`Limits`]); more wait in the kernel's
//!   backlog until one closes, and a warning says so;
//! - a connection must send its first bytes within [`HEAD_TIMEOUT`] of being accepted, and an
//!   HTTP/1 request its whole head within [`HEAD_TIMEOUT`] of the connection being ready for
//!   one (an idle keep-alive connection is closed after as long); a request being answered,
//!   however long (a Watch), is not limited;
//! - a connection that starts no request for [`IDLE_TIMEOUT`] (pings and settings do not
//!   count) is closed gracefully, answers in progress going on to their end, and a request's body
//!   must arrive within [`BODY_TIMEOUT`] (the API's and the console's extractors apply it);
//!   TCP keepalive and a user timeout (see [`keepalive`]) find peers that are gone.
//!
//! On shutdown it stops accepting, asks every connection to close after the requests it is
//! serving (HTTP/2: GOAWAY), and returns when all have.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a new connection has to send its first bytes, and an HTTP/1 request its head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The most connections the API's listener serves at once, whatever the descriptor limit.
pub const MAX_CONNECTIONS: usize = 4096;
/// The most connections the break-glass socket serves at once: its own, so that a flood of
/// the network listener never closes it.
pub const MAX_LOCAL_CONNECTIONS: usize = 64;
/// File descriptors left for everything but the API's connections: the database, the e-stop
/// list, the policy file, jobs' pipes, outgoing HTTP.
pub const FD_RESERVE: u64 = 1024;
/// How long a connection may ask nothing before it is closed, gracefully: an answer being
/// sent (a Watch) goes on to its end, and no new request is taken (HTTP/2: GOAWAY, which
/// clients answer by connecting again when they next call).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request's whole body may take to arrive, once its head has (the API's and the
/// console's forms; gRPC messages are read by their calls): 9 MiB at 160 KB/s.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often, at most, a warning says that the listener is full.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Finds peers that vanished (powered off, cut off) on an accepted connection: TCP keepalive
/// probes a quiet one after 60 s, every 10 s, and resets it after 3 probes unanswered; and
/// data the peer leaves unacknowledged for 90 s (a Watch's keep-alive comments to a peer that
/// is gone, when keepalive probes are not sent) resets it too, where TCP alone would retry
/// for about 15 minutes.
pub fn keepalive(tcp: &tokio::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let set = setsockopt(tcp, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(tcp, sockopt::TcpKeepIdle, &60))
        .and_then(|()| setsockopt(tcp, sockopt::TcpKeepInterval, &10))
        .and_then(|()| setsockopt(tcp, sockopt::TcpKeepCount, &3))
        .and_then(|()| setsockopt(tcp, sockopt::TcpUserTimeout, &90_000));
    if let Err(e) = set {
        tracing::debug!(error = %e, "could not turn TCP keepalive on");
    }
}

/// How many connections a listener serves at once, and how long each may take to ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    /// [`HEAD_TIMEOUT`] but in tests.
    pub head_timeout: Duration,
    /// [`IDLE_TIMEOUT`] but in tests.
    pub idle_timeout: Duration,
}

impl Limits {
    /// For the API's listener on a process that may open `fd_limit` descriptors: what is left
    /// after [`FD_RESERVE`], or a quarter of the limit when that is more, at most
    /// [`MAX_CONNECTIONS`], at least 16.
    pub fn for_fd_limit(fd_limit: u64) -> Limits {
        let left = fd_limit.saturating_sub(FD_RESERVE).max(fd_limit / 4);
        let max = usize::try_from(left).unwrap_or(usize::MAX);
        Limits::serving(max.clamp(16, MAX_CONNECTIONS))
    }

    /// For the break-glass socket.
    pub fn local() -> Limits {
        Limits::serving(MAX_LOCAL_CONNECTIONS)
    }

    /// `max_connections` at once, with the default deadlines.
    const fn serving(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            head_timeout: HEAD_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` fires; see the module's documentation.
/// Every request carries `ConnectInfo` of its connection's address.
pub async fn serve<L>(
    mut listener: L,
    router: axum::Router,
    shutdown: CancellationToken,
    limits: Limits,
) -> io::Result<()>
where
    L: axum::serve::Listener,
    L::Io: Unpin,
    L::Addr: Clone + Send + Sync + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut warned: Option<Instant> = None;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if warned.is_none_or(|w| w.elapsed() >= FULL_WARNING_EVERY) {
                    warned = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "the listener serves as many connections as it may; new ones wait \
                         until one closes"
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let (io, addr) = tokio::select! {
            () = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let last_request = Arc::new(AtomicU64::new(elapsed_ms()));
        let service = tower::ServiceExt::map_request(router.clone(), {
            let last_request = last_request.clone();
            move |req: axum::http::Request<hyper::body::Incoming>| {
                last_request.store(elapsed_ms(), Ordering::Relaxed);
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(ConnectInfo(addr.clone()));
                req
            }
        });
        let io = TokioIo::new(FirstBytes::new(io, limits.head_timeout));
        let conn = builder
            .serve_connection(io, TowerToHyperService::new(service))
            .into_owned();
        // Closed gracefully on shutdown, or once the client has asked nothing for the idle
        // timeout (an answer being sent, a Watch, goes on to its end).
        let close = shutdown.child_token();
        connections.spawn(close_when_idle(
            last_request,
            limits.idle_timeout,
            close.clone(),
        ));
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!(error = %e, "a connection ended with an error");
                    }
                }
                () = close.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    if let Err(e) = conn.await {
                        tracing::trace!(error = %e, "a connection ended with an error");
                    }
                }
            }
            // The idle watch ends with the connection.
            close.cancel();
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Cancels `close` once the connection has started no request for `idle` (or when the
/// connection ends, which cancels it too). Only requests count: a client that sends pings or
/// settings and never asks anything is idle. Requests still being answered then are not cut:
/// the close is graceful.
async fn close_when_idle(last_request: Arc<AtomicU64>, idle: Duration, close: CancellationToken) {
    loop {
        let quiet = elapsed_ms().saturating_sub(last_request.load(Ordering::Relaxed));
        let left = idle.saturating_sub(Duration::from_millis(quiet));
        if left.is_zero() {
            close.cancel();
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(left) => {}
            () = close.cancelled() => return,
        }
    }
}

/// Milliseconds since the first call: a clock that fits an atomic.
fn elapsed_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A connection that must send its first bytes within a deadline; after that, it is its own.
struct FirstBytes<I> {
    io: I,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<I> FirstBytes<I> {
    fn new(io: I, within: Duration) -> FirstBytes<I> {
        FirstBytes {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstBytes<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if this.deadline.is_some() && buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let late = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if late {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the connection sent nothing in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstBytes<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
