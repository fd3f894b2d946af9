//! The multiplexed stream's control API belongs to whoever opened the stream: a stolen token with
//! other credentials (or none) changes nothing; bodies must be JSON. A watch the upstream refuses
//! ends that watch only; a stream whose every watch is refused is an HTTP refusal. A watch may
//! start from a position the client has. A session refreshes without dropping its stream.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);
const MUX: &str = "/_herald/stream";
const SECRET: &str = "a-test-secret-of-32-bytes-length";

fn routes(extra: &str) -> String {
    format!(
        "[[route]]\npath = \"/api/me/{{id}}\"\ninterval = \"30ms\"\n{extra}\n\
         [[route]]\npath = \"/api/public/{{id}}\"\ninterval = \"30ms\"\nshare = \"all\"\n"
    )
}

fn doc(n: u64) -> Value {
    json!({"n": n, "pad": "p".repeat(200)})
}

/// Open a multiplexed stream with `headers`; its client and token (after `retry:` and `hello`).
async fn open(h: &TestHerald, watches: &[&str], headers: &[(&str, &str)]) -> (SseClient, String) {
    let q: Vec<String> = watches.iter().map(|w| format!("watch={w}")).collect();
    let url = h.url(&format!("{MUX}?{}", q.join("&")));
    let mut c = SseClient::connect_with(&reqwest::Client::new(), &url, None, headers).await;
    assert_eq!(c.status, 200, "{:?}", c.headers);
    let hello = c.expect_event("hello", T).await;
    let token = hello.json()["token"].as_str().unwrap().to_string();
    (c, token)
}

async fn control(
    h: &TestHerald,
    token: &str,
    action: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(h.url(&format!("{MUX}/{token}/{action}")))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_stolen_token_changes_nothing() {
    let up = TestUpstream::start().await;
    up.set_for("/api/me/1", "Bearer alice", Reply::json(doc(1)));
    up.set_for(
        "/api/me/2",
        "Bearer bob",
        Reply::json(json!({"bob": "secret"})),
    );
    up.set_for("/api/me/2", "Bearer alice", Reply::json(doc(2)));
    let h = start_herald(config(&up.url(), &routes(""))).await;
    let alice = [("authorization", "Bearer alice")];
    let (mut stream, token) = open(&h, &["/api/me/1"], &alice).await;
    stream.expect_event("snapshot", T).await;

    // Bob's credentials with Alice's token: refused, and nothing of Bob's reaches Alice.
    let bob = [("authorization", "Bearer bob")];
    let (status, _) = control(&h, &token, "watch", r#"{"path":"/api/me/2"}"#, &bob).await;
    assert_eq!(status, 403);
    assert_eq!(
        up.hits_by("/api/me/2", "Bearer bob"),
        0,
        "no topic made for Bob"
    );
    // No credentials at all: refused too, and Alice's stream goes on.
    let (status, _) = control(&h, &token, "watch", r#"{"path":"/api/me/2"}"#, &[]).await;
    assert!(status == 401 || status == 403, "{status}");
    let (status, _) = control(&h, &token, "unwatch", r#"{"path":"/api/me/1"}"#, &[]).await;
    assert!(
        status == 401 || status == 403,
        "unwatch needs them too: {status}"
    );
    // A body a cross-site form could send: refused before anything else.
    let resp = reqwest::Client::new()
        .post(h.url(&format!("{MUX}/{token}/watch")))
        .header("content-type", "text/plain")
        .header("authorization", "Bearer alice")
        .body(r#"{"path":"/api/me/2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    // Alice's stream is untouched: her change still arrives.
    up.set_for("/api/me/1", "Bearer alice", Reply::json(doc(3)));
    let ev = stream.expect_event("alice's patch", T).await;
    assert_eq!(ev.event, "patch", "{ev:?}");
    assert!(!String::from_utf8_lossy(&stream.raw).contains("secret"));
    // Alice herself may.
    let (status, body) = control(&h, &token, "watch", r#"{"path":"/api/me/2"}"#, &alice).await;
    assert_eq!((status, &body["changed"]), (200, &json!(true)), "{body}");
    drop(stream);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_refused_watch_ends_alone_and_all_refused_is_an_http_refusal() {
    let up = TestUpstream::start().await;
    up.set_for("/api/me/1", "session=s", Reply::json(doc(1)));
    up.set_for("/api/me/2", "session=s", Reply::status(403, "{}"));
    up.set_json("/api/public/1", doc(5));
    let h = start_herald(config(&up.url(), &routes(""))).await;
    let session = [("cookie", "session=s")];
    let (mut c, _) = open(&h, &["/api/me/1", "/api/me/2", "/api/public/1"], &session).await;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(c.expect_event("an event", T).await);
    }
    let refused = events
        .iter()
        .find(|e| e.event == "refused")
        .expect("refused");
    let data = &refused.json()["data"];
    assert_eq!(
        (data["path"].as_str(), data["status"].as_u64()),
        (Some("/api/me/2"), Some(403))
    );
    assert_eq!(events.iter().filter(|e| e.event == "snapshot").count(), 2);
    // The others go on.
    up.set_json("/api/public/1", doc(6));
    assert_eq!(c.expect_event("patch", T).await.event, "patch");
    drop(c);

    // Every watch refused: the request is.
    let q = format!("{MUX}?watch=/api/me/2");
    let c = SseClient::connect_with(&reqwest::Client::new(), &h.url(&q), None, &session).await;
    assert_eq!(c.status, 403);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_watch_starts_from_a_position_the_client_has() {
    let up = TestUpstream::start().await;
    up.set_json("/api/public/1", doc(1));
    up.set_json("/api/public/2", doc(2));
    let h = start_herald(config(&up.url(), &routes(""))).await;
    // A page rendered /api/public/2 and knows its position.
    let mut single = SseClient::connect(&h.url("/api/public/2"), None).await;
    let snap = single.expect_event("snapshot", T).await;
    let position = snap.id.clone().expect("an id");
    let (mut c, token) = open(&h, &["/api/public/1"], &[]).await;
    c.expect_event("snapshot", T).await;
    let body = json!({"path": "/api/public/2", "since": position}).to_string();
    let (status, _) = control(&h, &token, "watch", &body, &[]).await;
    assert_eq!(status, 200);
    // Nothing changed since: no snapshot. The next change arrives as a patch.
    up.set_json("/api/public/2", doc(3));
    let ev = c.expect_event("the change", T).await;
    assert_eq!(ev.event, "patch", "{ev:?}");
    assert_eq!(ev.json()["topic"], "/api/public/2");
    drop((c, single));
    h.stop().await;
    up.stop().await;
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_session_refreshes_without_dropping_and_expires_without() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, SECRET).unwrap();
    let up = TestUpstream::start().await;
    up.set_json("/api/me/1", doc(1));
    let jwt = format!(
        "access_token = \"access_token\"\njwt = {{ alg = \"HS256\", key = \"{}\" }}",
        key.display()
    );
    let cfg = format!("[sse]\nexpiry_notice = \"2s\"\n{}", routes(&jwt));
    let h = start_herald(config(&up.url(), &cfg)).await;

    let exp = now() + 3;
    let first = hs256(json!({"sub": "carol", "exp": exp}));
    let url = format!("/api/me/1&access_token={first}");
    let (mut c, token) = {
        let q = h.url(&format!("{MUX}?watch={url}"));
        let mut c = SseClient::connect_with(&reqwest::Client::new(), &q, None, &[]).await;
        assert_eq!(c.status, 200);
        let hello = c.expect_event("hello", T).await;
        (c, hello.json()["token"].as_str().unwrap().to_string())
    };
    // Told before the token expires.
    let mut names = Vec::new();
    loop {
        let ev = c.expect_event("auth-expiring", T).await;
        names.push(ev.event.clone());
        if ev.event == "auth-expiring" {
            assert!(ev.json()["data"]["expires_in_ms"].as_u64().unwrap() <= 3_000);
            break;
        }
    }
    // Another user's token is refused; the stream is unchanged.
    let mallory = hs256(json!({"sub": "mallory", "exp": now() + 600}));
    let body = json!({"access_token": mallory}).to_string();
    let bearer = format!("Bearer {first}");
    let auth = [("authorization", bearer.as_str())];
    let (status, answer) = control(&h, &token, "refresh", &body, &auth).await;
    assert_eq!(status, 403, "{answer}");
    // A new token of the same user: the stream goes on past the old `exp`.
    let second = hs256(json!({"sub": "carol", "exp": now() + 600}));
    let body = json!({"access_token": second}).to_string();
    let (status, answer) = control(&h, &token, "refresh", &body, &auth).await;
    assert_eq!(status, 200, "{answer}");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    up.set_json("/api/me/1", doc(7));
    let ev = loop {
        let ev = c.expect_event("a change after the old exp", T).await;
        if ev.event == "patch" || ev.event == "snapshot" {
            if ev.json()["data"].to_string().contains('7') {
                break ev;
            }
            continue;
        }
        assert_ne!(ev.event, "auth-expired", "the refreshed stream expired");
    };
    assert_eq!(ev.json()["topic"], "/api/me/1");
    drop(c);

    // No refresh: the stream ends with auth-expired, not a silent reconnect as nobody.
    let short = hs256(json!({"sub": "dan", "exp": now() + 2}));
    let q = h.url(&format!("{MUX}?watch=/api/me/1&access_token={short}"));
    let mut c = SseClient::connect_with(&reqwest::Client::new(), &q, None, &[]).await;
    let ended = loop {
        match c.next_item(Duration::from_secs(6)).await {
            Next::Item(ev) if ev.event == "auth-expired" => break true,
            Next::Item(_) => continue,
            _ => break false,
        }
    };
    assert!(ended, "an auth-expired event ends the stream");
    h.stop().await;
    up.stop().await;
}
