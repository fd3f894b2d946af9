//! `POST /_herald/publish`: the token (none, wrong, right) on the admin listener and on the
//! configured main-listener path; a poke that makes the next poll happen within 50 ms, for
//! every credential variant of a resource; a state published to a shared route reaching watchers
//! without a poll, and refused on a per-credential route.

mod common;

use std::time::Duration;

use common::admin::AdminHerald;
use common::{config, Reply, SseClient, TestUpstream};
use serde_json::json;
use tokio::time::Instant;

const TOKEN: &str = "publish-token-0123456789";
const WAIT: Duration = Duration::from_secs(10);

fn herald_config(upstream: &str) -> herald::Config {
    config(
        upstream,
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"

[publish]
token = "{TOKEN}"
path = "/_herald/publish"

[[route]]
path = "/shared/{{id}}"
interval = "60s"
share = "all"

[[route]]
path = "/mine/{{id}}"
interval = "60s"
"#
        ),
    )
}

async fn publish(
    url: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn publish_needs_the_token() {
    let upstream = TestUpstream::start().await;
    let herald = AdminHerald::start(herald_config(&upstream.url())).await;
    let admin = herald.admin_url("/_herald/publish");
    let body = json!({ "resource": "/shared/1" });
    let resp = reqwest::Client::new()
        .post(&admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "no token");
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, answer) = publish(&admin, Some("publish-token-wrong-guess"), body.clone()).await;
    assert_eq!(status, 401, "wrong token");
    assert_eq!(answer["error"], "unauthorized");
    assert!(
        !answer.to_string().contains(TOKEN),
        "the token is never echoed"
    );
    let (status, answer) = publish(&admin, Some(TOKEN), body.clone()).await;
    assert_eq!(
        (status, answer),
        (202, json!({ "topics": 0 })),
        "right token"
    );
    // The configured path on the main listener works the same.
    let main = herald.url("/_herald/publish");
    assert_eq!(publish(&main, None, body.clone()).await.0, 401);
    assert_eq!(publish(&main, Some(TOKEN), body.clone()).await.0, 202);
    let get = reqwest::get(&admin).await.unwrap();
    assert_eq!(get.status(), 405);
    let (status, answer) = publish(&admin, Some(TOKEN), json!({ "resource": "/nowhere" })).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("no-route")));
    let (status, _) = publish(&admin, Some(TOKEN), json!({ "nope": 1 })).await;
    assert_eq!(status, 400);
    herald.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn a_poke_makes_the_next_poll_happen_within_50ms() {
    let upstream = TestUpstream::start().await;
    upstream.set_json("/shared/1", json!({ "v": 0, "pad": "p".repeat(100) }));
    let herald = AdminHerald::start(herald_config(&upstream.url())).await;
    let mut w = SseClient::connect(&herald.url("/shared/1"), None).await;
    let first = w.expect_event("the snapshot", WAIT).await;
    assert_eq!(first.event, "snapshot");
    assert_eq!(upstream.hits("/shared/1"), 1);
    let admin = herald.admin_url("/_herald/publish");
    let mut best = Duration::MAX;
    for v in 1..=5 {
        upstream.set_json("/shared/1", json!({ "v": v, "pad": "p".repeat(100) }));
        let before = upstream.hits("/shared/1");
        let t0 = Instant::now();
        let (status, answer) =
            publish(&admin, Some(TOKEN), json!({ "resource": "/shared/1" })).await;
        assert_eq!((status, answer), (202, json!({ "topics": 1 })));
        let deadline = t0 + WAIT;
        while upstream.hits("/shared/1") == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        best = best.min(t0.elapsed());
        let ev = w.expect_event("the poked change", WAIT).await;
        assert_eq!(ev.event, "patch");
        assert!(ev.data.contains(&format!("\"value\":{v}")), "{ev:?}");
    }
    // The best of five, so a loaded machine's scheduling hiccup does not decide it.
    assert!(best < Duration::from_millis(50), "poke to poll: {best:?}");
    let info = herald.hub.topics_info();
    assert_eq!(info[0].source.as_ref().unwrap().pokes, 5);
    herald.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn a_poke_reaches_every_credential_variant() {
    let upstream = TestUpstream::start().await;
    for user in ["Bearer alice", "Bearer bob"] {
        upstream.set_for("/mine/1", user, Reply::json(json!({ "user": user })));
    }
    let herald = AdminHerald::start(herald_config(&upstream.url())).await;
    let client = reqwest::Client::new();
    let mut streams = Vec::new();
    for user in ["Bearer alice", "Bearer bob"] {
        let mut s = SseClient::connect_with(
            &client,
            &herald.url("/mine/1"),
            None,
            &[("authorization", user)],
        )
        .await;
        s.expect_event("the user's snapshot", WAIT).await;
        streams.push(s);
    }
    let (status, answer) = publish(
        &herald.admin_url("/_herald/publish"),
        Some(TOKEN),
        json!({ "resource": "/mine/1" }),
    )
    .await;
    assert_eq!((status, answer), (202, json!({ "topics": 2 })));
    let up = &upstream;
    assert!(
        common::eventually(WAIT, || up.hits_by("/mine/1", "Bearer alice") == 2
            && up.hits_by("/mine/1", "Bearer bob") == 2)
        .await,
        "each user's topic polled again with its own credentials"
    );
    herald.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn a_state_is_fanned_out_without_a_poll_on_shared_routes_only() {
    let upstream = TestUpstream::start().await;
    upstream.set_json("/shared/2", json!({ "v": 1, "pad": "p".repeat(100) }));
    upstream.set_for("/mine/2", "Bearer alice", Reply::json(json!({ "v": 1 })));
    let herald = AdminHerald::start(herald_config(&upstream.url())).await;
    let mut a = SseClient::connect(&herald.url("/shared/2"), None).await;
    let mut b = SseClient::connect(&herald.url("/shared/2"), None).await;
    a.expect_event("a's snapshot", WAIT).await;
    b.expect_event("b's snapshot", WAIT).await;
    let admin = herald.admin_url("/_herald/publish");
    let (status, answer) = publish(
        &admin,
        Some(TOKEN),
        json!({ "resource": "/shared/2", "data": { "v": 42, "pad": "p".repeat(100) } }),
    )
    .await;
    assert_eq!((status, answer), (202, json!({ "topics": 1 })));
    for w in [&mut a, &mut b] {
        let ev = w.expect_event("the published state", WAIT).await;
        assert_eq!(ev.event, "patch");
        assert!(ev.data.contains("\"value\":42"), "{ev:?}");
    }
    assert_eq!(upstream.hits("/shared/2"), 1, "no poll was needed");
    // On a per-credential route one body cannot be every user's view.
    let mut mine = SseClient::connect_with(
        &reqwest::Client::new(),
        &herald.url("/mine/2"),
        None,
        &[("authorization", "Bearer alice")],
    )
    .await;
    mine.expect_event("alice's snapshot", WAIT).await;
    let (status, answer) = publish(
        &admin,
        Some(TOKEN),
        json!({ "resource": "/mine/2", "data": { "v": 2 } }),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(answer["error"], "per-credential-route");
    assert!(
        mine.next_event(Duration::from_millis(300)).await.is_none(),
        "nothing reached the per-credential watcher"
    );
    herald.stop().await;
    upstream.stop().await;
}
