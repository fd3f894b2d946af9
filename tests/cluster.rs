//! Several herald nodes on one Redis (issue 17): each test starts its own `redis-server` on a free
//! loopback port (killed on drop), three herald nodes in this process, and one upstream that
//! counts requests. One poll per interval in the whole cluster; a dead writer's topic taken over
//! with no gap and no duplicate id; `Last-Event-ID` replay on another node; Redis restarted under
//! open streams; per-credential topics shared per user and isolated between users.

mod common;

use std::collections::HashSet;
use std::net::TcpStream;
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
}

impl TestRedis {
    fn start() -> TestRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = TestRedis { port, child: None };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port, and wait until it answers.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs Debian's redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
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

fn cluster_config(up: &TestUpstream, redis: &TestRedis, node: &str, route: &str) -> herald::Config {
    config(
        &up.url(),
        &format!(
            "[sse]\ngrace = \"2s\"\n[cluster]\nredis = \"{}\"\nnode = \"{node}\"\nsecret = \"{SECRET}\"\nlease = \"1s\"\n{route}",
            redis.url()
        ),
    )
}

fn build_route(interval: &str) -> String {
    format!("[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"{interval}\"\n")
}

/// A node started with `Herald::start` (it connects to Redis first).
async fn start_node(config: herald::Config) -> TestHerald {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let herald = herald::Herald::start(config).await.expect("node starts");
    let hub = herald.hub().clone();
    let shutdown = CancellationToken::new();
    let join = tokio::spawn(herald.serve(listener, shutdown.clone()));
    TestHerald {
        addr,
        hub,
        shutdown,
        join,
        tls: None,
    }
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
    let mut nodes = three_nodes(&up, &redis, &build_route("50ms")).await;
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
    let took = resumed.expect("another node took the topic over");
    // A lease of 1s, retried every quarter lease: well within 3s on a loaded machine.
    assert!(took < Duration::from_secs(4), "takeover took {took:?}");
    assert!(
        last.iter().all(|l| *l == last[0]),
        "survivors agree: {last:?}"
    );

    drop(clients);
    for n in nodes {
        n.stop().await;
    }
    up.stop().await;
}
