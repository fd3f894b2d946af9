//! HTTP/2 on herald's port: h2c with prior knowledge next to HTTP/1.1, many SSE streams multiplexed
//! on one connection, a stalled stream that does not hold up the others, no hop-by-hop headers on
//! h2 responses, and curl's view of all this when curl is installed.

mod common;

use std::time::{Duration, Instant};

use common::h2::{self, H2Sse, Windows};
use common::tls::{TestCa, TlsFiles};
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);
const ROUTES: &str = "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"20ms\"\n";

#[tokio::test]
async fn twenty_five_sse_streams_on_one_h2c_connection() {
    const N: usize = 25;
    let up = TestUpstream::start().await;
    for i in 1..=N {
        up.set_json(
            &format!("/api/builds/{i}"),
            json!({"id": i, "status": "queued"}),
        );
    }
    let h = start_herald(config(&up.url(), ROUTES)).await;

    // One TCP connection, HTTP/2 from the first byte (prior knowledge, no upgrade, no TLS).
    let (mut sender, conn) = h2::h2c(h.addr, Windows::default()).await;
    let started = Instant::now();
    let mut streams = Vec::new();
    for i in 1..=N {
        let s = H2Sse::open(&mut sender, &h.url(&format!("/api/builds/{i}"))).await;
        assert_eq!(s.status, 200);
        assert_eq!(s.version, http::Version::HTTP_2);
        assert_eq!(s.headers["content-type"], "text/event-stream");
        streams.push(s);
    }
    let snapshots =
        futures_util::future::join_all(streams.iter_mut().enumerate().map(|(i, s)| async move {
            let ev = s.expect_event("snapshot", T).await;
            assert_eq!(ev.event, "snapshot");
            assert_eq!(ev.json()["data"], json!({"id": i + 1, "status": "queued"}));
        }));
    snapshots.await;
    let all_snapshots = started.elapsed();
    assert_eq!(h.hub.topic_count(), N);

    // Every resource changes; every stream gets its own patch, concurrently.
    for i in 1..=N {
        up.set_json(
            &format!("/api/builds/{i}"),
            json!({"id": i, "status": "running"}),
        );
    }
    let changed = Instant::now();
    futures_util::future::join_all(streams.iter_mut().enumerate().map(|(i, s)| async move {
        let ev = s.expect_event("patch", T).await;
        let mut state = Some(json!({"id": i + 1, "status": "queued"}));
        apply_event(&mut state, &ev);
        assert_eq!(state.unwrap(), json!({"id": i + 1, "status": "running"}));
    }))
    .await;
    eprintln!(
        "{N} streams on one h2c connection: all snapshots in {all_snapshots:?}, all patches {:?} after the change",
        changed.elapsed()
    );

    // The same port still speaks HTTP/1.1 to a client that does not use h2.
    let resp = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .get(h.url("/api/builds/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.status(), 200);

    drop(streams);
    drop(sender);
    h.stop().await;
    conn.abort();
    up.stop().await;
}

#[tokio::test]
async fn a_stalled_stream_does_not_block_the_others() {
    let up = TestUpstream::start().await;
    // Each event carries the whole ~20 KB document, more than the stalled stream's window.
    let pad = "x".repeat(20_000);
    up.set_json("/api/big", json!({"n": 0, "pad": pad}));
    let routes = "[[route]]\npath = \"/api/big\"\ninterval = \"20ms\"\ndiff = \"snapshot\"\n";
    let h = start_herald(config(&up.url(), routes)).await;

    // A small stream window and a large connection window: an unread stream can pin at most
    // 16 KiB of the connection's window.
    let windows = Windows {
        stream: 16 * 1024,
        connection: 4 * 1024 * 1024,
    };
    let (mut sender, conn) = h2::h2c(h.addr, windows).await;
    let stalled = H2Sse::open(&mut sender, &h.url("/api/big")).await;
    assert_eq!(stalled.status, 200);
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut r = H2Sse::open(&mut sender, &h.url("/api/big")).await;
        r.expect_event("snapshot", T).await;
        readers.push(r);
    }

    // 30 changes of 20 KB: 600 KB for the stalled stream, far past its 16 KiB window and the
    // server's 64 KiB send buffer, so it is held back by flow control from the first events on.
    let up_ref = &up;
    let writer = async {
        for n in 1..=30 {
            up_ref.set_json("/api/big", json!({"n": n, "pad": pad}));
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    };
    let reading = futures_util::future::join_all(readers.iter_mut().map(|r| async move {
        // Each reader sees the document advance to the last change (it may skip versions that
        // changed faster than it polled, but it never stalls).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = 0;
        loop {
            let ev = r
                .expect_event("a snapshot with n = 30", deadline - Instant::now())
                .await;
            events += 1;
            if ev.json()["data"]["n"] == 30 {
                return events;
            }
        }
    }));
    let started = Instant::now();
    let (_, counts) = tokio::join!(writer, reading);
    let took = started.elapsed();
    assert!(
        counts.iter().all(|&c| c >= 5),
        "readers got too few events: {counts:?}"
    );
    eprintln!(
        "4 readers next to a stalled stream: {counts:?} events each, last change seen {:?} after the first",
        took
    );
    assert!(
        took < Duration::from_secs(8),
        "readers were held up: {took:?}"
    );

    // The stalled stream was never read; it is still open and, once read, it catches up to the
    // current document (directly or through a resync snapshot).
    assert_eq!(stalled.received, 0);
    let mut stalled = stalled;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = stalled
            .expect_event("the stalled stream to catch up", deadline - Instant::now())
            .await;
        if ev.json()["data"]["n"] == 30 {
            break;
        }
    }

    drop(readers);
    drop(stalled);
    drop(sender);
    h.stop().await;
    conn.abort();
    up.stop().await;
}

#[tokio::test]
async fn h2_responses_carry_no_hop_by_hop_headers() {
    let up = TestUpstream::start().await;
    up.set(
        "/legacy",
        Reply::json(json!({"ok": true}))
            .header("connection", "keep-alive, x-hop")
            .header("keep-alive", "timeout=5")
            .header("x-hop", "per-connection")
            .header("x-kept", "yes"),
    );
    up.set_json("/api/builds/1", json!({"id": 1}));
    let h = start_herald(config(&up.url(), ROUTES)).await;
    let (mut sender, conn) = h2::h2c(h.addr, Windows::default()).await;

    let resp = h2::get(&mut sender, &h.url("/legacy"), false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let headers = resp.headers();
    for name in [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "x-hop",
        "upgrade",
    ] {
        assert!(
            !headers.contains_key(name),
            "{name} on an h2 response: {headers:?}"
        );
    }
    assert_eq!(headers["x-kept"], "yes");

    let sse = H2Sse::open(&mut sender, &h.url("/api/builds/1")).await;
    for name in ["connection", "keep-alive", "transfer-encoding"] {
        assert!(
            !sse.headers.contains_key(name),
            "{name} on an h2 SSE response"
        );
    }

    drop(sse);
    drop(sender);
    h.stop().await;
    conn.abort();
    up.stop().await;
}

#[tokio::test]
async fn curl_speaks_h2c_and_h2_over_tls() {
    if !h2::curl_with_http2() {
        return;
    }
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/7", json!({"id": 7}));

    // Plain listener, HTTP/2 with prior knowledge.
    let h = start_herald(config(&up.url(), ROUTES)).await;
    let url = h.url("/api/builds/7");
    let version = h2::curl(&[
        "-s",
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &url,
    ])
    .await;
    assert_eq!(version, "2");
    let stream = h2::curl(&[
        "-sN",
        "--http2-prior-knowledge",
        "-H",
        "Accept: text/event-stream",
        "--max-time",
        "1",
        &url,
    ])
    .await;
    assert!(
        stream.contains("event: snapshot"),
        "curl h2c stream: {stream}"
    );
    h.stop().await;

    // TLS listener, HTTP/2 by ALPN, curl verifying against the test CA.
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-curl", 70));
    let h = start_herald(config(&up.url(), &format!("{ROUTES}{}", files.toml()))).await;
    let url = h.https_url("/api/builds/7");
    let cacert = ca.path.to_str().unwrap();
    let version = h2::curl(&[
        "-s",
        "--http2",
        "--cacert",
        cacert,
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &url,
    ])
    .await;
    assert_eq!(version, "2");
    let stream = h2::curl(&[
        "-sN",
        "--http2",
        "--cacert",
        cacert,
        "-H",
        "Accept: text/event-stream",
        "--max-time",
        "1",
        &url,
    ])
    .await;
    assert!(
        stream.contains("event: snapshot"),
        "curl h2 stream: {stream}"
    );
    let v11 = h2::curl(&[
        "-s",
        "--http1.1",
        "--cacert",
        cacert,
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &url,
    ])
    .await;
    assert_eq!(v11, "1.1");
    h.stop().await;
    up.stop().await;
}

/// A browser tab's connection (HTTP/2 over TLS, one stream): while it idles, h2 lets go of its
/// buffers (vendor/h2); heartbeats and events must still arrive, and the same connection must
/// still carry a large response and further requests when there is work again.
#[tokio::test]
async fn an_idle_h2_tls_stream_gets_heartbeats_events_and_large_answers_after_h2_let_go() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1, "status": "queued"}));
    // Larger than h2's 16 KiB write buffer and several frames: the buffer grows back and chains.
    let big: Vec<String> = (0..20_000).map(|i| format!("item-{i}")).collect();
    up.set_json("/api/big", json!({ "items": big }));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-h2-idle", 71));
    let h = start_herald(config(
        &up.url(),
        &format!("{ROUTES}[sse]\nheartbeat = \"100ms\"\n{}", files.toml()),
    ))
    .await;
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(ca.client_config(&[b"h2"]))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = h2::handshake(tls, Windows::default()).await;
    let url = h.url("/api/builds/1");
    let mut s = H2Sse::open(&mut sender, &url).await;
    assert_eq!((s.status, s.version), (200, http::Version::HTTP_2));
    let snap = s.expect_event("snapshot", T).await;
    assert_eq!(snap.event, "snapshot");

    // Idle: three heartbeats, each written after the last one's buffers were let go.
    let mut beats = 0;
    let deadline = Instant::now() + T;
    while beats < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = s.next_any(left).await.expect("heartbeats keep coming");
        if ev.comment.is_some() {
            beats += 1;
        }
    }
    // An event after the idle spell.
    up.set_json("/api/builds/1", json!({"id": 1, "status": "running"}));
    let mut state = Some(snap.json()["data"].clone());
    let ev = s.expect_event("patch", T).await;
    apply_event(&mut state, &ev);
    assert_eq!(state.unwrap()["status"], "running");

    // A plain GET on the same connection: a 270 KB answer, byte for byte as the upstream sent it.
    let resp = h2::get(&mut sender, &h.url("/api/big"), false).await;
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got["items"].as_array().unwrap().len(), 20_000);
    assert_eq!(got["items"][19_999], "item-19999");
    // And the stream goes on.
    up.set_json("/api/builds/1", json!({"id": 1, "status": "done"}));
    let ev = s.expect_event("patch", T).await;
    assert!(ev.data.contains("done"), "{}", ev.data);
    drop((s, sender));
    conn.abort();
    h.stop().await;
    up.stop().await;
}
