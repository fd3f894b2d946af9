//! Plain GETs on streamable routes. With `serve_get = "topic"`, a GET whose topic is live (same
//! resource, same credential) and whose state the upstream confirmed within one interval is
//! answered from that state (`ETag`, `304`, `Age`); any other passes through, and carries
//! `Herald-Event-Id` when its body is the live topic's state, so a page can stream from there.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tracing::debug;

use super::{cors, proxy, ConnInfo, ResponseBody, Service};
use crate::config::ServeGet;
use crate::hub::{Doc, Position, Topic};
use crate::reply::full;
use crate::routes::Route;
use crate::source::compact;
use crate::source::Connection;
use crate::telemetry::{GetAnswer, RouteMetrics};

/// The header naming the stream position of the state a GET returned.
pub const EVENT_ID: HeaderName = HeaderName::from_static("herald-event-id");
/// Largest pass-through body compared with a topic's state to name its position.
const MAX_COMPARED: usize = 4 << 20;

/// A plain GET on a streamable route, and the live topic the same client would watch, if any.
pub(super) struct PlainGet {
    route: Arc<Route>,
    metrics: Arc<RouteMetrics>,
    topic: Option<Arc<Topic>>,
}

/// The plain GET `req` is, if it is one on a streamable route.
pub(super) async fn classify<B>(svc: &Service, req: &Request<B>) -> Option<PlainGet> {
    if req.method() != Method::GET {
        return None;
    }
    let (route, key) = svc
        .routes
        .resolve(req.uri().path(), req.uri().query())
        .ok()??;
    // The same credentials a stream would present name the same topic (found without the
    // route's upstream check: only an answer from the topic needs that, see `answer`); refused
    // ones name none, and the upstream answers them as it always did.
    let topic = if svc.hub.topic_count() == 0 {
        None
    } else {
        svc.auth
            .topic_key(&route, key, req.headers(), req.uri().query())
            .ok()
            .and_then(|k| svc.hub.topic(&k))
    };
    let metrics = svc.metrics.route(&route.template);
    Some(PlainGet {
        route,
        metrics,
        topic,
    })
}

impl PlainGet {
    /// The topic's answer, when the route serves GETs from topics and herald can vouch for the
    /// state: the upstream confirmed it within one interval, and the request asks for nothing a
    /// stored state cannot give (a range, an end-to-end reload, an origin herald may not serve).
    /// A state older than that (the next poll is late) is refreshed first: the topic is poked
    /// and every GET that waits shares that one read (bounded by the route's timeout).
    pub async fn answer<B>(
        &self,
        svc: &Service,
        req: &Request<B>,
        conn: &ConnInfo,
    ) -> Option<Response<ResponseBody>> {
        if self.route.config.serve_get != ServeGet::Topic || !plain(req.headers()) {
            return None;
        }
        // What the pass-through path would refuse is refused there, as always.
        if proxy::bad_host(req).is_some() || !cors::origin_allowed(svc.cors.as_ref(), req, conn.tls)
        {
            return None;
        }
        let topic = self.topic.as_ref()?;
        // Answered by herald, so let in by herald: the route's upstream check runs as for a
        // stream (its answers are cached per credential).
        let grant = svc
            .auth
            .authorize(
                &self.route,
                topic.key.clone(),
                req.headers(),
                req.uri().query(),
            )
            .await
            .ok()?;
        if grant.key != topic.key {
            return None;
        }
        // A push source with its upstream connection open is told every change; a polled one
        // vouches for one interval (its current one, which adaptive polling may stretch).
        let view = topic.stats.view();
        let pushed = view.connection == Connection::Open;
        let interval = self
            .route
            .config
            .interval
            .max(Duration::from_millis(view.interval_ms));
        let fresh = |t: &Topic| t.fresh.age().filter(|a| pushed || *a <= interval);
        let age = match fresh(topic) {
            Some(age) => age,
            None => {
                let wait = topic.fresh.next_mark();
                topic.refresh();
                let _ = tokio::time::timeout(self.route.config.timeout, wait).await;
                fresh(topic)?
            }
        };
        let (position, doc) = topic.channel.current().filter(|(_, d)| d.json)?;
        let metrics = &self.metrics;
        let etag = format!("\"{position}\"");
        let mut resp = if matches_etag(req.headers(), &etag) {
            metrics.get(GetAnswer::NotModified);
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else {
            metrics.get(GetAnswer::Topic);
            let mut r = Response::new(full(doc.data.clone()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&etag) {
            h.insert(header::ETAG, v);
        }
        set_position(h, position);
        h.insert(header::AGE, HeaderValue::from(age.as_secs()));
        let per_credential = topic.channel.settings().per_credential;
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(if per_credential {
                "private, no-cache"
            } else {
                "no-cache"
            }),
        );
        if per_credential {
            h.append(
                header::VARY,
                HeaderValue::from_static("cookie, authorization"),
            );
        }
        if let Some(c) = svc.cors.as_ref() {
            cors::decorate(c, req.headers().get(header::ORIGIN), h);
        }
        debug!(route = %self.route.template, %position, "GET served from the topic");
        Some(resp)
    }

    /// A passed-through answer, counted, and marked with the topic's position when its body is
    /// exactly the topic's state (compared as compact JSON; bodies up to 4 MiB, uncompressed).
    pub async fn mark(&self, resp: Response<ResponseBody>) -> Response<ResponseBody> {
        self.metrics.get(GetAnswer::Upstream);
        let Some((position, doc)) = self.topic.as_ref().and_then(|t| t.channel.current()) else {
            return resp;
        };
        if !comparable(&resp, &doc) {
            return resp;
        }
        let (mut parts, body) = resp.into_parts();
        let timeout = self.route.config.timeout;
        let bytes = match tokio::time::timeout(timeout, body.collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            // The upstream's body broke off: so does this answer, as it would have unmarked.
            Ok(Err(e)) => return Response::from_parts(parts, broken(e)),
            Err(_) => return Response::from_parts(parts, broken("upstream body timed out".into())),
        };
        if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok()
            && compact(&bytes) == doc.data
        {
            set_position(&mut parts.headers, position);
            expose(&mut parts.headers);
        }
        Response::from_parts(parts, full(bytes))
    }
}

/// Whether a pass-through answer may be the topic's state: a 200 JSON body, not encoded, of a
/// known and modest length.
fn comparable(resp: &Response<ResponseBody>, doc: &Doc) -> bool {
    let h = resp.headers();
    let json = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|c| c == "application/json" || c.ends_with("+json"));
    let len = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    resp.status() == StatusCode::OK
        && doc.json
        && json
        && !h.contains_key(header::CONTENT_ENCODING)
        && len.is_some_and(|l| l <= MAX_COMPARED && l >= doc.data.len())
}

/// A body that fails at once with `e` (the client sees the answer cut, as the upstream cut it).
fn broken(e: super::BoxError) -> ResponseBody {
    let err = std::sync::Mutex::new(Some(e));
    http_body_util::StreamBody::new(futures_util::stream::once(async move {
        Err::<http_body::Frame<Bytes>, _>(
            err.lock()
                .ok()
                .and_then(|mut e| e.take())
                .unwrap_or_else(|| "broken".into()),
        )
    }))
    .boxed_unsync()
}

/// Whether the request asks only for the current representation: no range, no end-to-end
/// reload (`Cache-Control: no-cache`/`no-store`, `Pragma: no-cache`).
fn plain(headers: &HeaderMap) -> bool {
    let reload = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| {
                let d = d.trim();
                d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("no-store")
            })
    };
    !headers.contains_key(header::RANGE)
        && !headers.contains_key(header::IF_MATCH)
        && !headers.contains_key(header::IF_MODIFIED_SINCE)
        && !reload(header::CACHE_CONTROL)
        && !reload(header::PRAGMA)
}

/// Whether `If-None-Match` names `etag` (weak comparison, as RFC 9110 §13.1.2 asks) or `*`.
fn matches_etag(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

fn set_position(headers: &mut HeaderMap, position: Position) {
    if let Ok(v) = HeaderValue::from_str(&position.to_string()) {
        headers.insert(EVENT_ID, v);
    }
}

/// Let a cross-origin page read `Herald-Event-Id` where the answer is shared with it.
fn expose(headers: &mut HeaderMap) {
    if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        return;
    }
    let listed = headers
        .get_all(header::ACCESS_CONTROL_EXPOSE_HEADERS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim() == "*" || n.trim().eq_ignore_ascii_case(EVENT_ID.as_str()));
    if !listed {
        headers.append(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("herald-event-id"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_compare_weakly_and_star_matches() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"a\", W/\"b-1\""),
        );
        assert!(matches_etag(&h, "\"b-1\""));
        assert!(!matches_etag(&h, "\"b-2\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(matches_etag(&h, "\"x\""));
    }

    #[test]
    fn reloads_and_ranges_are_not_plain() {
        let mut h = HeaderMap::new();
        assert!(plain(&h));
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, no-cache"),
        );
        assert!(!plain(&h));
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-1"));
        assert!(!plain(&h));
    }
}
