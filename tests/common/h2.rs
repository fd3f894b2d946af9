//! HTTP/2 clients for tests: hyper's h2 client over any byte stream (h2c prior knowledge on plain
//! TCP, or TLS after ALPN chose h2), an SSE reader on an h2 response body, and curl when present.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{SseEvent, SseParser};

pub type H2Sender = SendRequest<Empty<Bytes>>;

/// Client windows. The stream window bounds what one unread stream can hold of the connection
/// window, which must be larger for a stalled stream not to starve the others.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    pub stream: u32,
    pub connection: u32,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            stream: 1024 * 1024,
            connection: 8 * 1024 * 1024,
        }
    }
}

/// An HTTP/2 connection on `io`; the returned task drives it until the connection ends.
pub async fn handshake<I>(io: I, windows: Windows) -> (H2Sender, JoinHandle<()>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .handshake(TokioIo::new(io))
        .await
        .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

/// h2c with prior knowledge: the client sends the HTTP/2 preface right away on plain TCP.
pub async fn h2c(addr: SocketAddr, windows: Windows) -> (H2Sender, JoinHandle<()>) {
    handshake(TcpStream::connect(addr).await.unwrap(), windows).await
}

/// GET `url` on the h2 connection, optionally asking for an event stream.
pub async fn get(sender: &mut H2Sender, url: &str, sse: bool) -> Response<Incoming> {
    let mut req = Request::get(url);
    if sse {
        req = req.header("accept", "text/event-stream");
    }
    sender.ready().await.expect("h2 connection ready");
    tokio::time::timeout(
        Duration::from_secs(5),
        sender.send_request(req.body(Empty::new()).unwrap()),
    )
    .await
    .expect("h2 response head within 5s")
    .expect("h2 request")
}

/// An SSE stream on an h2 response, parsed incrementally.
pub struct H2Sse {
    pub status: u16,
    pub headers: HeaderMap,
    pub version: http::Version,
    body: Incoming,
    parser: SseParser,
    queue: VecDeque<SseEvent>,
    /// Bytes of body received so far.
    pub received: usize,
}

impl H2Sse {
    pub async fn open(sender: &mut H2Sender, url: &str) -> H2Sse {
        let resp = get(sender, url, true).await;
        let (parts, body) = resp.into_parts();
        H2Sse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            version: parts.version,
            body,
            parser: SseParser::default(),
            queue: VecDeque::new(),
            received: 0,
        }
    }

    /// The next item (event, comment, bare retry), or None at end of stream or timeout.
    pub async fn next_any(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(data) = frame.into_data() {
                self.received += data.len();
                self.queue.extend(self.parser.feed(&data));
            }
        }
    }

    /// The next event with data (comments and bare retry lines skipped), or None.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_any(left).await?;
            if ev.comment.is_none() && !ev.data.is_empty() {
                return Some(ev);
            }
        }
    }

    pub async fn expect_event(&mut self, what: &str, timeout: Duration) -> SseEvent {
        match self.next_event(timeout).await {
            Some(ev) => ev,
            None => panic!("no event within {timeout:?}: expected {what}"),
        }
    }
}

/// Whether `curl` with HTTP/2 support is on PATH (prints why not, for the test log).
pub fn curl_with_http2() -> bool {
    match std::process::Command::new("curl").arg("--version").output() {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("HTTP2") => true,
        Ok(_) => {
            eprintln!("note: curl has no HTTP/2 support; skipping the curl check");
            false
        }
        Err(_) => {
            eprintln!("note: curl is not on PATH; skipping the curl check");
            false
        }
    }
}

/// Run curl with `args` (off the async workers) and return its stdout.
pub async fn curl(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl")
            .args(&args)
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}
