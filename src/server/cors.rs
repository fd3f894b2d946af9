//! CORS (WHATWG Fetch §3.2) for browsers on other origins: herald answers preflights for stream
//! routes (and for every route when `[cors] pass_through = "override"`) and adds the CORS headers
//! to its responses. An origin not allowed gets no CORS headers at all, and a preflight 403.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Empty};

use super::compress::add_vary;
use super::{json_error, ResponseBody};
use crate::config::{Cors, CorsOrigins};

/// Request headers a stream needs from a browser: resume, credentials, and what `EventSource`
/// or a fetch-based client sends.
const STREAM_HEADERS: &str = "Last-Event-ID, Authorization, Cache-Control, Accept";

/// Whether a request is a CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method` (a plain `OPTIONS` is an ordinary request).
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The method a preflight asks about.
pub fn requested_method(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .map(|v| v.as_bytes())
}

/// The `Access-Control-Allow-Origin` value for `origin`, if it is allowed.
fn allow_origin(cfg: &Cors, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
    match &cfg.origins {
        // Validation refuses `*` with credentials, so the literal wildcard is always valid here.
        CorsOrigins::Any => Some(HeaderValue::from_static("*")),
        CorsOrigins::List(list) => {
            let origin = origin?;
            let text = origin.to_str().ok()?;
            // Config origins are stored serialized (lowercase); browsers send them that way too,
            // but a hand-written client may not.
            list.iter()
                .any(|o| o.eq_ignore_ascii_case(text))
                .then(|| origin.clone())
        }
    }
}

/// Add CORS headers for a response to a request from `origin` (none if it is not allowed).
pub fn decorate(cfg: &Cors, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
    if matches!(cfg.origins, CorsOrigins::List(_)) {
        // The answer depends on Origin, even when there is none: caches must key on it.
        add_vary(headers, "origin");
    }
    let Some(allow) = allow_origin(cfg, origin) else {
        return;
    };
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    // What a page reads of herald's own answers: a GET's stream position, a refusal's wait.
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("herald-event-id, retry-after"),
    );
    if cfg.credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// Whether a browser page on the request's `Origin` may use herald's own answers (streams and
/// their control API), decided before anything is asked of the upstream: with `[cors]`, an
/// origin it lists; without, only the request's own origin (`scheme://Host`). A cross-origin page
/// could not read the answer anyway, but herald would still have polled the upstream with the
/// user's cookies. A request without `Origin` (a same-origin GET, a client that is no browser) is
/// allowed.
pub fn origin_allowed<B>(cfg: Option<&Cors>, req: &http::Request<B>, tls: bool) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    match cfg {
        Some(c) => allow_origin(c, Some(origin)).is_some(),
        None => {
            let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            });
            let scheme = if tls { "https" } else { "http" };
            host.zip(origin.to_str().ok())
                .is_some_and(|(h, o)| o.eq_ignore_ascii_case(&format!("{scheme}://{h}")))
        }
    }
}

/// The answer to a request from an origin that may not use herald.
pub fn refuse_origin() -> Response<ResponseBody> {
    let mut resp = json_error(
        StatusCode::FORBIDDEN,
        "cors-origin",
        "this origin is not allowed to use herald",
    );
    add_vary(resp.headers_mut(), "origin");
    resp
}

/// `pass_through = "override"`: drop whatever CORS the upstream set, then apply herald's.
pub fn replace(cfg: &Cors, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
    let upstream: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for k in upstream {
        headers.remove(k);
    }
    decorate(cfg, origin, headers);
}

/// herald's answer to a preflight. On a stream route only `GET` is offered with the headers a
/// stream needs; on a pass-through route (override mode) the requested method and headers are
/// granted, since the upstream decides what it accepts.
pub fn preflight(cfg: &Cors, headers: &HeaderMap, stream: bool) -> Response<ResponseBody> {
    let origin = headers.get(header::ORIGIN);
    let Some(allow) = allow_origin(cfg, origin) else {
        return refuse_origin();
    };
    let mut resp = Response::new(Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    if cfg.credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    let (methods, allow_headers) = if stream {
        (
            HeaderValue::from_static("GET"),
            Some(HeaderValue::from_static(STREAM_HEADERS)),
        )
    } else {
        (
            headers
                .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("GET")),
            headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned(),
        )
    };
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
    if let Some(v) = allow_headers {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from(cfg.max_age.as_secs()),
    );
    if matches!(cfg.origins, CorsOrigins::List(_)) {
        add_vary(h, "origin");
    }
    add_vary(h, "access-control-request-method");
    add_vary(h, "access-control-request-headers");
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CorsPassThrough;
    use std::time::Duration;

    fn cfg(origins: CorsOrigins, credentials: bool) -> Cors {
        Cors {
            origins,
            credentials,
            max_age: Duration::from_secs(600),
            pass_through: CorsPassThrough::Upstream,
        }
    }

    #[test]
    fn listed_origin_is_echoed_and_others_get_nothing() {
        let c = cfg(
            CorsOrigins::List(vec!["https://app.example.com".into()]),
            true,
        );
        let mut h = HeaderMap::new();
        decorate(
            &c,
            Some(&HeaderValue::from_static("https://app.example.com")),
            &mut h,
        );
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[header::VARY], "origin");

        let mut h = HeaderMap::new();
        decorate(
            &c,
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut h,
        );
        assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
    }

    #[test]
    fn override_drops_upstream_cors() {
        let c = cfg(CorsOrigins::Any, false);
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("https://x"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-a"),
        );
        replace(&c, None, &mut h);
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        // The upstream's list is gone; herald's own (what a page reads of its answers) is set.
        assert_eq!(
            h[header::ACCESS_CONTROL_EXPOSE_HEADERS],
            "herald-event-id, retry-after"
        );
    }
}
