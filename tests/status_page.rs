//! The status page in a real browser: headless Chromium (driven by issue 7's
//! `tests/browser/cdp.mjs`) opens the admin listener's page, which follows herald over its own SSE
//! stream: it must show the open streams, the topics with their watchers, a failing upstream, a
//! moving throughput sparkline, and change when a new stream opens. Skipped, with a note, where
//! Chromium or Node is missing (CI installs them).
//!
//! `HERALD_STATUS_SCREENSHOT=docs/status.png cargo test --test status_page` saves a screenshot.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::admin::{AdminHerald, ADMIN};
use common::{config, Reply, SseClient, TestUpstream};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const CHROMIUM: &str = "/usr/bin/chromium";
const STEP: Duration = Duration::from_secs(20);
const T: Duration = Duration::from_secs(5);

/// The driver process (`tests/browser/cdp.mjs`) and its one-JSON-line-per-command protocol.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    async fn start() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() {
            eprintln!("note: {CHROMIUM} not found; skipping the status page test (CI installs it)");
            return None;
        }
        let node = std::process::Command::new("node").arg("--version").output();
        if !node.is_ok_and(|o| o.status.success()) {
            eprintln!("note: `node` not found; skipping the status page test");
            return None;
        }
        let mut child = Command::new("node")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/browser/cdp.mjs"
            ))
            .arg(CHROMIUM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the browser driver");
        let stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut b = Browser {
            child,
            stdin,
            lines,
        };
        let ready = b.read().await;
        assert_eq!(ready["ready"], true, "{ready}");
        Some(b)
    }

    async fn read(&mut self) -> Value {
        let line = tokio::time::timeout(STEP + Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("the driver answers in time")
            .expect("read from the driver")
            .expect("the driver is running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("driver said {line:?}: {e}"))
    }

    async fn cmd(&mut self, cmd: Value) -> Value {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .expect("write to the driver");
        let r = self.read().await;
        assert_eq!(r["ok"], true, "browser command {cmd} failed: {r:#}");
        r["value"].clone()
    }

    async fn wait(&mut self, expr: &str) -> Value {
        self.cmd(json!({"cmd": "wait", "expr": expr, "timeout": STEP.as_millis() as u64}))
            .await
    }

    async fn quit(mut self) {
        let _ = self.stdin.write_all(b"{\"cmd\":\"quit\"}\n").await;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the driver exits");
        assert!(status.is_ok());
    }
}

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
    let Some(mut browser) = Browser::start().await else {
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
