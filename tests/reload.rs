//! Config reload under live streams, through `POST /reload`, `herald reload` and SIGHUP: an
//! unchanged route's streams keep flowing, a changed route's streams end with a final event and
//! reconnect to the new settings, an added route streams, a removed one passes through again, and
//! an invalid file is refused with its line while the running config stays.

mod common;

use std::path::Path;
use std::time::Duration;

use common::admin::{AdminHerald, ADMIN};
use common::{SseClient, TestUpstream};
use serde_json::json;

const T: Duration = Duration::from_secs(5);
/// What `POST /reload` must carry.
const TOKEN: &str = "a-reload-token-of-some-length";

fn doc(name: &str, n: u32) -> serde_json::Value {
    json!({"name": name, "n": n, "steps": ["fetch", "compile", "test", "package", "publish"]})
}

fn write_config(path: &Path, upstream: &str, routes: &[(&str, &str)]) {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{ADMIN}token = \"{TOKEN}\"\n"
    );
    for (p, interval) in routes {
        text.push_str(&format!(
            "\n[[route]]\npath = \"{p}\"\ninterval = \"{interval}\"\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

async fn reload(h: &AdminHerald) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(h.admin_url("/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Read until a `patch` or `snapshot` carrying `n`, skipping nothing else silently.
async fn expect_n(c: &mut SseClient, n: u32, what: &str) {
    let ev = c.expect_event(what, T).await;
    let env = ev.json();
    let got = match ev.event.as_str() {
        "snapshot" => env["data"]["n"].clone(),
        "patch" => env["data"][0]["value"].clone(),
        other => panic!("{what}: unexpected {other}: {}", ev.data),
    };
    assert_eq!(got, json!(n), "{what}: {}", ev.data);
}

#[tokio::test]
async fn reload_changes_routes_under_live_streams() {
    let up = TestUpstream::start().await;
    for p in ["a", "b", "c"] {
        up.set_json(&format!("/api/{p}/1"), doc(p, 1));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    write_config(
        &file,
        &up.url(),
        &[("/api/a/{id}", "30ms"), ("/api/b/{id}", "30ms")],
    );
    let h = AdminHerald::start(herald::config::load(&file).unwrap()).await;

    let mut a = SseClient::connect(&h.url("/api/a/1"), None).await;
    let mut b = SseClient::connect(&h.url("/api/b/1"), None).await;
    expect_n(&mut a, 1, "a's snapshot").await;
    expect_n(&mut b, 1, "b's snapshot").await;

    // b changes, c is added, a stays.
    write_config(
        &file,
        &up.url(),
        &[
            ("/api/a/{id}", "30ms"),
            ("/api/b/{id}", "40ms"),
            ("/api/c/{id}", "30ms"),
        ],
    );
    let (status, report) = reload(&h).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["changed"], json!(["/api/b/{id}"]));
    assert_eq!(report["added"], json!(["/api/c/{id}"]));
    assert_eq!(report["removed"], json!([]));
    assert_eq!(report["unchanged"], 1);
    assert_eq!(report["topics_closed"], 1);
    assert_eq!(report["restart_required"], json!([]));

    // b's stream ends with a final event that sends the client back (to the new settings).
    let last = b.expect_event("b's final event", T).await;
    assert_eq!(last.event, "shutdown");
    assert_eq!(last.json()["data"]["reason"], "route reconfigured");
    assert!(matches!(
        b.next_item(T).await,
        common::Next::End | common::Next::Item(_)
    ));
    // a never noticed: its next change arrives on the same stream.
    up.set_json("/api/a/1", doc("a", 2));
    expect_n(&mut a, 2, "a's change after the reload").await;
    // The changed route and the added one stream.
    let mut b2 = SseClient::connect(&h.url("/api/b/1"), None).await;
    expect_n(&mut b2, 1, "b's snapshot after the reload").await;
    let mut c = SseClient::connect(&h.url("/api/c/1"), None).await;
    assert_eq!(c.status, 200);
    expect_n(&mut c, 1, "c's snapshot").await;

    // An invalid file: refused with its line and key; everything keeps running.
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n[[route]]\npath = \"/api/a/{{id}}\"\ninterval = \"2x\"\n",
            up.url()
        ),
    )
    .unwrap();
    let (status, err) = reload(&h).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"], "invalid-config");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("proxy.toml:6:"), "{message}");
    assert!(message.contains("interval"), "{message}");
    up.set_json("/api/a/1", doc("a", 3));
    expect_n(&mut a, 3, "a's change after a refused reload").await;
    up.set_json("/api/c/1", doc("c", 2));
    expect_n(&mut c, 2, "c's change after a refused reload").await;

    // `herald reload` (the command) removes c: its stream ends, and the path passes through.
    write_config(
        &file,
        &up.url(),
        &[("/api/a/{id}", "30ms"), ("/api/b/{id}", "40ms")],
    );
    let admin = h.admin_addr.to_string();
    let config = file.clone();
    let out = tokio::task::spawn_blocking(move || {
        // The token comes from the config file, as an operator's would.
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["reload", "--admin", &admin, "--config"])
            .arg(&config)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("removed") && stdout.contains("/api/c/{id}"),
        "{stdout}"
    );
    let last = c.expect_event("c's final event", T).await;
    assert_eq!(last.event, "shutdown");
    let plain = reqwest::Client::new()
        .get(h.url("/api/c/1"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.headers()["content-type"], "application/json");

    // SIGHUP (what `systemctl reload` sends) reloads too: c comes back. The signal goes to this
    // whole test process, so it is sent here only, once this herald is the one to answer it.
    write_config(
        &file,
        &up.url(),
        &[("/api/a/{id}", "30ms"), ("/api/c/{id}", "30ms")],
    );
    let pid = std::process::id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let back = common::eventually(T, || {
        h.admin.app_routes().iter().any(|r| r == "/api/c/{id}")
    })
    .await;
    assert!(back, "SIGHUP did not reload: {:?}", h.admin.app_routes());
    let mut c = SseClient::connect(&h.url("/api/c/1"), None).await;
    expect_n(&mut c, 2, "c's snapshot after SIGHUP").await;
    // b was removed by it: its new stream ended.
    let last = b2.expect_event("b's final event", T).await;
    assert_eq!(last.event, "shutdown");
    up.set_json("/api/a/1", doc("a", 4));
    expect_n(&mut a, 4, "a's change after SIGHUP").await;

    let m = h.scrape().await;
    assert_eq!(m.get("herald_config_reloads_total{result=\"ok\"}"), 3.0);
    assert_eq!(
        m.get("herald_config_reloads_total{result=\"rejected\"}"),
        1.0
    );

    drop((a, b, c));
    h.stop().await;
    up.stop().await;
}
