//! Upstream trouble (issue 3, point 7): unreachable, error statuses, timeouts, bad bodies and
//! oversized bodies become one `upstream-error` event per outage while the last good state is
//! kept; recovery sends a fresh snapshot; conditional requests and 304s cost no event; a failing
//! upstream is polled with backoff, not at the route's interval.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(5);
const PATH: &str = "/api/builds/1";

fn route(extra: &str) -> String {
    format!("[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"50ms\"\n{extra}\n")
}

/// Connect and skip the `retry:` that opens every stream.
async fn connect(h: &TestHerald) -> SseClient {
    let mut c = SseClient::connect(&h.url(PATH), None).await;
    assert_eq!(c.status, 200);
    let first = c.next_any(T).await.expect("retry first");
    assert!(first.retry.is_some(), "{first:?}");
    c
}

async fn expect_kind(c: &mut SseClient, kind: &str) -> Value {
    let ev = c.expect_event(kind, T).await;
    assert_eq!(ev.event, kind, "{ev:?}");
    assert!(ev.id.is_some(), "{ev:?}");
    let env = ev.json();
    assert_eq!(env["type"], kind);
    assert_eq!(env["topic"], PATH);
    env["data"].clone()
}

#[tokio::test]
async fn upstream_down_at_start_then_up() {
    let addr = free_addr().await;
    let h = start_herald(config(&format!("http://{addr}"), &route(""))).await;
    let mut c = connect(&h).await;
    let err = expect_kind(&mut c, "upstream-error").await;
    assert_eq!(err["error"], "unreachable", "{err}");
    assert!(err.get("status").is_none(), "{err}");

    let up =
        TestUpstream::start_on(TcpListener::bind(addr).await.expect("port is still free")).await;
    up.set_json(PATH, json!({"up": true}));
    // However many polls failed meanwhile, the next event is the state, not another error.
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"up": true}));

    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn error_status_is_told_once_and_last_state_is_kept() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"v": 1}));
    let h = start_herald(config(&up.url(), &route(""))).await;
    let mut c = connect(&h).await;
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 1}));

    // Outage 1: several failed polls, one event; recovery to the same body still resyncs.
    up.set(PATH, Reply::status(500, "{\"oops\":true}"));
    let err = expect_kind(&mut c, "upstream-error").await;
    assert_eq!(
        (err["error"].as_str(), err["status"].as_u64()),
        (Some("status"), Some(500))
    );
    let failed_at = up.hits(PATH);
    assert!(
        eventually(T, || up.hits(PATH) >= failed_at + 3).await,
        "keeps polling"
    );
    // A client joining now gets the last good state, then the error.
    let mut late = connect(&h).await;
    assert_eq!(expect_kind(&mut late, "snapshot").await, json!({"v": 1}));
    assert_eq!(expect_kind(&mut late, "upstream-error").await, err);
    up.set_json(PATH, json!({"v": 1}));
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 1}));
    assert_eq!(expect_kind(&mut late, "snapshot").await, json!({"v": 1}));

    // Outage 2 (another status), recovering to a new body.
    up.set(PATH, Reply::status(404, "{}"));
    let err = expect_kind(&mut c, "upstream-error").await;
    assert_eq!(err["status"], 404);
    let failed_at = up.hits(PATH);
    assert!(eventually(T, || up.hits(PATH) >= failed_at + 3).await);
    up.set_json(PATH, json!({"v": 2}));
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 2}));

    drop((c, late));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn slow_upstream_times_out() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"v": 1}));
    let h = start_herald(config(&up.url(), &route("timeout = \"100ms\""))).await;
    let mut c = connect(&h).await;
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 1}));

    up.set(
        PATH,
        Reply::json(json!({"v": 2})).delayed(Duration::from_millis(600)),
    );
    let err = expect_kind(&mut c, "upstream-error").await;
    assert_eq!(err["error"], "timeout", "{err}");
    up.set_json(PATH, json!({"v": 3}));
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 3}));

    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn invalid_json_is_an_error_and_keeps_the_last_state() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"v": 1}));
    let h = start_herald(config(&up.url(), &route(""))).await;
    let mut c = connect(&h).await;
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 1}));

    up.set(
        PATH,
        Reply::raw(Some("application/json; charset=utf-8"), b"{\"v\": 2,"),
    );
    let err = expect_kind(&mut c, "upstream-error").await;
    assert_eq!(err["error"], "invalid-json", "{err}");
    let mut late = connect(&h).await;
    assert_eq!(expect_kind(&mut late, "snapshot").await, json!({"v": 1}));
    assert_eq!(expect_kind(&mut late, "upstream-error").await, err);

    up.set_json(PATH, json!({"v": 3}));
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 3}));
    assert_eq!(expect_kind(&mut late, "snapshot").await, json!({"v": 3}));

    drop((c, late));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn text_body_is_a_snapshot_of_a_json_string() {
    let up = TestUpstream::start().await;
    up.set(
        PATH,
        Reply::raw(Some("text/plain"), b"line one\nline \"two\"\r\n"),
    );
    let h = start_herald(config(&up.url(), &route(""))).await;
    let mut c = connect(&h).await;
    assert_eq!(
        expect_kind(&mut c, "snapshot").await,
        json!("line one\nline \"two\"\r\n")
    );
    // A change to a text body is a new snapshot (it cannot be patched).
    up.set(PATH, Reply::raw(Some("text/plain"), b"done"));
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!("done"));

    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn body_over_max_body_is_too_large() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"v": 1}));
    let h = start_herald(config(&up.url(), &route("max_body = 64"))).await;
    let mut c = connect(&h).await;
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 1}));

    up.set_json(PATH, json!({"v": "x".repeat(1000)}));
    let err = expect_kind(&mut c, "upstream-error").await;
    assert_eq!(err["error"], "too-large", "{err}");
    up.set_json(PATH, json!({"v": 2}));
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 2}));

    drop(c);
    h.stop().await;
    up.stop().await;
}

/// The values of `name` on the upstream's requests for `PATH`, in order (None: header absent).
fn request_headers(up: &TestUpstream, name: &str) -> Vec<Option<String>> {
    up.seen()
        .iter()
        .filter(|s| s.path_and_query == PATH)
        .map(|s| s.headers.get(name).map(|v| v.to_str().unwrap().to_string()))
        .collect()
}

#[tokio::test]
async fn etag_is_revalidated_and_304_sends_nothing() {
    let up = TestUpstream::start().await;
    up.set(PATH, Reply::json(json!({"v": 1})).header("etag", "\"v1\""));
    let h = start_herald(config(&up.url(), &route(""))).await;
    let mut c = connect(&h).await;
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 1}));
    assert!(eventually(T, || up.hits(PATH) >= 5).await);

    let inm = request_headers(&up, "if-none-match");
    assert_eq!(inm[0], None, "the first poll has nothing to revalidate");
    assert!(
        inm[1..].iter().all(|v| v.as_deref() == Some("\"v1\"")),
        "{inm:?}"
    );
    // Those 304s sent no event: the next one is the change.
    up.set(PATH, Reply::json(json!({"v": 2})).header("etag", "\"v2\""));
    let ev = c.expect_event("the change", T).await;
    let mut state = Some(json!({"v": 1}));
    apply_event(&mut state, &ev);
    assert_eq!(state, Some(json!({"v": 2})), "{ev:?}");
    let seen = up.hits(PATH);
    assert!(eventually(T, || up.hits(PATH) >= seen + 2).await);
    assert_eq!(
        request_headers(&up, "if-none-match")
            .last()
            .cloned()
            .flatten()
            .as_deref(),
        Some("\"v2\"")
    );

    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn last_modified_is_revalidated() {
    let up = TestUpstream::start().await;
    let lm = "Wed, 21 Oct 2015 07:28:00 GMT";
    up.set(
        PATH,
        Reply::json(json!({"v": 1})).header("last-modified", lm),
    );
    let h = start_herald(config(&up.url(), &route(""))).await;
    let mut c = connect(&h).await;
    assert_eq!(expect_kind(&mut c, "snapshot").await, json!({"v": 1}));
    assert!(eventually(T, || up.hits(PATH) >= 4).await);

    let ims = request_headers(&up, "if-modified-since");
    assert_eq!(ims[0], None);
    assert!(ims[1..].iter().all(|v| v.as_deref() == Some(lm)), "{ims:?}");
    // Same body again (200, not 304): still no event; the next one is the change.
    up.set_json(PATH, json!({"v": 2}));
    let ev = c.expect_event("the change", T).await;
    let mut state = Some(json!({"v": 1}));
    apply_event(&mut state, &ev);
    assert_eq!(state, Some(json!({"v": 2})), "{ev:?}");

    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn failing_upstream_is_polled_with_backoff() {
    let up = TestUpstream::start().await;
    up.set(PATH, Reply::status(502, "{}"));
    let h = start_herald(config(&up.url(), &route(""))).await;
    let mut c = connect(&h).await;
    expect_kind(&mut c, "upstream-error").await;

    let window = Duration::from_millis(1500);
    let start = up.hits(PATH);
    tokio::time::sleep(window).await;
    let polls = up.hits(PATH) - start;
    // At the 50 ms interval this would be 30 polls; with exponential backoff it is a handful.
    let at_interval = (window.as_millis() / 50) as usize;
    assert!(polls >= 1, "still polling");
    assert!(
        polls * 3 <= at_interval,
        "{polls} polls in {window:?} at a 50ms interval: no backoff"
    );

    drop(c);
    h.stop().await;
    up.stop().await;
}

/// A bare upstream that answers every request with `body` in 1 KB chunks and no Content-Length,
/// so only counting the bytes as they arrive can enforce `max_body`.
async fn chunked_upstream(body: Vec<u8>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                    transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    .to_vec();
                for part in body.chunks(1024) {
                    out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                // Herald may hang up once it has read enough to refuse the body.
                let _ = sock.write_all(&out).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn chunked_body_over_max_body_is_too_large() {
    let body = json!({"pad": "x".repeat(20_000)}).to_string().into_bytes();
    let (addr, upstream) = chunked_upstream(body).await;
    let h = start_herald(config(
        &format!("http://{addr}"),
        &route("max_body = \"4KiB\""),
    ))
    .await;
    let mut c = connect(&h).await;
    let err = expect_kind(&mut c, "upstream-error").await;
    assert_eq!(err["error"], "too-large", "{err}");
    drop(c);
    h.stop().await;

    // Control: the same chunked body under a larger limit is a state, not an error.
    let h = start_herald(config(
        &format!("http://{addr}"),
        &route("max_body = \"64KiB\""),
    ))
    .await;
    let mut c = connect(&h).await;
    let data = expect_kind(&mut c, "snapshot").await;
    assert_eq!(data["pad"].as_str().map(str::len), Some(20_000));
    drop(c);
    h.stop().await;

    upstream.abort();
    assert!(upstream.await.unwrap_err().is_cancelled());
}
