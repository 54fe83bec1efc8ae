#![allow(clippy::unwrap_used)]
// Test scaffolding: every task ends with the test's runtime, or is awaited.
#![allow(clippy::disallowed_methods)]

//! The limits on the API's connections (`api::conn`), over real TCP on loopback: a client
//! that sends nothing, or a request's head too slowly, is closed; no more than the limit are
//! served at once, and the next is served as soon as one closes; a long answer is not cut;
//! shutdown closes idle connections and waits for the rest.

use std::time::{Duration, Instant};

use api::conn::{Limits, serve};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const HEAD: Duration = Duration::from_millis(400);
const IDLE: Duration = Duration::from_millis(1000);

async fn server(
    max: usize,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let router = axum::Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                "slow"
            }),
        )
        .route(
            "/stream",
            get(|| async {
                // Three parts 600 ms apart: an answer in progress longer than IDLE.
                let parts = futures::stream::unfold(0, |i| async move {
                    if i == 3 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    Some((
                        Ok::<_, std::convert::Infallible>(format!("part{i};")),
                        i + 1,
                    ))
                });
                axum::body::Body::from_stream(parts)
            }),
        )
        .route(
            "/peer",
            get(
                |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
                    std::net::SocketAddr,
                >| async move { peer.to_string() },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let limits = Limits {
        max_connections: max,
        head_timeout: HEAD,
        idle_timeout: IDLE,
    };
    let task = tokio::task::spawn({
        let stop = stop.clone();
        async move { serve(listener, router, stop, limits).await.unwrap() }
    });
    (addr, stop, task)
}

/// How long until the server closes `conn` (reads until EOF or a reset), at most `within`.
async fn closed_after(conn: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(
            within.saturating_sub(started.elapsed()),
            conn.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// One `GET path` on a new connection: the answer's body, or None if none came within `within`.
async fn get_once(addr: std::net::SocketAddr, path: &str, within: Duration) -> Option<String> {
    let attempt = async {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = String::new();
        c.read_to_string(&mut raw).await.unwrap();
        raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
    };
    tokio::time::timeout(within, attempt).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_are_closed() {
    let (addr, _stop, _task) = server(16).await;
    // Sends nothing at all.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Sends half a request's head, then nothing.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    // Sends a request, then keeps the connection open.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    for (what, conn) in [
        ("silent", &mut silent),
        ("slow", &mut slow),
        ("idle", &mut idle),
    ] {
        let took = closed_after(conn, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("the {what} connection is still open after 10 s"));
        assert!(
            took < Duration::from_secs(3),
            "{what}: closed after {took:?}"
        );
    }
    // An answer that takes longer than the head's deadline is not cut.
    assert_eq!(
        get_once(addr, "/slow", Duration::from_secs(10))
            .await
            .as_deref(),
        Some("slow")
    );
    // Nor one whose body is still being sent.
    assert_eq!(
        get_once(addr, "/stream", Duration::from_secs(10))
            .await
            .as_deref(),
        Some("6\r\npart0;\r\n6\r\npart1;\r\n6\r\npart2;\r\n0\r\n\r\n")
    );
    // Every request knows its peer.
    let peer = get_once(addr, "/peer", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
}

/// An HTTP/2 connection (prior knowledge, as gRPC clients make them) with no request in
/// progress is closed after the idle timeout: pings and settings do not keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed() {
    let (addr, _stop, _task) = server(16).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    // A client that pings every 200 ms while it asks nothing: pings do not keep it.
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake::<_, String>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let driven = tokio::task::spawn(conn);
    // One request, then nothing.
    let req = axum::http::Request::get(format!("http://{addr}/"))
        .body(String::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), driven)
        .await
        .expect("the idle HTTP/2 connection is still open after 10 s")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(took >= IDLE / 2 && took < IDLE * 3, "closed after {took:?}");
    drop(send);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_the_limit_are_served_and_the_next_waits_its_turn() {
    let (addr, _stop, _task) = server(2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // A request whose answer they never read to the end keeps them open: a keep-alive.
        c.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The third is accepted by the kernel but not served while both are open...
    let third = tokio::task::spawn(get_once(addr, "/", Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served past the limit of 2"
    );
    // ...and is once one closes.
    drop(held.pop());
    let started = Instant::now();
    assert_eq!(third.await.unwrap().as_deref(), Some("ok"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_and_waits_for_answers() {
    let (addr, stop, task) = server(16).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let slow = tokio::task::spawn(get_once(addr, "/slow", Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    assert!(
        closed_after(&mut idle, Duration::from_millis(300))
            .await
            .is_some(),
        "an idle connection is closed at once"
    );
    assert_eq!(
        slow.await.unwrap().as_deref(),
        Some("slow"),
        "the answer in progress is finished"
    );
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returns once every connection has closed")
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens after shutdown"
    );
}
