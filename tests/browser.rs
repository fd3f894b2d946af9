//! End to end in a real browser (issue 7): headless Chromium opens the demo page over HTTPS and
//! HTTP/2, watches several builds on one connection through `/_herald/client.js`, sees the DOM
//! follow upstream changes, drops and re-adds a watch on the live stream, survives a herald
//! restart, and ends with the upstream's state. Driven by `tests/browser/cdp.mjs` (the DevTools
//! protocol over a pipe, no npm packages). Skipped, with a note, where Chromium or Node is missing;
//! CI installs Chromium (`.ci/run`).
//!
//! `HERALD_SCREENSHOT=path.png cargo test --test browser` also saves a screenshot of the page.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::browser::{Browser, STEP};
use common::*;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A build as the demo API serves it.
fn build(id: u64, status: &str, progress: u64) -> Value {
    let steps: Vec<Value> = ["checkout", "build", "test", "deploy"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let done = (progress as usize * 4) / 100;
            let s = if status == "passed" || i < done {
                "passed"
            } else if i == done && status == "running" {
                "running"
            } else {
                "pending"
            };
            json!({"name": name, "status": s})
        })
        .collect();
    json!({"id": id, "name": format!("service-{id}"), "run": 1, "status": status,
           "progress": progress, "steps": steps, "updated_at": "2026-01-10T10:00:00Z"})
}

fn set_build(up: &TestUpstream, id: u64, status: &str, progress: u64) {
    up.set_json(&format!("/api/builds/{id}"), build(id, status, progress));
}

/// herald over TLS (HTTP/2 by ALPN) with the demo's self-signed certificate, on `listener`.
fn start_tls(
    upstream: &str,
    listener: TcpListener,
) -> (
    herald::hub::Hub,
    CancellationToken,
    JoinHandle<herald::Result<()>>,
) {
    let text = "[sse]\nretry = \"300ms\"\nretry_jitter = \"200ms\"\n\
        [[route]]\npath = \"/api/builds/{id}\"\ninterval = \"50ms\"\n";
    let herald = herald::Herald::new(config(upstream, text)).expect("herald starts");
    let hub = herald.hub().clone();
    let tls = herald::demo::self_signed_tls().expect("a certificate");
    let shutdown = CancellationToken::new();
    let listeners = vec![herald::server::Listener::tls(listener, tls)];
    let join = tokio::spawn(herald.serve_on(listeners, shutdown.clone()));
    (hub, shutdown, join)
}

async fn stop(shutdown: CancellationToken, join: JoinHandle<herald::Result<()>>) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), join)
        .await
        .expect("herald stops")
        .expect("herald task")
        .expect("herald ok");
}

fn watchers(hub: &herald::hub::Hub, id: u64) -> usize {
    let resource = format!("/api/builds/{id}");
    hub.topics_info()
        .iter()
        .filter(|t| t.resource == resource)
        .map(|t| t.watchers)
        .sum()
}

/// The JS condition "row `id` shows `status`".
fn shows(id: u64, status: &str) -> String {
    format!("document.querySelector('#build-{id} td.status')?.textContent === '{status}'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_follows_builds_across_a_restart() {
    let Some(mut browser) = Browser::start("the browser test").await else {
        return;
    };
    let up = TestUpstream::start().await;
    up.set(
        "/",
        Reply::raw(
            Some("text/html; charset=utf-8"),
            herald::demo::PAGE.as_bytes(),
        ),
    );
    for id in 1..=3 {
        set_build(&up, id, "running", 25);
    }
    up.set_json(
        "/api/builds",
        json!({"builds": [build(1, "running", 25), build(2, "running", 25), build(3, "running", 25)]}),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (hub, shutdown, join) = start_tls(&up.url(), listener);

    // The page, over HTTPS and HTTP/2, every build live on one connection.
    let page = format!("https://127.0.0.1:{}/", addr.port());
    browser.cmd(json!({"cmd": "goto", "url": page})).await;
    browser
        .wait("document.getElementById('status').dataset.status === 'live'")
        .await;
    for id in 1..=3 {
        browser.wait(&shows(id, "running")).await;
    }
    let proto = browser
        .eval("performance.getEntriesByType('navigation')[0].nextHopProtocol")
        .await;
    assert_eq!(proto, "h2");
    let conns = browser
        .eval("[heraldClient.conns.size, heraldClient.stats.opens]")
        .await;
    assert_eq!(conns, json!([1, 1]), "one connection for three builds");
    for id in 1..=3 {
        assert_eq!(
            watchers(&hub, id),
            1,
            "build {id}: one watcher, the page's stream"
        );
    }

    // An upstream change reaches the DOM.
    set_build(&up, 2, "passed", 100);
    browser.wait(&shows(2, "passed")).await;
    browser
        .wait("document.querySelectorAll('#build-2 .steps .passed').length === 4")
        .await;

    // Unticking a build drops its watch on the live stream; ticking it again brings a snapshot.
    browser
        .eval("document.querySelector('#build-3 input').click()")
        .await;
    assert!(eventually(STEP, || watchers(&hub, 3) == 0).await);
    set_build(&up, 3, "failed", 100);
    browser
        .eval("document.querySelector('#build-3 input').click()")
        .await;
    browser.wait(&shows(3, "failed")).await;
    assert_eq!(watchers(&hub, 3), 1);

    // herald restarts; a change made while it was down shows up once the page is back.
    stop(shutdown, join).await;
    set_build(&up, 1, "failed", 60);
    let listener = TcpListener::bind(addr).await.expect("rebind herald's port");
    let (hub, shutdown, join) = start_tls(&up.url(), listener);
    browser.wait(&shows(1, "failed")).await;
    browser
        .wait("document.getElementById('status').dataset.status === 'live'")
        .await;
    set_build(&up, 2, "running", 50);
    browser.wait(&shows(2, "running")).await;

    // The right state at the end, every build, still one connection.
    for (id, status, progress) in [(1, "failed", 60), (2, "running", 50), (3, "failed", 100)] {
        let got = browser
            .eval(&format!(
                "[document.querySelector('#build-{id} td.status').textContent, \
                  document.querySelector('#build-{id} .bar > div').style.width]"
            ))
            .await;
        assert_eq!(got, json!([status, format!("{progress}%")]), "build {id}");
        assert_eq!(watchers(&hub, id), 1, "build {id}");
    }
    let stats = browser
        .eval("[heraldClient.conns.size, heraldClient.stats.resyncs]")
        .await;
    assert_eq!(stats, json!([1, 0]));
    let console = browser.cmd(json!({"cmd": "console"})).await;
    assert!(
        !console.to_string().contains("exception"),
        "page errors: {console}"
    );
    if let Ok(path) = std::env::var("HERALD_SCREENSHOT") {
        browser
            .cmd(json!({"cmd": "screenshot", "path": path}))
            .await;
    }
    browser.quit().await;
    stop(shutdown, join).await;
    up.stop().await;
}
