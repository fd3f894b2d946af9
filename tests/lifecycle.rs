//! Lifecycle of streams and topics (issue 3, points 3, 5 and 8): heartbeats on idle streams, a
//! disconnecting client freeing its watcher at once, topics and pollers closing after the grace
//! period, no task left behind, and graceful shutdown (a last `shutdown` event on every stream,
//! in-flight pass-through finished, all within the drain deadline).

mod common;

use std::time::Duration;

use common::*;
use herald::routes::TopicKey;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(5);

fn cfg(sse: &str, extra: &str) -> String {
    format!("[sse]\n{sse}\n{extra}\n[[route]]\npath = \"/api/t/{{id}}\"\ninterval = \"50ms\"\n")
}

fn key(path: &str) -> TopicKey {
    TopicKey {
        route: "/api/t/{id}".into(),
        resource: path.into(),
        vary: 0,
    }
}

/// Connect and read up to the first event (the snapshot), so the watcher is registered.
async fn subscribed(client: &reqwest::Client, url: &str) -> SseClient {
    let mut c = SseClient::connect_with(client, url, None, &[]).await;
    assert_eq!(c.status, 200);
    let snap = c.expect_event("snapshot", T).await;
    assert_eq!(snap.event, "snapshot");
    c
}

/// An SSE request over a bare TCP socket, for what a client library hides: the exact bytes, and
/// closing the socket while the stream is idle.
struct RawStream {
    sock: TcpStream,
    bytes: Vec<u8>,
}

impl RawStream {
    async fn open(addr: std::net::SocketAddr, path: &str) -> RawStream {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        sock.write_all(req.as_bytes()).await.unwrap();
        RawStream {
            sock,
            bytes: Vec::new(),
        }
    }

    /// Read until `needle` has arrived (anywhere in the stream so far, counting from `from`).
    async fn read_until(&mut self, from: usize, needle: &[u8], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(i) = self.bytes[from..]
                .windows(needle.len())
                .position(|w| w == needle)
            {
                return from + i + needle.len();
            }
            let n = tokio::time::timeout_at(deadline, self.sock.read(&mut chunk))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{:?} not seen within {timeout:?}; got {:?}",
                        String::from_utf8_lossy(needle),
                        String::from_utf8_lossy(&self.bytes)
                    )
                })
                .unwrap();
            assert!(n > 0, "connection closed before {needle:?}");
            self.bytes.extend_from_slice(&chunk[..n]);
        }
    }
}

#[tokio::test]
async fn heartbeat_comment_arrives_on_an_idle_stream() {
    let up = TestUpstream::start().await;
    up.set_json("/api/t/1", json!({"idle": true}));
    let h = start_herald(config(&up.url(), &cfg("heartbeat = \"100ms\"", ""))).await;

    let client = reqwest::Client::new();
    let mut c = subscribed(&client, &h.url("/api/t/1")).await;
    let id = c.last_event_id();
    let mut last = Instant::now();
    for _ in 0..3 {
        let item = c.next_any(T).await.expect("a heartbeat");
        let gap = last.elapsed();
        last = Instant::now();
        assert_eq!(item.comment.as_deref(), Some("heartbeat"), "{item:?}");
        assert!(item.event.is_empty() && item.data.is_empty() && item.retry.is_none());
        // Due after 100 ms of silence, and late by at most a maintenance tick (heartbeat / 4).
        assert!(
            gap >= Duration::from_millis(60) && gap <= Duration::from_millis(600),
            "heartbeat after {gap:?}"
        );
    }
    assert_eq!(c.last_event_id(), id, "a comment is not an event");

    // On the wire it is exactly a comment line and a blank line.
    let mut raw = RawStream::open(h.addr, "/api/t/1").await;
    let at = raw.read_until(0, b"event: snapshot\n", T).await;
    raw.read_until(at, b": heartbeat\n\n", T).await;

    drop((c, raw));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn idle_client_that_disconnects_frees_its_watcher_at_once() {
    let up = TestUpstream::start().await;
    up.set_json("/api/t/1", json!({"v": 1}));
    // A heartbeat far away: nothing is written to the idle stream, so only reading can notice the
    // client has gone.
    let h = start_herald(config(
        &up.url(),
        &cfg("heartbeat = \"60s\"\ngrace = \"30s\"", ""),
    ))
    .await;

    // A bare socket, closed while the stream is idle.
    let mut raw = RawStream::open(h.addr, "/api/t/1").await;
    raw.read_until(0, b"event: snapshot\n", T).await;
    let topic = h.hub.topic(&key("/api/t/1")).expect("topic is live");
    assert_eq!(topic.channel.watcher_count(), 1);
    drop(raw);
    let closed = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || topic.channel.watcher_count()
            == 0)
        .await,
        "an idle closed connection was not noticed"
    );
    let noticed = closed.elapsed();
    assert!(
        noticed < Duration::from_millis(500),
        "noticed after {noticed:?}"
    );

    // The same through a client library that drops the response mid-stream.
    let client = reqwest::Client::new();
    let c = subscribed(&client, &h.url("/api/t/1")).await;
    assert_eq!(topic.channel.watcher_count(), 1);
    drop(c);
    assert!(
        eventually(Duration::from_millis(500), || topic.channel.watcher_count()
            == 0)
        .await
    );
    assert_eq!(
        h.hub.topic_count(),
        1,
        "the topic itself waits out its grace period"
    );

    drop(topic);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn dropped_streams_close_their_topics_and_stop_polling() {
    let up = TestUpstream::start().await;
    let paths: Vec<String> = (0..10).map(|i| format!("/api/t/{i}")).collect();
    for p in &paths {
        up.set_json(p, json!({"topic": p}));
    }
    let h = start_herald(config(&up.url(), &cfg("grace = \"200ms\"", ""))).await;

    let client = reqwest::Client::new();
    let mut streams = Vec::new();
    for _ in 0..20 {
        for p in &paths {
            streams.push(subscribed(&client, &h.url(p)).await);
        }
    }
    assert_eq!(h.hub.topic_count(), 10);
    for p in &paths {
        let t = h.hub.topic(&key(p)).expect("topic");
        assert_eq!(t.channel.watcher_count(), 20, "{p}");
    }

    drop(streams);
    let dropped = Instant::now();
    // Grace (200 ms) plus a sweep tick (100 ms) plus slack.
    assert!(
        eventually(Duration::from_secs(2), || h.hub.topic_count() == 0).await,
        "{} topics left",
        h.hub.topic_count()
    );
    let closed_after = dropped.elapsed();
    assert!(
        closed_after >= Duration::from_millis(150),
        "closed before grace: {closed_after:?}"
    );
    assert!(
        closed_after <= Duration::from_millis(1000),
        "closed late: {closed_after:?}"
    );

    // Pollers are gone: no request for several intervals (after any that was already in flight).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hits = up.total_hits();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        up.total_hits(),
        hits,
        "upstream still polled after topics closed"
    );

    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn opening_and_dropping_streams_leaves_no_task_behind() {
    let up = TestUpstream::start().await;
    up.set_json("/api/t/1", json!({"v": 1}));
    let h = start_herald(config(&up.url(), &cfg("grace = \"50ms\"", ""))).await;
    let client = reqwest::Client::new();
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };

    // Warm up once, so pooled connections (herald → upstream) exist in both measurements.
    let c = subscribed(&client, &h.url("/api/t/1")).await;
    drop(c);
    assert!(eventually(T, || h.hub.topic_count() == 0).await);
    // Let the warm-up's connection tasks finish before taking the baseline (nothing to await).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = alive();

    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(subscribed(&client, &h.url("/api/t/1")).await);
    }
    let during = alive();
    assert!(
        during >= before + 100,
        "{before} → {during}: one task per connection expected"
    );
    drop(streams);

    assert!(eventually(T, || h.hub.topic_count() == 0).await);
    let settled = eventually(T, || alive() <= before + 2).await;
    assert!(
        settled,
        "tasks: {before} before, {during} with 100 streams, {} after",
        alive()
    );

    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn shutdown_sends_a_last_event_to_every_stream_and_drains() {
    let up = TestUpstream::start().await;
    up.set_json("/api/t/1", json!({"v": 1}));
    up.set_json("/api/t/2", json!({"v": 2}));
    let drain = Duration::from_secs(3);
    let h = start_herald(config(
        &up.url(),
        &cfg(
            "retry = \"2s\"\nretry_jitter = \"1s\"",
            "[server]\ndrain_timeout = \"3s\"",
        ),
    ))
    .await;

    let client = reqwest::Client::new();
    let mut streams = Vec::new();
    for i in 0..8 {
        let path = format!("/api/t/{}", 1 + i % 2);
        streams.push((path.clone(), subscribed(&client, &h.url(&path)).await));
    }

    let started = Instant::now();
    h.shutdown.cancel();
    let join = tokio::spawn(tokio::time::timeout(drain, h.join));
    for (path, c) in &mut streams {
        let id = c.last_event_id();
        let items = c.read_to_end(drain).await;
        let n = items.len();
        assert!(n >= 2, "{items:?}");
        let (retry, last) = (&items[n - 2], &items[n - 1]);
        assert!(
            retry.retry.is_some_and(|r| (2000..=4000).contains(&r)),
            "a retry line before the last event: {items:?}"
        );
        assert_eq!(last.event, "shutdown", "{items:?}");
        let env = last.json();
        assert_eq!(env["type"], "shutdown");
        assert_eq!(env["topic"], path.as_str());
        // It carries no id: a reconnect resumes from the last real event.
        assert_eq!(c.last_event_id(), id);
    }
    join.await
        .unwrap()
        .expect("herald stops within the drain timeout")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < drain, "took {:?}", started.elapsed());
    // Stopped accepting.
    assert!(TcpStream::connect(h.addr).await.is_err());

    drop(streams);
    up.stop().await;
}

#[tokio::test]
async fn pass_through_in_flight_completes_during_shutdown() {
    let up = TestUpstream::start().await;
    up.set_json("/api/t/1", json!({"v": 1}));
    up.set(
        "/slow",
        Reply::json(json!({"slow": true})).delayed(Duration::from_millis(300)),
    );
    let drain = Duration::from_secs(3);
    let h = start_herald(config(
        &up.url(),
        &cfg("", "[server]\ndrain_timeout = \"3s\""),
    ))
    .await;
    let client = reqwest::Client::new();
    let mut stream = subscribed(&client, &h.url("/api/t/1")).await;

    let req = tokio::spawn(client.get(h.url("/slow")).send());
    assert!(
        eventually(T, || up.hits("/slow") == 1).await,
        "request reached the upstream"
    );
    let started = Instant::now();
    h.shutdown.cancel();

    let resp = req
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap(),
        json!({"slow": true})
    );
    let items = stream.read_to_end(drain).await;
    assert_eq!(items.last().map(|e| e.event.as_str()), Some("shutdown"));
    tokio::time::timeout(drain, h.join)
        .await
        .expect("herald stops within the drain timeout")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < drain);

    up.stop().await;
}

#[tokio::test]
async fn drain_deadline_bounds_shutdown() {
    let up = TestUpstream::start().await;
    up.set(
        "/stuck",
        Reply::json(json!({"late": true})).delayed(Duration::from_secs(8)),
    );
    let h = start_herald(config(
        &up.url(),
        &cfg("", "[server]\ndrain_timeout = \"300ms\""),
    ))
    .await;
    let client = reqwest::Client::new();
    let req = tokio::spawn(client.get(h.url("/stuck")).send());
    assert!(eventually(T, || up.hits("/stuck") == 1).await);

    let started = Instant::now();
    h.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), h.join)
        .await
        .expect("herald stops at the drain deadline, not when the request ends")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "did not wait to drain: {took:?}"
    );
    // The connection left at the deadline is closed, not left to finish in the background.
    let outcome = tokio::time::timeout(Duration::from_secs(2), req)
        .await
        .expect("the in-flight request ends at the deadline, not when the upstream answers")
        .unwrap();
    assert!(
        outcome.is_err(),
        "expected a closed connection, got {outcome:?}"
    );
    up.stop().await;
}

fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

#[tokio::test]
async fn h2_stream_reset_frees_its_watcher() {
    let up = TestUpstream::start().await;
    up.set_json("/api/t/1", json!({"v": 1}));
    let h = start_herald(config(
        &up.url(),
        &cfg("heartbeat = \"60s\"\ngrace = \"30s\"", ""),
    ))
    .await;
    // Three streams multiplexed on one HTTP/2 connection; dropping one resets only that stream.
    let client = h2_client();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let c = subscribed(&client, &h.url("/api/t/1")).await;
        assert_eq!(c.headers["content-type"], "text/event-stream");
        streams.push(c);
    }
    let topic = h.hub.topic(&key("/api/t/1")).expect("topic");
    assert_eq!(topic.channel.watcher_count(), 3);
    streams.pop();
    assert!(
        eventually(Duration::from_millis(500), || topic.channel.watcher_count()
            == 2)
        .await,
        "an HTTP/2 stream reset did not free its watcher"
    );
    // The others on the same connection are still live.
    up.set_json("/api/t/1", json!({"v": 2}));
    for c in &mut streams {
        let mut state = Some(json!({"v": 1}));
        apply_event(&mut state, &c.expect_event("the change", T).await);
        assert_eq!(state, Some(json!({"v": 2})));
    }
    drop(streams);
    assert!(
        eventually(Duration::from_millis(500), || topic.channel.watcher_count()
            == 0)
        .await
    );

    drop(topic);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn shutdown_ends_h2_streams_with_a_last_event() {
    let up = TestUpstream::start().await;
    up.set_json("/api/t/1", json!({"v": 1}));
    let drain = Duration::from_secs(3);
    let h = start_herald(config(
        &up.url(),
        &cfg("", "[server]\ndrain_timeout = \"3s\""),
    ))
    .await;
    let client = h2_client();
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(subscribed(&client, &h.url("/api/t/1")).await);
    }

    let started = Instant::now();
    h.shutdown.cancel();
    let join = tokio::spawn(tokio::time::timeout(drain, h.join));
    for c in &mut streams {
        let items = c.read_to_end(drain).await;
        let n = items.len();
        assert!(n >= 2 && items[n - 2].retry.is_some(), "{items:?}");
        assert_eq!(items[n - 1].event, "shutdown", "{items:?}");
    }
    join.await
        .unwrap()
        .expect("herald stops within the drain timeout")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < drain);

    drop(streams);
    up.stop().await;
}

/// The kernel's timer on herald's side of the connection from `client` (a local address), as
/// `/proc/net/tcp` shows it: 0 none, 1 retransmit, 2 keepalive, 4 zero-window probe.
fn server_side_timer(herald: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<u8> {
    let hex = |a: std::net::SocketAddr| format!(":{:04X}", a.port());
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, timer) = (f.get(1)?, f.get(2)?, f.get(5)?);
        (local.ends_with(&hex(herald)) && remote.ends_with(&hex(client)))
            .then(|| u8::from_str_radix(timer.split(':').next()?, 16).ok())
            .flatten()
    })
}

#[tokio::test]
async fn the_kernel_probes_quiet_connections_for_a_dead_peer() {
    // No h2 PINGs and no timers of herald's own: SO_KEEPALIVE (and TCP_USER_TIMEOUT) on every
    // accepted socket. A stream whose heartbeats were acknowledged sits with the keepalive timer
    // armed on herald's side, which it would not be without SO_KEEPALIVE.
    let up = TestUpstream::start().await;
    up.set_json("/api/t/1", json!({"n": 1}));
    let h = start_herald(config(&up.url(), &cfg("heartbeat = \"60s\"", ""))).await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /api/t/1 HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    while !String::from_utf8_lossy(&got).contains("snapshot") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("the snapshot in time")
            .unwrap();
        assert!(n > 0, "stream closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    let client = s.local_addr().unwrap();
    assert!(
        eventually(T, || server_side_timer(h.addr, client) == Some(2)).await,
        "herald's socket has no keepalive timer: {:?}",
        server_side_timer(h.addr, client)
    );
    drop(s);
    h.stop().await;
    up.stop().await;
}
