//! herald's own TLS record layer, seen from the client: rustls does the handshake only and hands
//! over the keys; every record after it is opened and sealed by herald. A client whose bytes
//! arrive a few at a time (records split anywhere, its request in the handshake's last flight) is
//! served; a forged record, a key update or a record too large ends that connection alone.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::tls::{TestCa, TlsFiles};
use common::*;
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

async fn herald(up: &TestUpstream, files: &TlsFiles) -> TestHerald {
    let routes = "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"20ms\"\n";
    start_herald(config(
        &up.url(),
        &format!("{routes}[sse]\nheartbeat = \"100ms\"\n{}", files.toml()),
    ))
    .await
}

/// A client driven by hand: `request` is written before the handshake ends, so rustls sends it
/// in the same flight as its Finished; every flight goes out 7 bytes at a time with a pause, so
/// herald's reads end inside records. Reads until `until` is in the reply or the server closes.
async fn trickle(h: &TestHerald, ca: &TestCa, alpn: &[u8], request: &[u8], until: &str) -> String {
    let mut conn = rustls::ClientConnection::new(
        ca.client_config(&[alpn]),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    conn.writer().write_all(request).unwrap();
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut reply = Vec::new();
    let deadline = Instant::now() + T;
    loop {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out).unwrap();
            for piece in out.chunks(7) {
                tcp.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if String::from_utf8_lossy(&reply).contains(until) {
            break;
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, tcp.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{until:?} not seen in time; got:\n{}",
                    String::from_utf8_lossy(&reply)
                )
            })
            .unwrap();
        if n == 0 {
            break;
        }
        conn.read_tls(&mut &chunk[..n]).unwrap();
        conn.process_new_packets().expect("herald's records open");
        let _ = conn.reader().read_to_end(&mut reply);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test]
async fn a_client_whose_records_arrive_in_pieces_is_served() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1, "status": "queued"}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-records", 1));
    let h = herald(&up, &files).await;

    // A proxied GET, through hyper.
    let reply = trickle(
        &h,
        &ca,
        b"http/1.1",
        b"GET /api/builds/1 HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        "queued",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("queued"), "{reply}");

    // A stream, on the fast path: its heartbeats are sealed by herald.
    let reply = trickle(
        &h,
        &ca,
        b"http/1.1",
        b"GET /api/builds/1 HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n",
        ": heartbeat",
    )
    .await;
    assert!(reply.contains("event: snapshot"), "{reply}");

    // HTTP/2: the preface, SETTINGS and a GET in the handshake's last flight, in pieces.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // SETTINGS
    let mut block = vec![0x82, 0x87, 0x04, 13]; // GET, https, :path (literal, 13 bytes)
    block.extend_from_slice(b"/api/builds/1");
    block.extend_from_slice(&[0x01, 9]); // :authority
    block.extend_from_slice(b"localhost");
    let len = (block.len() as u32).to_be_bytes();
    h2.extend_from_slice(&[len[1], len[2], len[3], 0x1, 0x5, 0, 0, 0, 1]); // HEADERS, END_STREAM|END_HEADERS
    h2.extend_from_slice(&block);
    let reply = trickle(&h, &ca, b"h2", &h2, "queued").await;
    assert!(
        reply.contains("queued"),
        "the GET's body in a DATA frame: {reply:?}"
    );
    h.stop().await;
    up.stop().await;
}

/// Open a TLS 1.3 HTTP/1.1 keep-alive connection and check one GET on it.
async fn keep_alive(h: &TestHerald, ca: &TestCa) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut s = common::tls::handshake(h.addr, ca, &[b"http/1.1"])
        .await
        .stream;
    s.write_all(b"GET /api/builds/1 HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    while !String::from_utf8_lossy(&got).contains("queued") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut chunk))
            .await
            .expect("a reply in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    s
}

/// Whether herald closes `s` (end of stream or an error) within `T`.
async fn closed(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    let deadline = Instant::now() + T;
    loop {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline.into(), s.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_forged_record_a_key_update_or_an_oversized_record_ends_only_that_connection() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1, "status": "queued"}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-records-bad", 2));
    let h = herald(&up, &files).await;
    let mut bystander = keep_alive(&h, &ca).await;

    // A record under no key herald has: it does not open, the connection ends.
    let mut s = keep_alive(&h, &ca).await;
    let mut forged = vec![0x17, 3, 3, 0, 40];
    forged.extend_from_slice(&[0xAB; 40]);
    s.get_mut().0.write_all(&forged).await.unwrap();
    assert!(
        closed(&mut s).await,
        "a forged record closes the connection"
    );

    // A KeyUpdate: herald holds no traffic secret to follow it, so it closes (the client
    // reconnects with fresh keys) rather than answer under keys the client dropped.
    let mut s = keep_alive(&h, &ca).await;
    s.get_mut().1.refresh_traffic_keys().unwrap();
    let _ = s
        .write_all(b"GET /api/builds/1 HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    assert!(closed(&mut s).await, "a key update closes the connection");

    // A header announcing more than a record may hold.
    let mut s = keep_alive(&h, &ca).await;
    s.get_mut()
        .0
        .write_all(&[0x17, 3, 3, 0xff, 0xff])
        .await
        .unwrap();
    assert!(
        closed(&mut s).await,
        "an oversized record closes the connection"
    );

    // The first connection never noticed.
    bystander
        .write_all(b"GET /api/builds/1 HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, bystander.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.contains("queued"),
        "{rest}"
    );
    h.stop().await;
    up.stop().await;
}
