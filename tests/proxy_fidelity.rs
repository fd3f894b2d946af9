//! Pass-through says only what it should. It adds nothing to a request except the forwarding
//! headers and `Via` (compared with the same request sent directly, on a raw upstream). It refuses
//! what a reverse proxy must not forward (CONNECT, a missing or doubled Host). It takes
//! X-Forwarded-Host from `:authority` on HTTP/2 and names a TLS failure at the upstream. It never
//! shows the upstream's own address to clients.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::raw::{response, ConnState, RawRequest, RawUpstream};
use common::tls::TestCa;
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(3);

/// Send `req` to `addr` on a fresh connection and return the raw response.
async fn send(addr: std::net::SocketAddr, req: &str) -> String {
    raw_request(addr, req.as_bytes(), T).await
}

#[tokio::test]
async fn nothing_is_added_but_forwarding_headers_and_via() {
    let up = RawUpstream::echo().await;
    let h = start_herald(config(&up.url(""), "")).await;
    for (method, extra, body) in [
        ("GET", "", ""),
        (
            "POST",
            "Content-Type: text/plain\r\nContent-Length: 5\r\n",
            "hello",
        ),
        ("DELETE", "X-Custom: 1\r\nCookie: a=b\r\n", ""),
    ] {
        let req = |host: &str| {
            format!(
                "{method} /thing?x=1 HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n{body}"
            )
        };
        up.clear();
        send(up.addr, &req("direct")).await;
        let through = send(h.addr, &req("public.example")).await;
        assert!(through.starts_with("HTTP/1.1 200"), "{through}");
        let seen = up.seen();
        let (direct, via_herald) = (&seen[0], &seen[1]);
        let mut expected = direct.header_names();
        expected.retain(|n| n != "connection");
        expected.extend(
            [
                "via",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
            ]
            .map(String::from),
        );
        expected.sort();
        assert_eq!(via_herald.header_names(), expected, "{method}");
        for absent in ["accept", "accept-encoding", "user-agent"] {
            assert!(
                via_herald.header(absent).is_none(),
                "{method}: {absent} was added"
            );
        }
        assert_eq!(via_herald.line, direct.line);
        assert_eq!(via_herald.body, direct.body);
        assert_eq!(
            via_herald.header("host"),
            Some(up.addr.to_string().as_str())
        );
        assert_eq!(
            via_herald.header("x-forwarded-host"),
            Some("public.example")
        );
        assert_eq!(via_herald.header("x-forwarded-proto"), Some("http"));
        assert_eq!(via_herald.header("via"), Some("1.1 herald"));
    }
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn connect_and_bad_host_headers_are_refused() {
    let up = RawUpstream::echo().await;
    let h = start_herald(config(&up.url(""), "")).await;
    let r = send(
        h.addr,
        "CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert!(r.contains("\"error\":\"method-not-allowed\""), "{r}");

    for req in [
        "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    ] {
        let r = send(h.addr, req).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{req:?}: {r}");
        assert!(r.contains("exactly one Host"), "{r}");
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    // HTTP/1.0 may omit Host.
    let r = send(h.addr, "GET /x HTTP/1.0\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"),
        "{r}"
    );
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn http2_forwarded_host_is_the_authority() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), "")).await;
    let (mut sender, conn) = h2::h2c(h.addr, h2::Windows::default()).await;
    // hyper's client sends `:authority` from the URI; a stray `host` header must not win.
    let req = http::Request::get("http://public.example:8443/echo")
        .header("host", "spoofed.example")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-host"], "public.example:8443");
    assert_eq!(echo["headers"]["via"], "2 herald");
    drop(sender);
    conn.abort();

    if h2::curl_with_http2() {
        let out = h2::curl(&[
            "-s",
            "--http2-prior-knowledge",
            "--connect-to",
            &format!("curl.example:80:{}", h.addr),
            "http://curl.example/echo",
        ])
        .await;
        let echo: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(echo["headers"]["x-forwarded-host"], "curl.example");
    }
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn upstream_certificate_failure_is_named() {
    // The upstream's certificate comes from a CA herald does not trust.
    let ca = TestCa::new();
    let up = TestUpstream::start_tls(&ca.leaf("upstream", 701)).await;
    let h = start_herald(config(&up.url(), "")).await;
    let r = reqwest::get(h.url("/anything")).await.unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream-tls", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains("unknown issuer"), "{message}");
    assert!(
        !message.contains("BEGIN"),
        "no key or certificate material: {message}"
    );
    h.stop().await;
    up.stop().await;
}

/// An upstream that redirects to its own address, as legacy apps behind a proxy do.
async fn redirecting_upstream() -> RawUpstream {
    RawUpstream::start(Arc::new(|req: &RawRequest, _: &mut ConnState| {
        let me = req.header("host").unwrap_or("").to_string();
        response(
            "302 Found",
            &[
                ("Location", &format!("http://{me}/legacy/next?x=1")),
                ("Content-Location", &format!("http://{me}/legacy/doc")),
                ("Refresh", &format!("5; url=http://{me}/legacy/later")),
                ("Via", "1.0 legacy-cache"),
            ],
            "",
        )
    }))
    .await
}

#[tokio::test]
async fn upstream_addresses_are_rewritten_and_via_is_added() {
    let up = redirecting_upstream().await;
    let h = start_herald(config(&up.url("/legacy"), "")).await;
    let r = send(
        h.addr,
        "GET /start HTTP/1.1\r\nHost: public.example:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 302"), "{r}");
    let lower = r.to_ascii_lowercase();
    assert!(
        lower.contains("\r\nlocation: http://public.example:8080/next?x=1\r\n"),
        "{r}"
    );
    assert!(
        lower.contains("\r\ncontent-location: http://public.example:8080/doc\r\n"),
        "{r}"
    );
    assert!(
        lower.contains("\r\nrefresh: 5; url=http://public.example:8080/later\r\n"),
        "{r}"
    );
    assert!(
        !r.contains(&up.addr.to_string()),
        "internal address leaked: {r}"
    );
    assert!(lower.contains("\r\nvia: 1.0 legacy-cache\r\n"), "{r}");
    assert!(lower.contains("\r\nvia: 1.1 herald\r\n"), "{r}");
    assert_eq!(up.seen()[0].header("via"), Some("1.1 herald"));
    h.stop().await;

    // Both can be turned off.
    let off = "[proxy]\nrewrite_redirects = false\nvia = false\n";
    let h = start_herald(config(&up.url("/legacy"), off)).await;
    up.clear();
    let r = send(
        h.addr,
        "GET /start HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.contains(&format!("http://{}/legacy/next?x=1", up.addr)),
        "{r}"
    );
    assert!(!r.to_ascii_lowercase().contains("herald"), "{r}");
    assert_eq!(up.seen()[0].header("via"), None);
    h.stop().await;
    up.stop().await;
}

#[test]
fn new_proxy_keys_are_validated_with_their_line() {
    let text = "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n[proxy]\ntimeout = \"0s\"\nsend_timeout = \"10ms\"\ntunnel_idle_timeout = \"0s\"\n";
    let err = herald::config::parse(text, "proxy.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy.toml:4:"), "{err}");
    assert!(
        err.contains("proxy.timeout: must be at least 100ms"),
        "{err}"
    );
    assert!(err.contains("proxy.toml:5:"), "{err}");
    assert!(
        err.contains("proxy.send_timeout: must be at least 100ms"),
        "{err}"
    );
    assert!(err.contains("proxy.toml:6:"), "{err}");
    assert!(
        err.contains("proxy.tunnel_idle_timeout: must be at least 1s"),
        "{err}"
    );
    let text =
        "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n[proxy]\nvia = \"yes\"\n";
    let err = herald::config::parse(text, "proxy.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy.toml:4:"), "{err}");
}
