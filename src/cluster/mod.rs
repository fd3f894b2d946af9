//! Several herald nodes on one Redis (`[cluster] redis`): [`RedisBroker`] is then the hub's
//! broker. A lease per topic picks its one writer cluster-wide (fenced on every append); events
//! go through one Redis stream per topic, read back by one reader task per node and fanned out
//! locally; presence keys show which nodes watch and who writes each topic.

mod broker;
mod entry;
mod lease;
mod presence;
mod reader;
mod scripts;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisResult};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config;
use crate::hub::Channel;
use crate::routes::TopicId;
use crate::telemetry::ClusterMetrics;

/// Longest a Redis command may take before it counts as a failure (the node is then degraded).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// The broker of a clustered node.
pub struct RedisBroker {
    shared: Arc<Shared>,
}

/// What the broker, its lease renewals, its reader and its presence task share.
struct Shared {
    node: String,
    prefix: String,
    lease: Duration,
    retention: usize,
    retention_age: Duration,
    /// Opens the reader's own connection (a blocking read must not hold up commands).
    client: redis::Client,
    /// Commands: leases, appends, presence (reconnects by itself).
    conn: ConnectionManager,
    topics: Mutex<HashMap<TopicId, Local>>,
    /// Wakes the reader when it has no topic to read and one arrives.
    wake: Notify,
    /// `CLIENT ID` of the reader's connection (0: none), to cut its blocking read short.
    reader_id: AtomicI64,
    metrics: ClusterMetrics,
    scripts: scripts::Scripts,
    cancel: CancellationToken,
    /// Short commands sent on the side (lease releases, presence leaves, reader wake-ups): a
    /// clean shutdown waits for them.
    chores: TaskTracker,
}

/// One topic with a channel on this node.
struct Local {
    channel: Weak<Channel>,
    /// The reader's place in the topic's stream; None: read its tail first (priming).
    cursor: Option<String>,
    /// Told of the current Redis outage (once per outage).
    told: bool,
    /// This node's lease, while it writes the topic.
    held: Option<Held>,
    /// Who writes the topic, as last seen.
    writer: Option<String>,
    /// Other nodes have watchers of it (as last seen, for a topic this node writes).
    elsewhere: bool,
}

struct Held {
    token: u64,
    lost: CancellationToken,
    /// Stops the renewals.
    stop: CancellationToken,
}

impl RedisBroker {
    /// Connect to `[cluster] redis` and start the node's reader and presence tasks. Fails with a
    /// message naming the server (never its password) when Redis cannot be reached.
    pub async fn connect(
        cfg: &config::Redis,
        metrics: ClusterMetrics,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<RedisBroker, String> {
        let mut info = cfg
            .url
            .0
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("cluster.redis: {e}"))?;
        if let Some(u) = &cfg.username {
            info.redis.username = Some(u.clone());
        }
        if let Some(p) = &cfg.password {
            info.redis.password = Some(p.0.clone());
        }
        let place = info.addr.to_string();
        let client = redis::Client::open(info).map_err(|e| format!("Redis at {place}: {e}"))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(COMMAND_TIMEOUT)
            .set_response_timeout(COMMAND_TIMEOUT)
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let conn = tokio::time::timeout(
            COMMAND_TIMEOUT * 3,
            ConnectionManager::new_with_config(client.clone(), manager),
        )
        .await
        .map_err(|_| {
            format!(
                "Redis at {place} did not answer within {:?}",
                COMMAND_TIMEOUT * 3
            )
        })?
        .map_err(|e| format!("cannot reach Redis at {place}: {e}"))?;
        let mut ping = conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut ping)
            .await
            .map_err(|e| format!("Redis at {place} refused PING: {e}"))?;
        info!(redis = %place, node = %cfg.node, "cluster: connected to Redis");
        let shared = Arc::new(Shared {
            node: cfg.node.clone(),
            prefix: cfg.prefix.clone(),
            lease: cfg.lease,
            retention: cfg.retention,
            retention_age: cfg.retention_age,
            client,
            conn,
            topics: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            reader_id: AtomicI64::new(0),
            metrics,
            scripts: scripts::Scripts::new(),
            cancel: cancel.clone(),
            chores: TaskTracker::new(),
        });
        tracker.spawn(reader::run(shared.clone(), cancel.clone()));
        tracker.spawn(presence::run(shared.clone(), cancel));
        Ok(RedisBroker { shared })
    }

    /// This node's name in the cluster.
    pub fn node(&self) -> &str {
        &self.shared.node
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<TopicId, Local>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys of one topic share a hash tag, so they live in one slot of a Redis Cluster.
    fn key(&self, id: TopicId, what: &str) -> String {
        format!("{}:{{{id}}}:{what}", self.prefix)
    }

    fn lease_value(&self, token: u64) -> String {
        format!("{}:{token:016x}", self.node)
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a topic's stream outlives its last append or renewal: its age limit and a lease.
    fn stream_ttl_ms(&self) -> u64 {
        u64::try_from(self.retention_age.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(self.lease_ms())
    }

    fn channel(&self, id: TopicId) -> Option<Arc<Channel>> {
        self.lock().get(&id)?.channel.upgrade()
    }

    /// Run one Redis command, timing it and counting its failure.
    async fn timed<T>(&self, f: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
        let start = Instant::now();
        let r = f.await;
        self.metrics.rtt.observe(start.elapsed());
        if r.is_err() {
            self.metrics.errors.inc();
        }
        r
    }

    /// Cut the reader's blocking read short: a topic arrived that it must read too.
    fn wake_reader(self: &Arc<Self>) {
        self.wake.notify_one();
        let id = self.reader_id.load(Ordering::Relaxed);
        if id > 0 {
            let shared = self.clone();
            self.chores.spawn(async move {
                let mut conn = shared.conn.clone();
                let _ = shared
                    .timed(
                        redis::cmd("CLIENT")
                            .arg("UNBLOCK")
                            .arg(id)
                            .query_async::<i64>(&mut conn),
                    )
                    .await;
            });
        }
    }

    /// Give a lease back (the topic closed here): another node may take it at once.
    fn release(self: &Arc<Self>, id: TopicId, held: Held) {
        held.stop.cancel();
        let shared = self.clone();
        self.chores.spawn(async move {
            let mut conn = shared.conn.clone();
            let mut inv = shared.scripts.release.prepare_invoke();
            inv.key(shared.key(id, "lease"))
                .arg(shared.lease_value(held.token));
            let _ = shared.timed(inv.invoke_async::<i64>(&mut conn)).await;
        });
    }

    /// The lease with `token` is not ours any more: its writer stops.
    fn fence(&self, id: TopicId, token: u64) {
        if let Some(local) = self.lock().get_mut(&id) {
            if local.held.as_ref().is_some_and(|h| h.token == token) {
                if let Some(h) = local.held.take() {
                    h.lost.cancel();
                    h.stop.cancel();
                }
            }
        }
    }
}

/// Exponential backoff with jitter, for retries against Redis.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }

    /// The delay before the next attempt (grows until `reset`).
    pub fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        jitter(d)
    }

    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

/// `d` give or take a quarter, so nodes do not retry in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + rand::random::<f64>() / 2.0)
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    entry::unix_ms(SystemTime::now())
}
