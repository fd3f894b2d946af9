//! Replay (issue 3, point 6): a client that reconnects with `Last-Event-ID` gets exactly the events
//! it missed, in order, without duplicates; an id that is unknown, garbage, too old, or from another
//! incarnation of the topic (herald restarted, topic expired) gets a fresh snapshot, never a gap.
//!
//! Every test keeps an `Observer` connected for its whole length: the reference list of what the
//! topic published, which a reconnecting client is compared with event by event. The tests do not
//! care whether a change arrives as a patch or a snapshot (that is the diff's business); they check
//! ids, order, and that applying what arrived gives the upstream's current body.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);
const PATH: &str = "/api/builds/7";

fn routes(extra_sse: &str) -> String {
    format!("[sse]\n{extra_sse}\n[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"20ms\"\n")
}

/// The upstream body after `n` changes: scalars, a growing array and a nested object all move.
fn doc(n: u64) -> Value {
    json!({
        "id": 7,
        "n": n,
        "status": if n % 2 == 0 { "running" } else { "queued" },
        "steps": (0..n).collect::<Vec<_>>(),
        "meta": {"changes": n, "even": n % 2 == 0},
    })
}

/// `(incarnation, seq)` of an event id, which must be well formed.
fn id_parts(ev: &SseEvent) -> (u32, u64) {
    let id = ev
        .id
        .as_deref()
        .unwrap_or_else(|| panic!("event without id: {ev:?}"));
    id.parse::<herald::hub::Position>()
        .ok()
        .map(|p| (p.epoch, p.seq))
        .unwrap_or_else(|| panic!("malformed id {id:?}"))
}

/// Ids carry one incarnation and strictly growing seqs.
fn assert_ids_grow(events: &[SseEvent]) {
    for w in events.windows(2) {
        let (a, b) = (id_parts(&w[0]), id_parts(&w[1]));
        assert_eq!(a.0, b.0, "incarnation changed within one topic: {w:?}");
        assert!(
            a.1 < b.1,
            "ids do not grow: {:?} then {:?}",
            w[0].id,
            w[1].id
        );
    }
}

/// A client that stays connected and records every event the topic publishes.
struct Observer {
    client: SseClient,
    state: Option<Value>,
    events: Vec<SseEvent>,
}

impl Observer {
    async fn connect(url: &str, want: &Value) -> Observer {
        let mut o = Observer {
            client: SseClient::connect(url, None).await,
            state: None,
            events: Vec::new(),
        };
        o.until(want).await;
        o
    }

    /// Read until the observer's state equals `want`; the events that got it there.
    async fn until(&mut self, want: &Value) -> Vec<SseEvent> {
        let mut got = Vec::new();
        while self.state.as_ref() != Some(want) {
            let ev = self
                .client
                .expect_event("the observer's next event", T)
                .await;
            apply_event(&mut self.state, &ev);
            got.push(ev.clone());
            self.events.push(ev);
        }
        got
    }

    fn last_id(&self) -> String {
        self.events
            .last()
            .and_then(|e| e.id.clone())
            .expect("an id")
    }
}

/// Change the upstream to `doc(n)` and return the one event the topic published for it.
async fn change(up: &TestUpstream, obs: &mut Observer, n: u64) -> SseEvent {
    up.set_json(PATH, doc(n));
    let evs = obs.until(&doc(n)).await;
    assert_eq!(evs.len(), 1, "one change, one event: {evs:?}");
    evs.into_iter().next().expect("one event")
}

/// The first thing on a new stream is `retry:` alone; then the events.
async fn connect_after_retry(url: &str, last: Option<&str>) -> SseClient {
    let mut c = SseClient::connect(url, last).await;
    assert_eq!(c.status, 200);
    let first = c.next_any(T).await.expect("retry first");
    assert!(first.retry.is_some() && first.data.is_empty(), "{first:?}");
    c
}

#[tokio::test]
async fn reconnect_replays_exactly_the_missed_events() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, doc(0));
    let h = start_herald(config(&up.url(), &routes(""))).await;
    let url = h.url(PATH);
    let mut obs = Observer::connect(&url, &doc(0)).await;

    // A client follows along for one change, then drops.
    let mut a = connect_after_retry(&url, None).await;
    let mut state = None;
    let snap = a.expect_event("snapshot", T).await;
    assert_eq!(snap.event, "snapshot");
    apply_event(&mut state, &snap);
    let e1 = change(&up, &mut obs, 1).await;
    let got = a.expect_event("change 1", T).await;
    assert_eq!((&got.id, &got.data), (&e1.id, &e1.data));
    apply_event(&mut state, &got);
    let last = a.last_event_id().expect("an id");
    drop(a);

    // Five changes happen while it is away.
    let mut missed = Vec::new();
    for n in 2..=6 {
        missed.push(change(&up, &mut obs, n).await);
    }

    // Reconnecting replays exactly those five, in order, byte for byte.
    let mut b = connect_after_retry(&url, Some(&last)).await;
    let mut replayed = Vec::new();
    for _ in 0..missed.len() {
        replayed.push(b.expect_event("a replayed event", T).await);
    }
    assert_eq!(replayed, missed);
    for ev in &replayed {
        apply_event(&mut state, ev);
    }
    assert_eq!(state.as_ref(), Some(&doc(6)), "state after replay");

    // Then it is live: the next event is the next change, so nothing was sent twice in between.
    let e7 = change(&up, &mut obs, 7).await;
    let live = b.expect_event("change 7", T).await;
    assert_eq!(live, e7);
    apply_event(&mut state, &live);
    assert_eq!(state, Some(doc(7)));

    let mut all = vec![snap, got];
    all.extend(replayed);
    all.push(live);
    assert_ids_grow(&all);
    assert_ids_grow(&obs.events);

    drop((b, obs));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn reconnect_at_head_replays_nothing_and_stays_live() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, doc(0));
    let h = start_herald(config(&up.url(), &routes(""))).await;
    let url = h.url(PATH);
    let mut obs = Observer::connect(&url, &doc(0)).await;
    change(&up, &mut obs, 1).await;
    change(&up, &mut obs, 2).await;
    let head = obs.last_id();

    let mut c = connect_after_retry(&url, Some(&head)).await;
    // Whether the change lands before or after the subscription, the client must see exactly it
    // first: anything else would be a replay of what it already had.
    let e3 = change(&up, &mut obs, 3).await;
    let first = c.expect_event("change 3", T).await;
    assert_eq!(first, e3);
    let e4 = change(&up, &mut obs, 4).await;
    assert_eq!(c.expect_event("change 4", T).await, e4);
    assert_eq!(c.last_event_id(), e4.id);

    drop((c, obs));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn unknown_garbage_or_too_old_ids_get_a_fresh_snapshot() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, doc(0));
    let h = start_herald(config(&up.url(), &routes("history = 3"))).await;
    let url = h.url(PATH);
    let mut obs = Observer::connect(&url, &doc(0)).await;
    let too_old = obs.last_id();
    let (inc, _) = id_parts(&obs.events[0]);
    // Ten changes: the first id falls out of a history of three.
    for n in 1..=10 {
        change(&up, &mut obs, n).await;
    }
    let head = obs.last_id();
    let (_, head_seq) = id_parts(obs.events.last().expect("events"));
    let other_incarnation = format!(
        "{}-a",
        herald::hub::Position::new(inc ^ 2, 0)
            .to_string()
            .split('-')
            .next()
            .unwrap()
    );
    let future = herald::hub::Position::new(inc, head_seq + 5).to_string();

    let ids = [
        too_old.as_str(),
        "garbage",
        "",
        "1-2-3",
        "zzzzzzzzzzzz-1",
        &other_incarnation,
        &future,
    ];
    let mut clients = Vec::new();
    for id in ids {
        let mut c = connect_after_retry(&url, Some(id)).await;
        let snap = c.expect_event("a fresh snapshot", T).await;
        assert_eq!(snap.event, "snapshot", "Last-Event-ID {id:?}: {snap:?}");
        assert_eq!(snap.json()["data"], doc(10), "Last-Event-ID {id:?}");
        assert_eq!(
            snap.id.as_deref(),
            Some(head.as_str()),
            "the snapshot is at head"
        );
        clients.push((id, c));
    }
    // Nothing else was queued behind the snapshot: the next event on each is the next change.
    let e11 = change(&up, &mut obs, 11).await;
    for (id, c) in &mut clients {
        assert_eq!(
            c.expect_event("change 11", T).await,
            e11,
            "Last-Event-ID {id:?}"
        );
    }

    drop((clients, obs));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn id_from_before_a_restart_gets_a_fresh_snapshot() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, doc(0));
    let cfg = routes("");
    let h1 = start_herald(config(&up.url(), &cfg)).await;
    // The client holds the id of the very first event: seq 1 of the old incarnation, which the
    // new herald's topic also reaches with its first poll. Only the incarnation tells them apart.
    let mut a = connect_after_retry(&h1.url(PATH), None).await;
    let snap = a.expect_event("snapshot", T).await;
    let old = snap.id.clone().expect("an id");
    let (old_inc, _) = id_parts(&snap);
    drop(a);
    h1.stop().await;

    up.set_json(PATH, doc(5));
    let h2 = start_herald(config(&up.url(), &cfg)).await;
    let url = h2.url(PATH);
    let obs = Observer::connect(&url, &doc(5)).await;
    let mut b = connect_after_retry(&url, Some(&old)).await;
    let fresh = b.expect_event("a fresh snapshot", T).await;
    assert_eq!(fresh.event, "snapshot");
    assert_eq!(fresh.json()["data"], doc(5));
    assert_eq!(fresh.id.as_deref(), Some(obs.last_id().as_str()));
    assert_ne!(
        id_parts(&fresh).0,
        old_inc,
        "a new herald is a new incarnation"
    );

    drop((b, obs));
    h2.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn id_from_an_expired_topic_gets_a_fresh_snapshot() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, doc(0));
    let h = start_herald(config(&up.url(), &routes("grace = \"50ms\""))).await;
    let url = h.url(PATH);
    let mut obs = Observer::connect(&url, &doc(0)).await;
    change(&up, &mut obs, 1).await;
    let old = obs.last_id();
    drop(obs);
    assert!(
        eventually(T, || h.hub.topic_count() == 0).await,
        "topic closes after grace"
    );

    up.set_json(PATH, doc(2));
    let mut c = connect_after_retry(&url, Some(&old)).await;
    let fresh = c.expect_event("a fresh snapshot", T).await;
    assert_eq!(fresh.event, "snapshot");
    assert_eq!(fresh.json()["data"], doc(2));
    assert_ne!(
        id_parts(&fresh).0,
        old.parse::<herald::hub::Position>()
            .ok()
            .map(|p| (p.epoch, p.seq))
            .expect("id")
            .0
    );

    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn every_event_has_an_id_and_ids_only_grow() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, doc(0));
    let h = start_herald(config(&up.url(), &routes("history = 4"))).await;
    let url = h.url(PATH);
    let mut obs = Observer::connect(&url, &doc(0)).await;
    for n in 1..=3 {
        change(&up, &mut obs, n).await;
    }
    // An outage and a recovery are events of the topic too.
    up.set(PATH, Reply::status(503, "{}"));
    let err = obs.client.expect_event("upstream-error", T).await;
    assert_eq!(err.event, "upstream-error");
    obs.events.push(err);
    // A client that joins during the outage gets the last good state and the error, in id order.
    let mut late = connect_after_retry(&url, None).await;
    let s = late.expect_event("snapshot", T).await;
    let e = late.expect_event("upstream-error", T).await;
    assert_eq!(
        (s.event.as_str(), e.event.as_str()),
        ("snapshot", "upstream-error")
    );
    assert_eq!(s.json()["data"], doc(3));
    assert_ids_grow(&[s.clone(), e.clone()]);
    // Reconnecting with the snapshot's id replays the error it has not seen; with the error's id,
    // nothing. Either way the next thing is the recovery.
    let mut from_snapshot = connect_after_retry(&url, s.id.as_deref()).await;
    assert_eq!(
        from_snapshot.expect_event("replayed error", T).await.id,
        e.id
    );
    let mut from_error = connect_after_retry(&url, e.id.as_deref()).await;

    for n in 4..=6 {
        change(&up, &mut obs, n).await;
    }
    assert_ids_grow(&obs.events);
    for c in [&mut late, &mut from_snapshot, &mut from_error] {
        let mut seen = Vec::new();
        let mut state = Some(doc(3));
        while state != Some(doc(6)) {
            let ev = c.expect_event("catching up to change 6", T).await;
            apply_event(&mut state, &ev);
            seen.push(ev);
        }
        assert!(seen.iter().all(|ev| ev.id.is_some()));
        assert_ids_grow(&seen);
        assert!(id_parts(&seen[0]).1 > id_parts(&e).1);
    }

    drop((late, from_snapshot, from_error, obs));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn reconnect_within_grace_replays_with_no_other_watcher() {
    // The usual reconnect: the only client drops (network blip) and comes back before the topic's
    // grace period ends; the topic kept polling, so its history still has the gap.
    let up = TestUpstream::start().await;
    up.set_json(PATH, doc(0));
    let h = start_herald(config(&up.url(), &routes("grace = \"10s\""))).await;
    let url = h.url(PATH);
    let mut a = connect_after_retry(&url, None).await;
    let mut state = None;
    apply_event(&mut state, &a.expect_event("snapshot", T).await);
    let last = a.last_event_id().expect("an id");
    let (_, last_seq) = last
        .parse::<herald::hub::Position>()
        .ok()
        .map(|p| (p.epoch, p.seq))
        .expect("id");
    drop(a);
    let key = herald::routes::TopicKey {
        route: "/api/builds/{id}".into(),
        resource: PATH.into(),
        vary: 0,
    };
    let topic = h.hub.topic(&key).expect("topic");
    assert!(eventually(T, || topic.channel.watcher_count() == 0).await);

    for n in 1..=4 {
        up.set_json(PATH, doc(n));
        let want = last_seq + n;
        assert!(
            eventually(T, || topic.channel.head().seq == want).await,
            "change {n} published"
        );
    }
    let mut b = connect_after_retry(&url, Some(&last)).await;
    let mut replayed = Vec::new();
    while state != Some(doc(4)) {
        let ev = b.expect_event("replay", T).await;
        apply_event(&mut state, &ev);
        replayed.push(ev);
    }
    assert_eq!(
        replayed.len(),
        4,
        "one event per missed change: {replayed:?}"
    );
    let seqs: Vec<u64> = replayed.iter().map(|e| id_parts(e).1).collect();
    assert_eq!(seqs, (last_seq + 1..=last_seq + 4).collect::<Vec<_>>());

    drop((b, topic));
    h.stop().await;
    up.stop().await;
}

/// A big body: a few of them overflow the kernel's socket buffers and the topic's history bytes.
fn big(n: u64) -> Value {
    json!({"n": n, "pad": "p".repeat(1_000_000 + n as usize)})
}

#[tokio::test]
async fn a_watcher_that_falls_out_of_history_is_resynced_never_gapped() {
    let up = TestUpstream::start().await;
    up.set_json(PATH, big(0));
    // 1 MiB of history holds a single 1 MB event (events weigh twice their envelope).
    let h = start_herald(config(&up.url(), &routes("history_bytes = \"1MiB\""))).await;
    let url = h.url(PATH);
    let mut obs = Observer::connect(&url, &big(0)).await;

    // A client that stops reading: a bare socket with a small receive buffer.
    let mut slow = SlowReader::connect(h.addr).await;
    slow.read_until_state(&big(0)).await;

    // 1 MB changes while it does not read: more than the socket buffers and history hold.
    let changes = changes_to_overflow_socket_buffers();
    for n in 1..=changes {
        change_big(&up, &mut obs, n).await;
    }
    let head = obs.last_id();
    slow.read_until_state(&big(changes)).await;

    // Ids grow, and every jump over missed events lands on a snapshot: never a silent gap.
    let events = &slow.events;
    assert_ids_grow(events);
    let mut jumped = false;
    for w in events.windows(2) {
        if id_parts(&w[1]).1 > id_parts(&w[0]).1 + 1 {
            jumped = true;
            assert_eq!(
                w[1].event, "snapshot",
                "a gap bridged by a {:?}",
                w[1].event
            );
        }
    }
    assert!(
        jumped,
        "the client never fell out of history; the test proves nothing"
    );
    assert_eq!(events.last().and_then(|e| e.id.clone()), Some(head));

    drop((slow, obs));
    h.stop().await;
    up.stop().await;
}

/// An SSE client on a bare socket that reads only when told to. It asks in HTTP/1.0, so the body
/// is the SSE text itself (no chunked framing to undo).
struct SlowReader {
    sock: tokio::net::TcpStream,
    parser: SseParser,
    head: Option<Vec<u8>>,
    state: Option<Value>,
    events: Vec<SseEvent>,
}

impl SlowReader {
    async fn connect(addr: std::net::SocketAddr) -> SlowReader {
        use tokio::io::AsyncWriteExt;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        // Small, so that the kernel buffers little on the client side.
        sock.set_recv_buffer_size(4096).unwrap();
        let mut sock = sock.connect(addr).await.unwrap();
        let req = format!("GET {PATH} HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n");
        sock.write_all(req.as_bytes()).await.unwrap();
        SlowReader {
            sock,
            parser: SseParser::default(),
            head: Some(Vec::new()),
            state: None,
            events: Vec::new(),
        }
    }

    /// Read and apply events until the client's state is `want`. Megabytes through a 4 KiB
    /// receive window take a starved machine many seconds: the deadline is generous.
    async fn read_until_state(&mut self, want: &Value) {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut chunk = vec![0u8; 64 * 1024];
        while self.state.as_ref() != Some(want) {
            let n = tokio::time::timeout_at(deadline, self.sock.read(&mut chunk))
                .await
                .unwrap_or_else(|_| {
                    let got: Vec<_> = self.events.iter().map(|e| (&e.event, &e.id)).collect();
                    panic!("slow client did not catch up in time; got {got:?}")
                })
                .unwrap();
            assert!(n > 0, "stream ended");
            let body = match self.head.as_mut() {
                None => chunk[..n].to_vec(),
                Some(head) => {
                    head.extend_from_slice(&chunk[..n]);
                    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let body = head.split_off(end + 4);
                    assert!(head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"));
                    self.head = None;
                    body
                }
            };
            for ev in self.parser.feed(&body) {
                if ev.comment.is_none() && !ev.event.is_empty() {
                    apply_event(&mut self.state, &ev);
                    self.events.push(ev);
                }
            }
        }
    }
}

/// Enough 1 MB changes to overflow the kernel's largest TCP send buffer (Linux `tcp_wmem`; 4 MiB
/// by default) with room to spare, so the watcher surely falls out of history.
fn changes_to_overflow_socket_buffers() -> u64 {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .unwrap_or(4 << 20);
    (wmem_max / 1_000_000 + 8).clamp(12, 40)
}

async fn change_big(up: &TestUpstream, obs: &mut Observer, n: u64) {
    up.set_json(PATH, big(n));
    let evs = obs.until(&big(n)).await;
    assert_eq!(evs.len(), 1);
}
