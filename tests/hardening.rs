//! What an attacker on loopback found, each reproduced here with real sockets: connections that
//! send nothing, one address taking every connection, and the other findings of the hardening
//! issue that are not the pass-through proxy's (those are in `proxy_*.rs`).

mod common;

use std::time::{Duration, Instant};

use common::tls::{TestCa, TlsFiles};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const T: Duration = Duration::from_secs(5);

/// Whether the server closes `s` within `within` (EOF or reset).
async fn closed_within(s: &mut (impl AsyncReadExt + Unpin), within: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A connection from `ip` (127.0.0.x), so per-address limits can be exercised on loopback.
async fn connect_from(ip: [u8; 4], addr: std::net::SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(ip), 0).into()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// A plain GET over a fresh connection from `ip`: its status line.
async fn get_status(ip: [u8; 4], addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = connect_from(ip, addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

fn server(extra: &str) -> String {
    format!("[server]\nheader_timeout = \"400ms\"\nidle_timeout = \"1s\"\n{extra}\n[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"50ms\"\n")
}

#[tokio::test]
async fn silent_connections_are_closed_plain_and_after_a_tls_handshake() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    // Plain: no byte at all, and half a request head.
    let h = start_herald(config(&up.url(), &server(""))).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    let mut half = TcpStream::connect(h.addr).await.unwrap();
    half.write_all(b"GET /api/builds/1 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    assert!(closed_within(&mut half, Duration::from_secs(3)).await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
    // A keep-alive connection that stops asking is closed after idle_timeout.
    let mut kept = TcpStream::connect(h.addr).await.unwrap();
    kept.write_all(b"GET /api/builds/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut kept, Duration::from_secs(4)).await);
    h.stop().await;

    // TLS: handshaken, then silent.
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("localhost", 1));
    let h = start_herald(config(
        &up.url(),
        &format!("{}{}", files.toml(), server("")),
    ))
    .await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let mut hs = common::tls::handshake(h.addr, &ca, &[alpn]).await;
        assert!(
            closed_within(&mut hs.stream, Duration::from_secs(3)).await,
            "{}",
            String::from_utf8_lossy(alpn)
        );
    }
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn silent_sockets_cannot_deny_service_for_long() {
    // Every connection slot taken by sockets that say nothing: they are closed within
    // header_timeout, and a real client is served again right after.
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    let h = start_herald(config(&up.url(), &server("max_connections = 10"))).await;
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(connect_from([127, 0, 0, 2], h.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = get_status([127, 0, 0, 1], h.addr, "/api/builds/1").await;
    assert!(busy.contains(" 503 "), "at the limit: {busy}");
    let started = Instant::now();
    let served = loop {
        let status = get_status([127, 0, 0, 1], h.addr, "/api/builds/1").await;
        if status.contains(" 200 ") {
            break true;
        }
        if started.elapsed() > Duration::from_secs(4) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        served,
        "still refused {:?} after the silent sockets",
        started.elapsed()
    );
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    let cfg = server("header_timeout = \"30s\"\nmax_connections = 10\nmax_connections_per_ip = 3")
        .replacen("header_timeout = \"400ms\"\n", "", 1);
    let h = start_herald(config(&up.url(), &cfg)).await;
    let mut hog = Vec::new();
    for _ in 0..3 {
        hog.push(connect_from([127, 0, 0, 3], h.addr).await);
    }
    // The fourth from the same address is closed without a word...
    let mut fourth = connect_from([127, 0, 0, 3], h.addr).await;
    assert!(closed_within(&mut fourth, Duration::from_secs(2)).await);
    // ...while another address is served at once.
    let status = get_status([127, 0, 0, 1], h.addr, "/api/builds/1").await;
    assert!(status.contains(" 200 "), "{status}");
    drop(hog);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_stream_is_never_idle() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    let h = start_herald(config(
        &up.url(),
        &format!("[sse]\nheartbeat = \"200ms\"\n{}", server("")),
    ))
    .await;
    let mut c = SseClient::connect(&h.url("/api/builds/1"), None).await;
    c.expect_event("snapshot", T).await;
    // Well past idle_timeout, the stream still delivers.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    up.set_json(
        "/api/builds/1",
        json!({"id": 1, "status": "done", "log": "x".repeat(100)}),
    );
    c.expect_event("change after idle_timeout", T).await;
    drop(c);
    h.stop().await;
    up.stop().await;
}
