//! The HTTP/1.1 stream fast path: a plain-TCP connection whose first request is an SSE stream
//! (or the refusal of one) is served here, straight on the socket, instead of through hyper.
//! hyper keeps a 16 KiB read buffer and an 8 KiB write buffer for as long as a connection lives;
//! an idle stream needs neither, so this path holds only the socket, the response body and a few
//! words of state: once decided, the stream runs as its own small task (`StreamConn`, a
//! hand-written future of a few hundred bytes) and the connection task ends. Anything else (HTTP/2, pass-through, herald's own endpoints, a request head
//! that did not arrive in one piece) is left untouched for hyper: the head is only *peeked* until
//! the router has decided, so nothing needs to be rewound.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, Method, Request, Response, Version};
use http_body::Body;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::debug;

use super::idle::{Activity, Idle};
use super::record::Sealer;
use super::{router, ConnInfo, ResponseBody, Service};
use crate::telemetry::Protocol;

/// Largest request head taken on this path; a bigger one goes to hyper and its limits.
const MAX_HEAD: usize = 4096;
/// Headers parsed on this path; a request with more goes to hyper.
const MAX_HEADERS: usize = 48;

/// Frames written in one poll before the stream yields to the other tasks on its thread (a long
/// replay into a socket with room would otherwise hold the thread).
const FRAMES_PER_POLL: usize = 32;
/// Reads of unexpected client bytes in one poll before yielding (a client that keeps sending).
const READS_PER_POLL: usize = 8;

/// What became of a connection offered to the fast path.
pub(super) enum Outcome {
    /// Answered or closed here: nothing more to do.
    Served,
    /// A stream: the caller spawns it (holding whatever must live as long as the connection).
    Stream(StreamConn),
    /// Not a stream: serve it with hyper (nothing was consumed).
    Hyper(TcpStream),
}

/// Serve `stream` here if its first request is a stream herald answers itself.
/// A connection that sends nothing within `[server] header_timeout` of being accepted is closed
/// here; one that sent part of a head is left to hyper under the same deadline (`idle.rs`).
pub(super) async fn try_serve(
    stream: TcpStream,
    app: &Service,
    info: &ConnInfo,
    activity: &Activity,
) -> Outcome {
    let limit = app.connections.header_timeout;
    let due = activity.first_request_due(limit);
    let silent = |app: &Service| {
        debug!(timeout = ?limit, "no request in time; closing");
        app.metrics.reject(Idle::NoRequest.reason());
        Outcome::Served
    };
    // Readiness first, so a silent connection holds no buffer; but tokio may report a new socket
    // readable before any byte came, so the peek below is under the same deadline.
    let first = tokio::select! {
        r = tokio::time::timeout_at(due, stream.readable()) => r,
        _ = info.kill.cancelled() => return Outcome::Served,
    };
    match first {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Outcome::Served,
        Err(_) => return silent(app),
    }
    // On the heap and freed before the stream starts: a buffer in the future itself would be
    // held by every connection for its whole life.
    let mut buf = vec![0u8; MAX_HEAD];
    let peeked = tokio::select! {
        r = tokio::time::timeout_at(due, stream.peek(&mut buf)) => r,
        _ = info.kill.cancelled() => return Outcome::Served,
    };
    let n = match peeked {
        Ok(Ok(0)) | Ok(Err(_)) => return Outcome::Served,
        Ok(Ok(n)) => n,
        Err(_) => return silent(app),
    };
    let Some((head_len, resp)) = decide(&buf[..n], app, info).await else {
        return Outcome::Hyper(stream);
    };
    // Decided: take the head off the socket (it is all there: it was peeked whole).
    let mut taken = 0;
    while taken < head_len {
        match stream.try_read(&mut buf[taken..head_len]) {
            Ok(0) => return Outcome::Served,
            Ok(k) => taken += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stream.readable().await.is_err() {
                    return Outcome::Served;
                }
            }
            Err(_) => return Outcome::Served,
        }
    }
    drop(buf);
    let open = OpenConn(app.metrics.connection(Protocol::h1, false));
    Outcome::Stream(StreamConn::new(stream, resp, info.kill.clone(), open, None))
}

/// The response if `bytes` start with a stream request this path serves, and the head's length.
pub(super) async fn decide(
    bytes: &[u8],
    app: &Service,
    info: &ConnInfo,
) -> Option<(usize, Response<ResponseBody>)> {
    // The request lives only in this function: held across the stream, its header map would
    // stay allocated for as long as the stream (~640 B each, heaptrack). The router's future is
    // boxed for the same reason: inline, its largest state would size every connection's task.
    match parse_head(bytes) {
        Some((head_len, req)) if !app.mux.owns(req.uri().path()) => {
            Box::pin(router::answer(app, &req, info))
                .await
                .map(|resp| (head_len, resp))
        }
        _ => None,
    }
}

/// A complete, body-less HTTP/1.1 GET head in `bytes`: its length and the request it makes.
/// Anything unusual (other methods, HTTP/1.0, a body, absolute-form targets, a head not yet
/// complete) is `None`, for hyper to handle with all its rules.
fn parse_head(bytes: &[u8]) -> Option<(usize, Request<()>)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let path = parsed.path.filter(|p| p.starts_with('/'))?;
    let mut builder = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11);
    for h in parsed.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") && h.value != b"0"
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return None;
        }
        builder = builder.header(name, h.value);
    }
    let req = builder.body(()).ok()?;
    // Only stream requests are worth taking: everything else is hyper's.
    router::accepts_event_stream(req.headers()).then_some((len, req))
}

/// The `connections_open` gauge of a fast-path connection, held until it closes.
pub(super) struct OpenConn(pub(super) Gauge);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One stream on its socket: writes the response head, then the body as HTTP/1.1 chunks, each as
/// soon as it is produced, with one vectored write per frame. Ends when the body ends, the client
/// goes away, or herald closes the connection (`kill`: drain deadline, slow consumer).
///
/// Hand-written rather than an `async fn`: a future is as large as its largest state, and the
/// async version (select over the body, the client's EOF and the kill token, plus a write future)
/// came to ~1.7 KiB per idle stream; this is a few hundred bytes.
pub(super) struct StreamConn {
    stream: TcpStream,
    body: ResponseBody,
    chunked: bool,
    /// What is left to write of the current frame.
    out: Pending,
    /// The body has ended: once `out` is written, the stream is done.
    finished: bool,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Over TLS: each frame goes out as TLS records sealed here (`record.rs`).
    seal: Option<Box<Sealer>>,
    _open: OpenConn,
    /// Whatever must live as long as the connection (its drain watcher and its place in the
    /// connection budget).
    held: Option<Box<dyn Send>>,
}

impl StreamConn {
    pub(super) fn new(
        stream: TcpStream,
        resp: Response<ResponseBody>,
        kill: CancellationToken,
        open: OpenConn,
        seal: Option<Box<Sealer>>,
    ) -> Self {
        let (parts, body) = resp.into_parts();
        let (head, chunked) = response_head(parts);
        let mut conn = StreamConn {
            stream,
            body,
            chunked,
            out: Pending::whole(Bytes::new()),
            finished: false,
            killed: Box::pin(kill.cancelled_owned()),
            seal,
            _open: open,
            held: None,
        };
        // A head that cannot be sealed (never, with a fresh key) leaves nothing to write: the
        // stream ends at its first poll.
        if let Some(head) = conn.frame(Pending::whole(Bytes::from(head))) {
            conn.out = head;
        } else {
            conn.finished = true;
        }
        conn
    }

    /// `p` as it goes on the wire: as it is, or sealed into TLS records (`None`: the key is used
    /// up, the stream must end).
    fn frame(&mut self, p: Pending) -> Option<Pending> {
        match self.seal.as_mut() {
            None => Some(p),
            Some(seal) => seal.seal(&p.parts()).map(Pending::whole),
        }
    }

    /// Keep `held` alive until the stream ends.
    pub(super) fn holding(mut self, held: impl Send + 'static) -> Self {
        self.held = Some(Box::new(held));
        self
    }

    /// Ready when the client has closed its side (or the socket failed). Bytes it sends
    /// meanwhile (a pipelined request that will not be answered) are read and dropped.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut sink = [0u8; 64];
        for _ in 0..READS_PER_POLL {
            match self.stream.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => match self.stream.try_read(&mut sink) {
                    Ok(0) => return Poll::Ready(()),
                    // Read (and dropped) or readiness cleared: look again.
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Poll::Ready(()),
                },
            }
        }
        // Still sending: come back after the other tasks had their turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Write what is left of the current frame; ready when all of it is written.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]), IoSlice::new(&[]), IoSlice::new(&[])];
            let n = self.out.slices(&mut slices);
            // Write first and wait only when the socket is full: an idle stream's socket almost
            // always has room, so this is one syscall per frame.
            match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(k) => self.out.advance(k),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.stream.poll_write_ready(cx))?
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // Written: let go of the frame now rather than at the next one. Over TLS it is this
        // stream's own sealed copy (~350 B per idle stream, heaptrack), not the shared event.
        if !self.out.data.is_empty() {
            self.out = Pending::whole(Bytes::new());
        }
        Poll::Ready(Ok(()))
    }
}

impl Future for StreamConn {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.killed.as_mut().poll(cx).is_ready() || this.poll_gone(cx).is_ready() {
            return Poll::Ready(());
        }
        for _ in 0..FRAMES_PER_POLL {
            match this.poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "stream connection ended");
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(())) => {}
            }
            if this.finished {
                return Poll::Ready(());
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.finished = true;
                    let last = Pending::whole(Bytes::from_static(if this.chunked {
                        b"0\r\n\r\n"
                    } else {
                        b""
                    }));
                    // Over TLS the last frame carries a close_notify after it.
                    let last = match this.seal.as_mut() {
                        None => Some(last),
                        Some(seal) => seal.seal_last(&last.parts()).map(Pending::whole),
                    };
                    match last {
                        Some(last) => this.out = last,
                        None => return Poll::Ready(()),
                    }
                }
                // The body failed: end without the last chunk, so the client sees an incomplete
                // response rather than a clean end.
                Poll::Ready(Some(Err(e))) => {
                    debug!(error = %e, "stream body failed");
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) if !d.is_empty() => {
                        let p = if this.chunked {
                            Pending::chunk(d)
                        } else {
                            Pending::whole(d)
                        };
                        match this.frame(p) {
                            Some(p) => this.out = p,
                            None => {
                                debug!("TLS send key used up; ending the stream");
                                return Poll::Ready(());
                            }
                        }
                    }
                    _ => {}
                },
            }
        }
        // Many frames in a row (a replay): let the other tasks on this thread run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The unwritten rest of one frame: an optional chunk-size line, the data, an optional CRLF,
/// written together with one vectored write.
struct Pending {
    size: [u8; 18],
    size_len: u8,
    data: Bytes,
    crlf: bool,
    /// Bytes of the whole already written.
    done: usize,
}

impl Pending {
    fn whole(data: Bytes) -> Self {
        Pending {
            size: [0; 18],
            size_len: 0,
            data,
            crlf: false,
            done: 0,
        }
    }

    fn chunk(data: Bytes) -> Self {
        let mut p = Pending::whole(data);
        p.size_len = chunk_size(&mut p.size, p.data.len()).len() as u8;
        p.crlf = true;
        p
    }

    fn len(&self) -> usize {
        self.size_len as usize + self.data.len() + if self.crlf { 2 } else { 0 }
    }

    fn is_empty(&self) -> bool {
        self.done >= self.len()
    }

    fn advance(&mut self, n: usize) {
        self.done = (self.done + n).min(self.len());
    }

    /// The whole frame's three parts (size line, data, CRLF), some empty.
    fn parts(&self) -> [&[u8]; 3] {
        let crlf: &'static [u8] = if self.crlf { b"\r\n" } else { b"" };
        [&self.size[..self.size_len as usize], &self.data, crlf]
    }

    /// The unwritten parts as slices, in order; returns how many.
    fn slices<'a>(&'a self, out: &mut [IoSlice<'a>; 3]) -> usize {
        let parts = self.parts();
        let mut skip = self.done;
        let mut n = 0;
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            out[n] = IoSlice::new(&part[skip..]);
            skip = 0;
            n += 1;
        }
        n
    }
}

/// The status line and headers of `parts` as HTTP/1.1 bytes, and whether the body is chunked.
/// Takes `parts` by value so the header map is freed once the head is written, not held by the
/// stream's future for its whole life.
fn response_head(parts: http::response::Parts) -> (Vec<u8>, bool) {
    let chunked = !parts.headers.contains_key(header::CONTENT_LENGTH);
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n");
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    // The stream is this connection's last response: say so, so no client queues another.
    head.extend_from_slice(b"connection: close\r\n\r\n");
    (head, chunked)
}

/// `<hex length>\r\n` in `buf`.
fn chunk_size(buf: &mut [u8; 18], len: usize) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    let count = digits.len() - i;
    buf[..count].copy_from_slice(&digits[i..]);
    buf[count] = b'\r';
    buf[count + 1] = b'\n';
    &buf[..count + 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size(&mut b, 0), b"0\r\n");
        assert_eq!(chunk_size(&mut b, 255), b"ff\r\n");
        assert_eq!(chunk_size(&mut b, 4096), b"1000\r\n");
        assert_eq!(chunk_size(&mut b, usize::MAX), b"ffffffffffffffff\r\n");
    }

    /// An idle stream's task is this future, most of what a stream costs (BENCHMARKS.md): keep
    /// it from growing back into an async fn's worth of states.
    #[test]
    fn a_stream_task_stays_small() {
        let size = std::mem::size_of::<StreamConn>();
        eprintln!("StreamConn: {size} bytes");
        assert!(size <= 256, "StreamConn is {size} bytes");
    }

    /// Whatever a partial write took, the slices left are exactly the rest of the frame.
    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let whole = b"5\r\nhello\r\n";
        for step in 1..=whole.len() {
            let mut p = Pending::chunk(Bytes::from_static(b"hello"));
            assert_eq!(p.len(), whole.len());
            let mut done = 0;
            while !p.is_empty() {
                let mut slices = [IoSlice::new(&[]), IoSlice::new(&[]), IoSlice::new(&[])];
                let n = p.slices(&mut slices);
                let rest: Vec<u8> = slices[..n].iter().flat_map(|s| s.to_vec()).collect();
                assert_eq!(rest, &whole[done..], "step {step}, done {done}");
                p.advance(step);
                done = (done + step).min(whole.len());
            }
        }
        let p = Pending::whole(Bytes::from_static(b"head"));
        let mut slices = [IoSlice::new(&[]), IoSlice::new(&[]), IoSlice::new(&[])];
        assert_eq!(p.slices(&mut slices), 1);
        assert_eq!(&*slices[0], b"head");
    }

    #[test]
    fn only_plain_stream_gets_are_taken() {
        let ok = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream\r\n\r\n";
        let (len, req) = parse_head(ok).unwrap();
        assert_eq!(len, ok.len());
        assert_eq!(req.uri().path(), "/a");
        assert_eq!(req.uri().query(), Some("x=1"));
        for other in [
            &b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"POST /a HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            b"GET /a HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n",
            b"GET /a HTTP/1.1\r\nAccept: text/event-stream\r\n",
            b"GET /a HTTP/1.1\r\nAccept: text/event-stream\r\nContent-Length: 5\r\n\r\nhello",
            b"GET http://x/a HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /a HTTP/1.1\r\nAccept: text/event-stream\r\nUpgrade: websocket\r\n\r\n",
        ] {
            assert!(
                parse_head(other).is_none(),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
