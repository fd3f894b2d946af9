//! Pass-through: any request that is not a stream goes to the upstream as it came — method, path,
//! query, headers minus hop-by-hop, body streamed both ways — with `X-Forwarded-*` added. When the
//! upstream cannot be reached the client gets a 502/504 with a short JSON body, never a hang.

use std::net::SocketAddr;

use futures_util::TryStreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::{Frame, Incoming};
use tracing::debug;

use super::{json_error, ResponseBody};
use crate::source::Origin;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus `Host`, which reqwest
/// sets for the upstream.
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

pub async fn forward(
    upstream: &Origin,
    timeout: std::time::Duration,
    req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Response<ResponseBody> {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|pq| pq.starts_with('/'))
        .unwrap_or("/");
    let Ok(url) = upstream.url_for(target) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "invalid request target",
        );
    };
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });

    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
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
    if let Some(h) = host {
        headers.insert("x-forwarded-host", h);
    }

    let body_stream =
        BodyStream::new(body).try_filter_map(|frame| async move { Ok(frame.into_data().ok()) });
    let request = upstream
        .client()
        .request(parts.method.clone(), url)
        .headers(headers)
        .timeout(timeout)
        .body(reqwest::Body::wrap_stream(body_stream));

    let resp = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            // Without the URL: its query can carry credentials (`?access_token=…`).
            let e = e.without_url();
            debug!(error = %crate::logging::error_chain(&e), "pass-through failed");
            return if e.is_timeout() {
                json_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    "the upstream did not answer in time",
                )
            } else {
                json_error(
                    StatusCode::BAD_GATEWAY,
                    "bad-gateway",
                    "the upstream could not be reached",
                )
            };
        }
    };

    let mut builder = Response::builder().status(resp.status());
    if let Some(h) = builder.headers_mut() {
        let mut upstream_headers = resp.headers().clone();
        strip_hop_by_hop(&mut upstream_headers);
        *h = upstream_headers;
    }
    let stream = resp
        .bytes_stream()
        .map_ok(Frame::data)
        .map_err(|e| -> super::BoxError { Box::new(e) });
    builder
        .body(StreamBody::new(stream).boxed_unsync())
        .unwrap_or_else(|_| {
            json_error(
                StatusCode::BAD_GATEWAY,
                "bad-gateway",
                "invalid upstream response",
            )
        })
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
}
