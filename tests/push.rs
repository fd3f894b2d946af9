//! Push sources against real upstream servers started here: an SSE upstream that drops
//! mid-stream and resumes from `Last-Event-ID` (watchers see every event once, in order), one
//! that cannot resume (watchers get a snapshot), one that sends `retry:`, and an NDJSON upstream
//! reached with the watcher's credentials on its own path.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, start_herald, SseClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// One step of an upstream connection's script.
#[derive(Clone)]
enum Step {
    Send(String),
    /// Wait until the test opens this gate.
    Gate(CancellationToken),
    /// Keep the connection open until the upstream stops.
    Hold,
}

/// A connection as the upstream saw it.
#[derive(Clone, Debug)]
struct Conn {
    path: String,
    last_event_id: Option<String>,
    authorization: Option<String>,
    accept: Option<String>,
    at: Instant,
}

type Script = Arc<dyn Fn(usize, Option<&str>) -> Vec<Step> + Send + Sync>;

/// A streaming upstream speaking raw HTTP/1.1: each connection gets its script's steps as a
/// close-delimited body, then is closed (a dropped stream) unless the script holds it.
struct PushUpstream {
    addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<Conn>>>,
    stop: CancellationToken,
    join: tokio::task::JoinHandle<()>,
}

impl PushUpstream {
    async fn start(content_type: &'static str, script: Script) -> PushUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (c, s) = (conns.clone(), stop.clone());
        let join = tokio::spawn(async move {
            loop {
                let (mut sock, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                let (c, s, script) = (c.clone(), s.clone(), script.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    let header = |name: &str| {
                        text.lines().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                    };
                    let conn = Conn {
                        path,
                        last_event_id: header("last-event-id"),
                        authorization: header("authorization"),
                        accept: header("accept"),
                        at: Instant::now(),
                    };
                    let n = {
                        let mut all = c.lock().unwrap();
                        all.push(conn.clone());
                        all.len() - 1
                    };
                    let steps = script(n, conn.last_event_id.as_deref());
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n"
                    );
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for step in steps {
                        match step {
                            Step::Send(t) => {
                                if sock.write_all(t.as_bytes()).await.is_err() {
                                    return;
                                }
                                let _ = sock.flush().await;
                            }
                            Step::Gate(g) => tokio::select! {
                                _ = g.cancelled() => {}
                                _ = s.cancelled() => return,
                            },
                            Step::Hold => {
                                s.cancelled().await;
                                return;
                            }
                        }
                    }
                    // Dropping the socket ends the stream mid-way, as a crash or a deploy would.
                });
            }
        });
        PushUpstream {
            addr,
            conns,
            stop,
            join,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn conns(&self) -> Vec<Conn> {
        self.conns.lock().unwrap().clone()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.join)
            .await
            .expect("upstream stops")
            .unwrap();
    }
}

fn sse_event(id: Option<u64>, n: u64) -> String {
    let id = id.map_or(String::new(), |i| format!("id: {i}\n"));
    format!(
        "{id}data: {{\"n\":{n},\"pad\":\"{}\"}}\n\n",
        "x".repeat(100)
    )
}

/// The `data` of a herald event's envelope.
fn data(ev: &common::SseEvent) -> serde_json::Value {
    ev.json()["data"].clone()
}

#[tokio::test]
async fn sse_upstream_that_drops_is_resumed_and_watchers_see_every_event_once_in_order() {
    let gate = CancellationToken::new();
    let g = gate.clone();
    // Connection 0 sends 1..=4 and drops; connection 1 repeats 4 (what it resumed after), sends
    // 5..=7 and drops; connection 2 sends the rest and stays open.
    let script: Script = Arc::new(move |conn, last| {
        let from = last
            .and_then(|l| l.parse::<u64>().ok())
            .map_or(1, |l| l + 1);
        let mut steps = Vec::new();
        let upto = match conn {
            0 => {
                steps.push(Step::Gate(g.clone()));
                4
            }
            1 => {
                steps.push(Step::Send(sse_event(Some(from - 1), from - 1)));
                7
            }
            _ => 10,
        };
        for i in from..=upto {
            steps.push(Step::Send(sse_event(Some(i), i)));
        }
        if conn >= 2 {
            steps.push(Step::Hold);
        }
        steps
    });
    let upstream = PushUpstream::start("text/event-stream", script).await;
    let herald = start_herald(config(
        &upstream.url(),
        r#"
[[route]]
path = "/feed/{id}"
interval = "100ms"
share = "all"
source = { kind = "sse", mode = "pass" }
"#,
    ))
    .await;
    let mut a = SseClient::connect(&herald.url("/feed/1"), None).await;
    let mut b = SseClient::connect(&herald.url("/feed/1"), None).await;
    assert_eq!((a.status, b.status), (200, 200));
    let hub = herald.hub.clone();
    assert!(
        common::eventually(WAIT, || hub
            .topics_snapshot()
            .first()
            .is_some_and(|t| t.channel.watcher_count() == 2))
        .await,
        "both watchers join the one topic"
    );
    gate.cancel();
    let mut ids = Vec::new();
    for client in [&mut a, &mut b] {
        let mut seen = Vec::new();
        ids.clear();
        while seen.len() < 10 {
            let ev = client.expect_event("an upstream event", WAIT).await;
            assert_eq!(ev.event, "message", "passed through: {ev:?}");
            seen.push(data(&ev)["n"].as_u64().unwrap());
            ids.push(ev.id.clone().unwrap());
        }
        assert_eq!(seen, (1..=10).collect::<Vec<_>>(), "once each, in order");
        let positions: Vec<herald::hub::Position> =
            ids.iter().map(|i| i.parse().unwrap()).collect();
        assert!(
            positions.windows(2).all(|w| w[1].seq > w[0].seq),
            "herald's own ids grow: {ids:?}"
        );
        assert!(
            client
                .next_event(Duration::from_millis(300))
                .await
                .is_none(),
            "no duplicate"
        );
    }
    let conns = upstream.conns();
    assert_eq!(conns.len(), 3, "{conns:?}");
    assert_eq!(conns[0].last_event_id, None);
    assert_eq!(conns[1].last_event_id.as_deref(), Some("4"));
    assert_eq!(conns[2].last_event_id.as_deref(), Some("7"));
    assert_eq!(conns[0].accept.as_deref(), Some("text/event-stream"));
    // A watcher that reconnects to herald with one of herald's ids is replayed the rest.
    drop(a);
    let mut again = SseClient::connect(&herald.url("/feed/1"), Some(&ids[4])).await;
    for n in 6..=10 {
        let ev = again.expect_event("a replayed event", WAIT).await;
        assert_eq!(data(&ev)["n"], n);
    }
    herald.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn sse_upstream_that_cannot_resume_gives_watchers_a_fresh_snapshot() {
    let gate = CancellationToken::new();
    let g = gate.clone();
    // No ids: nothing to resume from. Connection 0: state 1, then 2, then drops; connection 1
    // starts over with state 5.
    let script: Script = Arc::new(move |conn, _| match conn {
        0 => vec![
            Step::Send(sse_event(None, 1)),
            Step::Gate(g.clone()),
            Step::Send(sse_event(None, 2)),
        ],
        _ => vec![Step::Send(sse_event(None, 5)), Step::Hold],
    });
    let upstream = PushUpstream::start("text/event-stream; charset=utf-8", script).await;
    let herald = start_herald(config(
        &upstream.url(),
        r#"
[[route]]
path = "/state/{id}"
interval = "100ms"
share = "all"
source = { kind = "sse" }
"#,
    ))
    .await;
    let mut w = SseClient::connect(&herald.url("/state/9"), None).await;
    let first = w.expect_event("the first state", WAIT).await;
    assert_eq!(first.event, "snapshot");
    assert_eq!(data(&first)["n"], 1);
    gate.cancel();
    let second = w.expect_event("the second state", WAIT).await;
    assert_eq!(second.event, "patch", "states are diffed: {second:?}");
    let third = w.expect_event("the state after the reconnect", WAIT).await;
    assert_eq!(
        third.event, "snapshot",
        "no resume: a fresh snapshot: {third:?}"
    );
    assert_eq!(data(&third)["n"], 5);
    let conns = upstream.conns();
    assert_eq!(conns.len(), 2);
    assert_eq!(conns[1].last_event_id, None);
    let topic = &herald.hub.topics_info()[0];
    let stats = topic.source.as_ref().unwrap();
    assert_eq!(stats.kind, "sse");
    assert_eq!(stats.reconnects, 1);
    herald.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn sse_upstream_retry_sets_the_reconnect_delay() {
    let script: Script = Arc::new(|conn, _| match conn {
        0 => vec![Step::Send(format!("retry: 300\n{}", sse_event(Some(1), 1)))],
        _ => vec![Step::Hold],
    });
    let upstream = PushUpstream::start("text/event-stream", script).await;
    // Without the upstream's `retry:`, herald would wait the route's interval (20s) to reconnect.
    let herald = start_herald(config(
        &upstream.url(),
        r#"
[[route]]
path = "/r"
interval = "20s"
share = "all"
source = { kind = "sse" }
"#,
    ))
    .await;
    let mut w = SseClient::connect(&herald.url("/r"), None).await;
    w.expect_event("the state", WAIT).await;
    let up = &upstream;
    assert!(
        common::eventually(WAIT, || up.conns().len() >= 2).await,
        "reconnected after the upstream's retry"
    );
    let conns = upstream.conns();
    let gap = conns[1].at - conns[0].at;
    assert!(
        gap >= Duration::from_millis(300),
        "waited the retry: {gap:?}"
    );
    assert!(gap < Duration::from_secs(5), "not the interval: {gap:?}");
    assert_eq!(conns[1].last_event_id.as_deref(), Some("1"));
    herald.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn ndjson_upstream_streams_states_on_its_own_path_with_the_watchers_credentials() {
    let gate = CancellationToken::new();
    let g = gate.clone();
    let line = |n: u64| format!("{{\"n\":{n},\"pad\":\"{}\"}}\n", "y".repeat(100));
    let script: Script = Arc::new(move |_, _| {
        vec![
            Step::Send(line(1)),
            Step::Gate(g.clone()),
            // Split mid-document: lines, not chunks, are documents.
            Step::Send(line(2)[..10].to_string()),
            Step::Send(line(2)[10..].to_string()),
            Step::Hold,
        ]
    });
    let upstream = PushUpstream::start("application/x-ndjson", script).await;
    let herald = start_herald(config(
        &upstream.url(),
        r#"
[[route]]
path = "/items/{id}"
interval = "100ms"
source = { kind = "ndjson", path = "/watch/items/{id}" }
"#,
    ))
    .await;
    let mut w = SseClient::connect_with(
        &reqwest::Client::new(),
        &herald.url("/items/7"),
        None,
        &[("authorization", "Bearer alice")],
    )
    .await;
    assert_eq!(w.status, 200);
    let first = w.expect_event("the first line", WAIT).await;
    assert_eq!(
        (first.event.as_str(), data(&first)["n"].as_u64()),
        ("snapshot", Some(1))
    );
    gate.cancel();
    let second = w.expect_event("the second line", WAIT).await;
    assert_eq!(second.event, "patch");
    let conns = upstream.conns();
    assert_eq!(conns.len(), 1, "one upstream connection per topic");
    assert_eq!(conns[0].path, "/watch/items/7");
    assert_eq!(conns[0].authorization.as_deref(), Some("Bearer alice"));
    assert!(conns[0].accept.as_deref().unwrap_or("").contains("ndjson"));
    herald.stop().await;
    upstream.stop().await;
}
