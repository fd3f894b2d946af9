//! The HTTP/1.1 stream fast path: a plain-TCP connection whose first request is an SSE stream
//! (or the refusal of one) is served here, straight on the socket, instead of through hyper.
//! hyper keeps a 16 KiB read buffer and an 8 KiB write buffer for as long as a connection lives;
//! an idle stream needs neither, so this path holds only the socket, the response body and a few
//! words of state. Anything else (HTTP/2, pass-through, herald's own endpoints, a request head
//! that did not arrive in one piece) is left untouched for hyper: the head is only *peeked* until
//! the router has decided, so nothing needs to be rewound.

use std::io::{self, IoSlice};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, Version};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{router, App, ConnInfo, ResponseBody};
use crate::admin::metrics::Protocol;

/// Largest request head taken on this path; a bigger one goes to hyper and its limits.
const MAX_HEAD: usize = 4096;
/// Headers parsed on this path; a request with more goes to hyper.
const MAX_HEADERS: usize = 48;
/// A connection that sends nothing for this long is closed (hyper's header timeout is the same).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// What became of a connection offered to the fast path.
pub(super) enum Outcome {
    /// Served here, to the end.
    Served,
    /// Not a stream: serve it with hyper (nothing was consumed).
    Hyper(TcpStream),
}

/// Serve `stream` here if its first request is a stream herald answers itself.
pub(super) async fn try_serve(stream: TcpStream, app: &App, info: &ConnInfo) -> Outcome {
    let first = tokio::select! {
        r = tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.readable()) => r,
        _ = info.kill.cancelled() => return Outcome::Served,
    };
    match first {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Outcome::Served,
        Err(_) => {
            debug!("no request within {FIRST_BYTE_TIMEOUT:?}; closing");
            return Outcome::Served;
        }
    }
    // On the heap and freed before the stream starts: a buffer in the future itself would be
    // held by every connection for its whole life.
    let mut buf = vec![0u8; MAX_HEAD];
    let n = match stream.peek(&mut buf).await {
        Ok(0) | Err(_) => return Outcome::Served,
        Ok(n) => n,
    };
    // The request lives only in this block: held across the stream, its header map would stay
    // allocated for as long as the stream (~640 B each, heaptrack). The router's future is boxed
    // for the same reason: inline, its largest state would size every connection's task.
    let decided = {
        match parse_head(&buf[..n]) {
            Some((head_len, req)) if !super::mux::owns(app, req.uri().path()) => {
                Box::pin(router::answer(app, &req, info))
                    .await
                    .map(|resp| (head_len, resp))
            }
            _ => None,
        }
    };
    let Some((head_len, resp)) = decided else {
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
    let open = app.metrics.connection(Protocol::h1, false);
    if let Err(e) = respond(&stream, resp, &info.kill).await {
        debug!(error = %e, "stream connection ended");
    }
    open.dec();
    Outcome::Served
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

/// Write `resp` on the socket: the head, then the body as HTTP/1.1 chunks, each written as soon
/// as it is produced. Ends when the body ends, the client goes away or herald closes the
/// connection (`kill`: drain deadline, slow consumer).
async fn respond(
    stream: &TcpStream,
    resp: Response<ResponseBody>,
    kill: &CancellationToken,
) -> io::Result<()> {
    let (parts, mut body) = resp.into_parts();
    let (head, chunked) = response_head(parts);
    write_all(stream, &mut [IoSlice::new(&head)]).await?;
    drop(head);

    // Made once, not per event: each of these registers interest (the socket's read readiness,
    // the token's waiter list) when first polled, and re-creating them for every event costs
    // more than writing the event.
    let gone = client_gone(stream);
    let killed = kill.cancelled();
    tokio::pin!(gone, killed);
    loop {
        let frame = tokio::select! {
            biased;
            f = body.frame() => f,
            r = &mut gone => return r,
            _ = &mut killed => return Ok(()),
        };
        let data: Bytes = match frame {
            None => break,
            // The body failed: end without the last chunk, so the client sees an incomplete
            // response rather than a clean end.
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) if !d.is_empty() => d,
                _ => continue,
            },
        };
        if chunked {
            let mut size = [0u8; 18];
            let size = chunk_size(&mut size, data.len());
            write_all(
                stream,
                &mut [
                    IoSlice::new(size),
                    IoSlice::new(&data),
                    IoSlice::new(b"\r\n"),
                ],
            )
            .await?;
        } else {
            write_all(stream, &mut [IoSlice::new(&data)]).await?;
        }
    }
    if chunked {
        write_all(stream, &mut [IoSlice::new(b"0\r\n\r\n")]).await?;
    }
    Ok(())
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

/// Write every slice, in order, waiting for the socket as needed (one syscall per event when the
/// socket has room).
async fn write_all(stream: &TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        // Write first and wait only when the socket is full: an idle stream's socket almost
        // always has room, so this is one syscall per event and no readiness bookkeeping.
        match stream.try_write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Resolves when the client closes its side (or the socket fails). Bytes it sends meanwhile
/// (a pipelined request we will not answer) are read and dropped.
async fn client_gone(stream: &TcpStream) -> io::Result<()> {
    let mut sink = [0u8; 64];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
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
