//! The core path end to end: a real upstream, herald on port 0, real SSE clients.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn snapshot_then_patches_with_wire_format() {
    let up = TestUpstream::start().await;
    let log = "x".repeat(400);
    up.set_json(
        "/api/builds/42",
        json!({"id": 42, "status": "queued", "steps": [1, 2], "log": log}),
    );
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"50ms\"\n",
    ))
    .await;

    let mut c = SseClient::connect(&h.url("/api/builds/42"), None).await;
    assert_eq!(c.status, 200);
    assert_eq!(c.headers["content-type"], "text/event-stream");
    assert_eq!(c.headers["cache-control"], "no-cache");
    assert_eq!(c.headers["x-accel-buffering"], "no");

    let first = c.next_any(T).await.expect("retry first");
    assert!(first.retry.is_some_and(|r| r >= 10_000), "{first:?}");
    let snap = c.expect_event("snapshot", T).await;
    assert_eq!(snap.event, "snapshot");
    let env = snap.json();
    assert_eq!(env["type"], "snapshot");
    assert_eq!(env["topic"], "/api/builds/42");
    assert!(env["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        env["data"],
        json!({"id": 42, "status": "queued", "steps": [1, 2], "log": log})
    );
    assert!(snap.id.is_some());

    let mut state = Some(env["data"].clone());
    let next = json!({"id": 42, "status": "running", "steps": [1, 2, 3], "log": log});
    up.set_json("/api/builds/42", next.clone());
    let patch = c.expect_event("patch", T).await;
    assert_eq!(patch.event, "patch");
    assert_ne!(patch.id, snap.id);
    apply_event(&mut state, &patch);
    assert!(
        patch.json()["data"].is_array(),
        "a small change to a big body is a JSON Patch"
    );
    assert_eq!(state.unwrap(), next);
    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn fifty_watchers_cost_one_poll_per_interval() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"n": 0}));
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"200ms\"\n",
    ))
    .await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut c = SseClient::connect(&h.url("/api/builds/1"), None).await;
        c.expect_event("snapshot", T).await;
        clients.push(c);
    }
    let before = up.hits("/api/builds/1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let polls = up.hits("/api/builds/1") - before;
    // 1 s at 200 ms ±5% jitter: 4 to 6 polls, regardless of 50 watchers.
    assert!(
        (3..=6).contains(&polls),
        "{polls} polls in 1s for 50 watchers"
    );
    assert_eq!(h.hub.topic_count(), 1);
    drop(clients);
    h.stop().await;
    up.stop().await;
}
