//! Resilience under pressure: stuck and slow readers next to fast ones, bursts of changes,
//! reconnect storms, admission limits, amplification caps and hostile input.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

fn big(n: u64) -> serde_json::Value {
    // ~1 MB per state (each change a snapshot, as nothing of it stays the same), so a few
    // unread changes overflow the loopback socket buffers (up to ~4 MB send + ~6 MB receive).
    json!({ "n": n, "blob": format!("{n}").repeat(1_000_000 / format!("{n}").len()) })
}

/// Open a stream on a raw socket, read the response head, then stop reading.
async fn stalled_reader(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s
}

// Several threads: herald's 1 MB diffs must not starve the test's own timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_reader_is_cut_while_fast_readers_keep_up() {
    let up = TestUpstream::start().await;
    up.set_json("/big", big(0));
    let h = start_herald(config(
        &up.url(),
        "[sse]\nslow_timeout = \"5s\"\nhistory = 4\n[[route]]\npath = \"/big\"\ninterval = \"50ms\"\n",
    ))
    .await;
    let mut stuck = stalled_reader(h.addr, "/big").await;
    let mut fast = SseClient::connect(&h.url("/big"), None).await;
    fast.expect_event("snapshot", T).await;

    // Change the state 16 times; the fast reader sees each change without waiting for the stuck
    // reader to be dealt with: a topic held back by it would hold each change for slow_timeout
    // (5 s, long enough that a loaded machine's own lag, seen up to 3.4 s, is not mistaken for it).
    let mut worst = Duration::ZERO;
    for n in 1..=16u64 {
        up.set_json("/big", big(n));
        let t0 = Instant::now();
        loop {
            let ev = fast.expect_event("change", T).await;
            if ev.json()["data"]["n"] == n || ev.event == "patch" {
                break;
            }
        }
        worst = worst.max(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        worst < Duration::from_secs(5),
        "fast reader lagged {worst:?}, as long as the stuck reader's slow_timeout"
    );

    // The stuck reader is marked slow once its events have been pending for slow_timeout (not
    // before this drains it: reading would unstick it), then cut: its connection closes.
    assert!(eventually(Duration::from_secs(20), || h.hub.slow_consumers() >= 1).await);
    let started = Instant::now();
    let mut sink = vec![0u8; 1 << 20];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(8), stuck.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => continue,
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "stuck reader still connected after {:?}",
        started.elapsed()
    );
    // The topic and the fast reader are unaffected.
    up.set_json("/big", big(99));
    let ev = fast.expect_event("after cut", T).await;
    assert!(ev.event == "patch" || ev.json()["data"]["n"] == 99);
    assert_eq!(h.hub.topic_count(), 1);
    h.stop().await;
    up.stop().await;
}

// Several threads: herald's 1 MB diffs must not starve the test's own timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_reading_client_gets_an_error_event_when_cut() {
    // A client that reads only the first bytes and then stops long enough is told why.
    let up = TestUpstream::start().await;
    up.set_json("/big", big(0));
    let h = start_herald(config(
        &up.url(),
        // A short grace makes the hub's sweep run every 100 ms, so the timing below is tight.
        "[sse]\nslow_timeout = \"1s\"\ngrace = \"200ms\"\nhistory = 2\n[[route]]\npath = \"/big\"\ninterval = \"50ms\"\n",
    ))
    .await;
    let mut s = stalled_reader(h.addr, "/big").await;
    // Keep changing the state until herald marks this client slow. Its sockets hold several
    // 1 MB events before they fill, and a loaded herald polls only some of the states, so no
    // fixed count of changes is sure to leave one pending; bounded in count and time instead.
    // Once marked, stop, then drain everything at once: it must end with the error event (the
    // connection is only cut if the client stays stuck longer).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0u64;
    while h.hub.slow_consumers() == 0 && n < 400 && Instant::now() < deadline {
        n += 1;
        up.set_json("/big", big(n));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(
        h.hub.slow_consumers() >= 1,
        "never marked slow after {n} changes"
    );
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&all);
    let tail: String = text
        .chars()
        .rev()
        .take(300)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert!(
        text.contains("event: error") && text.contains("slow-consumer"),
        "no slow-consumer error; read {} bytes ending {tail:?}",
        text.len()
    );
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_burst_of_changes_is_coalesced_per_window() {
    let up = Arc::new(TestUpstream::start().await);
    up.set_json("/hot", json!({"n": 0}));
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/hot\"\ninterval = \"10ms\"\nmin_interval = \"250ms\"\ndiff = \"snapshot\"\n",
    ))
    .await;
    let mut c = SseClient::connect(&h.url("/hot"), None).await;
    c.expect_event("snapshot", T).await;
    // 1,000 changes in about one second.
    let writer = {
        let up = up.clone();
        tokio::spawn(async move {
            for n in 1..=1000u64 {
                up.set_json("/hot", json!({ "n": n }));
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    let started = Instant::now();
    writer.await.unwrap();
    let burst = started.elapsed();
    let mut events = Vec::new();
    let mut stamps = Vec::new();
    let mut last_n = 0;
    while last_n < 1000 {
        let ev = c.expect_event("coalesced change", T).await;
        last_n = ev.json()["data"]["n"].as_u64().unwrap();
        events.push(Instant::now());
        stamps.push(humantime::parse_rfc3339(ev.json()["timestamp"].as_str().unwrap()).unwrap());
    }
    let span = started.elapsed();
    // At most one event per 250 ms window (plus one at each end of the burst).
    let allowed = (span.as_millis() / 250) as usize + 2;
    assert!(
        events.len() <= allowed,
        "{} events for a {burst:?} burst (allowed {allowed})",
        events.len()
    );
    // Herald's own timestamps (when it published) are at least a window apart.
    for w in stamps.windows(2) {
        let gap = w[1].duration_since(w[0]).unwrap_or_default();
        assert!(gap >= Duration::from_millis(245), "events {gap:?} apart");
    }
    h.stop().await;
    Arc::try_unwrap(up).ok().unwrap().stop().await;
}

#[tokio::test]
async fn reconnect_storm_is_spread_by_jittered_retry() {
    let up = TestUpstream::start().await;
    up.set_json("/a", json!({"x": 1}));
    let h = start_herald(config(
        &up.url(),
        "[sse]\nretry = \"1s\"\nretry_jitter = \"4s\"\n[server]\nmax_new_streams_per_sec = 0\n[[route]]\npath = \"/a\"\n",
    ))
    .await;
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(SseClient::connect(&h.url("/a"), None).await);
    }
    let mut first = Vec::new();
    for c in &mut clients {
        let r = c.next_any(T).await.unwrap();
        first.push(r.retry.expect("retry first"));
        c.expect_event("snapshot", T).await;
    }
    h.shutdown.cancel();
    let mut last = Vec::new();
    for c in &mut clients {
        let events = c.read_to_end(T).await;
        let retry = events
            .iter()
            .rev()
            .find_map(|e| e.retry)
            .expect("a retry with shutdown");
        assert!(events.iter().any(|e| e.event == "shutdown"));
        last.push(retry);
    }
    for (name, values, lo, hi) in [
        ("first", &first, 1000, 5000),
        ("shutdown", &last, 1000, 5000),
    ] {
        let min = *values.iter().min().unwrap();
        let max = *values.iter().max().unwrap();
        assert!(min >= lo && max <= hi, "{name}: {min}..{max}");
        // Spread: 200 clients cover most of the window, in many distinct values, none piled up.
        assert!(
            max - min >= (hi - lo) * 6 / 10,
            "{name} retry not spread: {min}..{max}"
        );
        let mut buckets = [0usize; 10];
        for v in values.iter() {
            buckets[((v - lo) * 10 / (hi - lo + 1)) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| b <= 60), "{name}: {buckets:?}");
    }
    tokio::time::timeout(Duration::from_secs(15), h.join)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    up.stop().await;
}

#[tokio::test]
async fn over_max_connections_is_503_with_retry_after() {
    let up = TestUpstream::start().await;
    up.set_json("/a", json!({"x": 1}));
    let h = start_herald(config(
        &up.url(),
        "[server]\nmax_connections = 3\n[[route]]\npath = \"/a\"\n",
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = SseClient::connect(&h.url("/a"), None).await;
        c.expect_event("snapshot", T).await;
        held.push(c);
    }
    let resp = raw_request(
        h.addr,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("retry-after: 2"),
        "{resp}"
    );
    assert!(resp.contains("\"error\":\"overloaded\""));
    drop(held);
    // Capacity comes back when streams end.
    assert!(
        eventually(T, || true).await
            && tokio::time::timeout(T, async {
                loop {
                    let r = raw_request(
                        h.addr,
                        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        Duration::from_secs(1),
                    )
                    .await;
                    if r.starts_with("HTTP/1.1 200") {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .is_ok()
    );
    h.stop().await;
    up.stop().await;
}

// Several threads: herald's 1 MB diffs must not starve the test's own timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_stream_rate_and_per_address_caps() {
    let up = TestUpstream::start().await;
    up.set_json("/a", json!({"x": 1}));
    let h = start_herald(config(
        &up.url(),
        "[server]\nmax_new_streams_per_sec = 10\nmax_streams_per_ip = 1000\n[[route]]\npath = \"/a\"\n",
    ))
    .await;
    let mut ok = 0;
    let mut refused = Vec::new();
    let mut held = Vec::new();
    // Bursts of 30 concurrent opens: one after the other, a loaded machine may open them no
    // faster than the bucket refills (10/s) and nothing is ever refused. Bounded in rounds.
    let burst = Instant::now();
    let url = h.url("/a");
    for _ in 0..5 {
        let opens = (0..30).map(|_| SseClient::connect(&url, None));
        for c in futures_util::future::join_all(opens).await {
            if c.status == 200 {
                ok += 1;
                held.push(c);
            } else {
                refused.push((c.status, c.headers.get("retry-after").cloned()));
            }
        }
        if !refused.is_empty() {
            break;
        }
    }
    // A full bucket (10) plus what refilled while the burst ran.
    let refill = (burst.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        ok >= 10 && ok <= 10 + refill,
        "{ok} admitted in a burst at 10/s ({refill} refilled)"
    );
    assert!(!refused.is_empty());
    assert!(
        refused
            .iter()
            .all(|(s, r)| *s == 503 && r.as_ref().is_some_and(|v| v == "1")),
        "{refused:?}"
    );
    drop(held);
    h.stop().await;

    // Per address: 3 streams from 127.0.0.1, then 429; another address is not affected.
    let h = start_herald(config(
        &up.url(),
        "[server]\nmax_streams_per_ip = 3\n[[route]]\npath = \"/a\"\n",
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let c = SseClient::connect(&h.url("/a"), None).await;
        assert_eq!(c.status, 200);
        held.push(c);
    }
    let c = SseClient::connect(&h.url("/a"), None).await;
    assert_eq!(c.status, 429);
    let other = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let c2 = SseClient::connect_with(&other, &h.url("/a"), None, &[]).await;
    assert_eq!(c2.status, 200, "another address has its own budget");
    drop(held);
    // Places come back when streams close.
    let mut reopened = false;
    for _ in 0..100 {
        let c = SseClient::connect(&h.url("/a"), None).await;
        if c.status == 200 {
            reopened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reopened);
    drop(c2);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn random_query_strings_cannot_multiply_upstream_polls() {
    let up = TestUpstream::start().await;
    up.set_json("/items", json!({"items": []}));
    let h = start_herald(config(
        &up.url(),
        "[server]\nmax_new_streams_per_sec = 0\n[[route]]\npath = \"/items\"\ninterval = \"200ms\"\nquery = [\"page\"]\nmax_topics = 20\n",
    ))
    .await;
    let client = reqwest::Client::new();
    // 1,000 streams with distinct junk parameters: one topic, one poller.
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let client = client.clone();
        let url = h.url(&format!("/items?cb={i}&r={}", i * 7919));
        tasks.push(tokio::spawn(async move {
            let mut c = SseClient::connect_with(&client, &url, None, &[]).await;
            c.expect_event("snapshot", T).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().json()["topic"], "/items");
    }
    assert_eq!(h.hub.topic_count(), 1);
    let upstream_resources: std::collections::HashSet<String> =
        up.seen().into_iter().map(|s| s.path_and_query).collect();
    assert_eq!(upstream_resources.len(), 1, "{upstream_resources:?}");
    // The 1,000 streams have closed: one stays on the page-less topic, or a slow loop below
    // outlasts its grace and it closes, leaving room for a 20th page.
    let mut keep = SseClient::connect(&h.url("/items"), None).await;
    keep.expect_event("snapshot", T).await;

    // Distinct allowed values are distinct topics, capped per route: the 21st gets 429.
    let mut held = Vec::new();
    let mut refused = 0;
    for page in 0..30 {
        let c = SseClient::connect(&h.url(&format!("/items?page={page}")), None).await;
        match c.status {
            200 => held.push(c),
            429 => refused += 1,
            s => panic!("status {s}"),
        }
    }
    assert_eq!(
        held.len(),
        19,
        "20 topics in all, one of them the page-less /items"
    );
    assert_eq!(refused, 11);
    assert!(h.hub.topic_count() <= 20);
    drop(keep);
    h.stop().await;

    // `unknown_query = "reject"` refuses instead of dropping, before anything is polled.
    let hits = up.total_hits();
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/items\"\nquery = [\"page\"]\nunknown_query = \"reject\"\n",
    ))
    .await;
    let c = SseClient::connect(&h.url("/items?page=1&cb=3"), None).await;
    assert_eq!(c.status, 400);
    assert_eq!(up.total_hits(), hits);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn hostile_headers_and_ids_get_clear_answers() {
    let up = TestUpstream::start().await;
    up.set_json("/a", json!({"x": 1}));
    let h = start_herald(config(&up.url(), "[[route]]\npath = \"/a\"\n")).await;
    // Invalid UTF-8 and absurd values in Last-Event-ID: a fresh snapshot, never an error.
    for id in [
        &b"\xff\xfe\xfd"[..],
        b"99999999999999999999-1",
        b"-",
        b"a-b-c-d",
        &[b'z'; 4000][..],
    ] {
        let mut req = b"GET /a HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nConnection: close\r\nLast-Event-ID: ".to_vec();
        req.extend_from_slice(id);
        req.extend_from_slice(b"\r\n\r\n");
        let resp = raw_request(h.addr, &req, Duration::from_millis(600)).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains("event: snapshot"), "{resp}");
    }
    // An absurd query string: refused by the header limit, not buffered or polled.
    let q = "x".repeat(200_000);
    let req = format!("GET /a?{q} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    let resp = raw_request(h.addr, req.as_bytes(), Duration::from_secs(2)).await;
    assert!(
        resp.is_empty()
            || resp.starts_with("HTTP/1.1 431")
            || resp.starts_with("HTTP/1.1 414")
            || resp.starts_with("HTTP/1.1 400"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    // Binary garbage in Accept: not a stream, passed through.
    let resp = raw_request(
        h.addr,
        b"GET /a HTTP/1.1\r\nHost: x\r\nAccept: \xff\xfe\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("\"x\":1") && !resp.contains("event:"),
        "{resp}"
    );
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn streams_per_credential_are_capped_across_addresses() {
    let up = TestUpstream::start().await;
    up.set_json("/me", json!({"inbox": 3}));
    let h = start_herald(config(
        &up.url(),
        "[server]\nmax_streams_per_credential = 2\n[[route]]\npath = \"/me\"\n",
    ))
    .await;
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let alice = [("cookie", "session=alice")];
    let mut held = Vec::new();
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let c = SseClient::connect_with(&from(ip), &h.url("/me"), None, &alice).await;
        assert_eq!(c.status, 200);
        held.push(c);
    }
    // A third stream with the same session, even from another address: 429.
    let c = SseClient::connect_with(&from("127.0.0.3"), &h.url("/me"), None, &alice).await;
    assert_eq!(c.status, 429);
    // Another user and an anonymous client are not affected.
    let bob = [("cookie", "session=bob")];
    let c = SseClient::connect_with(&from("127.0.0.3"), &h.url("/me"), None, &bob).await;
    assert_eq!(c.status, 200);
    held.push(c);
    let c = SseClient::connect(&h.url("/me"), None).await;
    assert_eq!(c.status, 200);
    held.push(c);
    drop(held);
    h.stop().await;
    up.stop().await;
}

/// A client that keeps sending bytes after its stream request (a pipelined request, garbage):
/// herald reads and drops them without answering, the stream goes on delivering, herald does
/// not spin on the input (other streams still get their changes), and the connection closes
/// cleanly when the client goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_sending_after_its_request_still_gets_its_stream() {
    let up = TestUpstream::start().await;
    up.set_json("/a", json!({"n": 0}));
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/a\"\ninterval = \"50ms\"\n",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    // The stream request and, in the same write, a pipelined request herald will not answer.
    s.write_all(
        b"GET /a HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\nGET /other HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.into_split();
    // Then 4 MB of garbage, as fast as herald takes it.
    let flood = tokio::spawn(async move {
        let junk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            if wr.write_all(&junk).await.is_err() {
                break;
            }
        }
        wr
    });
    let mut watcher = SseClient::connect(&h.url("/a"), None).await;
    let snapshot = watcher
        .next_event(T)
        .await
        .expect("the other watcher's snapshot");
    assert_eq!(snapshot.event, "snapshot");
    let mut text = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + T;
    for n in 1..=3u64 {
        up.set_json("/a", json!({"n": n}));
        // A change of a one-field document comes as a snapshot (smaller than the patch).
        let needle = format!("\"n\":{n}");
        while !String::from_utf8_lossy(&text).contains(&needle) {
            let Ok(read) = tokio::time::timeout_at(deadline, rd.read(&mut buf)).await else {
                panic!(
                    "the flooding client got no n = {n}: {}",
                    String::from_utf8_lossy(&text)
                );
            };
            let k = read.unwrap();
            assert!(
                k > 0,
                "herald closed the stream: {}",
                String::from_utf8_lossy(&text)
            );
            text.extend_from_slice(&buf[..k]);
        }
        // A quiet client on the same topic is not held up by the flood.
        let mut seen = false;
        for _ in 0..10 {
            let ev = watcher
                .next_event(T)
                .await
                .expect("the other watcher's event");
            if ev.data.contains(&needle) {
                seen = true;
                break;
            }
        }
        assert!(seen, "the other watcher never saw n = {n}");
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Exactly one response: the pipelined request got none.
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    let wr = flood.await.unwrap();
    drop((rd, wr));
    h.stop().await;
}
