//! Polling that spares the upstream: `Retry-After` honoured, `Cache-Control: max-age` as a floor
//! where configured, adaptive backoff on a still resource
//! and its return on a change, and 1,000 per-user topics against an upstream that counts
//! concurrent requests: the `[polling]` cap and rate hold, and every topic is still refreshed.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::admin::AdminHerald;
use common::{config, start_herald, Reply, SseClient, TestUpstream};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn retry_after_is_honoured() {
    let upstream = TestUpstream::start().await;
    upstream.set(
        "/busy",
        Reply::status(503, r#"{"error":"busy"}"#).header("retry-after", "2"),
    );
    let herald = start_herald(config(
        &upstream.url(),
        "[[route]]\npath = \"/busy\"\ninterval = \"50ms\"\nshare = \"all\"\n",
    ))
    .await;
    let started = Instant::now();
    let mut w = SseClient::connect(&herald.url("/busy"), None).await;
    let ev = w.expect_event("the upstream error", WAIT).await;
    assert_eq!(ev.event, "upstream-error");
    // At a 50ms interval (even backing off) there would be several polls in 1.5s.
    tokio::time::sleep_until(started + Duration::from_millis(1500)).await;
    assert_eq!(upstream.hits("/busy"), 1, "no poll before Retry-After");
    upstream.set_json("/busy", json!({ "ok": true }));
    let ev = w.expect_event("the recovered state", WAIT).await;
    assert_eq!(ev.event, "snapshot");
    assert!(started.elapsed() >= Duration::from_secs(2));
    herald.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn cache_control_max_age_is_a_floor_where_configured() {
    let upstream = TestUpstream::start().await;
    let cached = Reply::json(json!({ "v": 1 })).header("cache-control", "public, max-age=2");
    upstream.set("/cached", cached.clone());
    upstream.set("/uncached", cached);
    let herald = start_herald(config(
        &upstream.url(),
        r#"
[[route]]
path = "/cached"
interval = "50ms"
share = "all"
honor_cache_control = true

[[route]]
path = "/uncached"
interval = "50ms"
share = "all"
"#,
    ))
    .await;
    let started = Instant::now();
    let mut a = SseClient::connect(&herald.url("/cached"), None).await;
    let mut b = SseClient::connect(&herald.url("/uncached"), None).await;
    a.expect_event("the snapshot", WAIT).await;
    b.expect_event("the snapshot", WAIT).await;
    tokio::time::sleep_until(started + Duration::from_millis(1500)).await;
    assert_eq!(
        upstream.hits("/cached"),
        1,
        "no poll before max-age ran out"
    );
    assert!(
        upstream.hits("/uncached") >= 5,
        "without honor_cache_control the interval rules: {}",
        upstream.hits("/uncached")
    );
    herald.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn a_still_resource_is_polled_less_and_less_until_it_changes() {
    let upstream = TestUpstream::start().await;
    upstream.set_json("/still", json!({ "v": 0, "pad": "p".repeat(100) }));
    let herald = AdminHerald::start(config(
        &upstream.url(),
        r#"
[admin]
listen = "127.0.0.1:0"

[publish]
token = "publish-token-0123456789"

[[route]]
path = "/still"
interval = "50ms"
max_interval = "800ms"
share = "all"
"#,
    ))
    .await;
    let mut w = SseClient::connect(&herald.url("/still"), None).await;
    w.expect_event("the snapshot", WAIT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Fixed at 50ms that is about 60 polls; backing off by 1.5× up to 800ms, about 9.
    let quiet = upstream.hits("/still");
    assert!(quiet <= 20, "backed off: {quiet} polls in 3s");
    let interval = herald.hub.topics_info()[0]
        .source
        .as_ref()
        .unwrap()
        .interval_ms;
    assert!(interval >= 600, "interval stretched to {interval}ms");
    // A change seen by a poke brings the interval back at once.
    upstream.set_json("/still", json!({ "v": 1, "pad": "p".repeat(100) }));
    let resp = reqwest::Client::new()
        .post(herald.admin_url("/_herald/publish"))
        .bearer_auth("publish-token-0123456789")
        .json(&json!({ "resource": "/still" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    w.expect_event("the change", WAIT).await;
    let after = upstream.hits("/still");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fast = upstream.hits("/still") - after;
    assert!(
        fast >= 3,
        "back to the base interval: {fast} polls in 500ms"
    );
    herald.stop().await;
    upstream.stop().await;
}

/// What the counting upstream saw.
#[derive(Default)]
struct Counts {
    in_flight: usize,
    max_in_flight: usize,
    starts: Vec<Instant>,
    by_user: HashMap<String, usize>,
}

/// One request the counting upstream is working on.
struct InFlight(Arc<Mutex<Counts>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).in_flight -= 1;
    }
}

/// An upstream that answers every user after 20ms, counting requests in flight.
async fn counting_upstream(
    counts: Arc<Mutex<Counts>>,
    stop: CancellationToken,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let join = tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let (counts, stop) = (counts.clone(), stop.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let counts = counts.clone();
                    async move {
                        let user = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        {
                            let mut c = counts.lock().unwrap();
                            c.in_flight += 1;
                            c.max_in_flight = c.max_in_flight.max(c.in_flight);
                            c.starts.push(Instant::now());
                            *c.by_user.entry(user.clone()).or_default() += 1;
                        }
                        // Out of flight when answered, and also when hyper drops the handler
                        // because herald gave up on the request (its timeout) and closed the
                        // connection: herald's place is free again then, as it is for nginx's
                        // `max_conns`.
                        let _done = InFlight(counts.clone());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let mut resp = Response::new(Full::new(Bytes::from(
                            json!({ "user": user }).to_string(),
                        )));
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    (addr, join)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_user_topics_stay_within_the_budget_and_all_refresh() {
    const USERS: usize = 1000;
    const CAP: usize = 8;
    const RATE: f64 = 400.0;
    let counts = Arc::new(Mutex::new(Counts::default()));
    let stop = CancellationToken::new();
    let (addr, upstream) = counting_upstream(counts.clone(), stop.clone()).await;
    let herald = AdminHerald::start(config(
        &format!("http://{addr}"),
        &format!(
            r#"
[server]
max_topics_per_ip = 0
max_topics_per_credential = 0
max_streams_per_ip = 0
max_connections_per_ip = 0
max_new_streams_per_sec = 0

[admin]
listen = "127.0.0.1:0"

[polling]
max_concurrent = {CAP}
max_rate = {RATE}

[[route]]
path = "/u/data"
interval = "1s"
# Polls queue for the budget before they start; once started, none is given up on a loaded
# machine (a poll herald abandons frees its place at once, which this test is not about).
timeout = "20s"
"#
        ),
    ))
    .await;
    let url = herald.url("/u/data");
    // Opened 100 at a time: a thousand at once on a starved machine overflow the listen backlog
    // and outlast herald's header_timeout, which is herald protecting itself, not this test.
    let mut streams = Vec::new();
    for batch in (0..USERS).collect::<Vec<_>>().chunks(100) {
        let mut opening = Vec::new();
        for &i in batch {
            let url = url.clone();
            opening.push(tokio::spawn(async move {
                let auth = format!("Bearer user-{i}");
                let client = reqwest::Client::new();
                let s =
                    SseClient::connect_with(&client, &url, None, &[("authorization", &auth)]).await;
                assert_eq!(s.status, 200);
                s
            }));
        }
        for o in opening {
            streams.push(o.await.unwrap());
        }
    }
    let c = counts.clone();
    let refreshed = common::eventually(Duration::from_secs(60), || {
        let c = c.lock().unwrap();
        c.by_user.len() == USERS && c.by_user.values().all(|&n| n >= 2)
    })
    .await;
    {
        let c = counts.lock().unwrap();
        let low = c.by_user.values().filter(|&&n| n < 2).count();
        assert!(
            refreshed,
            "every topic refreshed: {low} of {USERS} were not"
        );
        assert!(
            c.max_in_flight <= CAP,
            "cap held: {} in flight",
            c.max_in_flight
        );
        // The rate, over every one-second window (slots are spaced; a little slack for scheduling).
        let mut starts = c.starts.clone();
        starts.sort();
        let mut j = 0;
        let mut worst = 0;
        for i in 0..starts.len() {
            while starts[i] - starts[j] >= Duration::from_secs(1) {
                j += 1;
            }
            worst = worst.max(i - j + 1);
        }
        assert!(
            worst as f64 <= RATE * 1.1,
            "rate held: {worst} requests in one second"
        );
    }
    let metrics = herald.scrape().await;
    assert!(
        metrics.get("herald_upstream_budget_waits_total") > 0.0,
        "waits are counted"
    );
    drop(streams);
    herald.stop().await;
    stop.cancel();
    upstream.await.unwrap();
}
