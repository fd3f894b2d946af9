//! Pass-through: any request that is not a stream goes to the upstream as it came — method, the
//! target byte for byte under the upstream's prefix, headers minus hop-by-hop, body streamed both
//! ways — with only `X-Forwarded-For/-Proto/-Host` and `Via` added. When the upstream cannot be
//! reached the client gets a 502/504 with a short JSON body, never a hang.
//!
//! What is refused before anything is sent: `CONNECT` (405), an HTTP/1.1 request without exactly
//! one `Host` (400), a path with a dot segment in any encoding (400).
//!
//! Around the exchange:
//! - `exchange`: `[proxy] timeout` bounds the whole exchange, head and body; a client that takes
//!   no body bytes for `[proxy] send_timeout` is cut off, and the upstream connection with it.
//! - `private`: a request carrying connection-bound credentials (NTLM, Negotiate) goes over an
//!   upstream connection owned by its downstream connection, never the shared pool.
//! - `tunnel`: `Upgrade` (WebSocket) over HTTP/1.1 becomes a byte tunnel after the upstream's 101.
//! - `rewrite`: `Location`-like headers that name the upstream are rewritten to the client-facing
//!   origin; `Via` is added both ways.

mod exchange;
pub mod pass;
mod private;
mod rewrite;
mod tunnel;

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use super::{json_error, ConnInfo, ResponseBody, Service};
use pass::{classify, PassClient, PassError, TargetError};

pub use private::ConnUpstream;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Pass `req` through to the upstream and answer with what it said.
pub async fn forward(
    app: &Service,
    req: Request<Incoming>,
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    let settings = &app.proxy;
    let deadline = tokio::time::Instant::now() + settings.timeout;
    if let Some(refusal) = check_head(&req) {
        return refusal;
    }
    let pass = &app.pass;
    let raw = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|pq| pq.starts_with('/'))
        .unwrap_or("/");
    let uri = match pass.base().target(raw) {
        Ok(u) => u,
        Err(e @ TargetError::DotSegment) => {
            debug!(path = req.uri().path(), "dot segment refused");
            return json_error(StatusCode::BAD_REQUEST, "bad-request", &e.to_string());
        }
        Err(e) => return json_error(StatusCode::BAD_REQUEST, "bad-request", &e.to_string()),
    };
    let public = rewrite::Public::of(&req, conn.tls);
    let mut req = req;
    // The client's side of a tunnel, if it asks for one: taken before the request is consumed.
    let upgrade = tunnel::requested(&req).map(|protocol| (protocol, hyper::upgrade::on(&mut req)));

    let (mut parts, body) = req.into_parts();
    let down_version = parts.version;
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    add_forwarding(&mut headers, conn.peer, conn.tls, public.host());
    if settings.via {
        rewrite::add_via(&mut headers, down_version);
    }
    let mut up = Request::new(body);
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    *up.headers_mut() = headers;
    if let Some((protocol, client)) = upgrade {
        return tunnel::open(app, up, protocol, client, &public, conn, deadline).await;
    }
    let resp = match tokio::time::timeout_at(deadline, send(app, up, conn)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return upstream_error(e),
        Err(_) => return timed_out(),
    };
    respond(app, resp, &public, conn, deadline, down_version)
}

/// The refusal of a request that its head alone rules out, if any.
fn check_head<B>(req: &Request<B>) -> Option<Response<ResponseBody>> {
    if req.method() == Method::CONNECT {
        let mut resp = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "herald is not a forward proxy: CONNECT is not supported",
        );
        resp.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        return Some(resp);
    }
    bad_host(req)
}

/// The refusal of a request without exactly one `Host`. RFC 9112 §3.2: an HTTP/1.1 request has
/// exactly one (HTTP/1.0 may have none); more than one is ambiguous on every version. A request
/// answered or forwarded under the wrong host is how cache poisoning and routing confusion start.
pub(super) fn bad_host<B>(req: &Request<B>) -> Option<Response<ResponseBody>> {
    let hosts = req.headers().get_all(header::HOST).iter().count();
    let bad = match req.version() {
        Version::HTTP_11 => hosts != 1,
        _ => hosts > 1,
    };
    bad.then(|| {
        json_error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "a request must carry exactly one Host header",
        )
    })
}

/// `X-Forwarded-For` (appended to), `-Proto` and `-Host` (replaced): what the upstream knows of
/// the client. `host` is the client-facing authority (`:authority` on HTTP/2).
fn add_forwarding(headers: &mut HeaderMap, peer: SocketAddr, tls: bool, host: Option<&str>) {
    let peer_ip = peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {peer_ip}"),
        None => peer_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(h) => {
            headers.insert("x-forwarded-host", h);
        }
        None => {
            headers.remove("x-forwarded-host");
        }
    }
}

/// Send over this downstream connection's private upstream connection when the request (or an
/// earlier one on it) carries connection-bound credentials; over the shared pool otherwise.
async fn send(
    app: &Service,
    mut req: Request<Incoming>,
    conn: &ConnInfo,
) -> Result<Response<Incoming>, PassError> {
    let pass = &app.pass;
    if conn.upstream.engaged() || private::binds_connection(req.headers()) {
        return conn.upstream.send(pass, req).await;
    }
    let captured = hyper_util::client::legacy::connect::capture_connection(&mut req);
    let resp = pass.shared().request(req).await.map_err(|e| classify(&e))?;
    if private::challenges_connection(resp.headers()) {
        // The upstream means to bind authentication to this connection: it must serve no one
        // else, so it leaves the pool once this response is done.
        if let Some(c) = captured.connection_metadata().as_ref() {
            c.poison();
        }
    }
    Ok(resp)
}

/// The client's response: the upstream's status and headers (hop-by-hop removed, redirects
/// rewritten, `Via` added) and its body under the exchange's deadline and stall bound.
fn respond(
    app: &Service,
    resp: Response<Incoming>,
    public: &rewrite::Public,
    conn: &ConnInfo,
    deadline: tokio::time::Instant,
    down_version: Version,
) -> Response<ResponseBody> {
    let settings = &app.proxy;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    finish_headers(app, &mut parts.headers, parts.version, public);
    let body = if http_body::Body::is_end_stream(&body) {
        body.map_err(|e| -> super::BoxError { Box::new(e) })
            .boxed_unsync()
    } else {
        // An HTTP/1 connection carries only this exchange: cut it when the exchange is aborted.
        // An HTTP/2 connection carries others, so only this stream is reset.
        let kill = (down_version < Version::HTTP_2).then(|| conn.kill.clone());
        exchange::guard(body, deadline, settings.send_timeout, kill).boxed_unsync()
    };
    let mut out = Response::from_parts(parts, body);
    *out.version_mut() = Version::default();
    out
}

/// Response headers herald adjusts: redirects that name the upstream, and `Via`.
fn finish_headers(
    app: &Service,
    headers: &mut HeaderMap,
    up_version: Version,
    public: &rewrite::Public,
) {
    let settings = &app.proxy;
    if settings.rewrite_redirects {
        rewrite::redirects(headers, app.pass.base(), public);
    }
    if settings.via {
        rewrite::add_via(headers, up_version);
    }
}

fn upstream_error(e: PassError) -> Response<ResponseBody> {
    debug!(error = %e, "pass-through failed");
    match e {
        PassError::Tls(message) => json_error(StatusCode::BAD_GATEWAY, "upstream-tls", &message),
        PassError::Connect(_) | PassError::Other(_) => json_error(
            StatusCode::BAD_GATEWAY,
            "bad-gateway",
            "the upstream could not be reached",
        ),
    }
}

fn timed_out() -> Response<ResponseBody> {
    json_error(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream-timeout",
        "the upstream did not answer in time",
    )
}

/// `uri` in origin form (`/path?query`), for a request written on a raw HTTP/1.1 connection.
fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}

/// Make `req` (absolute URI, no `Host`, as for the pool) fit a raw HTTP/1.1 connection: origin
/// form and the upstream's `Host` (the pool sets its own).
fn for_raw_connection(pass: &PassClient, req: &mut Request<Incoming>) {
    let uri = origin_form(req.uri());
    *req.uri_mut() = uri;
    let (_, authority) = pass.base().parts();
    if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(header::HOST, host);
    }
    *req.version_mut() = Version::HTTP_11;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn head_checks() {
        let req = |method: &str, version: Version, hosts: &[&str]| {
            let mut b = Request::builder().method(method).version(version).uri("/x");
            for h in hosts {
                b = b.header("host", *h);
            }
            b.body(()).unwrap()
        };
        assert!(check_head(&req("GET", Version::HTTP_11, &["a"])).is_none());
        assert!(check_head(&req("GET", Version::HTTP_10, &[])).is_none());
        assert!(check_head(&req("GET", Version::HTTP_2, &[])).is_none());
        let status = |r: Option<Response<ResponseBody>>| r.unwrap().status();
        assert_eq!(status(check_head(&req("GET", Version::HTTP_11, &[]))), 400);
        assert_eq!(
            status(check_head(&req("GET", Version::HTTP_11, &["a", "b"]))),
            400
        );
        assert_eq!(
            status(check_head(&req("GET", Version::HTTP_2, &["a", "a"]))),
            400
        );
        assert_eq!(
            status(check_head(&req("CONNECT", Version::HTTP_11, &["a"]))),
            405
        );
    }
}
