//! What several nodes must agree on: a topic's key and id (route template, resource, keyed
//! credential hash) are the same for the same request on two heralds configured with the same
//! secret, and differ without one; patch envelopes name their format in both diff modes.

mod common;

use std::time::Duration;

use common::*;
use http::{HeaderMap, HeaderValue};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

fn routes(secret: Option<&str>, diff: &str) -> String {
    let cluster = secret.map_or(String::new(), |s| format!("[cluster]\nsecret = \"{s}\"\n"));
    format!(
        "{cluster}[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"20ms\"\ndiff = \"{diff}\"\n"
    )
}

fn alice() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("authorization", HeaderValue::from_static("Bearer alice"));
    h
}

#[tokio::test]
async fn the_same_secret_gives_the_same_topic_on_two_heralds() {
    let secret = "a shared secret of some length";
    let a = herald::Herald::new(config(
        "http://127.0.0.1:9",
        &routes(Some(secret), "json-patch"),
    ))
    .unwrap();
    let b = herald::Herald::new(config(
        "http://127.0.0.1:9",
        &routes(Some(secret), "json-patch"),
    ))
    .unwrap();
    let ka = a.topic_for("/api/builds/7", &alice()).await.expect("topic");
    let kb = b.topic_for("/api/builds/7", &alice()).await.expect("topic");
    assert_eq!(ka, kb);
    assert_eq!(ka.id(), kb.id());
    assert_ne!(ka.vary, 0, "a per-credential topic");
    assert_eq!(
        &*ka.route, "/api/builds/{id}",
        "named by template, not position"
    );
    // Another user, another topic; the same user on another resource, another topic.
    let mut bob = HeaderMap::new();
    bob.insert("authorization", HeaderValue::from_static("Bearer bob"));
    let kbob = a.topic_for("/api/builds/7", &bob).await.unwrap();
    assert_ne!(kbob.id(), ka.id());
    assert_ne!(
        a.topic_for("/api/builds/8", &alice()).await.unwrap().id(),
        ka.id()
    );
    // The id names nothing: no resource, no credential in its text.
    let text = ka.id().to_string();
    assert_eq!(text.len(), 32);
    assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
}

#[tokio::test]
async fn without_a_secret_each_herald_keys_credentials_its_own_way() {
    // The environment's secret would make them agree: this test is about having none.
    if std::env::var_os(herald::config::CLUSTER_SECRET_ENV).is_some() {
        eprintln!("skipped: {} is set", herald::config::CLUSTER_SECRET_ENV);
        return;
    }
    let a = herald::Herald::new(config("http://127.0.0.1:9", &routes(None, "json-patch"))).unwrap();
    let b = herald::Herald::new(config("http://127.0.0.1:9", &routes(None, "json-patch"))).unwrap();
    let ka = a.topic_for("/api/builds/7", &alice()).await.unwrap();
    let kb = b.topic_for("/api/builds/7", &alice()).await.unwrap();
    assert_ne!(ka.vary, kb.vary);
    assert_ne!(ka.id(), kb.id());
    // Public data needs no secret to agree: no credential, vary 0.
    let pa = a
        .topic_for("/api/builds/7", &HeaderMap::new())
        .await
        .unwrap();
    let pb = b
        .topic_for("/api/builds/7", &HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(pa.id(), pb.id());
}

#[tokio::test]
async fn a_short_secret_is_refused_at_its_line() {
    let text = "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\n[cluster]\nsecret = \"short\"\n";
    let err = herald::config::parse(text, "proxy.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("proxy.toml:4:") && err.contains("cluster.secret"),
        "{err}"
    );
    assert!(
        !err.contains("short\""),
        "the secret itself is not echoed: {err}"
    );
}

/// The first patch of a stream in `diff` mode, as its envelope.
async fn first_patch(diff: &str) -> serde_json::Value {
    let up = TestUpstream::start().await;
    let doc = |status: &str| json!({"id": 1, "status": status, "log": "x".repeat(200)});
    up.set_json("/api/builds/1", doc("running"));
    let h = start_herald(config(&up.url(), &routes(None, diff))).await;
    let mut c = SseClient::connect(&h.url("/api/builds/1"), None).await;
    c.expect_event("snapshot", T).await;
    up.set_json("/api/builds/1", doc("passed"));
    let patch = c.expect_event("patch", T).await.json();
    drop(c);
    h.stop().await;
    up.stop().await;
    patch
}

#[tokio::test]
async fn patches_name_their_format_in_both_modes() {
    let p = first_patch("json-patch").await;
    assert_eq!(p["format"], "json-patch", "{p}");
    assert_eq!(
        p["data"],
        json!([{"op": "replace", "path": "/status", "value": "passed"}])
    );
    let p = first_patch("merge-patch").await;
    assert_eq!(p["format"], "merge-patch", "{p}");
    assert_eq!(p["data"], json!({"status": "passed"}));
}
