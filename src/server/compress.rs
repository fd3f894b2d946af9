//! Content negotiation for gzip: whether a client accepts it (`Accept-Encoding`), and gzip for
//! pass-through responses the upstream sent uncompressed, flushed as each upstream chunk arrives
//! so a slow or streaming upstream reaches the client without delay. SSE streams use `sse::gzip`.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression as Level;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::{BoxError, ResponseBody};
use crate::config::Compression;

/// Whether `Accept-Encoding` allows gzip (RFC 9110 §12.5.3): `gzip`/`x-gzip`, or `*` unless gzip
/// is refused explicitly, with a non-zero q. No header means identity only, as far as herald is
/// concerned: compressing for a client that did not ask is never worth the risk.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for coding in headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or("").trim();
        let q_ok = !parts.any(|p| {
            let p = p.trim();
            let q = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="));
            q.and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(q_ok);
        } else if name == "*" {
            any = Some(q_ok);
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// Media types worth compressing: text, JSON, JavaScript, XML and SVG.
pub fn compressible(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/")
        || essence.ends_with("+json")
        || essence.ends_with("+xml")
        || matches!(
            essence.as_str(),
            "application/json"
                | "application/javascript"
                | "application/x-javascript"
                | "application/ecmascript"
                | "application/xml"
                | "application/x-ndjson"
                | "image/svg+xml"
        )
}

/// Add `token` to `Vary` unless it is listed already (or `Vary: *`).
pub fn add_vary(headers: &mut HeaderMap, token: &'static str) {
    let listed = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case(token));
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static(token));
    }
}

/// gzip a pass-through response when it is worth it and allowed: herald compression on, an
/// uncompressed compressible body of unknown or at least `min_size` length, no `no-transform`.
/// `accepts` is the client's `Accept-Encoding` verdict (false for HEAD, whose headers must match
/// an uncompressed GET's). `Vary: Accept-Encoding` is added whenever the answer depends on it.
pub fn pass_through(
    mut resp: Response<ResponseBody>,
    accepts: bool,
    cfg: &Compression,
) -> Response<ResponseBody> {
    // herald's own short answers (502, 504) carry no Content-Length header, only an exact size.
    let exact = resp.body().size_hint().exact();
    if !cfg.enabled || !eligible(resp.status(), resp.headers(), exact, cfg.min_size) {
        return resp;
    }
    let h = resp.headers_mut();
    add_vary(h, "accept-encoding");
    if !accepts {
        return resp;
    }
    h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    h.remove(header::CONTENT_LENGTH);
    // Byte ranges of the identity body mean nothing in the gzip body.
    h.remove(header::ACCEPT_RANGES);
    // A strong validator names exact bytes; these are different bytes (as nginx does).
    if let Some(etag) = h.get(header::ETAG) {
        if etag.as_bytes().starts_with(b"\"") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                h.insert(header::ETAG, v);
            }
        }
    }
    resp.map(|body| GzipBody::new(body).boxed_unsync())
}

fn eligible(status: StatusCode, h: &HeaderMap, exact: Option<u64>, min_size: u64) -> bool {
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::PARTIAL_CONTENT;
    let compressible_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(compressible);
    let length = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or(exact);
    let no_transform = h
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
    !no_body
        && compressible_type
        && !h.contains_key(header::CONTENT_ENCODING)
        && !h.contains_key(header::CONTENT_RANGE)
        && !no_transform
        // Unknown length (chunked): likely a large or streamed body; compress.
        && length.is_none_or(|n| n >= min_size)
}

/// A body gzipped on the fly: every data frame of `inner` is compressed and sync-flushed at once,
/// so nothing the upstream sent is held back; the trailer follows the last frame.
pub struct GzipBody<B> {
    inner: B,
    /// None once the gzip member is finished.
    encoder: Option<GzEncoder<Vec<u8>>>,
    /// Trailers from `inner`, sent after the gzip trailer.
    trailers: Option<HeaderMap>,
}

impl<B> GzipBody<B> {
    pub fn new(inner: B) -> GzipBody<B> {
        GzipBody {
            inner,
            // Level 5: close to 6's ratio on JSON at noticeably less CPU; this runs per response.
            encoder: Some(GzEncoder::new(Vec::new(), Level::new(5))),
            trailers: None,
        }
    }
}

impl<B> Body for GzipBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    let out = match this.encoder.take().map(GzEncoder::finish) {
                        Some(Ok(out)) => out,
                        Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                        None => Vec::new(),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => {
                    // Writing into a Vec only fails if deflate itself does (it does not).
                    if let Err(e) = encoder.write_all(&data).and_then(|()| encoder.flush()) {
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    let out = std::mem::take(encoder.get_mut());
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Err(frame) => {
                    // Trailers end the body: finish the member first, then send them.
                    if let Ok(t) = frame.into_trailers() {
                        this.trailers = Some(t);
                    }
                    let out = match this.encoder.take().map(GzEncoder::finish) {
                        Some(Ok(out)) => out,
                        Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                        None => Vec::new(),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ae(v: &'static str) -> bool {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
        accepts_gzip(&h)
    }

    #[test]
    fn accept_encoding() {
        assert!(ae("gzip"));
        assert!(ae("gzip, deflate, br"));
        assert!(ae("br;q=1.0, GZIP;q=0.5"));
        assert!(ae("x-gzip"));
        assert!(ae("*"));
        assert!(!ae("*, gzip;q=0"));
        assert!(!ae("gzip;q=0"));
        assert!(!ae("gzip;q=0.000"));
        assert!(!ae("br, deflate"));
        assert!(!ae("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn compressible_types() {
        for t in [
            "application/json",
            "application/json; charset=utf-8",
            "text/html",
            "text/plain;charset=UTF-8",
            "application/problem+json",
            "application/javascript",
            "image/svg+xml",
            "application/atom+xml",
        ] {
            assert!(compressible(t), "{t}");
        }
        for t in [
            "image/png",
            "application/octet-stream",
            "application/zip",
            "",
        ] {
            assert!(!compressible(t), "{t}");
        }
    }

    /// Yields its chunks, then stays pending: an upstream that has sent part of a body.
    struct Partial(Vec<Bytes>);

    impl Body for Partial {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.0.pop() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    /// Each upstream chunk is flushed through the compressor at once: what the upstream sent so
    /// far decodes completely while the body is still open.
    #[test]
    fn flushes_every_upstream_chunk() {
        let text = "{\"builds\":[".repeat(50);
        let mut body = GzipBody::new(Partial(vec![Bytes::from(text.clone())]));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) else {
            panic!("the chunk is sent at once");
        };
        let data = frame.into_data().unwrap();
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        let mut d = flate2::Decompress::new(false);
        let mut out = Vec::with_capacity(text.len() + 64);
        d.decompress_vec(&data[10..], &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        assert_eq!(out, text.as_bytes());
        assert!(data.len() < text.len() / 4);
    }

    #[test]
    fn vary_is_merged() {
        let mut h = HeaderMap::new();
        h.insert(
            header::VARY,
            HeaderValue::from_static("Origin, Accept-Encoding"),
        );
        add_vary(&mut h, "accept-encoding");
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
        add_vary(&mut h, "cookie");
        assert_eq!(h.get_all(header::VARY).iter().count(), 2);
    }
}
