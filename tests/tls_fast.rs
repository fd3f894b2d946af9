//! HTTP/1.1 streams over TLS (1.3 and 1.2) on the fast path: once the request is read, rustls
//! gives the send key to herald and its buffers are freed; the stream must still get its
//! heartbeats and events, readable by an ordinary rustls client. A head split over records is
//! still taken; requests the path does not take (a plain GET) still reach hyper with nothing lost.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{TestCa, TlsFiles};
use common::*;
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const T: Duration = Duration::from_secs(10);
const STREAM_HEAD: &[u8] =
    b"GET /api/builds/1 HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n";

fn client(
    ca: &TestCa,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(ca.roots())
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn connect(h: &TestHerald, config: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Read until `seen` holds `needle` `times` times (counting from `from`), or fail after `T`.
async fn read_until(
    s: &mut TlsStream<TcpStream>,
    seen: &mut Vec<u8>,
    from: usize,
    needle: &str,
    times: usize,
) {
    let deadline = Instant::now() + T;
    loop {
        let text = String::from_utf8_lossy(&seen[from..]);
        if text.matches(needle).count() >= times {
            return;
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{needle:?} x{times} not seen in time; got:\n{text}"))
            .expect("the stream reads cleanly");
        assert!(
            n > 0,
            "stream ended before {needle:?} x{times}; got:\n{text}"
        );
        seen.extend_from_slice(&chunk[..n]);
    }
}

async fn herald(up: &TestUpstream, files: &TlsFiles) -> TestHerald {
    let routes = "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"20ms\"\n";
    start_herald(config(
        &up.url(),
        &format!("{routes}[sse]\nheartbeat = \"100ms\"\n{}", files.toml()),
    ))
    .await
}

#[tokio::test]
async fn an_idle_tls_stream_gets_heartbeats_and_events_after_rustls_let_go() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1, "status": "queued"}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-fast", 1));
    let h = herald(&up, &files).await;

    let mut s = connect(&h, client(&ca, &rustls::version::TLS13)).await;
    s.write_all(STREAM_HEAD).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, 0, "event: snapshot", 1).await;
    let head = String::from_utf8_lossy(&seen).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    // The fast path's own head (hyper does not close a stream's connection).
    assert!(head.contains("connection: close"), "{head}");

    // Idle: heartbeats, several records sealed by herald after the head and snapshot.
    let mark = seen.len();
    read_until(&mut s, &mut seen, mark, ": heartbeat", 3).await;
    // Then a change.
    up.set_json("/api/builds/1", json!({"id": 1, "status": "running"}));
    let mark = seen.len();
    read_until(&mut s, &mut seen, mark, "running", 1).await;
    // A second stream next to it, as the first one goes on.
    let mut s2 = connect(&h, client(&ca, &rustls::version::TLS13)).await;
    s2.write_all(STREAM_HEAD).await.unwrap();
    let mut seen2 = Vec::new();
    read_until(&mut s2, &mut seen2, 0, "running", 1).await;
    up.set_json("/api/builds/1", json!({"id": 1, "status": "done"}));
    let mark = seen.len();
    read_until(&mut s, &mut seen, mark, "done", 1).await;
    read_until(&mut s2, &mut seen2, 0, "done", 1).await;
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn requests_the_fast_path_does_not_take_still_reach_hyper_over_tls() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1, "status": "queued"}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-fast-other", 2));
    let h = herald(&up, &files).await;

    // A stream head split over two TLS records, with a pause between them.
    let mut s = connect(&h, client(&ca, &rustls::version::TLS13)).await;
    s.write_all(&STREAM_HEAD[..20]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&STREAM_HEAD[20..]).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, 0, ": heartbeat", 2).await;
    assert!(String::from_utf8_lossy(&seen).contains("event: snapshot"));

    // TLS 1.2: the fast path too (its records are framed the TLS 1.2 way).
    let mut s = connect(&h, client(&ca, &rustls::version::TLS12)).await;
    s.write_all(STREAM_HEAD).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut seen, 0, ": heartbeat", 2).await;
    let text = String::from_utf8_lossy(&seen).to_lowercase();
    assert!(text.contains("event: snapshot"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    up.set_json("/api/builds/1", json!({"id": 1, "status": "running"}));
    let mark = seen.len();
    read_until(&mut s, &mut seen, mark, "running", 1).await;

    // A plain GET on TLS 1.3: read by the fast path, answered by hyper.
    let mut s = connect(&h, client(&ca, &rustls::version::TLS13)).await;
    s.write_all(b"GET /api/builds/1 HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut reply))
        .await
        .unwrap()
        .ok();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("running"), "{reply}");
    h.stop().await;
    up.stop().await;
}
