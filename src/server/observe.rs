//! What herald observes about each stream and connection as it runs: one body wrapper per stream
//! that holds its admission permit, counts open streams and bytes after compression, and writes
//! one `info` line when the stream opens and one when it closes (route, topic, duration, bytes,
//! reason); and a connection wrapper that learns the protocol (h1/h2) from the first bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::info;

use super::admission::StreamPermit;
use super::BoxError;
use crate::hub::{Cursor, WatchSlot};
use crate::shutdown::Flag;
use crate::telemetry::{redact, Metrics, Protocol, RouteMetrics};

/// One open stream's bookkeeping; dropped with the response body, it closes the stream's books.
pub struct StreamLog {
    metrics: Arc<RouteMetrics>,
    /// What the stream watches, for the closing line (redacted then, so an idle stream holds no
    /// copy of its resource): a topic's resource, or the multiplexed stream's path.
    what: Arc<str>,
    slot: Arc<WatchSlot>,
    shutdown: Flag,
    started: Instant,
    bytes: u64,
    /// How the body ended: None while open or when the client went away first.
    end: Option<&'static str>,
}

/// How a stream started, for its opening line and the reconnect metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    New,
    /// Came with a `Last-Event-ID` whose gap was replayed.
    Replay,
    /// Came with a `Last-Event-ID` that could not be replayed: a snapshot instead.
    Snapshot,
}

impl Start {
    pub fn of(resumed: bool, cursor: Cursor) -> Start {
        match (resumed, cursor) {
            (false, _) => Start::New,
            (true, Cursor::Fresh) => Start::Snapshot,
            (true, Cursor::At(_)) => Start::Replay,
        }
    }
}

impl StreamLog {
    /// A stream was just opened: count it, tell how it started, and log it. `metrics` are the
    /// route's (or, for a multiplexed stream, its endpoint's).
    pub fn opened(
        metrics: Arc<RouteMetrics>,
        what: Arc<str>,
        slot: Arc<WatchSlot>,
        start: Start,
        shutdown: &Flag,
    ) -> StreamLog {
        metrics.streams_open.inc();
        metrics.streams_opened.inc();
        let start = match start {
            Start::New => "new",
            Start::Snapshot => {
                metrics.snapshots.inc();
                "snapshot"
            }
            Start::Replay => {
                metrics.replays.inc();
                "replay"
            }
        };
        info!(route = %metrics.route, topic = %redact(&what), start, "stream opened");
        StreamLog {
            metrics,
            what,
            slot,
            shutdown: shutdown.clone(),
            started: Instant::now(),
            bytes: 0,
            end: None,
        }
    }

    fn reason(&self) -> &'static str {
        match (self.end, self.slot.stop_reason()) {
            (_, Some(stop)) => stop.label(),
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
            topic = %redact(&self.what),
            duration = ?self.started.elapsed(),
            bytes = self.bytes,
            reason,
            "stream closed"
        );
    }
}

/// A stream's response body with everything that lives as long as it: its books and its place
/// in the admission counts. One wrapper, statically typed over the body it wraps.
pub struct Watched<B> {
    body: B,
    log: StreamLog,
    _permit: StreamPermit,
}

impl<B> Watched<B> {
    pub fn new(body: B, log: StreamLog, permit: StreamPermit) -> Watched<B> {
        Watched {
            body,
            log,
            _permit: permit,
        }
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.log.bytes += n;
                    this.log.metrics.stream_bytes.inc_by(n);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.log.end = Some("error");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.log.end = Some("ended");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
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

impl<S> Tracked<S> {
    /// Wrap an accepted (and, for TLS, handshaken) connection.
    pub fn new(inner: S, metrics: &Arc<Metrics>, tls: bool) -> Tracked<S> {
        Tracked {
            inner,
            metrics: metrics.clone(),
            tls,
            head: [0; 3],
            seen: 0,
            gauge: None,
        }
    }

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
