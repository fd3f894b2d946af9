//! The status page: one small HTML file (`status.html`, no dependencies) that follows herald live
//! over an SSE stream from this same admin listener (`/status/events`, one `status` event per
//! second): open streams, topics with their watchers and last change, upstream health per route,
//! and a throughput sparkline that the page computes from the running totals.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde::Serialize;

use super::Admin;
use crate::hub::TopicInfo;
use crate::reply::ResponseBody;

/// The page itself.
pub const PAGE: &str = include_str!("status.html");

/// How often the status stream sends a new snapshot.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Topics listed at most (the busiest first): the page stays small with 100k topics.
const MAX_TOPICS_SHOWN: usize = 100;

#[derive(Debug, Serialize)]
pub struct RouteStatus {
    pub route: String,
    pub streams: i64,
    pub topics: usize,
    pub failing_topics: usize,
    pub upstream: crate::telemetry::UpstreamHealth,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub ready: bool,
    pub uptime_s: u64,
    /// Unix time in milliseconds, for rates computed by the page.
    pub now_ms: u128,
    pub streams: i64,
    pub topics_alive: usize,
    pub events_total: u64,
    pub bytes_total: u64,
    pub routes: Vec<RouteStatus>,
    pub topics: Vec<TopicInfo>,
}

/// The whole status, as `/status.json` and each `status` event carry it.
pub fn snapshot(admin: &Admin) -> Status {
    let mut infos: Vec<TopicInfo> = admin.stats.hub.topics_info();
    let table = admin.stats.routes.current();
    let routes: Vec<RouteStatus> = table
        .routes()
        .iter()
        .map(|r| {
            let m = admin.metrics.route(&r.template);
            let mine = infos.iter().filter(|t| *t.route == *r.template);
            let (topics, failing) =
                mine.fold((0, 0), |(n, f), t| (n + 1, f + usize::from(t.failing)));
            RouteStatus {
                route: r.config.template.source.clone(),
                streams: m.streams_open.get(),
                topics,
                failing_topics: failing,
                upstream: m.upstream_health(),
            }
        })
        .collect();
    let streams = admin
        .metrics
        .routes()
        .iter()
        .map(|r| r.streams_open.get())
        .sum();
    let topics_alive = infos.len();
    infos.sort_by(|a, b| {
        b.watchers
            .cmp(&a.watchers)
            .then_with(|| a.resource.cmp(&b.resource))
    });
    infos.truncate(MAX_TOPICS_SHOWN);
    let (events_total, bytes_total) = admin.metrics.totals();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        ready: admin.is_ready(),
        uptime_s: admin.started.elapsed().map_or(0, |d| d.as_secs()),
        now_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
        streams,
        topics_alive,
        events_total,
        bytes_total,
        routes,
        topics: infos,
    }
}

/// `GET /status/events`: a `status` event now and every [`STATUS_INTERVAL`] until herald stops.
/// `permit` (one of the few status streams allowed at once) is held as long as the stream.
pub fn events(
    admin: Arc<Admin>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<ResponseBody> {
    let stop = admin.stop.clone();
    let mut ticker = tokio::time::interval(STATUS_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures_util::stream::unfold(
        (admin, ticker, stop, true, permit),
        |(admin, mut ticker, stop, first, permit)| async move {
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = ticker.tick() => {}
            }
            let json = serde_json::to_string(&snapshot(&admin)).unwrap_or_default();
            let mut text = String::with_capacity(json.len() + 32);
            if first {
                text.push_str("retry: 2000\n");
            }
            text.push_str("event: status\ndata: ");
            text.push_str(&json);
            text.push_str("\n\n");
            let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(text)));
            Some((frame, (admin, ticker, stop, false, permit)))
        },
    );
    let mut resp = Response::new(
        StreamBody::new(stream)
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
