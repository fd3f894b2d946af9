//! The stream fast path over TLS: after a handshake that chose HTTP/1.1 (or nothing), the first
//! request is read; if it is a stream herald answers itself, it runs on the bare socket with the
//! send key (`record.rs`) like a plaintext one. Anything else goes to hyper, with the bytes
//! already read put back in front.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tracing::debug;

use super::fast::{self, OpenConn, StreamConn};
use super::handover::Established;
use super::idle::{Activity, Idle};
use super::tls_stream::TlsStream;
use super::{ConnInfo, Service};
use crate::telemetry::Protocol;

/// Largest request head taken on this path (as on the plaintext one).
const MAX_HEAD: usize = 4096;

/// What became of a TLS connection offered to the fast path.
pub(super) enum Outcome {
    /// Answered or closed here.
    Served,
    /// A stream on the bare socket: the caller spawns it.
    Stream(StreamConn),
    /// For hyper, with what was read so far put back.
    Hyper(Box<Rewind<TlsStream>>),
}

/// Serve `tls` here if it is HTTP/1.1 (or no ALPN) and its first request is a stream herald
/// answers itself.
pub(super) async fn try_serve(
    established: Established,
    app: &Service,
    info: &ConnInfo,
    activity: &Activity,
) -> Outcome {
    let mut tls = established.stream;
    if !matches!(established.alpn.as_deref(), None | Some(b"http/1.1")) {
        return Outcome::Hyper(Box::new(Rewind::plain(tls)));
    }
    let limit = app.connections.header_timeout;
    let due = activity.first_request_due(limit);
    // Read until the head is complete (or cannot be one this path takes); on the heap and freed
    // before the stream starts.
    let mut buf = Vec::with_capacity(MAX_HEAD);
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout_at(due, tls.read_buf(&mut buf)) => r,
            _ = info.kill.cancelled() => return Outcome::Served,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return Outcome::Served,
            Ok(Ok(_)) => {}
            Err(_) if buf.is_empty() => {
                debug!(timeout = ?limit, "no request in time; closing");
                app.metrics.reject(Idle::NoRequest.reason());
                return Outcome::Served;
            }
            // Part of a head: hyper applies its own rules (and the same deadline, `idle.rs`).
            Err(_) => return Outcome::Hyper(Box::new(Rewind::new(tls, buf.into()))),
        }
        let mut headers = [httparse::EMPTY_HEADER; 48];
        match httparse::Request::new(&mut headers).parse(&buf) {
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(_) => break,
            // Not a head this path reads (too many headers, not HTTP): hyper's to answer.
            Err(_) => return Outcome::Hyper(Box::new(Rewind::new(tls, buf.into()))),
        }
    }
    let Some((_, resp)) = fast::decide(&buf, app, info).await else {
        return Outcome::Hyper(Box::new(Rewind::new(tls, buf.into())));
    };
    drop(buf);
    // Nothing was written yet, so the send half is free to go.
    let Some((tcp, sealer)) = tls.into_send_half() else {
        return Outcome::Served;
    };
    let open = OpenConn(app.metrics.connection(Protocol::h1, true));
    Outcome::Stream(StreamConn::new(
        tcp,
        resp,
        info.kill.clone(),
        open,
        Some(sealer),
    ))
}

/// An I/O stream with bytes already read from it put back in front.
pub(super) struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(inner: T, pre: Bytes) -> Self {
        Rewind { pre, inner }
    }

    /// Nothing put back.
    pub(super) fn plain(inner: T) -> Self {
        Rewind::new(inner, Bytes::new())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            if self.pre.is_empty() {
                // Give the memory back.
                self.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
