//! The hub: a registry of topics, keyed by `TopicKey`. The first watcher of a key creates the topic
//! and starts its poller; later watchers share both. One maintenance task wakes idle streams for
//! heartbeats and closes topics whose last watcher left more than `grace` ago.

pub mod history;
pub mod topic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::admin::metrics::{Metrics, RouteMetrics};
use crate::config;
use crate::diff;
use crate::routes::{Route, TopicKey};
use crate::upstream::{PollSpec, Sink, Upstream};

pub use topic::{clock_ms, parse_event_id, Cursor, Delivery, StopReason, Topic, WatchSlot};

/// How long a slow consumer gets to send its final `error` event before its connection is closed.
const SLOW_KILL_GRACE: Duration = Duration::from_secs(2);

/// Why a watcher could not join a topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The route already has its maximum number of live topics (`max_topics`): a client asking
    /// for yet another distinct resource would add an upstream poll.
    #[error("this route already streams {max} distinct resources; try again later")]
    TooManyTopics { max: usize },
}

/// The kinds of event a stream carries (the SSE `event:` name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Snapshot,
    Patch,
    UpstreamError,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Snapshot => "snapshot",
            EventKind::Patch => "patch",
            EventKind::UpstreamError => "upstream-error",
        }
    }
}

/// One published event: sequenced, with its JSON envelope serialized once. Encodings of it for the
/// wire are cached here too, so each is made once per topic, never once per watcher.
#[derive(Debug)]
pub struct Event {
    pub seq: u64,
    pub id: Box<str>,
    pub kind: EventKind,
    /// `{"type":…,"topic":…,"timestamp":…,"data":…}`
    pub envelope: Bytes,
    /// When the event was made (for a live change: when the upstream's new state was seen), for
    /// the change-to-delivery latency metric.
    pub made: std::time::Instant,
    encoded: [OnceLock<Encoded>; 3],
}

/// One cached wire encoding of an event.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Bytes,
    /// CRC-32 and length of the SSE text a compressed encoding stands for, and x^(8·len) modulo
    /// the CRC polynomial: with them a gzip stream folds the event into its trailer's CRC in one
    /// multiplication (`sse::gzip`), without reading the text again. Zero for `Identity`.
    pub crc: u32,
    pub len: u64,
    pub crc_shift: u32,
}

impl Encoded {
    /// Bytes sent as they are (no checksum needed).
    pub fn identity(bytes: Bytes) -> Encoded {
        Encoded {
            bytes,
            crc: 0,
            len: 0,
            crc_shift: 0,
        }
    }
}

/// Which cached encoding of an event (see `Event::encoded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity = 0,
    Gzip = 1,
    /// gzip of the event without its `id:` line (multiplexed streams write their own id).
    GzipBare = 2,
}

impl Event {
    pub fn new(seq: u64, id: String, kind: EventKind, envelope: Bytes) -> Event {
        Event {
            seq,
            id: id.into(),
            kind,
            envelope,
            encoded: Default::default(),
            made: std::time::Instant::now(),
        }
    }

    /// The wire bytes of this event in `enc`, made by `make` the first time they are asked for.
    pub fn encoded(&self, enc: Encoding, make: impl FnOnce(&Event) -> Encoded) -> Encoded {
        self.encoded_ref(enc, make).clone()
    }

    /// The same, borrowed: reading it (its length, say) touches no reference count, which every
    /// watcher's thread would otherwise bump on the one shared allocation.
    pub fn encoded_ref(&self, enc: Encoding, make: impl FnOnce(&Event) -> Encoded) -> &Encoded {
        self.encoded[enc as usize].get_or_init(|| make(self))
    }

    /// Approximate memory held by the event, for history limits.
    pub fn weight(&self) -> usize {
        // Envelope, plus its SSE framing once encoded, plus fixed overhead.
        self.envelope.len() * 2 + self.id.len() + 64
    }
}

/// What every topic of a route shares.
#[derive(Debug)]
pub struct TopicSettings {
    pub diff_mode: diff::Mode,
    pub diff_options: diff::Options,
    pub history: usize,
    pub history_bytes: usize,
    pub grace: Duration,
    /// The route's metric handles, resolved once (`admin::metrics`).
    pub metrics: Arc<RouteMetrics>,
    /// Topics are per credential (not `share = "all"`): an upstream 401/403 refuses every
    /// watcher's credentials and ends their streams (`Topic::refused`).
    pub per_credential: bool,
}

/// A watcher's hold on a topic; dropping it leaves the topic.
pub struct Subscription {
    pub topic: Arc<Topic>,
    pub slot: Arc<WatchSlot>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.topic.remove_watcher(&self.slot);
    }
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    topics: Mutex<HashMap<TopicKey, Arc<Topic>>>,
    /// `[sse]` as at startup: what every route's topics share (`route_settings`).
    sse: config::Sse,
    metrics: Arc<Metrics>,
    upstream: Upstream,
    heartbeat: Duration,
    grace: Duration,
    /// A watcher with events pending this long is a slow consumer.
    slow_timeout: Duration,
    /// Watchers stopped as slow consumers since start.
    slow_consumers: AtomicU64,
    /// Parent of every poller's token.
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Hub {
    pub fn new(
        config: &config::Config,
        upstream: Upstream,
        cancel: CancellationToken,
        tracker: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                sse: config.sse.clone(),
                metrics,
                upstream,
                heartbeat: config.sse.heartbeat,
                slow_timeout: config.sse.slow_timeout,
                slow_consumers: AtomicU64::new(0),
                grace: config.sse.grace,
                cancel,
                tracker,
            }),
        }
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, HashMap<TopicKey, Arc<Topic>>> {
        self.inner.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Join the topic for `key`, creating it (and starting its poller) if nobody watches it yet.
    /// `headers` are sent on every poll of a new topic (its credentials, when it varies by them).
    pub fn subscribe(
        &self,
        route: &Route,
        key: TopicKey,
        headers: HeaderMap,
        slot: Arc<WatchSlot>,
    ) -> Result<Subscription, SubscribeError> {
        let mut topics = self.topics();
        crate::admin::reload::check_retired(route, &slot);
        if let Some(topic) = topics.get(&key) {
            if topic.add_watcher(&slot) {
                return Ok(Subscription {
                    topic: topic.clone(),
                    slot,
                });
            }
        }
        // Counting on creation only (not per watcher) keeps the common path O(1).
        let max = route.config.max_topics;
        if topics.keys().filter(|k| k.route == route.index).count() >= max {
            return Err(SubscribeError::TooManyTopics { max });
        }
        let settings = self.route_settings(route);
        let cancel = self.inner.cancel.child_token();
        let topic = Arc::new(Topic::new(key.clone(), settings, cancel.clone()));
        topic.add_watcher(&slot);
        topics.insert(key.clone(), topic.clone());
        drop(topics);

        let spec = PollSpec {
            // The resource was built from the matched route; it is always a valid path.
            url: match self.inner.upstream.url_for(&key.resource) {
                Ok(u) => u,
                Err(_) => {
                    topic.deliver(crate::upstream::Outcome::Failed(
                        crate::upstream::FetchError::Other,
                    ));
                    return Ok(Subscription { topic, slot });
                }
            },
            label: key.resource.clone(),
            interval: route.config.interval,
            timeout: route.config.timeout,
            max_body: route.config.max_body,
            min_interval: route.config.min_interval,
            metrics: topic.metrics().clone(),
            headers,
        };
        debug!(topic = %key.resource, incarnation = topic.incarnation, "topic started");
        self.inner
            .upstream
            .spawn_poller(spec, topic.clone(), cancel, &self.inner.tracker);
        Ok(Subscription { topic, slot })
    }

    /// Number of live topics.
    pub fn topic_count(&self) -> usize {
        self.topics().len()
    }

    /// The topic for `key`, if it is live.
    pub fn topic(&self, key: &TopicKey) -> Option<Arc<Topic>> {
        self.topics().get(key).cloned()
    }

    /// Wake every watcher (for shutdown: they see the token and send their last event).
    pub fn wake_all(&self) {
        let topics: Vec<Arc<Topic>> = self.topics().values().cloned().collect();
        for t in topics {
            t.for_each_watcher(|w| w.wake());
        }
    }

    /// Maintenance until cancelled: heartbeat wake-ups and idle-topic expiry, on one shared tick.
    pub async fn run_maintenance(self, cancel: CancellationToken) {
        // Streams check their own idle time when woken; waking them every heartbeat/4 bounds a
        // heartbeat's lateness to a quarter of the period with one timer for all streams.
        let beat = (self.inner.heartbeat / 4).max(Duration::from_millis(5));
        let sweep = (self.inner.grace / 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
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
        let topics: Vec<Arc<Topic>> = self.topics().values().cloned().collect();
        for t in topics {
            t.for_each_watcher(|w| {
                if w.check_slow(now, self.inner.slow_timeout, SLOW_KILL_GRACE) {
                    self.inner.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(topic = %t.key.resource, "slow consumer: stream stopped");
                }
            });
        }
    }

    /// Close topics that nobody has watched for `grace`, stopping their pollers.
    pub fn expire_idle(&self, now: Instant) {
        let mut topics = self.topics();
        topics.retain(|key, topic| {
            if topic.close_if_idle(now) {
                topic.cancel.cancel();
                debug!(topic = %key.resource, "topic closed: no watchers");
                false
            } else {
                true
            }
        });
    }
}

/// Reload support and inspection (`admin`): settings built per route, topics listed and retired.
impl Hub {
    /// What every topic of `route` shares; made when a topic is created (not per event), so a
    /// route changed by a reload gets its new settings with its new id.
    fn route_settings(&self, route: &Route) -> Arc<TopicSettings> {
        let (r, sse) = (&route.config, &self.inner.sse);
        Arc::new(TopicSettings {
            diff_mode: match r.diff {
                config::DiffMode::JsonPatch => diff::Mode::JsonPatch,
                config::DiffMode::MergePatch => diff::Mode::MergePatch,
                config::DiffMode::Snapshot => diff::Mode::Snapshot,
            },
            diff_options: diff::Options {
                array_key: r.array_key.clone(),
            },
            history: sse.history,
            history_bytes: sse.history_bytes,
            grace: sse.grace,
            metrics: self.inner.metrics.route(&r.template.source),
            per_credential: r.auth.sharing != config::auth::Sharing::All,
        })
    }

    /// Every live topic (for the status page).
    pub fn topics_snapshot(&self) -> Vec<Arc<Topic>> {
        self.topics().values().cloned().collect()
    }

    /// A reload removed or changed route `id`: end its streams (each sends a final `shutdown`
    /// event, so clients reconnect and meet the new config) and stop its pollers. Returns how many
    /// topics were closed.
    pub fn retire_route(&self, id: usize) -> usize {
        let mut topics = self.topics();
        let before = topics.len();
        topics.retain(|key, topic| {
            if key.route != id {
                return true;
            }
            topic.for_each_watcher(|w| w.stop(StopReason::Reconfigured));
            topic.cancel.cancel();
            false
        });
        before - topics.len()
    }
}
