//! Several herald nodes on one Redis (issue 17): each test starts its own `redis-server` on a free
//! loopback port (killed on drop), three herald nodes in this process, and one upstream that
//! counts requests. One poll per interval in the whole cluster; a dead writer's topic taken over
//! with no gap and no duplicate id; `Last-Event-ID` replay on another node; Redis restarted under
//! open streams; per-credential topics shared per user and isolated between users.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(10);
const PATH: &str = "/api/builds/7";
const SECRET: &str = "cluster-test-secret-0123456789";

/// A `redis-server` child on a loopback port, with no persistence; killed when dropped.
struct TestRedis {
    port: u16,
    child: Option<Child>,
    /// Extra server arguments (e.g. `--requirepass`).
    args: Vec<String>,
}

impl TestRedis {
    /// On a free port below the ephemeral range (so that no client socket of this test process
    /// can hold it when Redis binds it, or binds it again after a restart).
    fn start() -> TestRedis {
        TestRedis::start_with(&[])
    }

    fn start_with(args: &[&str]) -> TestRedis {
        for _ in 0..20 {
            let port = 20_000 + rand::random::<u16>() % 12_000;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            let mut r = TestRedis {
                port,
                child: None,
                args: args.iter().map(|a| a.to_string()).collect(),
            };
            if r.try_start() {
                return r;
            }
        }
        panic!("redis-server did not start on any of 20 ports");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start again on the same port (a restart), and wait until it answers.
    fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.try_start() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start again"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Spawn redis-server on `port`; true once it answers, false if it exited (port taken).
    fn try_start(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs Debian's redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Still running a moment later: it is ours that answered, not another's.
                std::thread::sleep(Duration::from_millis(50));
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
                self.child = Some(child);
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A node's config. Its lease is 3 s (renewed every second), so that a loaded machine does not
/// lose it by accident; the takeover test shortens it.
fn cluster_config(up: &TestUpstream, redis: &TestRedis, node: &str, route: &str) -> herald::Config {
    lease_config(up, redis, node, route, "3s")
}

fn lease_config(
    up: &TestUpstream,
    redis: &TestRedis,
    node: &str,
    route: &str,
    lease: &str,
) -> herald::Config {
    config(
        &up.url(),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[sse]\ngrace = \"2s\"\n[cluster]\nredis = \"{}\"\nnode = \"{node}\"\nsecret = \"{SECRET}\"\nlease = \"{lease}\"\n{route}",
            redis.url()
        ),
    )
}

fn build_route(interval: &str) -> String {
    format!("[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"{interval}\"\n")
}

/// A node started with `Herald::start` (it connects to Redis first).
async fn start_node(config: herald::Config) -> TestHerald {
    start_node_admin(config).await.0
}

/// The same, with its admin listener's address (when `[admin]` is configured).
async fn start_node_admin(config: herald::Config) -> (TestHerald, Option<SocketAddr>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut herald = herald::Herald::start(config).await.expect("node starts");
    let admin = herald.bind_admin().await.unwrap();
    let hub = herald.hub().clone();
    let shutdown = CancellationToken::new();
    let join = tokio::spawn(herald.serve(listener, shutdown.clone()));
    let node = TestHerald {
        addr,
        hub,
        shutdown,
        join,
        tls: None,
    };
    (node, admin)
}

/// A counter or gauge of a node's `/metrics` (0 when absent).
async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn three_nodes(up: &TestUpstream, redis: &TestRedis, route: &str) -> Vec<TestHerald> {
    let mut nodes = Vec::new();
    for n in ["n1", "n2", "n3"] {
        nodes.push(start_node(cluster_config(up, redis, n, route)).await);
    }
    nodes
}

fn seq(ev: &SseEvent) -> (u32, u64) {
    let p: herald::hub::Position = ev.id.as_deref().expect("an id").parse().expect("an id");
    (p.epoch, p.seq)
}

/// The node that writes the topic, as `n`'s status shows it.
fn writer_of(node: &TestHerald) -> Option<String> {
    node.hub
        .topics_info()
        .first()
        .and_then(|t| t.writer.clone())
}

#[tokio::test]
async fn one_poll_per_interval_across_three_nodes() {
    let redis = TestRedis::start();
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"n": 0}));
    let nodes = three_nodes(&up, &redis, &build_route("200ms")).await;
    let mut clients = Vec::new();
    for node in &nodes {
        for _ in 0..3 {
            clients.push(SseClient::connect(&node.url(PATH), None).await);
        }
    }
    let mut first = HashSet::new();
    for c in &mut clients {
        let ev = c.expect_event("the first snapshot", T).await;
        assert_eq!(ev.event, "snapshot");
        assert_eq!(ev.json()["data"], json!({"n": 0}));
        first.insert(seq(&ev));
    }
    assert_eq!(first.len(), 1, "every node shows the same id: {first:?}");

    // Over three seconds, one poller in the whole cluster: about 15 polls, not 45.
    let before = up.hits(PATH);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let polls = up.hits(PATH) - before;
    assert!(
        (5..=22).contains(&polls),
        "{polls} upstream polls in 3s at 200ms across 3 nodes"
    );

    // A change reaches every watcher on every node under the same id.
    up.set_json(PATH, json!({"n": 1}));
    let mut ids = HashSet::new();
    for c in &mut clients {
        let ev = c.expect_event("the change", T).await;
        ids.insert(seq(&ev));
        let mut state = Some(json!({"n": 0}));
        apply_event(&mut state, &ev);
        assert_eq!(state, Some(json!({"n": 1})));
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let (epoch, s) = *first.iter().next().unwrap();
    assert_eq!(*ids.iter().next().unwrap(), (epoch, s + 1));
    // Every node names the same writer.
    assert!(
        eventually(T, || {
            let w: Vec<_> = nodes.iter().map(writer_of).collect();
            w[0].is_some() && w.iter().all(|x| *x == w[0])
        })
        .await,
        "every node names one writer"
    );

    drop(clients);
    for n in nodes {
        n.stop().await;
    }
    up.stop().await;
}

#[tokio::test]
async fn a_dead_writer_is_taken_over_without_gap_or_duplicate() {
    let redis = TestRedis::start();
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"n": 0}));
    let mut nodes = Vec::new();
    let mut admins = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let config = lease_config(&up, &redis, n, &build_route("50ms"), "1s");
        let (node, admin) = start_node_admin(config).await;
        nodes.push(node);
        admins.push(admin.unwrap());
    }
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(SseClient::connect(&node.url(PATH), None).await);
    }
    for c in &mut clients {
        c.expect_event("the first snapshot", T).await;
    }
    assert!(eventually(T, || writer_of(&nodes[0]).is_some()).await);
    let writer = writer_of(&nodes[0]).unwrap();
    let dead = ["n1", "n2", "n3"]
        .iter()
        .position(|n| *n == writer)
        .unwrap();
    admins.remove(dead);

    // The upstream keeps changing while the writer dies (its task aborted: no clean goodbye,
    // its lease stays in Redis until it expires).
    let mut n = 1;
    let mut change = || {
        up.set_json(PATH, json!({"n": n}));
        n += 1;
    };
    for _ in 0..5 {
        change();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let victim = nodes.remove(dead);
    let victim_client = clients.remove(dead);
    let killed = Instant::now();
    victim.join.abort();
    drop(victim_client);

    // Survivors: ids strictly consecutive across the takeover, and events again soon.
    let mut last: Vec<(u32, u64)> = vec![(0, 0); clients.len()];
    let mut resumed = None;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        change();
        for (i, c) in clients.iter_mut().enumerate() {
            while let Some(ev) = c.next_event(Duration::from_millis(50)).await {
                let (e, s) = seq(&ev);
                if last[i].1 > 0 {
                    assert_eq!(e, last[i].0, "the epoch survives the takeover: {ev:?}");
                    assert_eq!(s, last[i].1 + 1, "no gap, no duplicate: {ev:?}");
                }
                last[i] = (e, s);
                let new_writer = writer_of(&nodes[i]);
                if resumed.is_none() && new_writer.as_deref().is_some_and(|w| w != writer) {
                    resumed = Some(killed.elapsed());
                }
            }
        }
    }
    // Changes stopped: the survivors drain what is still in flight, still without gap.
    for (i, c) in clients.iter_mut().enumerate() {
        while let Some(ev) = c.next_event(Duration::from_secs(1)).await {
            let (e, s) = seq(&ev);
            if last[i].1 > 0 {
                assert_eq!((e, s), (last[i].0, last[i].1 + 1), "no gap: {ev:?}");
            }
            last[i] = (e, s);
        }
    }
    let took = resumed.expect("another node took the topic over");
    // A lease of 1s, tried again as it runs out: well within 4s on a loaded machine.
    assert!(took < Duration::from_secs(4), "takeover took {took:?}");
    assert!(
        last.iter().all(|l| *l == last[0]),
        "survivors agree: {last:?}"
    );
    // The survivors' metrics: one of them holds the lease now, having taken it over; both read.
    let mut held = 0.0;
    let mut takeovers = 0.0;
    for a in &admins {
        held += metric(*a, "herald_cluster_leases_held").await;
        takeovers += metric(*a, "herald_cluster_takeovers_total").await;
        assert!(metric(*a, "herald_cluster_events_read_total").await > 0.0);
    }
    assert_eq!(held, 1.0, "one survivor writes the topic");
    // (A loaded machine may add a takeover of its own: the ids above stay consecutive anyway.)
    assert!(takeovers >= 1.0, "after a takeover");

    drop(clients);
    for n in nodes {
        n.stop().await;
    }
    up.stop().await;
}

#[tokio::test]
async fn a_client_resuming_on_another_node_gets_exactly_its_gap() {
    let redis = TestRedis::start();
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"n": 0, "pad": "x".repeat(200)}));
    let nodes = three_nodes(&up, &redis, &build_route("50ms")).await;
    // The observer on node 2 sees everything the topic publishes.
    let mut observer = SseClient::connect(&nodes[1].url(PATH), None).await;
    observer.expect_event("the first snapshot", T).await;
    let mut client = SseClient::connect(&nodes[0].url(PATH), None).await;
    client.expect_event("the first snapshot", T).await;
    up.set_json(PATH, json!({"n": 1, "pad": "x".repeat(200)}));
    let seen = client.expect_event("the first change", T).await;
    observer.expect_event("the first change", T).await;
    let last = seen.id.clone().unwrap();
    drop(client);

    // Three changes while the client is away.
    let mut missed = Vec::new();
    for n in 2..5 {
        up.set_json(PATH, json!({"n": n, "pad": "x".repeat(200)}));
        missed.push(observer.expect_event("a change", T).await);
    }
    // Node 3 has never had this topic: it learns its past from Redis.
    assert_eq!(nodes[2].hub.topic_count(), 0);
    let mut back = SseClient::connect(&nodes[2].url(PATH), Some(&last)).await;
    for want in &missed {
        let got = back.expect_event("a missed event", T).await;
        assert_eq!(got.id, want.id);
        assert_eq!(got.event, want.event);
        assert_eq!(got.json()["data"], want.json()["data"]);
    }
    assert!(
        back.next_event(Duration::from_millis(500)).await.is_none(),
        "nothing but the gap"
    );
    // And a live change after the gap, under the next id.
    up.set_json(PATH, json!({"n": 9, "pad": "x".repeat(200)}));
    let live = back.expect_event("a live change", T).await;
    assert_eq!(seq(&live).1, seq(missed.last().unwrap()).1 + 1, "{live:?}");

    drop((observer, back));
    for n in nodes {
        n.stop().await;
    }
    up.stop().await;
}

#[tokio::test]
async fn streams_stay_open_while_redis_restarts_and_resume_after() {
    let mut redis = TestRedis::start();
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"n": 0}));
    let nodes = three_nodes(&up, &redis, &build_route("50ms")).await;
    let mut clients = Vec::new();
    let mut states = Vec::new();
    for node in &nodes {
        let mut c = SseClient::connect(&node.url(PATH), None).await;
        let ev = c.expect_event("the first snapshot", T).await;
        let mut state = None;
        apply_event(&mut state, &ev);
        states.push(state);
        clients.push(c);
    }

    redis.stop();
    for c in &mut clients {
        let ev = c.expect_event("the cluster's error", T).await;
        assert_eq!(ev.event, "upstream-error", "{ev:?}");
        assert_eq!(ev.json()["data"]["error"], "cluster-unavailable", "{ev:?}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    up.set_json(PATH, json!({"n": 1}));

    // Every stream is still open and reaches the upstream's state (from a snapshot: the
    // restarted Redis kept nothing).
    for (c, state) in clients.iter_mut().zip(&mut states) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while *state != Some(json!({"n": 1})) {
            assert!(
                Instant::now() < deadline,
                "events resume after Redis returns"
            );
            match c.next_item(Duration::from_secs(1)).await {
                Next::Item(ev) if ev.event == "snapshot" || ev.event == "patch" => {
                    apply_event(state, &ev)
                }
                Next::End | Next::Broken(_) => panic!("the stream ended"),
                _ => {}
            }
        }
    }

    drop(clients);
    for n in nodes {
        n.stop().await;
    }
    up.stop().await;
}

#[tokio::test]
async fn per_credential_topics_are_shared_per_user_and_isolated_between_users() {
    const ME: &str = "/api/me/notifications";
    let redis = TestRedis::start();
    let up = TestUpstream::start().await;
    up.set_for(
        ME,
        "session=a",
        Reply::json(json!({"user": "alice", "n": 0})),
    );
    up.set_for(ME, "session=b", Reply::json(json!({"user": "bob", "n": 0})));
    let route =
        format!("[[route]]\npath = \"{ME}\"\ninterval = \"100ms\"\nvary = [\"cookie:session\"]\n");
    let nodes = three_nodes(&up, &redis, &route).await;
    let client = reqwest::Client::new();
    let mut alice = Vec::new();
    let mut bob = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let url = node.url(ME);
        alice.push(SseClient::connect_with(&client, &url, None, &[("cookie", "session=a")]).await);
        if i > 0 {
            bob.push(
                SseClient::connect_with(&client, &url, None, &[("cookie", "session=b")]).await,
            );
        }
    }
    let mut alice_ids = HashSet::new();
    for c in &mut alice {
        let ev = c.expect_event("alice's snapshot", T).await;
        assert_eq!(ev.json()["data"]["user"], "alice");
        alice_ids.insert(ev.id);
    }
    for c in &mut bob {
        let ev = c.expect_event("bob's snapshot", T).await;
        assert_eq!(ev.json()["data"]["user"], "bob");
    }
    assert_eq!(
        alice_ids.len(),
        1,
        "alice's topic is one topic: {alice_ids:?}"
    );

    // One poller per user in the whole cluster: about 20 polls each in 2s, not 60.
    let (a0, b0) = (up.hits_by(ME, "session=a"), up.hits_by(ME, "session=b"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a, b) = (
        up.hits_by(ME, "session=a") - a0,
        up.hits_by(ME, "session=b") - b0,
    );
    assert!((4..=30).contains(&a), "{a} polls for alice in 2s");
    assert!((4..=30).contains(&b), "{b} polls for bob in 2s");

    up.set_for(
        ME,
        "session=a",
        Reply::json(json!({"user": "alice", "n": 1})),
    );
    for c in &mut alice {
        let ev = c.expect_event("alice's change", T).await;
        assert!(!ev.data.contains("bob"), "{ev:?}");
    }
    for c in &mut bob {
        assert!(
            c.next_event(Duration::from_millis(500)).await.is_none(),
            "bob sees nothing of alice's change"
        );
    }
    // Only the caller's own cookie ever went upstream.
    for s in up.seen() {
        let c = credential_of(&s.headers);
        assert!(c == "session=a" || c == "session=b", "forwarded {c:?}");
    }

    drop((alice, bob));
    for n in nodes {
        n.stop().await;
    }
    up.stop().await;
}

#[tokio::test]
async fn redis_unreachable_at_startup_is_a_clear_error_or_a_local_node() {
    let up = TestUpstream::start().await;
    let port = free_addr().await.port();
    let text = |extra: &str| {
        format!(
            "[cluster]\nredis = \"redis://127.0.0.1:{port}\"\nsecret = \"{SECRET}\"\n{extra}\n{}",
            build_route("100ms")
        )
    };
    let err = herald::Herald::start(config(&up.url(), &text("")))
        .await
        .err()
        .expect("no Redis: no node");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(
        herald::Herald::new(config(&up.url(), &text(""))).is_err(),
        "a clustered config needs Herald::start"
    );

    // Degraded local mode: serves alone.
    up.set_json(PATH, json!({"n": 0}));
    let node = start_node(config(&up.url(), &text("on_unavailable = \"local\""))).await;
    let mut c = SseClient::connect(&node.url(PATH), None).await;
    assert_eq!(c.expect_event("a snapshot", T).await.event, "snapshot");
    drop(c);
    node.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn the_writer_polls_while_any_node_watches_and_stops_when_none_does() {
    let redis = TestRedis::start();
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"n": 0}));
    let route = build_route("100ms");
    let n1 = start_node(cluster_config(&up, &redis, "n1", &route)).await;
    let n2 = start_node(cluster_config(&up, &redis, "n2", &route)).await;
    let mut first = SseClient::connect(&n1.url(PATH), None).await;
    first.expect_event("a snapshot", T).await;
    assert!(eventually(T, || writer_of(&n1).as_deref() == Some("n1")).await);
    let mut second = SseClient::connect(&n2.url(PATH), None).await;
    let snap = second.expect_event("a snapshot", T).await;

    // n1's watcher leaves; n2 still watches: n1 keeps writing past its grace (2s), no handoff
    // (which would show as a new snapshot).
    drop(first);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(writer_of(&n2).as_deref(), Some("n1"));
    assert_eq!(
        n1.hub.topic_count(),
        1,
        "the writer keeps the topic for n2's watcher"
    );
    assert!(second
        .next_event(Duration::from_millis(100))
        .await
        .is_none());
    up.set_json(PATH, json!({"n": 1}));
    let ev = second.expect_event("the change", T).await;
    assert_eq!(seq(&ev).1, seq(&snap).1 + 1, "{ev:?}");

    // Nobody watches: polling stops within about two graces.
    drop(second);
    assert!(
        eventually(Duration::from_secs(15), || n1.hub.topic_count() == 0
            && n2.hub.topic_count() == 0)
        .await,
        "both nodes close the topic"
    );
    let before = up.hits(PATH);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(up.hits(PATH), before, "nobody polls an unwatched topic");

    n1.stop().await;
    n2.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_password_in_the_url_is_used_and_never_printed() {
    let redis = TestRedis::start_with(&["--requirepass", "s3cret-pw"]);
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"n": 0}));
    let text = |pw: &str| {
        format!(
            "[cluster]\nredis = \"redis://:{pw}@127.0.0.1:{}\"\nsecret = \"{SECRET}\"\n{}",
            redis.port,
            build_route("100ms")
        )
    };
    let err = herald::Herald::start(config(&up.url(), &text("wrong-pw")))
        .await
        .err()
        .expect("a wrong password: no node");
    let msg = err.to_string();
    assert!(!msg.contains("wrong-pw"), "the password is printed: {msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", redis.port)), "{msg}");

    let node = start_node(config(&up.url(), &text("s3cret-pw"))).await;
    let mut c = SseClient::connect(&node.url(PATH), None).await;
    assert_eq!(c.expect_event("a snapshot", T).await.event, "snapshot");
    drop(c);
    node.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_writer_that_shuts_down_cleanly_hands_its_topic_over_at_once() {
    let redis = TestRedis::start();
    let up = TestUpstream::start().await;
    up.set_json(PATH, json!({"n": 0}));
    // A long lease: waiting for it to expire would take 4 s or more.
    let lease = "6s";
    let route = build_route("50ms");
    let mut nodes = vec![
        start_node(lease_config(&up, &redis, "n1", &route, lease)).await,
        start_node(lease_config(&up, &redis, "n2", &route, lease)).await,
    ];
    let mut clients = Vec::new();
    for node in &nodes {
        let mut c = SseClient::connect(&node.url(PATH), None).await;
        c.expect_event("a snapshot", T).await;
        clients.push(c);
    }
    assert!(eventually(T, || writer_of(&nodes[1]).is_some()).await);
    let writer = writer_of(&nodes[1]).unwrap();
    let leaving = if writer == "n1" { 0 } else { 1 };
    drop(clients.remove(leaving));
    nodes.remove(leaving).stop().await;

    let stopped = Instant::now();
    let survivor = &mut clients[0];
    let mut n = 1;
    let ev = loop {
        up.set_json(PATH, json!({"n": n}));
        n += 1;
        if let Some(ev) = survivor.next_event(Duration::from_millis(100)).await {
            break ev;
        }
        assert!(stopped.elapsed() < T, "nobody took the topic over");
    };
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "a lease given back is taken within a third of a lease: {took:?} ({ev:?})"
    );
    drop(clients);
    for n in nodes {
        n.stop().await;
    }
    up.stop().await;
}

#[tokio::test]
async fn a_multiplexed_stream_resumes_on_another_node() {
    let redis = TestRedis::start();
    let up = TestUpstream::start().await;
    let body = |id: u64, n: u64| json!({"id": id, "n": n, "pad": "p".repeat(200)});
    up.set_json("/api/builds/1", body(1, 0));
    up.set_json("/api/builds/2", body(2, 0));
    let nodes = three_nodes(&up, &redis, &build_route("50ms")).await;
    let mux = "/_herald/stream?watch=/api/builds/1&watch=/api/builds/2";
    let topic = |ev: &SseEvent| ev.json()["topic"].as_str().unwrap_or("").to_string();
    // The observer (node 2) keeps both topics alive and sees everything.
    let mut observer = SseClient::connect(&nodes[1].url(mux), None).await;
    let mut client = SseClient::connect(&nodes[0].url(mux), None).await;
    for c in [&mut observer, &mut client] {
        assert_eq!(c.expect_event("hello", T).await.event, "hello");
        let mut seen = HashSet::new();
        while seen.len() < 2 {
            seen.insert(topic(&c.expect_event("a snapshot", T).await));
        }
    }
    let last = client.last_event_id().expect("a multiplexed id");
    drop(client);

    let mut missed = Vec::new();
    for n in 1..=2 {
        up.set_json("/api/builds/1", body(1, n));
        missed.push(observer.expect_event("a change of topic 1", T).await);
    }
    // Node 3 never had either topic.
    let mut back = SseClient::connect(&nodes[2].url(mux), Some(&last)).await;
    assert_eq!(back.expect_event("hello", T).await.event, "hello");
    for want in &missed {
        let got = back.expect_event("a missed event", T).await;
        assert_eq!(topic(&got), "/api/builds/1");
        assert_eq!(
            (got.event.as_str(), got.data.as_str()),
            (want.event.as_str(), want.data.as_str())
        );
    }
    assert!(
        back.next_event(Duration::from_millis(500)).await.is_none(),
        "topic 2 missed nothing: nothing is sent for it"
    );

    drop((observer, back));
    for n in nodes {
        n.stop().await;
    }
    up.stop().await;
}

/// A writer that lost its lease (paused while another node took over) can never append: the
/// append script checks the lease token, the old writer is told, and the ids go on from the new
/// writer's appends only.
#[tokio::test]
async fn a_writer_whose_lease_was_taken_is_fenced() {
    use herald::hub::{Broker, BrokerError, Channel, Draft, EventKind, TopicSettings};
    let redis = TestRedis::start();
    let up = TestUpstream::start().await;
    let cfg = |node: &str| {
        config(
            &up.url(),
            &format!(
                "[cluster]\nredis = \"{}\"\nnode = \"{node}\"\nsecret = \"{SECRET}\"\nlease = \"1s\"\n",
                redis.url()
            ),
        )
        .cluster
        .redis
        .unwrap()
    };
    let metrics = std::sync::Arc::new(herald::telemetry::Metrics::new());
    let (cancel, tracker) = (
        CancellationToken::new(),
        tokio_util::task::TaskTracker::new(),
    );
    let (cfg_a, cfg_b) = (cfg("a"), cfg("b"));
    let connect = |cfg| {
        herald::cluster::RedisBroker::connect(
            cfg,
            metrics.cluster.clone(),
            cancel.clone(),
            &tracker,
        )
    };
    let (a, b) = (
        connect(&cfg_a).await.unwrap(),
        connect(&cfg_b).await.unwrap(),
    );
    let key = herald::routes::TopicKey {
        route: "/t".into(),
        resource: "/t".into(),
        vary: 0,
    };
    let settings = std::sync::Arc::new(TopicSettings {
        diff_mode: herald::diff::Mode::Snapshot,
        diff_options: Default::default(),
        history: 100,
        history_bytes: 1 << 20,
        grace: Duration::from_secs(1),
        min_interval: Duration::ZERO,
        metrics: metrics.route("/t"),
        per_credential: false,
        refuse: Default::default(),
        pass_through: false,
    });
    let id = key.id();
    let (ca, cb) = (
        std::sync::Arc::new(Channel::new(key.clone(), settings.clone())),
        std::sync::Arc::new(Channel::new(key, settings)),
    );
    a.attach(id, &ca);
    b.attach(id, &cb);
    let draft = |n: u64| Draft {
        kind: EventKind::Snapshot,
        envelope: format!("{{\"n\":{n}}}").into_bytes(),
        doc: None,
        changed_at: std::time::SystemTime::now(),
        made: Instant::now(),
    };
    let lease_a = a.lead(id).await.unwrap();
    let p1 = a.publish(id, &lease_a, draft(1)).await.unwrap();

    // A pauses; its lease disappears as if it had run out; B takes the topic over.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("herald:{{{id}}}:lease");
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let lease_b = tokio::time::timeout(T, b.lead(id)).await.unwrap().unwrap();
    let p2 = b.publish(id, &lease_b, draft(2)).await.unwrap();
    assert_eq!((p2.epoch, p2.seq), (p1.epoch, p1.seq + 1), "ids go on");

    // A wakes up and tries with the token it holds, before its renewal noticed anything: the
    // append script refuses it (the fencing is Redis's, not the node's own bookkeeping).
    let stale = herald::hub::Lease::new(lease_a.token, CancellationToken::new());
    assert_eq!(
        a.publish(id, &stale, draft(3)).await,
        Err(BrokerError::Fenced)
    );
    // And the writer is told: its lease is lost, any later try is refused too.
    assert!(eventually(T, || lease_a.is_lost()).await);
    assert_eq!(
        a.publish(id, &lease_a, draft(3)).await,
        Err(BrokerError::Fenced)
    );
    let p3 = b.publish(id, &lease_b, draft(4)).await.unwrap();
    assert_eq!(p3.seq, p2.seq + 1, "A's attempt took no id");
    let len: i64 = redis::cmd("XLEN")
        .arg(format!("herald:{{{id}}}:events"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 3);
    cancel.cancel();
    up.stop().await;
}
