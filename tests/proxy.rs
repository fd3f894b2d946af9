//! Pass-through: everything that is not a stream reaches the upstream unchanged.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTES: &str = "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"1s\"\n";

#[tokio::test]
async fn get_and_post_pass_through_with_bodies_status_and_headers() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), ROUTES)).await;
    let client = reqwest::Client::new();

    // A GET on a stream route without Accept: text/event-stream is an ordinary request.
    let r = client
        .get(h.url("/api/builds/7?verbose=1&x=%20y"))
        .header("x-custom", "kept")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/api/builds/7?verbose=1&x=%20y");
    let hdrs = &echo["headers"];
    assert_eq!(hdrs["x-custom"], "kept");
    assert!(
        hdrs.get("x-hop").is_none(),
        "Connection-named header must not be forwarded"
    );
    assert_eq!(hdrs["x-forwarded-for"], "127.0.0.1");
    assert_eq!(hdrs["x-forwarded-proto"], "http");
    assert_eq!(hdrs["x-forwarded-host"], h.addr.to_string());

    // POST with a body and a non-200 status chosen by the upstream.
    let r = client
        .post(h.url("/api/builds"))
        .header("x-echo-status", "201")
        .header("content-type", "application/json")
        .body(r#"{"name":"new"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], r#"{"name":"new"}"#);

    // Other methods and error statuses pass through too.
    for (method, status) in [("PUT", 409u16), ("DELETE", 404), ("PATCH", 500)] {
        let r = client
            .request(method.parse().unwrap(), h.url("/api/builds/1"))
            .header("x-echo-status", status.to_string())
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method}");
        let echo: Value = r.json().await.unwrap();
        assert_eq!(echo["method"], method);
    }
    // X-Forwarded-For appends to what the client sent.
    let r = client
        .get(h.url("/x"))
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .unwrap();
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let up = TestUpstream::start().await;
    let big: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    up.set("/big", Reply::raw(Some("text/plain"), big.as_bytes()));
    let h = start_herald(config(&up.url(), ROUTES)).await;
    let client = reqwest::Client::new();
    let got = client
        .get(h.url("/big"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(got.len(), big.len());
    assert_eq!(got, big);

    let r = client
        .post(h.url("/upload"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["body"].as_str().unwrap().len(), big.len());
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn upstream_down_is_a_quick_502_with_json() {
    // A port with nothing listening.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let h = start_herald(config(&format!("http://127.0.0.1:{port}"), ROUTES)).await;
    let started = std::time::Instant::now();
    let r = reqwest::get(h.url("/api/anything")).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "bad-gateway");
    assert!(started.elapsed() < Duration::from_secs(3));
    h.stop().await;
}

#[tokio::test]
async fn slow_upstream_gets_504_after_the_proxy_timeout() {
    let up = TestUpstream::start().await;
    up.set(
        "/slow",
        Reply::json(json!({})).delayed(Duration::from_secs(3)),
    );
    let h = start_herald(config(&up.url(), "[proxy]\ntimeout = \"300ms\"\n")).await;
    let started = std::time::Instant::now();
    let r = reqwest::get(h.url("/slow")).await.unwrap();
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream-timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn unsafe_stream_parameters_are_refused_not_polled() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), ROUTES)).await;
    // Raw requests: a URL library would normalize `..` before sending.
    for path in [
        "/api/builds/..",
        "/api/builds/%2e%2e",
        "/api/builds/a%2Fb",
        "/api/builds/a%5c..",
        "/api/builds/%00",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n");
        let resp = raw_request(h.addr, req.as_bytes(), Duration::from_secs(2)).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
        assert!(resp.contains("\"error\":\"bad-request\""), "{resp}");
    }
    assert_eq!(
        up.total_hits(),
        0,
        "nothing reaches the upstream for refused streams"
    );
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_server_keeps_serving() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), ROUTES)).await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 400"),
            "{text}"
        );
    }
    // Oversized headers are refused, not buffered without bound.
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = s.write_all(huge.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );

    let r = reqwest::get(h.url("/still/alive")).await.unwrap();
    assert_eq!(r.status(), 200);
    h.stop().await;
    up.stop().await;
}
