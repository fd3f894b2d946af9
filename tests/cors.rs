//! CORS end to end: preflights answered by herald for streams, credentialed and wildcard streams,
//! pass-through routes keeping (or, when configured, losing) the upstream's CORS, and the config
//! that browsers would refuse at runtime refused at startup instead.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);
const APP: &str = "https://app.example.com";
const ROUTE: &str = "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"50ms\"\n";

fn cors(extra: &str) -> String {
    format!("{ROUTE}[cors]\n{extra}\n")
}

async fn preflight(h: &TestHerald, path: &str, origin: &str, method: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, h.url(path))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header(
            "access-control-request-headers",
            "last-event-id, authorization",
        )
        .send()
        .await
        .unwrap()
}

fn vary_has(h: &reqwest::header::HeaderMap, token: &str) -> bool {
    h.get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn options_seen(up: &TestUpstream) -> usize {
    up.seen().iter().filter(|s| s.method == "OPTIONS").count()
}

#[tokio::test]
async fn stream_preflight_allowed_and_denied() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(
        &up.url(),
        &cors(&format!(
            "origins = [\"{APP}\"]\ncredentials = true\nmax_age = \"10m\""
        )),
    ))
    .await;

    let r = preflight(&h, "/api/builds/42", APP, "GET").await;
    assert_eq!(r.status(), 204);
    let hd = r.headers();
    assert_eq!(hd["access-control-allow-origin"], APP);
    assert_eq!(hd["access-control-allow-credentials"], "true");
    assert_eq!(hd["access-control-allow-methods"], "GET");
    let allowed = hd["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["last-event-id", "authorization", "cache-control"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert_eq!(hd["access-control-max-age"], "600");
    assert!(vary_has(hd, "origin"));

    let r = preflight(&h, "/api/builds/42", "https://evil.example", "GET").await;
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(r
        .headers()
        .get("access-control-allow-credentials")
        .is_none());

    // herald answered both itself; the upstream never saw a preflight.
    assert_eq!(options_seen(&up), 0);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn credentialed_stream_echoes_the_origin() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/42", json!({"status": "running"}));
    let h = start_herald(config(
        &up.url(),
        &cors(&format!(
            "origins = [\"{APP}\", \"http://localhost:3000\"]\ncredentials = true"
        )),
    ))
    .await;
    let client = reqwest::Client::new();
    let url = h.url("/api/builds/42");

    let headers = [("origin", APP), ("cookie", "session=abc")];
    let mut c = SseClient::connect_with(&client, &url, None, &headers).await;
    assert_eq!(c.status, 200);
    assert_eq!(c.headers["access-control-allow-origin"], APP);
    assert_eq!(c.headers["access-control-allow-credentials"], "true");
    assert!(vary_has(&c.headers, "origin"));
    c.expect_event("snapshot", T).await;

    // Another listed origin gets its own echo; an unlisted one is refused before anything is
    // asked of the upstream with the browser's cookies.
    let other = [("origin", "http://localhost:3000")];
    let d = SseClient::connect_with(&client, &url, None, &other).await;
    assert_eq!(
        d.headers["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let evil = [
        ("origin", "https://evil.example"),
        ("cookie", "session=victim"),
    ];
    let e = SseClient::connect_with(&client, &url, None, &evil).await;
    assert_eq!(e.status, 403);
    assert_eq!(up.hits_by("/api/builds/42", "session=victim"), 0);
    assert!(e.headers.get("access-control-allow-origin").is_none());
    assert!(e.headers.get("access-control-allow-credentials").is_none());
    assert!(vary_has(&e.headers, "origin"));
    drop((c, d, e));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn wildcard_without_credentials() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/42", json!({"status": "running"}));
    let h = start_herald(config(&up.url(), &cors("origins = [\"*\"]"))).await;

    let r = preflight(&h, "/api/builds/42", "https://anywhere.example", "GET").await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r
        .headers()
        .get("access-control-allow-credentials")
        .is_none());

    let headers = [("origin", "https://anywhere.example")];
    let mut c = SseClient::connect_with(
        &reqwest::Client::new(),
        &h.url("/api/builds/42"),
        None,
        &headers,
    )
    .await;
    assert_eq!(c.headers["access-control-allow-origin"], "*");
    assert!(c.headers.get("access-control-allow-credentials").is_none());
    c.expect_event("snapshot", T).await;
    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn pass_through_keeps_upstream_cors_unless_overridden() {
    let up = TestUpstream::start().await;
    up.set(
        "/api/users",
        Reply::json(json!({"users": []}))
            .header("access-control-allow-origin", "https://upstream.example")
            .header("access-control-expose-headers", "x-total"),
    );
    let origin = [("origin", APP)];
    let get = |url: String| async move {
        let mut req = reqwest::Client::new().get(url);
        for (k, v) in origin {
            req = req.header(k, v);
        }
        req.send().await.unwrap()
    };

    // Default ("upstream"): the upstream's CORS as it was, and its own preflight answer.
    let h = start_herald(config(&up.url(), &cors(&format!("origins = [\"{APP}\"]")))).await;
    let r = get(h.url("/api/users")).await;
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://upstream.example"
    );
    assert_eq!(r.headers()["access-control-expose-headers"], "x-total");
    let r = preflight(&h, "/api/users", APP, "POST").await;
    assert_eq!(r.status(), 200, "the test upstream's echo");
    assert_eq!(options_seen(&up), 1);
    // A non-GET preflight on a stream path is for a pass-through request too.
    preflight(&h, "/api/builds/42", APP, "DELETE").await;
    assert_eq!(options_seen(&up), 2);
    h.stop().await;

    // "override": herald's CORS replaces the upstream's, and herald answers every preflight.
    let text = cors(&format!(
        "origins = [\"{APP}\"]\npass_through = \"override\""
    ));
    let h = start_herald(config(&up.url(), &text)).await;
    let r = get(h.url("/api/users")).await;
    assert_eq!(r.headers()["access-control-allow-origin"], APP);
    // The upstream's exposed headers are gone; herald's own are readable.
    assert_eq!(
        r.headers()["access-control-expose-headers"],
        "herald-event-id, retry-after"
    );
    assert!(vary_has(r.headers(), "origin"));
    let r = preflight(&h, "/api/users", APP, "POST").await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-methods"], "POST");
    assert_eq!(options_seen(&up), 2);
    h.stop().await;
    up.stop().await;
}

#[test]
fn wildcard_with_credentials_is_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = "listen = \"127.0.0.1:0\"\n\
                upstream = \"http://127.0.0.1:9\"\n\
                [cors]\n\
                origins = [\"*\"]\n\
                credentials = true\n\
                max_age = \"10m\"\n";
    std::fs::write(&path, text).unwrap();
    let err = herald::config::load(&path).unwrap_err().to_string();
    let want = format!("{}:5:", path.display());
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("credentials") && err.contains('*'), "{err}");

    // Each bad origin is named on its own line, all at once.
    let text = "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\n[cors]\norigins = [\n  \"https://ok.example\",\n  \"https://app.example.com/path\",\n  \"ftp://x\",\n]\n";
    let err = herald::config::parse(text, "proxy.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy.toml:6:"), "{err}");
    assert!(err.contains("proxy.toml:7:"), "{err}");
    assert!(!err.contains("proxy.toml:5:"), "{err}");

    // Unknown keys are refused too.
    let text = "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\n[cors]\norigins = [\"*\"]\norigin = \"x\"\n";
    assert!(herald::config::parse(text, "proxy.toml").is_err());
    let text =
        "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\n[compression]\nlevel = 9\n";
    assert!(herald::config::parse(text, "proxy.toml").is_err());
}
