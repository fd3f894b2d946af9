//! The hub: topics by key. A topic is a writer (its source feeds it: coalesce → diff → sequence)
//! and a channel (history ring and watchers), joined by a [`Broker`]; the first watcher of a key
//! opens the topic and later ones share it. One maintenance task wakes idle streams for
//! heartbeats, stops slow consumers and closes topics whose last watcher left `grace` ago.

pub mod broker;
mod channel;
mod event;
pub mod history;
mod watcher;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config;
use crate::diff;
use crate::routes::{Route, TopicId, TopicKey};
use crate::source::{Document, Feed, Source, SourceError, StatsView, Target, TopicStats, Update};
use crate::telemetry::{Metrics, RouteMetrics};

pub use broker::{Broker, BrokerError, Lease, MemoryBroker, Replay};
pub use channel::{Channel, Draft};
pub use event::{
    envelope, BadPosition, Encoded, Encoding, Event, EventKind, PatchFormat, Position,
};
pub use watcher::{clock_ms, Cursor, StopReason, WatchSlot};

/// How long a slow consumer gets to send its final `error` event before its connection is closed.
const SLOW_KILL_GRACE: Duration = Duration::from_secs(2);

/// Why a watcher could not join a topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The route already has its maximum number of live topics (`max_topics`): a client asking
    /// for yet another distinct resource would add an upstream poll.
    #[error("this route already streams {max} distinct resources; try again later")]
    TooManyTopics { max: usize },
    /// A reload removed or changed the route between resolving it and subscribing.
    #[error("the route was reconfigured; retry")]
    Retired,
    /// This client (its address, or its credential) already holds its share of topics: more
    /// would let one client multiply upstream polls and memory.
    #[error("this client already streams {max} distinct resources; close some first")]
    ClientBudget { max: usize },
}

/// Who asks for a new topic: the topics a client holds are limited per address and per
/// credential (`[server] max_topics_per_ip`, `max_topics_per_credential`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    pub ip: std::net::IpAddr,
    /// The keyed hash of its credentials (0: none).
    pub principal: u64,
}

/// Live topics by the client that opened them.
#[derive(Debug, Default)]
struct Budgets {
    max_per_ip: usize,
    max_per_principal: usize,
    counts: Mutex<(HashMap<std::net::IpAddr, usize>, HashMap<u64, usize>)>,
}

/// A topic's place in its opener's budget, given back when the topic is dropped.
struct BudgetSlot {
    budgets: Arc<Budgets>,
    client: Client,
}

impl Budgets {
    fn take(self: &Arc<Self>, client: Client) -> Result<BudgetSlot, SubscribeError> {
        let mut guard = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (by_ip, by_principal) = &mut *guard;
        let ip = by_ip.get(&client.ip).copied().unwrap_or(0);
        if self.max_per_ip > 0 && ip >= self.max_per_ip {
            return Err(SubscribeError::ClientBudget {
                max: self.max_per_ip,
            });
        }
        let principal = by_principal.get(&client.principal).copied().unwrap_or(0);
        if client.principal != 0
            && self.max_per_principal > 0
            && principal >= self.max_per_principal
        {
            return Err(SubscribeError::ClientBudget {
                max: self.max_per_principal,
            });
        }
        *by_ip.entry(client.ip).or_insert(0) += 1;
        if client.principal != 0 {
            *by_principal.entry(client.principal).or_insert(0) += 1;
        }
        Ok(BudgetSlot {
            budgets: self.clone(),
            client,
        })
    }
}

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        let mut guard = self
            .budgets
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (by_ip, by_principal) = &mut *guard;
        let release = |n: Option<&mut usize>| match n {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if release(by_ip.get_mut(&self.client.ip)) {
            by_ip.remove(&self.client.ip);
        }
        if self.client.principal != 0 && release(by_principal.get_mut(&self.client.principal)) {
            by_principal.remove(&self.client.principal);
        }
    }
}

/// A topic's document as last published: the JSON text of an envelope's `data` (compact JSON, or
/// a body that is not JSON as a JSON string). Kept as text, not as a parsed tree: a fraction of
/// the memory, and sent without serializing again.
#[derive(Debug, PartialEq, Eq)]
pub struct Doc {
    pub data: Bytes,
    /// Parsed from JSON (so it can be diffed), rather than a text body.
    pub json: bool,
}

/// When the upstream last agreed with a topic's published state: a read equal to it, or the read
/// that made it. Cleared while the upstream fails or a newer change is held back, so a plain GET
/// is answered from the topic only while its state is the upstream's (`serve_get`).
#[derive(Debug, Clone, Default)]
pub struct Freshness(Arc<FreshnessInner>);

#[derive(Debug, Default)]
struct FreshnessInner {
    /// Unix milliseconds of the last agreement; 0 while not known to agree.
    at: AtomicU64,
    marked: Notify,
}

impl Freshness {
    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis().max(1) as u64)
    }

    pub fn mark(&self) {
        self.0.at.store(Self::now_ms(), Ordering::Relaxed);
        self.0.marked.notify_waiters();
    }

    pub fn clear(&self) {
        self.0.at.store(0, Ordering::Relaxed);
    }

    /// How long ago the upstream last agreed; `None` while it is not known to.
    pub fn age(&self) -> Option<Duration> {
        match self.0.at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(Self::now_ms().saturating_sub(at))),
        }
    }

    /// Resolves at the next agreement (a read that confirmed or changed the state) after this
    /// call, whenever it is first polled.
    pub fn next_mark(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.marked.notified()
    }
}

/// What a watcher should send next.
pub enum Delivery {
    Nothing,
    One(Arc<Event>),
    Many(Vec<Arc<Event>>),
}

/// What every topic of a route shares.
#[derive(Debug)]
pub struct TopicSettings {
    pub diff_mode: diff::Mode,
    pub diff_options: diff::Options,
    pub history: usize,
    pub history_bytes: usize,
    pub grace: Duration,
    /// Changes closer together than this are coalesced into one event (the newest).
    pub min_interval: Duration,
    /// The route's metric handles, resolved once.
    pub metrics: Arc<RouteMetrics>,
    /// Topics are per credential (not `share = "all"`): an upstream refusal ends every watcher's
    /// stream and drops the topic's state.
    pub per_credential: bool,
    /// Upstream answers that mean "these credentials are refused" (the route's `refuse`).
    pub refuse: config::Refusal,
    /// Upstream events are passed through (no state to snapshot): a new watcher starts with the
    /// events to come.
    pub pass_through: bool,
}

impl TopicSettings {
    /// The status to report when `error` refuses a per-credential topic's credentials, if it
    /// does: the upstream's own, or 401 for a login page served as 200.
    pub fn refusal(&self, error: &SourceError) -> Option<u16> {
        if !self.per_credential {
            return None;
        }
        match error {
            SourceError::Status(s) if self.refuse.status(*s) => Some(*s),
            SourceError::Html if self.refuse.html => Some(401),
            _ => None,
        }
    }
}

/// The hub's part of `[sse]`: what every topic and watcher shares.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub history: usize,
    pub history_bytes: usize,
    pub grace: Duration,
    pub heartbeat: Duration,
    /// A watcher with events pending this long is a slow consumer.
    pub slow_timeout: Duration,
    /// Live topics one client address may have opened (0: no limit).
    pub max_topics_per_ip: usize,
    /// Live topics one credential may have opened (0: no limit).
    pub max_topics_per_credential: usize,
}

impl HubSettings {
    pub fn new(sse: &config::Sse, server: &config::Server) -> HubSettings {
        HubSettings {
            history: sse.history,
            history_bytes: sse.history_bytes,
            grace: sse.grace,
            heartbeat: sse.heartbeat,
            slow_timeout: sse.slow_timeout,
            max_topics_per_ip: server.max_topics_per_ip,
            max_topics_per_credential: server.max_topics_per_credential,
        }
    }
}

/// One topic on this node: its channel, and the handles of its writer task.
pub struct Topic {
    pub key: TopicKey,
    pub id: TopicId,
    /// The route version the topic was opened under (a reload that retires it closes the topic).
    pub route: Arc<Route>,
    pub channel: Arc<Channel>,
    /// Stops the topic's source and writer.
    cancel: CancellationToken,
    /// Asks the source for a fresh read now.
    poke: Arc<Notify>,
    /// When the upstream last agreed with the published state.
    pub fresh: Freshness,
    /// What the source reports (status page).
    pub stats: Arc<TopicStats>,
    /// The writer's input, for states published to herald directly (`POST /_herald/publish`).
    feed: Feed,
    /// Counts against the budget of the client that opened it.
    _budget: BudgetSlot,
}

impl Topic {
    /// The route's metric handles.
    pub fn metrics(&self) -> &Arc<RouteMetrics> {
        &self.channel.settings().metrics
    }

    /// Ask the source for a fresh read now.
    pub fn poke(&self) {
        self.stats.poked();
        self.poke.notify_one();
    }

    /// Ask for a read now unless one is under way (a read in flight answers the asker too, so
    /// it must not leave a second one owed): for readers of the state, not for news of a change.
    pub fn refresh(&self) {
        self.poke.notify_waiters();
    }

    /// Hand the writer a new state of the resource, as if the source had read it (diffed and
    /// fanned out). False if the topic is gone.
    pub async fn publish_state(&self, doc: Document) -> bool {
        self.stats.poked();
        self.feed.send(Update::Document(doc)).await.is_ok()
    }
}

/// A watcher's hold on a topic; dropping it leaves the topic.
pub struct Subscription {
    pub topic: Arc<Topic>,
    pub slot: Arc<WatchSlot>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.topic.channel.remove_watcher(&self.slot);
    }
}

/// One topic as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TopicInfo {
    /// The route's template.
    pub route: String,
    /// The resource, credential-like query values hidden.
    pub resource: String,
    pub watchers: usize,
    pub seq: u64,
    /// RFC 3339, when the upstream state last changed.
    pub last_change: String,
    /// Seconds since then.
    pub age_s: f64,
    pub failing: bool,
    /// What its source has been doing (kind, reads, changes, interval, connection, pokes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<StatsView>,
    /// The node that writes the topic (a cluster; None: this one, alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    topics: Mutex<HashMap<TopicKey, Arc<Topic>>>,
    budgets: Arc<Budgets>,
    broker: Arc<dyn Broker>,
    source: Arc<dyn Source>,
    metrics: Arc<Metrics>,
    settings: HubSettings,
    /// Watchers stopped as slow consumers since start.
    slow_consumers: AtomicU64,
    /// Parent of every topic's token.
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Hub {
    pub fn new(
        settings: HubSettings,
        broker: Arc<dyn Broker>,
        source: Arc<dyn Source>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                budgets: Arc::new(Budgets {
                    max_per_ip: settings.max_topics_per_ip,
                    max_per_principal: settings.max_topics_per_credential,
                    counts: Mutex::default(),
                }),
                broker,
                source,
                metrics,
                settings,
                slow_consumers: AtomicU64::new(0),
                cancel,
                tracker,
            }),
        }
    }

    fn lock_topics(&self) -> std::sync::MutexGuard<'_, HashMap<TopicKey, Arc<Topic>>> {
        self.inner.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Join the topic for `key`, opening it (and starting its writer) if nobody watches it yet.
    /// `credentials` are sent on every upstream request of a new topic; a new topic counts
    /// against `client`'s budget.
    pub fn subscribe(
        &self,
        route: &Arc<Route>,
        key: TopicKey,
        credentials: HeaderMap,
        slot: Arc<WatchSlot>,
        client: Client,
    ) -> Result<Subscription, SubscribeError> {
        let mut topics = self.lock_topics();
        // Checked under the lock `retire_route` takes: a route retired just after this request
        // resolved it is either seen here or has its topics closed after this subscription.
        if route.is_retired() {
            return Err(SubscribeError::Retired);
        }
        if let Some(topic) = topics.get(&key) {
            if topic.channel.add_watcher(&slot) {
                return Ok(Subscription {
                    topic: topic.clone(),
                    slot,
                });
            }
        }
        // Counting on creation only (not per watcher) keeps the common path O(1).
        let max = route.config.max_topics;
        if topics.keys().filter(|k| k.route == key.route).count() >= max {
            return Err(SubscribeError::TooManyTopics { max });
        }
        let budget = self.inner.budgets.take(client)?;
        let topic = self.open(route, key.clone(), credentials, budget);
        topic.channel.add_watcher(&slot);
        topics.insert(key, topic.clone());
        Ok(Subscription { topic, slot })
    }

    /// A new topic: its channel attached to the broker, its writer started once the broker lets
    /// this node lead it.
    fn open(
        &self,
        route: &Arc<Route>,
        key: TopicKey,
        credentials: HeaderMap,
        budget: BudgetSlot,
    ) -> Arc<Topic> {
        let inner = &self.inner;
        let settings = self.route_settings(route);
        let id = key.id();
        let channel = Arc::new(Channel::new(key.clone(), settings.clone()));
        inner.broker.attach(id, &channel);
        let (feed, mut updates) = Feed::channel();
        let topic = Arc::new(Topic {
            id,
            route: route.clone(),
            channel,
            cancel: inner.cancel.child_token(),
            poke: Arc::new(Notify::new()),
            fresh: Freshness::default(),
            stats: Arc::new(TopicStats::default()),
            feed: feed.clone(),
            key,
            _budget: budget,
        });
        let target = Target {
            route: route.clone(),
            resource: topic.key.resource.clone(),
            credentials,
            metrics: settings.metrics.clone(),
            poke: topic.poke.clone(),
            stats: topic.stats.clone(),
        };
        let (broker, source, cancel) = (
            inner.broker.clone(),
            inner.source.clone(),
            topic.cancel.clone(),
        );
        let resource = topic.key.resource.clone();
        let fresh = topic.fresh.clone();
        debug!(topic = %id, "topic opened");
        inner.tracker.spawn(async move {
            // In a cluster the lease can be lost (another node took the topic over); this node
            // then waits to lead again, in case that node goes away while watchers are here.
            loop {
                let lease = tokio::select! {
                    _ = cancel.cancelled() => return,
                    l = broker.lead(id) => l,
                };
                match lease {
                    Ok(lease) => {
                        let w = writer::Writer::new(
                            id,
                            resource.clone(),
                            settings.clone(),
                            broker.clone(),
                            lease,
                            fresh.clone(),
                        );
                        let lost = writer::run(
                            source.clone(),
                            target.clone(),
                            w,
                            feed.clone(),
                            &mut updates,
                            cancel.clone(),
                        )
                        .await;
                        if !lost || cancel.is_cancelled() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(topic = %id, error = %e, "cannot lead the topic");
                        return;
                    }
                }
            }
        });
        topic
    }

    /// Whether history lives outside this process (a cluster): a channel opened here may learn
    /// its past after it opens.
    pub fn clustered(&self) -> bool {
        self.inner.broker.shared_history()
    }

    /// Number of live topics.
    pub fn topic_count(&self) -> usize {
        self.lock_topics().len()
    }

    /// The topic for `key`, if it is live.
    pub fn topic(&self, key: &TopicKey) -> Option<Arc<Topic>> {
        self.lock_topics().get(key).cloned()
    }

    /// Every live topic (for inspection).
    pub fn topics_snapshot(&self) -> Vec<Arc<Topic>> {
        self.lock_topics().values().cloned().collect()
    }

    /// Every live topic, as the status page shows them.
    pub fn topics_info(&self) -> Vec<TopicInfo> {
        let topics: Vec<Arc<Topic>> = self.lock_topics().values().cloned().collect();
        topics
            .iter()
            .map(|t| {
                let mut info = t.channel.info();
                info.source = Some(t.stats.view());
                info.writer = self.inner.broker.writer(t.id);
                info
            })
            .collect()
    }

    /// Wake every watcher (for shutdown: they see the flag and send their last event).
    pub fn wake_all(&self) {
        let topics: Vec<Arc<Topic>> = self.lock_topics().values().cloned().collect();
        for t in topics {
            t.channel.for_each_watcher(|w| w.wake());
        }
    }

    /// Maintenance until cancelled: heartbeat wake-ups, slow consumers and idle-topic expiry, on
    /// one shared tick.
    pub async fn run_maintenance(self, cancel: CancellationToken) {
        let s = &self.inner.settings;
        // Streams check their own idle time when woken; waking them every heartbeat/4 bounds a
        // heartbeat's lateness to a quarter of the period with one timer for all streams.
        let beat = (s.heartbeat / 4).max(Duration::from_millis(5));
        let sweep = (s.grace / 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let tick = beat.min(sweep);
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat = Instant::now();
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let now = Instant::now();
            if now.duration_since(last_beat) >= beat {
                last_beat = now;
                self.wake_all();
            }
            if now.duration_since(last_sweep) >= sweep {
                last_sweep = now;
                self.expire_idle(now);
                self.sweep_slow();
            }
        }
    }

    /// Watchers stopped as slow consumers since start.
    pub fn slow_consumers(&self) -> u64 {
        self.inner.slow_consumers.load(Ordering::Relaxed)
    }

    /// Stop watchers that have had events pending for longer than `slow_timeout` (they cannot
    /// keep up even with conflation); close the connections of those that cannot even be told.
    pub fn sweep_slow(&self) {
        let now = clock_ms();
        let timeout = self.inner.settings.slow_timeout;
        let topics: Vec<Arc<Topic>> = self.lock_topics().values().cloned().collect();
        for t in topics {
            t.channel.for_each_watcher(|w| {
                if w.check_slow(now, timeout, SLOW_KILL_GRACE) {
                    self.inner.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    info!(topic = %crate::telemetry::redact(&t.key.resource), "slow consumer: stream stopped");
                }
            });
        }
    }

    /// Close topics that nobody has watched for `grace` (or that were refused), stopping their
    /// writers.
    pub fn expire_idle(&self, now: Instant) {
        let mut closed = Vec::new();
        let broker = &self.inner.broker;
        self.lock_topics().retain(|_, topic| {
            // A writer whose watchers left keeps the topic while other nodes watch it (never
            // one that was refused).
            let keep = broker.watched_elsewhere(topic.id) && topic.channel.refused().is_none();
            if !keep && topic.channel.close_if_idle(now) {
                closed.push(topic.clone());
                false
            } else {
                true
            }
        });
        for topic in closed {
            self.close(&topic);
            debug!(topic = %topic.id, "topic closed: no watchers");
        }
    }

    /// Close every topic (a clean shutdown, after the streams drained): writers stop and the
    /// broker hears of it (in a cluster, their leases go to other nodes at once).
    pub async fn close_all(&self) {
        let topics: Vec<Arc<Topic>> = self.lock_topics().drain().map(|(_, t)| t).collect();
        for topic in &topics {
            topic.channel.close();
            self.close(topic);
        }
        self.inner.broker.flush().await;
    }

    fn close(&self, topic: &Topic) {
        topic.cancel.cancel();
        self.inner.broker.detach(topic.id, &topic.channel);
    }

    /// What every topic of `route` shares; made when a topic is opened (not per event), so a
    /// route changed by a reload gets its new settings with its new version.
    fn route_settings(&self, route: &Route) -> Arc<TopicSettings> {
        let (r, s) = (&route.config, &self.inner.settings);
        Arc::new(TopicSettings {
            diff_mode: match r.diff {
                config::DiffMode::JsonPatch => diff::Mode::JsonPatch,
                config::DiffMode::MergePatch => diff::Mode::MergePatch,
                config::DiffMode::Snapshot => diff::Mode::Snapshot,
            },
            diff_options: diff::Options {
                array_key: r.array_key.clone(),
            },
            history: s.history,
            history_bytes: s.history_bytes,
            grace: s.grace,
            min_interval: r.min_interval,
            metrics: self.inner.metrics.route(&route.template),
            per_credential: r.auth.sharing != config::auth::Sharing::All,
            refuse: r.refuse.clone(),
            pass_through: r.source.kind == config::source::SourceKind::Sse
                && r.source.mode == config::source::PushMode::Pass,
        })
    }

    /// A reload removed or changed `route`: end its streams (each sends a final `shutdown`
    /// event, so clients reconnect and meet the new config) and stop its writers. Returns how
    /// many topics were closed.
    pub fn retire_route(&self, route: &Arc<Route>) -> usize {
        let mut retired = Vec::new();
        let mut topics = self.lock_topics();
        route.retire();
        topics.retain(|_, topic| {
            if !Arc::ptr_eq(&topic.route, route) {
                return true;
            }
            retired.push(topic.clone());
            false
        });
        drop(topics);
        for topic in &retired {
            topic.channel.close();
            topic
                .channel
                .for_each_watcher(|w| w.stop(StopReason::Reconfigured));
            self.close(topic);
        }
        retired.len()
    }
}
