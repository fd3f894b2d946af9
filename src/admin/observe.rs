//! What herald observes about each stream and connection as it runs: an SSE body wrapper that
//! counts open streams and bytes after compression and writes one `info` line when a stream opens
//! and one when it closes (route, topic, duration, bytes, reason); and a connection wrapper that
//! learns the protocol (h1/h2) from the first bytes the client sends.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::info;

use super::metrics::{Metrics, Protocol, RouteMetrics};
use crate::hub::{Cursor, StopReason, Subscription, Topic, WatchSlot};
use crate::server::{BoxError, ResponseBody};

/// Query parameters whose values never reach a log line.
const SECRET_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "auth",
    "key",
    "api_key",
    "apikey",
    "secret",
    "password",
    "session",
    "signature",
    "sig",
    "jwt",
    "code",
];

/// A resource for logs: the path, and the query with the values of credential-like parameters
/// replaced by `***`. Names are matched as the upstream reads them (`%74oken`, `access%5Ftoken`
/// and `access+token` are secrets too); everything else is kept exactly as written.
pub fn redact(resource: &str) -> String {
    let Some((path, query)) = resource.split_once('?') else {
        return resource.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or(pair);
            if is_secret(name) {
                format!("{name}=***")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

/// Whether a query parameter name, as written, names a credential: decoded as a form (`+` is a
/// space, then `%XX`), lowercased, trimmed, with ` `, `.` and `-` read as `_` (PHP reads
/// `access+token` and `access.token` as `access_token`).
fn is_secret(written: &str) -> bool {
    let decoded = crate::routes::percent_decode(&written.replace('+', " ")).map_or_else(
        || written.to_string(),
        |b| String::from_utf8_lossy(&b).into_owned(),
    );
    let name: String = decoded
        .trim()
        .chars()
        .map(|c| match c {
            ' ' | '.' | '-' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    SECRET_PARAMS
        .iter()
        .any(|s| name == *s || name.ends_with(&format!("_{s}")))
}

/// One open stream's bookkeeping; dropping it (with the response body) closes the stream's books.
pub struct StreamLog {
    metrics: Arc<RouteMetrics>,
    /// For the closing line (redacted then, so an idle stream holds no copy of its resource).
    topic: Arc<Topic>,
    slot: Arc<WatchSlot>,
    shutdown: crate::shutdown::Flag,
    started: Instant,
    bytes: u64,
    /// How the body ended: None while open or when the client went away first.
    end: Option<&'static str>,
}

impl Metrics {
    /// A stream was just subscribed (the one-line hook in the router): count it, tell whether a
    /// reconnect was replayed or resynced, and log it. `resumed`: it came with a `Last-Event-ID`.
    pub fn stream_opened(
        &self,
        sub: &Subscription,
        resumed: bool,
        cursor: Cursor,
        shutdown: &crate::shutdown::Flag,
    ) -> StreamLog {
        let metrics = sub.topic.metrics().clone();
        metrics.streams_open.inc();
        metrics.streams_opened.inc();
        let outcome = match (resumed, cursor) {
            (false, _) => "new",
            (true, Cursor::Fresh) => {
                metrics.snapshots.inc();
                "snapshot"
            }
            (true, Cursor::At(_)) => {
                metrics.replays.inc();
                "replay"
            }
        };
        let resource = redact(&sub.topic.key.resource);
        info!(route = %metrics.route, topic = %resource, start = outcome, "stream opened");
        StreamLog {
            metrics,
            topic: sub.topic.clone(),
            slot: sub.slot.clone(),
            shutdown: shutdown.clone(),
            started: Instant::now(),
            bytes: 0,
            end: None,
        }
    }
}

impl StreamLog {
    /// The response body, wrapped so its bytes (after compression) are counted.
    pub fn wrap(self, body: ResponseBody) -> ResponseBody {
        Observed { body, log: self }.boxed_unsync()
    }

    fn reason(&self) -> &'static str {
        match (self.end, self.slot.stop_reason()) {
            (_, Some(StopReason::SlowConsumer)) => "slow-consumer",
            (_, Some(StopReason::Reconfigured)) => "route-reconfigured",
            // Access ended (auth): upstream 401/403, revoked by `reauth`, or token expired.
            (_, Some(StopReason::Unauthorized)) => "unauthorized",
            (_, Some(StopReason::Forbidden)) => "forbidden",
            (_, Some(StopReason::Expired)) => "token-expired",
            (Some("error"), _) => "error",
            (_, _) if self.shutdown.is_cancelled() => "shutdown",
            (Some(e), _) => e,
            (None, None) => "client-closed",
        }
    }
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        self.metrics.streams_open.dec();
        let reason = self.reason();
        if reason == "slow-consumer" {
            self.metrics.slow_consumers.inc();
        }
        info!(
            route = %self.metrics.route,
            topic = %redact(&self.topic.key.resource),
            duration = ?self.started.elapsed(),
            bytes = self.bytes,
            reason,
            "stream closed"
        );
    }
}

struct Observed {
    body: ResponseBody,
    log: StreamLog,
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.log.bytes += n;
                    this.log.metrics.stream_bytes.inc_by(n);
                }
            }
            Poll::Ready(Some(Err(_))) => this.log.end = Some("error"),
            Poll::Ready(None) => this.log.end = Some("ended"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client connection that learns its protocol from the first bytes it reads (the HTTP/2
/// preface starts `PRI `) and holds its `connections_open` gauge until dropped.
pub struct Tracked<S> {
    inner: S,
    metrics: Arc<Metrics>,
    tls: bool,
    /// The first bytes seen, until there are enough to tell the protocol.
    head: [u8; 3],
    seen: usize,
    gauge: Option<Gauge>,
}

impl Metrics {
    /// Wrap an accepted (and, for TLS, handshaken) connection (the one-line hook in `conn.rs`).
    pub fn track<S>(self: &Arc<Self>, inner: S, tls: bool) -> Tracked<S> {
        Tracked {
            inner,
            metrics: self.clone(),
            tls,
            head: [0; 3],
            seen: 0,
            gauge: None,
        }
    }
}

impl<S> Tracked<S> {
    fn classify(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.seen >= self.head.len() {
                break;
            }
            self.head[self.seen] = b;
            self.seen += 1;
        }
        if self.seen >= self.head.len() {
            let protocol = if &self.head == b"PRI" {
                Protocol::h2
            } else {
                Protocol::h1
            };
            self.gauge = Some(self.metrics.connection(protocol, self.tls));
        }
    }
}

impl<S> Drop for Tracked<S> {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.dec();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.gauge.is_none() {
            let new = buf.filled()[before..].to_vec();
            self.classify(&new);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("/a/b"), "/a/b");
        assert_eq!(
            redact("/a?page=2&access_token=abc&x_api_key=k"),
            "/a?page=2&access_token=***&x_api_key=***"
        );
    }

    #[test]
    fn redacts_encoded_names_like_plain_ones() {
        for (written, logged) in [
            ("/a?%74oken=abc", "/a?%74oken=***"),
            ("/a?%54OKEN=abc", "/a?%54OKEN=***"),
            ("/a?access%5Ftoken=abc", "/a?access%5Ftoken=***"),
            ("/a?access%5ftoken=abc", "/a?access%5ftoken=***"),
            ("/a?access+token=abc", "/a?access+token=***"),
            ("/a?access.token=abc", "/a?access.token=***"),
            ("/a?+token+=abc", "/a?+token+=***"),
            ("/a?x%2Dapi%2Dkey=k", "/a?x%2Dapi%2Dkey=***"),
            ("/a?%70assword", "/a?%70assword=***"),
        ] {
            assert_eq!(redact(written), logged, "{written}");
        }
        // Pairs that are not secrets are kept byte for byte, odd encodings included.
        assert_eq!(
            redact("/a?page=%32&q=a+b&%zz=1&tok=%zz&token=x&n%61me=v"),
            "/a?page=%32&q=a+b&%zz=1&tok=%zz&token=***&n%61me=v"
        );
    }
}
