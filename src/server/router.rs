//! Decides what a request is: a GET that accepts `text/event-stream` on a stream route becomes an
//! SSE stream (gzip when accepted); herald answers CORS preflights for streams; everything else
//! is passed through to the upstream, gzipped only if it came uncompressed.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use super::open::{self, StreamRequest, Target};
use super::{compress, cors, get, json_error, proxy, ResponseBody, Service};
use crate::config::CorsPassThrough;
use crate::logging::Access;
use crate::sse::mux::WatchInfo;

/// Per-connection facts a request handler needs.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// Closes this connection (used for slow HTTP/1 consumers, whose body hyper stops polling).
    pub kill: CancellationToken,
    /// This connection's private upstream connection for connection-bound credentials (NTLM,
    /// Negotiate), made on first use (`proxy::private`).
    pub upstream: proxy::ConnUpstream,
}

pub async fn handle(
    svc: Arc<Service>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<ResponseBody> {
    // herald's own endpoints (multiplexed stream, its control API, client.js): never passed through.
    if svc.mux.owns(req.uri().path()) {
        return super::mux::handle(&svc, req, &conn).await;
    }
    if svc.publish.owns(req.uri().path()) {
        return svc.publish.handle(req).await;
    }
    if let Some(resp) = answer(&svc, &req, &conn).await {
        return resp;
    }
    let cors_cfg = svc.cors.as_ref();
    let origin = cors_cfg.and_then(|_| req.headers().get(header::ORIGIN).cloned());
    // HEAD must describe what an uncompressed GET would send.
    let gzip = req.method() != Method::HEAD && compress::accepts_gzip(req.headers());
    let access = Access::start(&req, conn.peer, svc.access_log);
    // A plain GET on a streamable route: from the live topic, or passed through and marked.
    let plain = get::classify(&svc, &req).await;
    if let Some(p) = &plain {
        if let Some(resp) = p.answer(&svc, &req, &conn).await {
            return access.wrap(compress::pass_through(resp, gzip, &svc.compression));
        }
    }
    let resp = proxy::forward(&svc, req, &conn).await;
    let resp = match &plain {
        Some(p) => p.mark(resp).await,
        None => resp,
    };
    let mut resp = compress::pass_through(resp, gzip, &svc.compression);
    if let Some(c) = cors_cfg.filter(|c| c.pass_through == CorsPassThrough::Override) {
        cors::replace(c, origin.as_ref(), resp.headers_mut());
    }
    access.wrap(resp)
}

/// What herald answers itself for a request on a route (the preflight of a stream, a stream, or
/// the refusal of one), or `None` when it is passed through. Only the head is read, so the HTTP/1
/// stream fast path (`fast.rs`) can ask before it consumes anything.
pub async fn answer<B>(
    svc: &Service,
    req: &Request<B>,
    conn: &ConnInfo,
) -> Option<Response<ResponseBody>> {
    let cors_cfg = svc.cors.as_ref();
    if let Some(c) = cors_cfg.filter(|_| cors::is_preflight(req.method(), req.headers())) {
        // A preflight for a stream (GET on a stream route) is herald's to answer; others are the
        // upstream's unless herald overrides CORS everywhere.
        let stream = cors::requested_method(req.headers()) == Some(b"GET")
            && !matches!(
                svc.routes.resolve(req.uri().path(), req.uri().query()),
                Ok(None)
            );
        if stream || c.pass_through == CorsPassThrough::Override {
            return Some(cors::preflight(c, req.headers(), stream));
        }
    }
    if req.method() != Method::GET || !accepts_event_stream(req.headers()) {
        return None;
    }
    if let Some(refused) = proxy::bad_host(req) {
        return Some(refused);
    }
    let origin = cors_cfg.and_then(|_| req.headers().get(header::ORIGIN).cloned());
    // `last_event_id` says where the client is, not what it watches: never part of the topic.
    let (query, query_last_event_id) = take_last_event_id(req.uri().query());
    let mut resp = match svc.routes.resolve(req.uri().path(), query.as_deref()) {
        Ok(Some(_)) if !cors::origin_allowed(cors_cfg, req, conn.tls) => {
            svc.metrics.reject("cors-origin");
            cors::refuse_origin()
        }
        Ok(Some((route, key))) => {
            let info = WatchInfo {
                path: req.uri().to_string(),
                topic: key.resource.to_string(),
            };
            let target = Target {
                route,
                key,
                info,
                query,
            };
            let stream = StreamRequest {
                headers: req.headers(),
                version: req.version(),
                conn,
                query_last_event_id,
            };
            open::single(svc, &stream, target).await
        }
        Ok(None) => return None,
        Err(e) => json_error(StatusCode::BAD_REQUEST, "bad-request", &e.to_string()),
    };
    if let Some(c) = cors_cfg {
        cors::decorate(c, origin.as_ref(), resp.headers_mut());
    }
    Some(resp)
}

/// `query` without its `last_event_id` parameter, and that parameter's (decoded) value.
fn take_last_event_id(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(q) = query else {
        return (None, None);
    };
    let mut found = None;
    let rest: Vec<&str> = q
        .split('&')
        .filter(|pair| match pair.strip_prefix("last_event_id=") {
            Some(v) => {
                found = super::mux::form_decode(v);
                false
            }
            None => true,
        })
        .collect();
    if found.is_none() && rest.len() == q.split('&').count() {
        return (Some(q.to_string()), None);
    }
    let rest = rest.join("&");
    ((!rest.is_empty()).then_some(rest), found)
}

/// Whether `Accept` lists `text/event-stream` with a non-zero q (e.g. what `EventSource` sends).
pub fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("text/event-stream") && !q_zero
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn accept_parsing() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_static(v));
            accepts_event_stream(&m)
        };
        assert!(h("text/event-stream"));
        assert!(h("application/json, Text/Event-Stream;q=0.5"));
        assert!(!h("text/event-stream;q=0"));
        assert!(!h("*/*"));
        assert!(!h("application/json"));
        assert!(!accepts_event_stream(&HeaderMap::new()));
    }
}
