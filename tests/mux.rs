//! One connection, many resources (issue 7): the multiplexed stream carries several topics, each
//! event naming its topic; watches are added and removed on a live stream through its token; one
//! `Last-Event-ID` resumes every topic (replay where history allows, a snapshot of that topic
//! alone where it does not); gzip wraps it like a single stream; herald serves `client.js`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);
const MUX: &str = "/_herald/stream";

fn routes(extra: &str) -> String {
    format!(
        "{extra}\n[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"20ms\"\n\
         [[route]]\npath = \"/api/items\"\ninterval = \"20ms\"\nquery = [\"page\"]\n"
    )
}

fn build(id: u64, n: u64) -> Value {
    // Padded so that a change is smaller as a patch than as a snapshot.
    json!({"id": id, "n": n, "status": if n % 2 == 0 { "running" } else { "queued" },
           "log": (0..n).collect::<Vec<_>>(), "pad": "p".repeat(200)})
}

fn mux_url(h: &TestHerald, watches: &[&str]) -> String {
    let q: Vec<String> = watches
        .iter()
        .map(|w| format!("watch={}", w.replace('?', "%3F").replace('&', "%26")))
        .collect();
    h.url(&format!("{MUX}?{}", q.join("&")))
}

/// A multiplexed stream read as a browser would: per-topic state from snapshots and patches.
struct Mux {
    client: SseClient,
    token: String,
    hello: Value,
    states: HashMap<String, Option<Value>>,
    events: Vec<SseEvent>,
}

impl Mux {
    async fn open(url: &str, last: Option<&str>) -> Mux {
        let mut client = SseClient::connect(url, last).await;
        assert_eq!(client.status, 200, "{:?}", client.headers);
        assert_eq!(client.headers["content-type"], "text/event-stream");
        let retry = client.next_any(T).await.expect("retry first");
        assert!(retry.retry.is_some(), "{retry:?}");
        let hello = client.expect_event("hello", T).await;
        assert_eq!(hello.event, "hello");
        assert_eq!(hello.id, None, "hello carries no id");
        let hello = hello.json();
        let token = hello["token"].as_str().expect("a token").to_string();
        assert_eq!(token.len(), 32, "{token}");
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        Mux {
            client,
            token,
            hello,
            states: HashMap::new(),
            events: Vec::new(),
        }
    }

    /// The next topic event, applied to its topic's state.
    async fn next(&mut self) -> SseEvent {
        let ev = self.client.expect_event("a topic event", T).await;
        let topic = ev.json()["topic"].as_str().expect("topic").to_string();
        apply_event(self.states.entry(topic).or_default(), &ev);
        self.events.push(ev.clone());
        ev
    }

    /// Read until every topic in `want` has the given state; the events that got there.
    async fn until(&mut self, want: &[(&str, Value)]) -> Vec<SseEvent> {
        let mut got = Vec::new();
        while !want
            .iter()
            .all(|(t, v)| self.states.get(*t).and_then(|s| s.as_ref()) == Some(v))
        {
            got.push(self.next().await);
        }
        got
    }

    fn last_id(&self) -> String {
        self.client.last_event_id().expect("an id")
    }
}

/// `(topic incarnation, seq)` positions of a multiplexed id.
fn positions(id: &str) -> Vec<(u32, u64)> {
    id.split('~')
        .map(|p| {
            p.parse::<herald::hub::Position>()
                .ok()
                .map(|p| (p.epoch, p.seq))
                .unwrap_or_else(|| panic!("bad position {p:?} in {id:?}"))
        })
        .collect()
}

async fn post(h: &TestHerald, token: &str, action: &str, body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(h.url(&format!("{MUX}/{token}/{action}")))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn one_stream_carries_every_watched_topic() {
    let up = TestUpstream::start().await;
    for id in 1..=3 {
        up.set_json(&format!("/api/builds/{id}"), build(id, 0));
    }
    up.set_json("/api/items", json!({"page": 1, "items": []}));
    let h = start_herald(config(&up.url(), &routes(""))).await;

    // Two paths of one topic (a dropped query parameter) are one watch.
    let url = mux_url(&h, &["/api/builds/1", "/api/builds/2", "/api/builds/1?x=1"]);
    let mut m = Mux::open(&url, None).await;
    assert_eq!(
        m.hello["watches"],
        json!([{"path": "/api/builds/1", "topic": "/api/builds/1"}, {"path": "/api/builds/2", "topic": "/api/builds/2"}])
    );
    assert_eq!(m.hello["control"], format!("{MUX}/{}", m.token));
    m.until(&[
        ("/api/builds/1", build(1, 0)),
        ("/api/builds/2", build(2, 0)),
    ])
    .await;
    assert_eq!(m.events.len(), 2, "one snapshot per topic: {:?}", m.events);
    assert!(m.events.iter().all(|e| e.event == "snapshot"));

    up.set_json("/api/builds/2", build(2, 1));
    let evs = m.until(&[("/api/builds/2", build(2, 1))]).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].event, "patch");
    assert_eq!(evs[0].json()["topic"], "/api/builds/2");
    // The id holds both topics' positions; topic 2's moved on.
    let before = positions(m.events[1].id.as_deref().unwrap());
    let after = positions(evs[0].id.as_deref().unwrap());
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0], before[0]);
    assert_eq!(after[1].0, before[1].0);
    assert!(after[1].1 > before[1].1);
    // Each topic has this stream as its only watcher: one registration, however many topics.
    for id in 1..=2 {
        let topic = h
            .hub
            .topics_snapshot()
            .into_iter()
            .find(|t| *t.key.resource == format!("/api/builds/{id}"));
        assert_eq!(topic.expect("topic").channel.watcher_count(), 1);
    }
    drop(m);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn watches_change_on_a_live_stream() {
    let up = TestUpstream::start().await;
    for id in 1..=4 {
        up.set_json(&format!("/api/builds/{id}"), build(id, 0));
    }
    up.set_json("/api/items", json!({"page": 2}));
    let h = start_herald(config(&up.url(), &routes("[mux]\nmax_watches = 3"))).await;
    let mut m = Mux::open(&mux_url(&h, &["/api/builds/1"]), None).await;
    m.until(&[("/api/builds/1", build(1, 0))]).await;
    let token = m.token.clone();

    // Added: its snapshot arrives on the stream.
    let (status, body) = post(&h, &token, "watch", r#"{"path": "/api/builds/2"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topic"], "/api/builds/2");
    assert_eq!(body["changed"], true);
    m.until(&[("/api/builds/2", build(2, 0))]).await;
    let (status, body) = post(&h, &token, "watch", r#"{"path": "/api/builds/2"}"#).await;
    assert_eq!(
        (status, &body["changed"]),
        (200, &json!(false)),
        "idempotent"
    );
    // A query that selects the resource is kept; others are dropped, as for a single stream.
    let (status, body) = post(
        &h,
        &token,
        "watch",
        r#"{"path": "/api/items?page=2&junk=1"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topic"], "/api/items?page=2");
    m.until(&[("/api/items?page=2", json!({"page": 2}))]).await;

    // Bounded: a fourth watch is refused.
    let (status, body) = post(&h, &token, "watch", r#"{"path": "/api/builds/3"}"#).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too-many-watches"))
    );

    // Removed: no more events of that topic, and the stream leaves it.
    let (status, body) = post(&h, &token, "unwatch", r#"{"path": "/api/builds/1"}"#).await;
    assert_eq!((status, &body["changed"]), (200, &json!(true)), "{body}");
    let topic1 = h
        .hub
        .topics_snapshot()
        .into_iter()
        .find(|t| &*t.key.resource == "/api/builds/1")
        .expect("topic 1");
    assert!(eventually(T, || topic1.channel.watcher_count() == 0).await);
    up.set_json("/api/builds/1", build(1, 1));
    up.set_json("/api/builds/2", build(2, 1));
    let evs = m.until(&[("/api/builds/2", build(2, 1))]).await;
    assert!(
        evs.iter().all(|e| e.json()["topic"] != "/api/builds/1"),
        "{evs:?}"
    );
    // Room again for a new watch.
    let (status, _) = post(&h, &token, "watch", r#"{"path": "/api/builds/3"}"#).await;
    assert_eq!(status, 200);
    m.until(&[("/api/builds/3", build(3, 0))]).await;

    // Refusals: unknown token, not a stream route, unsafe parameter, malformed body, wrong method.
    let (status, body) = post(&h, &"0".repeat(32), "watch", r#"{"path": "/api/builds/1"}"#).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no-such-stream"))
    );
    let (status, body) = post(&h, &token, "watch", r#"{"path": "/api/other"}"#).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("not-a-stream"))
    );
    let (status, _) = post(&h, &token, "watch", r#"{"path": "/api/builds/%2e%2e"}"#).await;
    assert_eq!(status, 400);
    let (status, _) = post(&h, &token, "watch", r#"{"paht": "/api/builds/1"}"#).await;
    assert_eq!(status, 400);
    let (status, _) = post(&h, &token, "watch", "not json").await;
    assert_eq!(status, 400);
    let resp = reqwest::get(h.url(&format!("{MUX}/{token}/watch")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);

    // The token dies with its stream.
    drop(m);
    let mut gone = false;
    for _ in 0..100 {
        let (status, _) = post(&h, &token, "watch", r#"{"path": "/api/builds/1"}"#).await;
        if status == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the token outlived its stream");
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn open_refuses_bad_watch_lists() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), &routes("[mux]\nmax_watches = 2"))).await;
    let get = |url: String| async move {
        let r = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let (s, b) = get(mux_url(
        &h,
        &["/api/builds/1", "/api/builds/2", "/api/builds/3"],
    ))
    .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("too-many-watches")));
    let (s, b) = get(mux_url(&h, &["/api/builds/1", "/elsewhere"])).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("not-a-stream")));
    let (s, _) = get(mux_url(&h, &["/api/builds/%252F"])).await;
    assert_eq!(s, 400);
    let (s, _) = get(h.url(&format!("{MUX}?watch=%ff"))).await;
    assert_eq!(s, 400);
    // Nothing was polled for refused streams.
    assert_eq!(up.total_hits(), 0);
    assert_eq!(h.hub.topic_count(), 0);
    h.stop().await;
    up.stop().await;
}

/// Topic 1 missed one change (replayed), topic 2 missed more than its history holds (a snapshot
/// of topic 2 alone), topic 3 missed nothing (nothing sent): all from one `Last-Event-ID`.
#[tokio::test]
async fn one_last_event_id_resumes_every_topic() {
    let up = TestUpstream::start().await;
    for id in 1..=3 {
        up.set_json(&format!("/api/builds/{id}"), build(id, 0));
    }
    let h = start_herald(config(
        &up.url(),
        &routes("[sse]\nhistory = 3\ngrace = \"30s\""),
    ))
    .await;
    let all = ["/api/builds/1", "/api/builds/2", "/api/builds/3"];
    // The observer stays connected: the topics' reference history.
    let mut obs = Mux::open(&mux_url(&h, &all), None).await;
    let mut m = Mux::open(&mux_url(&h, &all), None).await;
    let start = [
        ("/api/builds/1", build(1, 0)),
        ("/api/builds/2", build(2, 0)),
        ("/api/builds/3", build(3, 0)),
    ];
    obs.until(&start).await;
    m.until(&start).await;
    let last = m.last_id();
    assert_eq!(positions(&last).len(), 3, "{last}");
    let states = m.states.clone();
    drop(m);

    up.set_json("/api/builds/1", build(1, 1));
    obs.until(&[("/api/builds/1", build(1, 1))]).await;
    for n in 1..=5 {
        up.set_json("/api/builds/2", build(2, n));
        obs.until(&[("/api/builds/2", build(2, n))]).await;
    }
    let missed_1: Vec<SseEvent> = obs
        .events
        .iter()
        .filter(|e| e.json()["topic"] == "/api/builds/1")
        .skip(1)
        .cloned()
        .collect();
    assert_eq!(missed_1.len(), 1);

    let want = [
        ("/api/builds/1", build(1, 1)),
        ("/api/builds/2", build(2, 5)),
        ("/api/builds/3", build(3, 0)),
    ];
    // Reconnect (in another order: positions match by topic, not by place) with the header, as
    // EventSource does, then with the query parameter, as client.js does after changing watches.
    for by_query in [false, true] {
        let order = ["/api/builds/3", "/api/builds/2", "/api/builds/1"];
        let mut r = if by_query {
            let url = format!(
                "{}&last_event_id={}",
                mux_url(&h, &order),
                last.replace('~', "%7E")
            );
            Mux::open(&url, None).await
        } else {
            Mux::open(&mux_url(&h, &order), Some(&last)).await
        };
        r.states = states.clone();
        let got = r.until(&want).await;
        let by_topic =
            |t: &str| -> Vec<&SseEvent> { got.iter().filter(|e| e.json()["topic"] == t).collect() };
        let one = by_topic("/api/builds/1");
        assert_eq!(one.len(), 1, "{got:?}");
        assert_eq!(one[0].event, missed_1[0].event, "replayed as published");
        assert_eq!(one[0].data, missed_1[0].data);
        let two = by_topic("/api/builds/2");
        assert_eq!(two.len(), 1, "{got:?}");
        assert_eq!(two[0].event, "snapshot", "too old for history: a snapshot");
        assert!(by_topic("/api/builds/3").is_empty(), "{got:?}");
        // Nothing else follows.
        assert!(r
            .client
            .next_event(Duration::from_millis(200))
            .await
            .is_none());
        // The new id still has every topic, positions now in the new watch order.
        let ids = positions(&r.last_id());
        assert_eq!(ids.len(), 3);
        let old = positions(&last);
        assert_eq!(ids[0], old[2], "topic 3 kept its position");
    }

    // A garbage or foreign id costs snapshots, never an error or a gap.
    for bad in ["garbage", "1-1~2-2", &"z".repeat(5000)] {
        let mut r = Mux::open(&mux_url(&h, &all), Some(bad)).await;
        let got = r.until(&want).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.iter().all(|e| e.event == "snapshot"));
    }
    drop(obs);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn gzip_wraps_the_multiplexed_stream() {
    let up = TestUpstream::start().await;
    for id in 1..=2 {
        up.set_json(&format!("/api/builds/{id}"), build(id, 0));
    }
    let h = start_herald(config(&up.url(), &routes(""))).await;
    let url = mux_url(&h, &["/api/builds/1", "/api/builds/2"]);
    let mut plain = Mux::open(&url, None).await;
    let gz_client = SseClient::connect_with(
        &reqwest::Client::new(),
        &url,
        None,
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(gz_client.headers["content-encoding"], "gzip");
    let mut gz = Mux {
        client: gz_client,
        token: String::new(),
        hello: Value::Null,
        states: HashMap::new(),
        events: Vec::new(),
    };
    let hello = gz.client.expect_event("hello", T).await;
    assert_eq!(hello.event, "hello");
    let start = [
        ("/api/builds/1", build(1, 0)),
        ("/api/builds/2", build(2, 0)),
    ];
    plain.until(&start).await;
    gz.until(&start).await;
    for n in 1..=3 {
        up.set_json("/api/builds/1", build(1, n));
        let want = [("/api/builds/1", build(1, n))];
        plain.until(&want).await;
        gz.until(&want).await;
    }
    // Same events, same ids, whichever the coding.
    let strip = |evs: &[SseEvent]| -> Vec<(Option<String>, String, String)> {
        evs.iter()
            .map(|e| (e.id.clone(), e.event.clone(), e.data.clone()))
            .collect()
    };
    assert_eq!(strip(&plain.events).len(), strip(&gz.events).len());
    for (a, b) in plain.events.iter().zip(&gz.events) {
        assert_eq!(a.event, b.event);
        assert_eq!(a.json()["data"], b.json()["data"]);
        assert_eq!(
            positions(a.id.as_deref().unwrap()),
            positions(b.id.as_deref().unwrap())
        );
    }
    drop((plain, gz));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn shutdown_ends_the_multiplexed_stream_with_a_retry() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", build(1, 0));
    let h = start_herald(config(&up.url(), &routes(""))).await;
    let mut m = Mux::open(&mux_url(&h, &["/api/builds/1"]), None).await;
    m.until(&[("/api/builds/1", build(1, 0))]).await;
    h.shutdown.cancel();
    let rest = m.client.read_to_end(T).await;
    let last = rest
        .iter()
        .rev()
        .find(|e| !e.event.is_empty())
        .expect("a last event");
    assert_eq!(last.event, "shutdown");
    assert!(last.json()["data"]["retry"].as_u64().is_some(), "{last:?}");
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn herald_serves_its_browser_client() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), &routes(""))).await;
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/client/herald.js")).unwrap();
    let client = reqwest::Client::new();
    let resp = client
        .get(h.url("/_herald/client.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert_eq!(headers["content-type"], "text/javascript; charset=utf-8");
    assert!(headers["cache-control"]
        .to_str()
        .unwrap()
        .contains("max-age="));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let etag = headers["etag"].clone();
    assert_eq!(resp.text().await.unwrap(), file);
    // Revalidation by ETag.
    let resp = client
        .get(h.url("/_herald/client.js"))
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);
    // gzip for those who accept it, decoding to the same module.
    let resp = client
        .get(h.url("/_herald/client.js"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let gz = resp.bytes().await.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    assert_eq!(text, file);
    // Cross-tab sharing, session refresh and resume made it grow from 5.6 KB; a third of what
    // remains is comments. Keep it from growing further unnoticed.
    assert!(
        gz.len() < 14 * 1024,
        "the client is a few KB on the wire: {}",
        gz.len()
    );
    // herald's paths never reach the upstream.
    let resp = client
        .post(h.url("/_herald/client.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(up.total_hits(), 0);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn mux_config_is_checked_and_can_be_turned_off() {
    let bad = "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\
        [mux]\npath = \"/api/builds/x\"\nmax_watches = 0\nclient = \"relative.js\"\n\
        [[route]]\npath = \"/api/builds/{id}\"\n";
    let err = herald::config::parse(bad, "proxy.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy.toml:4:8: mux.path"), "{err}");
    assert!(
        err.contains("also matched by route \"/api/builds/{id}\""),
        "{err}"
    );
    assert!(
        err.contains("proxy.toml:5:15: mux.max_watches: must be between 1 and 256"),
        "{err}"
    );
    assert!(
        err.contains("mux.client: invalid path \"relative.js\""),
        "{err}"
    );

    // Turned off, the paths are the upstream's like any other.
    let up = TestUpstream::start().await;
    let h = start_herald(config(
        &up.url(),
        &routes("[mux]\npath = \"\"\nclient = \"\""),
    ))
    .await;
    for path in [MUX, "/_herald/client.js"] {
        let r = reqwest::get(h.url(path)).await.unwrap();
        assert_eq!(r.status(), 200);
        let echo: Value = r.json().await.unwrap();
        assert_eq!(echo["path"], path, "passed through");
    }
    h.stop().await;
    up.stop().await;
}
