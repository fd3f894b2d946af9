//! The status page in a real browser: headless Chromium (driven by issue 7's
//! `tests/browser/cdp.mjs`) opens the admin listener's page, which follows herald over its own SSE
//! stream: it must show the open streams, the topics with their watchers, a failing upstream, a
//! moving throughput sparkline, and change when a new stream opens. Skipped, with a note, where
//! Chromium or Node is missing (CI installs them).
//!
//! `HERALD_STATUS_SCREENSHOT=docs/status.png cargo test --test status_page` saves a screenshot.

mod common;

use std::time::Duration;

use common::admin::{AdminHerald, ADMIN};
use common::browser::Browser;
use common::{config, Reply, SseClient, TestUpstream};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

fn build(id: u32, step: u32) -> Value {
    let steps = ["fetch", "compile", "test", "package", "publish"];
    json!({"id": id, "status": "running", "step": steps[step as usize % steps.len()], "progress": step})
}

/// The text of the table row whose first cell contains `needle` (or "").
fn row(table: &str, needle: &str) -> String {
    format!(
        "[...document.querySelectorAll('#{table} tbody tr')].map(r => r.innerText).find(t => t.includes('{needle}')) || ''"
    )
}

#[tokio::test]
async fn status_page_follows_herald_live() {
    let Some(mut browser) = Browser::start("the status page test").await else {
        return;
    };
    let up = std::sync::Arc::new(TestUpstream::start().await);
    for id in 1..=3 {
        up.set_json(&format!("/api/builds/{id}"), build(id, 0));
    }
    up.set("/api/deploys/9", Reply::status(503, "{\"error\":\"down\"}"));
    let cfg = config(
        &up.url(),
        &format!(
            "[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"100ms\"\n\n\
             [[route]]\npath = \"/api/deploys/{{id}}\"\ninterval = \"100ms\"\n{ADMIN}"
        ),
    );
    let h = AdminHerald::start(cfg).await;

    // Streams: three watchers of build 1, two of build 2, one of build 3, one of a failing deploy.
    let mut clients = Vec::new();
    for id in [1, 1, 1, 2, 2, 3] {
        let mut c = SseClient::connect(&h.url(&format!("/api/builds/{id}")), None).await;
        c.expect_event("snapshot", T).await;
        clients.push(c);
    }
    let mut failing = SseClient::connect(&h.url("/api/deploys/9"), None).await;
    failing.expect_event("upstream-error", T).await;

    // Build 1 keeps changing while the page is open, so the throughput moves.
    let changer = {
        let stop = h.shutdown.clone();
        let up = up.clone();
        tokio::spawn(async move {
            for step in 1..=200u32 {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                up.set_json("/api/builds/1", build(1, step));
            }
        })
    };

    browser
        .cmd(json!({"cmd": "goto", "url": h.admin_url("/")}))
        .await;
    browser
        .wait("document.getElementById('conn').textContent === 'live'")
        .await;
    browser
        .wait("document.getElementById('streams').textContent === '7'")
        .await;
    browser
        .wait("document.getElementById('topics').textContent === '4'")
        .await;
    let b1 = browser
        .wait(&format!(
            "(t => /\\t3\\t/.test(t) && t)({})",
            row("topic-table", "/api/builds/1")
        ))
        .await;
    assert!(b1.as_str().unwrap().contains("ok"), "{b1}");
    let deploys = browser
        .wait(&format!(
            "(t => t.includes('failing') && t)({})",
            row("routes", "/api/deploys/{id}")
        ))
        .await;
    assert!(deploys.as_str().unwrap().contains("503"), "{deploys}");
    let builds = browser
        .wait(&format!(
            "(t => t.includes('healthy') && t)({})",
            row("routes", "/api/builds/{id}")
        ))
        .await;
    assert!(builds.as_str().unwrap().contains("200") || builds.as_str().unwrap().contains("304"));
    // Events flow: a rate above zero and a sparkline of several points.
    browser
        .wait("parseFloat(document.getElementById('eps').textContent) > 0")
        .await;
    browser
        .wait("document.getElementById('spark-line').getAttribute('points').split(' ').length >= 4")
        .await;

    // A new stream shows up on the page without a reload.
    let mut late = SseClient::connect(&h.url("/api/builds/3"), None).await;
    late.expect_event("snapshot", T).await;
    browser
        .wait("document.getElementById('streams').textContent === '8'")
        .await;
    browser
        .wait(&format!(
            "(t => /\\t2\\t/.test(t) && t)({})",
            row("topic-table", "/api/builds/3")
        ))
        .await;

    if let Ok(path) = std::env::var("HERALD_STATUS_SCREENSHOT") {
        // Let the sparkline fill a little more for the picture.
        browser
            .wait("document.getElementById('spark-line').getAttribute('points').split(' ').length >= 12")
            .await;
        browser
            .cmd(json!({"cmd": "screenshot", "path": path}))
            .await;
    }

    browser.quit().await;
    drop((clients, failing, late));
    h.stop().await;
    changer.await.unwrap();
    let Ok(up) = std::sync::Arc::try_unwrap(up) else {
        panic!("the changer task is done with the upstream");
    };
    up.stop().await;
}
