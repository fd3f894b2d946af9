//! Several herald nodes on one Redis (`[cluster] redis`): [`RedisBroker`] is then the hub's
//! broker. A lease per topic picks its one writer cluster-wide (fenced on every append); events
//! go through one Redis stream per topic, read back by one reader task per node and fanned out
//! locally; presence keys show which nodes watch and who writes each topic.

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

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisResult};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::config;
use crate::hub::{Broker, BrokerError, Channel, Draft, Event, Lease, Position, Replay};
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

impl Broker for RedisBroker {
    fn attach(&self, id: TopicId, channel: &Arc<Channel>) {
        let old = self.shared.lock().insert(
            id,
            Local {
                channel: Arc::downgrade(channel),
                cursor: None,
                told: false,
                held: None,
                writer: None,
                elsewhere: false,
            },
        );
        // A channel of the same topic that closed but was not detached yet: its writer is over.
        if let Some(held) = old.and_then(|l| l.held) {
            held.lost.cancel();
            self.shared.release(id, held);
        }
        self.shared.wake_reader();
    }

    fn detach(&self, id: TopicId, channel: &Arc<Channel>) {
        let removed = {
            let mut topics = self.shared.lock();
            let same = topics
                .get(&id)
                .is_some_and(|l| std::ptr::eq(l.channel.as_ptr(), Arc::as_ptr(channel)));
            if same {
                topics.remove(&id)
            } else {
                None
            }
        };
        if removed.is_some() {
            presence::leave(&self.shared, id);
        }
        if let Some(held) = removed.and_then(|l| l.held) {
            debug!(topic = %id, "cluster: lease given back");
            self.shared.release(id, held);
        }
    }

    fn lead(&self, id: TopicId) -> BoxFuture<'static, Result<Lease, BrokerError>> {
        Box::pin(lease::acquire(self.shared.clone(), id))
    }

    fn publish<'a>(
        &'a self,
        id: TopicId,
        lease: &'a Lease,
        draft: Draft,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        Box::pin(self.append(id, lease, draft))
    }

    fn history(&self, id: TopicId, since: Position) -> BoxFuture<'_, Result<Replay, BrokerError>> {
        Box::pin(self.read_history(id, since))
    }

    fn shared_history(&self) -> bool {
        true
    }

    fn watched_elsewhere(&self, id: TopicId) -> bool {
        self.shared
            .lock()
            .get(&id)
            .is_some_and(|l| l.held.is_some() && l.elsewhere)
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let chores = &self.shared.chores;
            chores.close();
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, chores.wait()).await;
            chores.reopen();
        })
    }

    fn writer(&self, id: TopicId) -> Option<String> {
        let topics = self.shared.lock();
        let local = topics.get(&id)?;
        if local.held.is_some() {
            return Some(self.shared.node.clone());
        }
        local.writer.clone()
    }
}

impl RedisBroker {
    async fn append(
        &self,
        id: TopicId,
        lease: &Lease,
        draft: Draft,
    ) -> Result<Position, BrokerError> {
        let s = &self.shared;
        if lease.is_lost() {
            return Err(BrokerError::Fenced);
        }
        let (doc, json): (&[u8], &str) = match &draft.doc {
            Some(d) => (&d.data, if d.json { "1" } else { "0" }),
            None => (b"", ""),
        };
        let age_ms = u64::try_from(s.retention_age.as_millis()).unwrap_or(u64::MAX);
        let mut inv = s.scripts.publish.prepare_invoke();
        inv.key(s.key(id, "lease"))
            .key(s.key(id, "events"))
            .arg(s.lease_value(lease.token))
            .arg(rand::random::<u32>().max(1))
            .arg(s.retention)
            .arg(age_ms)
            .arg(entry::kind_code(draft.kind))
            .arg(&draft.envelope)
            .arg(doc)
            .arg(json)
            .arg(entry::unix_ms(draft.changed_at))
            .arg(s.stream_ttl_ms());
        let mut conn = s.conn.clone();
        let reply: Option<(String, u64, String)> = s
            .timed(inv.invoke_async(&mut conn))
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let Some((epoch, seq, _)) = reply else {
            s.fence(id, lease.token);
            return Err(BrokerError::Fenced);
        };
        let epoch: u32 = epoch
            .parse()
            .map_err(|_| BrokerError::Unavailable(format!("bad epoch {epoch:?} in the stream")))?;
        s.metrics.events_written.inc();
        let position = Position::new(epoch, seq);
        // This node's watchers get it now; the reader skips it when it reads it back.
        if let Some(channel) = s.channel(id) {
            let ev = Event::new(position, draft.kind, &draft.envelope, draft.made);
            channel.push(Arc::new(ev), draft.doc, draft.changed_at);
        }
        Ok(position)
    }

    async fn read_history(&self, id: TopicId, since: Position) -> Result<Replay, BrokerError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let reply: redis::streams::StreamRangeReply = s
            .timed(
                redis::cmd("XREVRANGE")
                    .arg(s.key(id, "events"))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(s.retention)
                    .query_async(&mut conn),
            )
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let entries: Vec<entry::Entry> = reply.ids.iter().rev().filter_map(entry::decode).collect();
        let Some(first) = entries.first() else {
            return Ok(Replay::Gap);
        };
        if first.position.epoch != since.epoch || first.position.seq > since.seq + 1 {
            return Ok(Replay::Gap);
        }
        Ok(Replay::Events(
            entries
                .into_iter()
                .filter(|e| e.position.seq > since.seq)
                .map(|e| {
                    Arc::new(Event::new(
                        e.position,
                        e.kind,
                        &e.envelope,
                        std::time::Instant::now(),
                    ))
                })
                .collect(),
        ))
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
