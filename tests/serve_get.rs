//! Plain GETs on streamable routes, over real HTTP: a page's GET names the stream position of the
//! state it returned (`Herald-Event-Id`), and a stream started there has no gap and no second
//! snapshot; with `serve_get = "topic"`, pollers of a live topic are answered from its state
//! (ETag, 304, Age) and the upstream sees one request per interval, while another credential, a
//! failing upstream or a reload request still reach the upstream.

mod common;

use std::time::{Duration, Instant};

use common::admin::{AdminHerald, ADMIN};
use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);
const B: &str = "/api/builds/1";

/// A build large enough that a one-field change goes out as a patch.
fn build(n: u64) -> Value {
    json!({"id": 1, "n": n, "steps": ["fetch", "compile", "test", "package"], "log": "x".repeat(200)})
}

async fn get(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn event_id(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("herald-event-id")
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn a_page_streams_from_its_get_without_a_gap_or_a_second_snapshot() {
    let up = TestUpstream::start().await;
    up.set_json(B, build(1));
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"40ms\"\n",
    ))
    .await;
    // No live topic: the GET passes through unmarked (herald cannot vouch for its position).
    let cold = get(&h.url(B), &[]).await;
    assert_eq!(cold.status(), 200);
    assert_eq!(event_id(&cold), None);

    // Someone watches the build: its topic is live.
    let mut other = SseClient::connect(&h.url(B), None).await;
    other.expect_event("snapshot", T).await;
    for (how, n) in [("header", 2), ("query", 4)] {
        // The page renders from a GET...
        let page = get(&h.url(B), &[]).await;
        let id = event_id(&page).unwrap_or_else(|| panic!("{how}: no Herald-Event-Id"));
        let mut state = Some(page.json::<Value>().await.unwrap());
        assert_eq!(state.as_ref().unwrap()["n"], n - 1);
        // ...a change lands before its stream opens...
        up.set_json(B, build(n));
        let seen = other.expect_event("the change", T).await;
        assert_eq!(seen.event, "patch");
        // ...and the stream starts where the page is: the change, not a snapshot.
        let mut c = match how {
            "header" => SseClient::connect(&h.url(B), Some(&id)).await,
            _ => SseClient::connect(&h.url(&format!("{B}?last_event_id={id}")), None).await,
        };
        let ev = c.expect_event("first event", T).await;
        assert_eq!(ev.event, "patch", "{how}: {ev:?}");
        apply_event(&mut state, &ev);
        assert_eq!(state, Some(build(n)), "{how}");
        // One more change on the page's stream, so the next round starts from a settled state.
        up.set_json(B, build(n + 1));
        let ev = c.expect_event("next change", T).await;
        apply_event(&mut state, &ev);
        assert_eq!(state, Some(build(n + 1)), "{how}");
        other.expect_event("next change", T).await;
    }
    // `last_event_id` says where the client is, not what it watches: one topic for all.
    assert_eq!(h.hub.topic_count(), 1);
    drop(other);
    h.stop().await;
    up.stop().await;
}

fn serving(extra: &str) -> String {
    format!("[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"200ms\"\nserve_get = \"topic\"\n{extra}{ADMIN}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollers_of_a_live_topic_are_served_from_its_state() {
    let up = TestUpstream::start().await;
    up.set_json(B, build(1));
    // A poll timeout a loaded machine does not hit: a poll that times out clears the topic's
    // freshness, and the GETs waiting on it pass through (and lose their ETag).
    let h = AdminHerald::start(config(&up.url(), &serving("timeout = \"5s\"\n"))).await;
    let mut watcher = SseClient::connect(&h.url(B), None).await;
    watcher.expect_event("snapshot", T).await;

    // 100 clients poll every 200 ms for 2 s, each revalidating with the ETag it was given.
    let before = up.hits(B);
    let started = Instant::now();
    let pollers = (0..100).map(|_| {
        let url = h.url(B);
        tokio::spawn(async move {
            let (mut served, mut not_modified, mut etag) = (0u32, 0u32, None::<String>);
            for _ in 0..10 {
                let headers: Vec<(&str, &str)> = etag
                    .as_deref()
                    .map(|e| vec![("if-none-match", e)])
                    .unwrap_or_default();
                let resp = get(&url, &headers).await;
                match resp.status().as_u16() {
                    200 => {
                        served += 1;
                        etag = resp
                            .headers()
                            .get("etag")
                            .map(|v| v.to_str().unwrap().to_string());
                        let body: Value = resp.json().await.unwrap();
                        assert_eq!(body["id"], 1);
                    }
                    304 => not_modified += 1,
                    s => panic!("status {s}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (served, not_modified)
        })
    });
    let results = futures_util::future::join_all(pollers).await;
    let elapsed = started.elapsed();
    let (served, not_modified) = results
        .into_iter()
        .map(|r| r.unwrap())
        .fold((0, 0), |(a, b), (s, n)| (a + s, b + n));
    assert_eq!(served + not_modified, 1000);
    assert!(
        not_modified >= 800,
        "unchanged state revalidates: {not_modified} of 1000"
    );
    // The upstream saw herald's own polls (one per interval), not the pollers' 1,000 GETs: the
    // few that fell between two polls (state not yet confirmed) passed through.
    let polls = (elapsed.as_millis() / 200) as usize + 2;
    let hits = up.hits(B) - before;
    assert!(
        hits <= polls + 3,
        "{hits} upstream requests in {elapsed:?} (herald's own polls: about {polls})"
    );
    let m = h.scrape().await;
    let by = |answer: &str| {
        m.get(&format!(
            "herald_gets_total{{route=\"/api/builds/{{id}}\",answer=\"{answer}\"}}"
        ))
    };
    assert_eq!(
        by("topic") + by("not-modified") + by("upstream"),
        1000.0,
        "{}",
        m.0
    );
    assert!(by("not-modified") >= 800.0);

    // A served answer says how old and where it is.
    let resp = get(&h.url(B), &[]).await;
    assert_eq!(resp.status(), 200);
    let age: u64 = resp.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(age <= 1, "age {age}");
    assert!(resp.headers().contains_key("herald-event-id"));
    // Topics are per credential by default (here: the anonymous one), so caches keep it private.
    assert_eq!(resp.headers()["cache-control"], "private, no-cache");
    // A client that asks for a reload reaches the upstream.
    let before = up.hits(B);
    let reload = get(&h.url(B), &[("cache-control", "no-cache")]).await;
    assert!(!reload.headers().contains_key("age"), "passed through");
    assert!(up.hits(B) > before);

    // A change is served at once, under a new ETag.
    up.set_json(B, build(2));
    watcher.expect_event("change", T).await;
    let resp = get(&h.url(B), &[]).await;
    assert_eq!(resp.json::<Value>().await.unwrap()["n"], 2);

    // A failing upstream is not covered for: GETs pass through and see the failure.
    up.set(B, Reply::status(503, "{\"error\":\"down\"}"));
    watcher.expect_event("upstream-error", T).await;
    assert_eq!(get(&h.url(B), &[]).await.status(), 503);

    drop(watcher);
    h.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), h.join).await;
    up.stop().await;
}

#[tokio::test]
async fn only_the_same_credential_is_served_from_a_topic() {
    const ME: &str = "/api/me";
    let up = TestUpstream::start().await;
    up.set_for(ME, "Bearer alice", Reply::json(json!({"me": "alice"})));
    up.set_for(ME, "Bearer bob", Reply::json(json!({"me": "bob"})));
    let h = start_herald(config(
        &up.url(),
        &format!("[[route]]\npath = \"{ME}\"\ninterval = \"200ms\"\nserve_get = \"topic\"\n"),
    ))
    .await;
    let mut alice = SseClient::connect_with(
        &reqwest::Client::new(),
        &h.url(ME),
        None,
        &[("authorization", "Bearer alice")],
    )
    .await;
    alice.expect_event("snapshot", T).await;
    // Alice's GET is hers, from her topic, private to her.
    let resp = get(&h.url(ME), &[("authorization", "Bearer alice")]).await;
    assert_eq!(resp.headers()["cache-control"], "private, no-cache");
    assert!(resp.headers().contains_key("age"), "served from the topic");
    assert_eq!(resp.json::<Value>().await.unwrap()["me"], "alice");
    // Bob has no live topic: his GET goes to the upstream, and is his.
    let bob_before = up.hits_by(ME, "Bearer bob");
    let resp = get(&h.url(ME), &[("authorization", "Bearer bob")]).await;
    assert!(!resp.headers().contains_key("age"), "passed through");
    assert_eq!(resp.json::<Value>().await.unwrap()["me"], "bob");
    assert_eq!(up.hits_by(ME, "Bearer bob"), bob_before + 1);
    // No credential at all: not Alice's either.
    let resp = get(&h.url(ME), &[]).await;
    assert!(!resp.headers().contains_key("age"));
    drop(alice);
    h.stop().await;
    up.stop().await;
}
