//! gzip end to end: SSE streams compressed once per event for all watchers and decodable event by
//! event, valid gzip files when they end, identity for clients that do not ask; pass-through
//! bodies compressed only when the upstream did not.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);
const GZIP: &[(&str, &str)] = &[("accept-encoding", "gzip")];
/// Fast polls, no heartbeats (they would interleave with the blocks these tests compare).
const ROUTE: &str =
    "[sse]\nheartbeat = \"60s\"\n[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"20ms\"\n";

/// A build document of about 2 KB, as a CI dashboard would poll.
fn build(step: usize) -> serde_json::Value {
    let steps: Vec<_> = (0..20)
        .map(|i| {
            json!({
                "id": i,
                "name": format!("step-{i}: compile and test the package"),
                "status": if i < step { "passed" } else if i == step { "running" } else { "queued" },
                "log": format!("https://ci.example.com/builds/42/steps/{i}/log"),
            })
        })
        .collect();
    json!({"id": 42, "branch": "main", "step": step, "steps": steps})
}

async fn gzip_client(h: &TestHerald, path: &str) -> SseClient {
    let c = SseClient::connect_with(&reqwest::Client::new(), &h.url(path), None, GZIP).await;
    assert_eq!(c.status, 200);
    assert_eq!(c.headers["content-encoding"], "gzip");
    assert_eq!(c.headers["content-type"], "text/event-stream");
    assert!(vary_has(&c.headers, "accept-encoding"), "{:?}", c.headers);
    assert!(c.gzip.is_some());
    c
}

fn vary_has(h: &http::HeaderMap, token: &str) -> bool {
    h.get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The bytes a stream starts with: header, then its own `retry:` block.
fn prelude_len(c: &SseClient, retry: u64) -> usize {
    let mut block = Vec::new();
    herald::sse::gzip::deflate_block(format!("retry: {retry}\n\n").as_bytes(), &mut block);
    let mut expected = herald::sse::gzip::HEADER.to_vec();
    expected.extend_from_slice(&block);
    assert!(
        c.raw.starts_with(&expected),
        "stream starts with header + retry block"
    );
    expected.len()
}

#[tokio::test]
async fn each_event_is_decodable_before_the_next_is_published() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/42", build(0));
    let h = start_herald(config(&up.url(), ROUTE)).await;
    let mut c = gzip_client(&h, "/api/builds/42").await;
    assert!(c.next_any(T).await.expect("retry").retry.is_some());
    let snap = c.expect_event("snapshot", T).await;
    let mut state = None;
    apply_event(&mut state, &snap);
    for step in 1..=6 {
        // The next change is published only after this one was decoded: an event the compressor
        // held back would time out here.
        up.set_json("/api/builds/42", build(step));
        let ev = c.expect_event("the change, decoded from gzip", T).await;
        apply_event(&mut state, &ev);
        assert_eq!(state.as_ref(), Some(&build(step)), "step {step}");
        // Each event ends in a full flush: the bytes so far end with a sync marker.
        assert!(c.raw.ends_with(&[0, 0, 0xff, 0xff]), "step {step}");
    }
    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn two_gzip_watchers_receive_identical_event_blocks() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/42", build(0));
    let h = start_herald(config(&up.url(), ROUTE)).await;
    let mut a = gzip_client(&h, "/api/builds/42").await;
    let mut b = gzip_client(&h, "/api/builds/42").await;
    let ra = a.next_any(T).await.unwrap().retry.unwrap();
    let rb = b.next_any(T).await.unwrap().retry.unwrap();
    for c in [&mut a, &mut b] {
        c.expect_event("snapshot", T).await;
    }
    for step in 1..=3 {
        up.set_json("/api/builds/42", build(step));
        for c in [&mut a, &mut b] {
            c.expect_event("change", T).await;
        }
    }
    // After the per-client prelude, both streams are the same bytes: the events were
    // compressed once and shared.
    let shared_a = &a.raw[prelude_len(&a, ra)..];
    let shared_b = &b.raw[prelude_len(&b, rb)..];
    assert!(!shared_a.is_empty());
    assert_eq!(shared_a, shared_b);
    // The shared part decodes on its own (no reference to the prelude): raw deflate.
    let mut alone = GzipInflater::default();
    alone.feed(&herald::sse::gzip::HEADER);
    let text = String::from_utf8(alone.feed(shared_a)).unwrap();
    assert!(text.contains("event: snapshot"), "{text}");
    assert_eq!(
        text.matches("\n\n").count(),
        4,
        "snapshot + 3 changes: {text}"
    );
    drop((a, b));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_finished_stream_is_a_valid_gzip_file() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/42", build(0));
    let h = start_herald(config(&up.url(), ROUTE)).await;
    let mut c = gzip_client(&h, "/api/builds/42").await;
    c.expect_event("snapshot", T).await;
    up.set_json("/api/builds/42", build(1));
    c.expect_event("change", T).await;

    // Shutdown sends the last event, then the trailer, then ends the body.
    let (items, ()) = tokio::join!(c.read_to_end(T), h.stop());
    assert!(items.iter().any(|e| e.event == "shutdown"), "{items:?}");

    // Decoded end to end by a standard decoder, which checks CRC-32 and ISIZE.
    let mut whole = Vec::new();
    flate2::read::GzDecoder::new(&c.raw[..])
        .read_to_end(&mut whole)
        .expect("a valid gzip member");
    let incremental = &c.gzip.as_ref().unwrap().text;
    assert_eq!(&whole, incremental);
    let (crc, isize) = c.raw[c.raw.len() - 8..].split_at(4);
    assert_eq!(
        u32::from_le_bytes(crc.try_into().unwrap()),
        crc32fast::hash(&whole)
    );
    assert_eq!(
        u32::from_le_bytes(isize.try_into().unwrap()),
        whole.len() as u32
    );
    let text = String::from_utf8(whole).unwrap();
    assert!(text.starts_with("retry: "), "{text}");
    assert!(text.contains("event: snapshot") && text.contains("event: shutdown"));
    up.stop().await;
}

#[tokio::test]
async fn identity_without_accept_encoding_or_when_disabled() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/42", build(0));
    let h = start_herald(config(&up.url(), ROUTE)).await;
    let mut c = SseClient::connect(&h.url("/api/builds/42"), None).await;
    assert!(c.headers.get("content-encoding").is_none());
    assert!(vary_has(&c.headers, "accept-encoding"));
    c.expect_event("snapshot", T).await;
    assert!(c.raw.starts_with(b"retry: "));
    drop(c);
    h.stop().await;

    let off = format!("[compression]\nenabled = false\n{ROUTE}");
    let h = start_herald(config(&up.url(), &off)).await;
    let mut c = SseClient::connect_with(
        &reqwest::Client::new(),
        &h.url("/api/builds/42"),
        None,
        GZIP,
    )
    .await;
    assert!(c.headers.get("content-encoding").is_none());
    assert!(c.headers.get("vary").is_none());
    c.expect_event("snapshot", T).await;
    drop(c);
    h.stop().await;
    up.stop().await;
}

async fn get(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn pass_through_compressed_only_when_useful_and_not_already_done() {
    let up = TestUpstream::start().await;
    let big = build(3).to_string();
    up.set(
        "/api/big",
        Reply::raw(Some("application/json"), big.as_bytes()).header("etag", "\"v1\""),
    );
    up.set("/api/tiny", Reply::json(json!({"ok": true})));
    up.set("/api/png", Reply::raw(Some("image/png"), big.as_bytes()));
    let mut pre = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    pre.write_all(big.as_bytes()).unwrap();
    let pre = pre.finish().unwrap();
    up.set(
        "/api/pre",
        Reply::raw(Some("application/json"), &pre).header("content-encoding", "gzip"),
    );
    let h = start_herald(config(&up.url(), ROUTE)).await;

    // Large, compressible, accepted: gzip, streamed (no Content-Length), weak ETag.
    let r = get(&h.url("/api/big"), GZIP).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert!(r.headers().get("content-length").is_none());
    assert!(vary_has(r.headers(), "accept-encoding"));
    assert_eq!(r.headers()["etag"], "W/\"v1\"");
    let body = r.bytes().await.unwrap();
    assert!(
        body.len() < big.len() / 2,
        "{} of {}",
        body.len(),
        big.len()
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, big);

    // Not accepted: identity, but caches are told it varies.
    let r = get(&h.url("/api/big"), &[]).await;
    assert!(r.headers().get("content-encoding").is_none());
    assert!(vary_has(r.headers(), "accept-encoding"));
    assert_eq!(r.headers()["etag"], "\"v1\"");
    assert_eq!(r.bytes().await.unwrap(), big.as_bytes());

    // Too small, or not compressible: untouched.
    for path in ["/api/tiny", "/api/png"] {
        let r = get(&h.url(path), GZIP).await;
        assert!(r.headers().get("content-encoding").is_none(), "{path}");
        assert!(r.headers().get("content-length").is_some(), "{path}");
    }

    // Already compressed by the upstream: its bytes, as they were, encoded once.
    let r = get(&h.url("/api/pre"), GZIP).await;
    assert_eq!(r.headers().get_all("content-encoding").iter().count(), 1);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.bytes().await.unwrap(), &pre[..]);

    // HEAD describes the uncompressed GET.
    let r = reqwest::Client::new()
        .head(h.url("/api/big"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());

    h.stop().await;
    up.stop().await;
}
