//! What herald counts and how it redacts: the Prometheus registry (scraped by `admin`) and the
//! handles the hot path holds, resolved once per route, updated with plain numbers. The bottom
//! of the module map: it imports nothing from the rest of herald.

mod redact;
mod shard;

pub use redact::redact;
pub use shard::{AtomicHistogram, ShardedCounter};

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The route's path template as configured (`/api/builds/{id}`): bounded, never a resource.
    pub route: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Protocol {
    h1,
    h2,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub protocol: Protocol,
    pub tls: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub route: String,
    /// The HTTP status (`200`, `304`, `503`), or why there was none (`timeout`, `unreachable`,
    /// `error`).
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconnectLabels {
    pub route: String,
    /// `replay` (the gap was still in history) or `snapshot` (a fresh state instead).
    pub outcome: String,
}

/// A plain GET on a streamable route, by who answered it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GetLabels {
    pub route: String,
    pub answer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Upper bounds (seconds) of the upstream latency buckets.
const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds (seconds) of the change-to-delivery buckets: a live event should leave within a
/// millisecond or so; replays after a reconnect land in the high buckets.
const DELIVERY_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

type HistFamily = Family<RouteLabel, AtomicHistogram, fn() -> AtomicHistogram>;

/// Every metric herald exports, registered once in `registry`.
pub struct Metrics {
    registry: Registry,
    streams_open: Family<RouteLabel, Gauge>,
    streams_opened: Family<RouteLabel, Counter>,
    connections_open: Family<ConnLabels, Gauge>,
    connections: Family<ConnLabels, Counter>,
    events_sent: Family<RouteLabel, ShardedCounter>,
    event_bytes: Family<RouteLabel, ShardedCounter>,
    stream_bytes: Family<RouteLabel, ShardedCounter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: HistFamily,
    delivery_latency: HistFamily,
    topics_alive: Gauge,
    slow_consumers: Family<RouteLabel, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    reconnects: Family<ReconnectLabels, Counter>,
    reloads: Family<ResultLabel, Counter>,
    gets: Family<GetLabels, Counter>,
    /// Pass-through tunnels (WebSocket and other `Upgrade` exchanges).
    pub tunnels_opened: Counter,
    pub tunnels_open: Gauge,
    /// Upstream requests that waited for the `[polling]` budget (cap or rate).
    pub upstream_budget_waits: Counter,
    /// Handles per route template, made on first use; a route that keeps its path across a reload
    /// keeps its series.
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
    /// What the cluster broker counts (zero without `[cluster] redis`).
    pub cluster: ClusterMetrics,
}

/// The cluster broker's handles (`cluster`): cheap clones of shared atomics.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    /// Topic leases this node holds now (topics it writes).
    pub leases_held: Gauge,
    /// Leases taken of topics another node had written.
    pub takeovers: Counter,
    /// Events this node appended to Redis streams.
    pub events_written: Counter,
    /// Events this node read from Redis streams (other nodes' and its own).
    pub events_read: Counter,
    /// Time from an event's append to its read here, in milliseconds (the newest read).
    pub stream_lag_ms: Gauge,
    /// Redis command round trips (lease, publish, presence).
    pub rtt: AtomicHistogram,
    /// Redis commands that failed (unreachable, timed out, refused).
    pub errors: Counter,
}

const REDIS_BUCKETS: &[f64] = &[
    0.000_25, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("herald"),
            streams_open: Family::default(),
            streams_opened: Family::default(),
            connections_open: Family::default(),
            connections: Family::default(),
            events_sent: Family::default(),
            event_bytes: Family::default(),
            stream_bytes: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(|| {
                AtomicHistogram::new(UPSTREAM_BUCKETS)
            }),
            delivery_latency: Family::new_with_constructor(|| {
                AtomicHistogram::new(DELIVERY_BUCKETS)
            }),
            topics_alive: Gauge::default(),
            slow_consumers: Family::default(),
            rejected: Family::default(),
            reconnects: Family::default(),
            reloads: Family::default(),
            tunnels_opened: Counter::default(),
            tunnels_open: Gauge::default(),
            gets: Family::default(),
            upstream_budget_waits: Counter::default(),
            routes: Mutex::new(HashMap::new()),
            cluster: ClusterMetrics {
                leases_held: Gauge::default(),
                takeovers: Counter::default(),
                events_written: Counter::default(),
                events_read: Counter::default(),
                stream_lag_ms: Gauge::default(),
                rtt: AtomicHistogram::new(REDIS_BUCKETS),
                errors: Counter::default(),
            },
        };
        let r = &mut m.registry;
        r.register(
            "streams_open",
            "SSE streams open now",
            m.streams_open.clone(),
        );
        r.register(
            "streams_opened",
            "SSE streams opened",
            m.streams_opened.clone(),
        );
        r.register(
            "connections_open",
            "Client connections open now, by protocol (h1, h2) and TLS",
            m.connections_open.clone(),
        );
        r.register(
            "connections",
            "Client connections accepted, by protocol (h1, h2) and TLS",
            m.connections.clone(),
        );
        r.register(
            "events_sent",
            "Events written to streams (one per watcher per event)",
            m.events_sent.clone(),
        );
        r.register(
            "event_bytes",
            "SSE bytes of the events written to streams, before compression",
            m.event_bytes.clone(),
        );
        r.register(
            "stream_bytes",
            "Bytes of stream bodies handed to connections, after compression (framing, retry and heartbeats included)",
            m.stream_bytes.clone(),
        );
        r.register(
            "upstream_requests",
            "Upstream polls by route and status (304: not modified; timeout/unreachable/error: no answer)",
            m.upstream_requests.clone(),
        );
        r.register(
            "upstream_request_duration_seconds",
            "Time from sending an upstream poll to its response head",
            m.upstream_duration.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Time from an event's making (the upstream change seen) to its write to a stream; first snapshots excluded",
            m.delivery_latency.clone(),
        );
        r.register(
            "topics_alive",
            "Topics (watched upstream resources) alive now",
            m.topics_alive.clone(),
        );
        r.register(
            "slow_consumer_drops",
            "Streams ended because the client did not read its events in time",
            m.slow_consumers.clone(),
        );
        r.register(
            "rejected",
            "Connections and streams refused, by reason",
            m.rejected.clone(),
        );
        r.register(
            "reconnects",
            "Streams opened with a Last-Event-ID, by outcome (replay of the gap, or a fresh snapshot)",
            m.reconnects.clone(),
        );
        r.register(
            "proxy_tunnels_opened",
            "Tunnels (WebSocket and other Upgrade exchanges) opened",
            m.tunnels_opened.clone(),
        );
        r.register(
            "proxy_tunnels_open",
            "Tunnels open now",
            m.tunnels_open.clone(),
        );
        let c = &m.cluster;
        r.register(
            "cluster_leases_held",
            "Topics this node writes now (cluster leases held)",
            c.leases_held.clone(),
        );
        r.register(
            "cluster_takeovers",
            "Leases taken of topics another node had written",
            c.takeovers.clone(),
        );
        r.register(
            "cluster_events_written",
            "Events appended to Redis streams by this node",
            c.events_written.clone(),
        );
        r.register(
            "cluster_events_read",
            "Events read from Redis streams by this node",
            c.events_read.clone(),
        );
        r.register(
            "cluster_stream_lag_ms",
            "Milliseconds from the newest event's append to its read by this node",
            c.stream_lag_ms.clone(),
        );
        r.register(
            "cluster_redis_rtt_seconds",
            "Round-trip time of Redis commands (leases, appends, presence)",
            c.rtt.clone(),
        );
        r.register(
            "cluster_redis_errors",
            "Redis commands that failed (unreachable, timed out, refused)",
            c.errors.clone(),
        );
        r.register(
            "upstream_budget_waits",
            "Upstream requests that waited for the [polling] budget (max_concurrent, max_rate)",
            m.upstream_budget_waits.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads, by result (ok, rejected)",
            m.reloads.clone(),
        );
        r.register(
            "gets",
            "Plain GETs on streamable routes, by answer: topic (served from a live topic), not-modified (304 from a topic), upstream (passed through: someone still polls)",
            m.gets.clone(),
        );
        m
    }

    /// The handles of one route (by path template), made once and shared by its topics.
    pub fn route(&self, template: &str) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = routes.get(template) {
            return r.clone();
        }
        let label = RouteLabel {
            route: template.to_string(),
        };
        let reconnect = |outcome: &str| {
            self.reconnects.get_or_create_owned(&ReconnectLabels {
                route: template.to_string(),
                outcome: outcome.to_string(),
            })
        };
        let get = |answer: &str| {
            self.gets.get_or_create_owned(&GetLabels {
                route: template.to_string(),
                answer: answer.to_string(),
            })
        };
        let r = Arc::new(RouteMetrics {
            route: template.into(),
            streams_open: self.streams_open.get_or_create_owned(&label),
            streams_opened: self.streams_opened.get_or_create_owned(&label),
            events_sent: self.events_sent.get_or_create_owned(&label),
            event_bytes: self.event_bytes.get_or_create_owned(&label),
            stream_bytes: self.stream_bytes.get_or_create_owned(&label),
            upstream_duration: self.upstream_duration.get_or_create_owned(&label),
            delivery_latency: self.delivery_latency.get_or_create_owned(&label),
            slow_consumers: self.slow_consumers.get_or_create_owned(&label),
            replays: reconnect("replay"),
            snapshots: reconnect("snapshot"),
            upstream_requests: self.upstream_requests.clone(),
            gets: [get("topic"), get("not-modified"), get("upstream")],
            upstream_last_status: AtomicU16::new(0),
            upstream_last_micros: AtomicI64::new(-1),
            upstream_errors: AtomicU64::new(0),
            upstream_total: AtomicU64::new(0),
        });
        routes.insert(template.to_string(), r.clone());
        r
    }

    /// The routes seen so far (for the status page).
    pub fn routes(&self) -> Vec<Arc<RouteMetrics>> {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = routes.values().cloned().collect();
        v.sort_by(|a, b| a.route.cmp(&b.route));
        v
    }

    /// The gauges of a new client connection (see `admin::observe::Tracked`).
    pub fn connection(&self, protocol: Protocol, tls: bool) -> Gauge {
        let labels = ConnLabels { protocol, tls };
        self.connections.get_or_create(&labels).inc();
        let g = self.connections_open.get_or_create_owned(&labels);
        g.inc();
        g
    }

    /// A connection or stream refused (`reason`: `tls-handshake`, `admission`, `too-many-topics`…).
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// [`Metrics::reject`] when `rejected` holds (a one-line hook where the decision is a bool).
    pub fn count_if(&self, rejected: bool, reason: &str) {
        if rejected {
            self.reject(reason);
        }
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn set_topics_alive(&self, n: usize) {
        self.topics_alive.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Totals over every route, for the status page's throughput: (events, bytes after compression).
    pub fn totals(&self) -> (u64, u64) {
        self.routes().iter().fold((0, 0), |(e, b), r| {
            (e + r.events_sent.get(), b + r.stream_bytes.get())
        })
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing into a String does not fail; a label that cannot be encoded would be a bug.
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// One route's metric handles: clones of the registered series, so each update is an atomic add.
#[derive(Debug)]
pub struct RouteMetrics {
    pub route: Arc<str>,
    pub streams_open: Gauge,
    pub streams_opened: Counter,
    pub events_sent: ShardedCounter,
    pub event_bytes: ShardedCounter,
    pub stream_bytes: ShardedCounter,
    pub upstream_duration: AtomicHistogram,
    pub delivery_latency: AtomicHistogram,
    pub slow_consumers: Counter,
    pub replays: Counter,
    pub snapshots: Counter,
    /// Looked up per poll (once per interval per topic, not per event) because the status varies.
    upstream_requests: Family<UpstreamLabels, Counter>,
    /// Plain GETs: served from a topic, 304 from a topic, passed through.
    gets: [Counter; 3],
    /// For the status page: the last upstream status seen on this route (0: none yet, 1: no
    /// answer), its latency, and error and request totals.
    upstream_last_status: AtomicU16,
    upstream_last_micros: AtomicI64,
    upstream_errors: AtomicU64,
    upstream_total: AtomicU64,
}

/// Who answered a plain GET on a streamable route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetAnswer {
    /// The live topic's state (`serve_get = "topic"`).
    Topic = 0,
    /// `304 Not Modified`, from the topic.
    NotModified = 1,
    /// Passed through to the upstream.
    Upstream = 2,
}

/// The status page's view of a route's upstream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamHealth {
    pub last_status: Option<String>,
    pub last_latency_ms: Option<f64>,
    pub requests: u64,
    pub errors: u64,
}

impl RouteMetrics {
    /// One upstream poll answered with `status` (None: no answer, `reason` says why) after
    /// `elapsed`.
    pub fn upstream(&self, status: Result<u16, &str>, elapsed: Duration) {
        let label = match status {
            Ok(s) => s.to_string(),
            Err(reason) => reason.to_string(),
        };
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                route: self.route.to_string(),
                status: label,
            })
            .inc();
        self.upstream_duration.observe(elapsed);
        self.upstream_total.fetch_add(1, Ordering::Relaxed);
        let code = status.unwrap_or(1);
        if !(200..400).contains(&code) {
            self.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.upstream_last_status.store(code, Ordering::Relaxed);
        let micros = i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX);
        self.upstream_last_micros.store(micros, Ordering::Relaxed);
    }

    /// A plain GET on this route, answered as `answer` says.
    pub fn get(&self, answer: GetAnswer) {
        self.gets[answer as usize].inc();
    }

    pub fn upstream_health(&self) -> UpstreamHealth {
        let last = self.upstream_last_status.load(Ordering::Relaxed);
        let micros = self.upstream_last_micros.load(Ordering::Relaxed);
        UpstreamHealth {
            last_status: match last {
                0 => None,
                1 => Some("no answer".into()),
                s => Some(s.to_string()),
            },
            last_latency_ms: (micros >= 0).then(|| micros as f64 / 1000.0),
            requests: self.upstream_total.load(Ordering::Relaxed),
            errors: self.upstream_errors.load(Ordering::Relaxed),
        }
    }

    /// One event written to a stream: its SSE size before compression and, for a live event or a
    /// replay (not a stream's first snapshot), how long ago it was made.
    pub fn event_sent(&self, bytes: usize, age: Option<Duration>) {
        self.events_sent.inc();
        self.event_bytes.inc_by(bytes as u64);
        if let Some(age) = age {
            self.delivery_latency.observe(age);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_text() {
        let m = Metrics::new();
        let r = m.route("/a/{id}");
        r.delivery_latency.observe(Duration::from_micros(50));
        r.delivery_latency.observe(Duration::from_secs(100));
        r.upstream(Ok(304), Duration::from_millis(3));
        r.upstream(Err("timeout"), Duration::from_secs(1));
        let text = m.encode();
        assert!(
            text.contains(
                r#"herald_delivery_latency_seconds_bucket{le="0.0001",route="/a/{id}"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"herald_delivery_latency_seconds_bucket{le="+Inf",route="/a/{id}"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"herald_delivery_latency_seconds_count{route="/a/{id}"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"herald_upstream_requests_total{route="/a/{id}",status="304"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"herald_upstream_requests_total{route="/a/{id}",status="timeout"} 1"#),
            "{text}"
        );
        assert_eq!(r.upstream_health().errors, 1);
        assert!(Arc::ptr_eq(&r, &m.route("/a/{id}")));
    }
}
