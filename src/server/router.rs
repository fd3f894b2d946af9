//! Decides what a request is: a GET that accepts `text/event-stream` on a stream route becomes an
//! SSE stream (gzip when accepted); herald answers CORS preflights for streams; everything else
//! is passed through to the upstream, gzipped only if it came uncompressed.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use bytes::Bytes;
use http_body::Body;

use super::admission::{Permitted, StreamPermit};
use super::{compress, cors, json_error, proxy, App, ResponseBody};
use crate::config::CorsPassThrough;
use crate::hub::{parse_event_id, WatchSlot};
use crate::sse::stream::{ItemSource, StreamClosed};
use crate::sse::{GzipStream, SseStream};

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
    app: Arc<App>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<ResponseBody> {
    // herald's own endpoints (multiplexed stream, its control API, client.js): never passed through.
    if super::mux::owns(&app, req.uri().path()) {
        return super::mux::handle(&app, req, &conn).await;
    }
    if let Some(resp) = answer(&app, &req, &conn).await {
        return resp;
    }
    let cors_cfg = app.config.cors.as_ref();
    let origin = cors_cfg.and_then(|_| req.headers().get(header::ORIGIN).cloned());
    // HEAD must describe what an uncompressed GET would send.
    let gzip = req.method() != Method::HEAD && compress::accepts_gzip(req.headers());
    let resp = proxy::forward(&app, req, &conn).await;
    let mut resp = compress::pass_through(resp, gzip, &app.config.compression);
    if let Some(c) = cors_cfg.filter(|c| c.pass_through == CorsPassThrough::Override) {
        cors::replace(c, origin.as_ref(), resp.headers_mut());
    }
    resp
}

/// What herald answers itself for a request on a route (the preflight of a stream, a stream, or
/// the refusal of one), or `None` when it is passed through. Only the head is read, so the HTTP/1
/// stream fast path (`fast.rs`) can ask before it consumes anything.
pub async fn answer<B>(
    app: &App,
    req: &Request<B>,
    conn: &ConnInfo,
) -> Option<Response<ResponseBody>> {
    let cors_cfg = app.config.cors.as_ref();
    if let Some(c) = cors_cfg.filter(|_| cors::is_preflight(req.method(), req.headers())) {
        // A preflight for a stream (GET on a stream route) is herald's to answer; others are the
        // upstream's unless herald overrides CORS everywhere.
        let stream = cors::requested_method(req.headers()) == Some(b"GET")
            && !matches!(
                app.routes.resolve(req.uri().path(), req.uri().query()),
                Ok(None)
            );
        if stream || c.pass_through == CorsPassThrough::Override {
            return Some(cors::preflight(c, req.headers(), stream));
        }
    }
    if req.method() != Method::GET || !accepts_event_stream(req.headers()) {
        return None;
    }
    let origin = cors_cfg.and_then(|_| req.headers().get(header::ORIGIN).cloned());
    let mut resp = match app.routes.resolve(req.uri().path(), req.uri().query()) {
        // Access first (every connect, Last-Event-ID or not): the grant names the topic.
        Ok(Some((route, key))) => match app
            .auth
            .authorize(&route, key, req.headers(), req.uri().query())
            .await
        {
            Ok(grant) => open_stream(app, &route, grant, req, conn),
            Err(denied) => {
                debug!(route = %route.config.template.source, error = %denied, "stream refused");
                json_error(denied.status(), denied.code(), &denied.to_string())
            }
        },
        Ok(None) => return None,
        Err(e) => json_error(StatusCode::BAD_REQUEST, "bad-request", &e.to_string()),
    };
    if let Some(c) = cors_cfg {
        cors::decorate(c, origin.as_ref(), resp.headers_mut());
    }
    Some(resp)
}

fn open_stream<B>(
    app: &App,
    route: &crate::routes::Route,
    grant: crate::auth::Grant,
    req: &Request<B>,
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    let headers = req.headers();
    let permit = match app.admission.admit(conn.peer.ip(), grant.principal) {
        Ok(p) => p,
        Err(rejection) => {
            debug!(peer = %conn.peer, %rejection, "stream refused");
            app.metrics.reject("stream-admission");
            return rejection.response();
        }
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_event_id);
    // An HTTP/1 connection carries this one stream, so a stuck reader can be cut by closing it;
    // an HTTP/2 connection carries others that must not suffer for it.
    let slot = Arc::new(if req.version() < http::Version::HTTP_2 {
        WatchSlot::with_kill(conn.kill.clone())
    } else {
        WatchSlot::default()
    });
    let sub = match app
        .hub
        .subscribe(route, grant.key.clone(), grant.headers.clone(), slot)
    {
        Ok(sub) => {
            app.auth.watch(&grant, &sub.slot);
            sub
        }
        Err(e) => {
            debug!(error = %e, "stream refused");
            app.metrics.reject("too-many-topics");
            return json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-topics",
                &e.to_string(),
            );
        }
    };
    let cursor = sub.topic.resume_cursor(last);
    let stream_log = app
        .metrics
        .stream_opened(&sub, last.is_some(), cursor, &app.streams);
    debug!(topic = %sub.topic.key.resource, ?cursor, "stream opened");
    let sse = &app.config.sse;
    let jitter = |max: std::time::Duration| {
        if max.is_zero() {
            max
        } else {
            rand::thread_rng().gen_range(std::time::Duration::ZERO..=max)
        }
    };
    let body = SseStream::new(
        sub,
        cursor,
        sse.retry + jitter(sse.retry_jitter),
        sse.heartbeat,
        app.streams.clone(),
        sse.retry + jitter(sse.retry_jitter.max(sse.retry)),
    );
    stream_response(app, headers, body, permit, |b| stream_log.wrap(b))
}

/// The response for an opened stream (single or multiplexed): gzip when the client accepts it and
/// compression is on, the SSE headers, `observe` around the body (metrics), and `permit` held for
/// as long as the stream lives.
pub(super) fn stream_response<S>(
    app: &App,
    headers: &HeaderMap,
    stream: S,
    permit: StreamPermit,
    observe: impl FnOnce(ResponseBody) -> ResponseBody,
) -> Response<ResponseBody>
where
    S: ItemSource + Body<Data = Bytes, Error = StreamClosed> + Unpin + Send + 'static,
{
    let compression = app.config.compression.enabled;
    let gzip = compression && compress::accepts_gzip(headers);
    let body = if gzip {
        GzipStream::new(stream)
            .map_err(|e| -> super::BoxError { Box::new(e) })
            .boxed_unsync()
    } else {
        stream
            .map_err(|e| -> super::BoxError { Box::new(e) })
            .boxed_unsync()
    };
    let mut resp = Response::new(Permitted::new(observe(body), permit).boxed_unsync());
    let h = resp.headers_mut();
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if compression {
        compress::add_vary(h, "accept-encoding");
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
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
