//! A refused stream, in a real browser: Chromium's own `EventSource` on a route whose upstream
//! refuses the page's session gets an HTTP 401 and stops (no reconnect loop, so herald and the
//! upstream see one attempt), and an app on `/_herald/client.js` is told why through `onError`
//! and does not retry either. Skipped, with a note, where Chromium or Node is missing.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::*;
use serde_json::json;

/// A page with a session cookie the upstream no longer accepts; it opens the stream one way or
/// the other (`?native` or `?client`) and records what the browser reports.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8"><title>herald refusal</title>
<script type="module">
document.cookie = "session=revoked; path=/";
const out = { opens: 0, errors: [], state: null };
window.out = out;
if (location.search.includes("native")) {
  const es = new EventSource("/api/me");
  es.onopen = () => out.opens++;
  es.onerror = () => { out.errors.push("error"); out.state = es.readyState; };
  es.addEventListener("snapshot", () => out.errors.push("snapshot!"));
} else {
  const { Herald } = await import("/_herald/client.js");
  const h = new Herald({ retry: 200 });
  window.h = h;
  h.onError((e) => out.errors.push({ type: e.type, status: e.status, path: e.path }));
  out.watch = [];
  h.watch("/api/me", (state, info) => out.watch.push({ state, type: info.type, error: info.error }));
}
</script>
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_stops_in_the_browser_and_the_app_is_told() {
    let Some(mut browser) = Browser::start("the refusal test").await else {
        return;
    };
    let up = TestUpstream::start().await;
    up.set(
        "/page.html",
        Reply::raw(Some("text/html; charset=utf-8"), PAGE.as_bytes()),
    );
    // Every session but a valid one is refused, as a legacy API does.
    up.set(
        "/api/me",
        Reply::status(401, "{\"error\":\"login required\"}"),
    );
    let h = start_herald(config(
        &up.url(),
        "[sse]\nretry = \"200ms\"\nretry_jitter = \"50ms\"\n\
         [[route]]\npath = \"/api/me\"\ninterval = \"50ms\"\n",
    ))
    .await;

    // Chromium's EventSource: one error, then CLOSED (2), never a snapshot.
    browser
        .cmd(json!({"cmd": "goto", "url": h.url("/page.html?native")}))
        .await;
    browser.wait("out.state === 2").await;
    let first = up.hits("/api/me");
    // Ten retry windows later, nobody asked again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = browser.eval("out").await;
    assert_eq!(out["errors"], json!(["error"]), "{out}");
    assert_eq!(out["opens"], 0, "{out}");
    assert_eq!(
        up.hits("/api/me"),
        first,
        "the browser retried a refused stream"
    );

    // client.js: the app's error callback gets the refusal with its status, once, and no state.
    browser
        .cmd(json!({"cmd": "goto", "url": h.url("/page.html?client")}))
        .await;
    browser.wait("out.errors.length > 0").await;
    let first = up.hits("/api/me");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = browser.eval("out").await;
    let errors = out["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{out}");
    assert_eq!(errors[0]["status"], 401, "{out}");
    assert_eq!(errors[0]["path"], "/api/me", "{out}");
    // The watch itself hears that it ended, with no state.
    assert_eq!(out["watch"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(out["watch"][0]["type"], "refused", "{out}");
    assert_eq!(out["watch"][0]["error"]["status"], 401, "{out}");
    assert!(out["watch"][0]["state"].is_null(), "{out}");
    assert!(
        up.hits("/api/me") <= first + 1,
        "client.js kept retrying a refused stream: {} after {first}",
        up.hits("/api/me")
    );
    browser.quit().await;
    h.stop().await;
    up.stop().await;
}
