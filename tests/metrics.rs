//! The admin listener over real HTTP: `/metrics` moves as streams open and close, events flow,
//! the upstream answers 304 or fails; `/healthz`, `/readyz` and the status JSON answer.

mod common;

use std::time::Duration;

use common::admin::{AdminHerald, ADMIN};
use common::{config, free_addr, Reply, SseClient, TestUpstream};
use serde_json::json;

const T: Duration = Duration::from_secs(5);
const R: &str = "/api/builds/{id}";

/// A build big enough that a one-field change goes out as a patch, not a new snapshot.
fn doc(n: u32) -> serde_json::Value {
    json!({"n": n, "name": "nightly build of the main branch", "steps": ["fetch", "compile", "test", "package"]})
}

fn series(name: &str, labels: &str) -> String {
    format!("{name}{{{labels}}}")
}

fn route(extra: &str) -> String {
    format!("route=\"{R}\"{extra}")
}

#[tokio::test]
async fn metrics_follow_streams_events_and_upstream() {
    let up = TestUpstream::start().await;
    up.set(
        "/api/builds/1",
        Reply::json(doc(1)).header("etag", "\"v1\""),
    );
    let cfg = config(
        &up.url(),
        &format!("[[route]]\npath = \"{R}\"\ninterval = \"30ms\"\n{ADMIN}"),
    );
    let h = AdminHerald::start(cfg).await;

    let health = reqwest::get(h.admin_url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(h.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let m = h.scrape().await;
    assert_eq!(m.get(&series("herald_streams_open", &route(""))), 0.0);
    assert_eq!(m.get("herald_topics_alive"), 0.0);

    // A stream opens: gauges, the connection's protocol, and the first poll (200).
    let mut c = SseClient::connect(&h.url("/api/builds/1"), None).await;
    let first = c.expect_event("snapshot", T).await;
    assert_eq!(first.event, "snapshot");
    let m = h
        .scrape_until(T, |m| {
            m.get(&series(
                "herald_upstream_requests_total",
                &route(",status=\"304\""),
            )) >= 1.0
        })
        .await;
    assert_eq!(m.get(&series("herald_streams_open", &route(""))), 1.0);
    assert_eq!(
        m.get(&series("herald_streams_opened_total", &route(""))),
        1.0
    );
    assert_eq!(m.get("herald_topics_alive"), 1.0);
    assert!(
        m.get("herald_connections_open{protocol=\"h1\",tls=\"false\"}") >= 1.0,
        "{}",
        m.0
    );
    assert_eq!(
        m.get(&series(
            "herald_upstream_requests_total",
            &route(",status=\"200\"")
        )),
        1.0
    );
    // The ETag made every later poll conditional: 304s, counted apart.
    assert!(
        m.get(&series(
            "herald_upstream_requests_total",
            &route(",status=\"304\"")
        )) >= 1.0
    );
    assert!(
        m.get(&series(
            "herald_upstream_request_duration_seconds_count",
            &route("")
        )) >= 2.0
    );
    assert_eq!(m.get(&series("herald_events_sent_total", &route(""))), 1.0);
    let snapshot_bytes = m.get(&series("herald_event_bytes_total", &route("")));
    assert!(snapshot_bytes > 10.0);
    // The first snapshot says nothing about delivery latency.
    assert_eq!(
        m.get(&series("herald_delivery_latency_seconds_count", &route(""))),
        0.0
    );

    // A change flows: one more event, its bytes, and one latency sample.
    up.set(
        "/api/builds/1",
        Reply::json(doc(2)).header("etag", "\"v2\""),
    );
    let patch = c.expect_event("patch", T).await;
    assert_eq!(patch.event, "patch");
    let m = h.scrape().await;
    assert_eq!(m.get(&series("herald_events_sent_total", &route(""))), 2.0);
    assert!(m.get(&series("herald_event_bytes_total", &route(""))) > snapshot_bytes);
    assert!(
        m.get(&series("herald_stream_bytes_total", &route("")))
            >= m.get(&series("herald_event_bytes_total", &route(""))),
        "identity stream bytes include the events' bytes"
    );
    assert_eq!(
        m.get(&series("herald_delivery_latency_seconds_count", &route(""))),
        1.0
    );
    assert_eq!(
        m.get(&format!(
            "herald_delivery_latency_seconds_bucket{{le=\"+Inf\",{}}}",
            route("")
        )),
        1.0,
        "{}",
        m.0
    );

    // The upstream fails: counted by status, and the stream is told.
    up.set("/api/builds/1", Reply::status(503, "{}"));
    let err = c.expect_event("upstream-error", T).await;
    assert_eq!(err.event, "upstream-error");
    let m = h.scrape().await;
    assert!(
        m.get(&series(
            "herald_upstream_requests_total",
            &route(",status=\"503\"")
        )) >= 1.0
    );

    // Reconnects: a Last-Event-ID still in history is replayed; an unknown one gets a snapshot.
    let id = c.last_event_id().unwrap();
    let replayed = SseClient::connect(&h.url("/api/builds/1"), Some(&id)).await;
    let mut resynced = SseClient::connect(&h.url("/api/builds/1"), Some("zz-1")).await;
    assert_eq!(resynced.expect_event("snapshot", T).await.event, "snapshot");
    let m = h.scrape().await;
    assert_eq!(
        m.get(&series(
            "herald_reconnects_total",
            &route(",outcome=\"replay\"")
        )),
        1.0
    );
    assert_eq!(
        m.get(&series(
            "herald_reconnects_total",
            &route(",outcome=\"snapshot\"")
        )),
        1.0
    );
    assert_eq!(m.get(&series("herald_streams_open", &route(""))), 3.0);

    // The status JSON sees the same.
    let status: serde_json::Value = reqwest::get(h.admin_url("/status.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["streams"], 3);
    assert_eq!(status["topics"][0]["resource"], "/api/builds/1");
    assert_eq!(status["topics"][0]["watchers"], 3);
    assert_eq!(status["topics"][0]["failing"], true);
    assert_eq!(status["routes"][0]["route"], R);
    assert_eq!(status["routes"][0]["upstream"]["last_status"], "503");

    // Streams close: the gauge goes back to 0 once the connections are gone.
    drop((c, replayed, resynced));
    let m = h
        .scrape_until(T, |m| {
            m.get(&series("herald_streams_open", &route(""))) == 0.0
        })
        .await;
    assert_eq!(m.get(&series("herald_streams_open", &route(""))), 0.0);
    assert_eq!(
        m.get(&series("herald_streams_opened_total", &route(""))),
        3.0
    );

    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_and_h2_connections_are_counted() {
    let down = free_addr().await;
    let cfg = config(
        &format!("http://{down}"),
        &format!("[[route]]\npath = \"{R}\"\ninterval = \"50ms\"\n{ADMIN}"),
    );
    let h = AdminHerald::start(cfg).await;
    let mut c = SseClient::connect(&h.url("/api/builds/7"), None).await;
    assert_eq!(
        c.expect_event("upstream-error", T).await.event,
        "upstream-error"
    );
    let m = h
        .scrape_until(T, |m| {
            m.get(&series(
                "herald_upstream_requests_total",
                &route(",status=\"unreachable\""),
            )) >= 1.0
        })
        .await;
    assert!(
        m.get(&series(
            "herald_upstream_requests_total",
            &route(",status=\"unreachable\"")
        )) >= 1.0,
        "{}",
        m.0
    );

    // HTTP/2 with prior knowledge is told apart from HTTP/1.1 by its preface.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2.get(h.url("/other")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let m = h.scrape().await;
    assert_eq!(
        m.get("herald_connections_total{protocol=\"h2\",tls=\"false\"}"),
        1.0,
        "{}",
        m.0
    );
    assert!(m.get("herald_connections_total{protocol=\"h1\",tls=\"false\"}") >= 1.0);

    // Unknown admin paths and methods.
    let nf = reqwest::get(h.admin_url("/nope")).await.unwrap();
    assert_eq!(nf.status(), 404);
    let bad = reqwest::Client::new()
        .delete(h.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 405);

    drop((c, resp));
    h.stop().await;
}

#[tokio::test]
async fn readyz_turns_503_while_draining() {
    let up = TestUpstream::start().await;
    up.set(
        "/slow",
        Reply::json(json!({"ok": true})).delayed(Duration::from_millis(1500)),
    );
    let cfg = config(
        &up.url(),
        &format!("[server]\ndrain_timeout = \"5s\"\n{ADMIN}"),
    );
    let h = AdminHerald::start(cfg).await;
    assert_eq!(
        reqwest::get(h.admin_url("/readyz")).await.unwrap().status(),
        200
    );
    // A pass-through request in flight keeps the drain going for a while.
    let slow = tokio::spawn(reqwest::get(h.url("/slow")));
    assert!(common::eventually(T, || up.hits("/slow") == 1).await);
    h.shutdown.cancel();
    let mut saw_503 = false;
    for _ in 0..100 {
        let r = reqwest::get(h.admin_url("/readyz")).await.unwrap();
        if r.status() == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_503, "/readyz stayed 200 during the drain");
    // Liveness and metrics stay up through the drain.
    assert_eq!(
        reqwest::get(h.admin_url("/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    tokio::time::timeout(Duration::from_secs(15), h.join)
        .await
        .expect("herald stops")
        .unwrap()
        .unwrap();
    up.stop().await;
}

#[test]
fn admin_listen_must_not_be_the_public_one() {
    let text = "listen = \"127.0.0.1:8080\"\nupstream = \"http://u\"\n\n[admin]\nlisten = \"127.0.0.1:8080\"\n";
    let err = herald::config::parse(text, "proxy.toml")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("proxy.toml:5:"), "{err}");
    assert!(err.contains("admin.listen"), "{err}");
    let ok = herald::config::parse(
        "listen = \"127.0.0.1:8080\"\nupstream = \"http://u\"\n[admin]\n",
        "proxy.toml",
    )
    .unwrap();
    assert_eq!(ok.admin.unwrap().listen.to_string(), "127.0.0.1:9090");
    let none = herald::config::parse(
        "listen = \"127.0.0.1:8080\"\nupstream = \"http://u\"\n",
        "p",
    )
    .unwrap();
    assert!(none.admin.is_none());
}

/// Every client.js page uses the multiplexed stream: it must show in the metrics and the status
/// JSON (under the stream endpoint's path) exactly as single streams do, events included.
#[tokio::test]
async fn multiplexed_streams_are_counted_and_shown() {
    const MUX: &str = "/_herald/stream";
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", doc(1));
    up.set_json("/api/builds/2", doc(2));
    let cfg = config(
        &up.url(),
        &format!("[[route]]\npath = \"{R}\"\ninterval = \"30ms\"\n{ADMIN}"),
    );
    let h = AdminHerald::start(cfg).await;
    let mux = format!("route=\"{MUX}\"");
    let mut c = SseClient::connect(
        &h.url(&format!("{MUX}?watch=/api/builds/1&watch=/api/builds/2")),
        None,
    )
    .await;
    assert_eq!(c.status, 200);
    c.expect_event("hello", T).await;
    c.expect_event("first snapshot", T).await;
    c.expect_event("second snapshot", T).await;
    let m = h
        .scrape_until(T, |m| {
            m.get(&series("herald_events_sent_total", &mux)) >= 2.0
        })
        .await;
    assert_eq!(m.get(&series("herald_streams_open", &mux)), 1.0, "{}", m.0);
    assert_eq!(m.get(&series("herald_streams_opened_total", &mux)), 1.0);
    assert_eq!(m.get("herald_topics_alive"), 2.0);

    // A change reaches the stream and moves its counter.
    up.set_json("/api/builds/1", doc(10));
    c.expect_event("change", T).await;
    h.scrape_until(T, |m| {
        m.get(&series("herald_events_sent_total", &mux)) >= 3.0
    })
    .await;

    let status: serde_json::Value = reqwest::get(h.admin_url("/status.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["streams"], 1, "{status}");
    let topics = status["topics"].as_array().unwrap();
    assert_eq!(topics.len(), 2, "{status}");
    assert!(topics.iter().all(|t| t["watchers"] == 1), "{status}");

    drop(c);
    let m = h
        .scrape_until(T, |m| m.get(&series("herald_streams_open", &mux)) == 0.0)
        .await;
    assert_eq!(m.get(&series("herald_streams_opened_total", &mux)), 1.0);
    h.stop().await;
    up.stop().await;
}
