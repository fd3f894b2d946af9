//! Shared test harness: a scriptable upstream HTTP server, herald started on 127.0.0.1:0, and an
//! SSE client that parses the stream as a browser would (WHATWG rules). Every server a test starts
//! is stopped and awaited through `Drop`-free explicit `stop()` calls, so a hang fails the test.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod admin;
pub mod browser;
pub mod h2;
pub mod raw;
pub mod tls;

/// How the test upstream answers one path.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub content_type: Option<&'static str>,
    pub delay: Duration,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(v: serde_json::Value) -> Reply {
        Reply {
            status: 200,
            body: Bytes::from(v.to_string()),
            content_type: Some("application/json"),
            delay: Duration::ZERO,
            headers: vec![],
        }
    }
    pub fn status(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: Bytes::from(body.to_string()),
            content_type: Some("application/json"),
            delay: Duration::ZERO,
            headers: vec![],
        }
    }
    pub fn raw(content_type: Option<&'static str>, body: &[u8]) -> Reply {
        Reply {
            status: 200,
            body: Bytes::copy_from_slice(body),
            content_type,
            delay: Duration::ZERO,
            headers: vec![],
        }
    }
    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
    pub fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }
}

/// A request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// HTTP/1.1, or HTTP/2 when herald reached a TLS upstream by ALPN.
    pub version: http::Version,
}

#[derive(Default)]
struct UpstreamState {
    replies: HashMap<String, Reply>,
    /// Per-user answers: (path, credential) → reply; see `TestUpstream::set_for`.
    by_credential: HashMap<(String, String), Reply>,
    seen: Vec<Seen>,
}

/// The credential a request presents, as `set_for` keys it: its `Authorization` header, else
/// its `Cookie` header, else "".
pub fn credential_of(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .or_else(|| headers.get("cookie"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A real HTTP/1.1 upstream on 127.0.0.1:0 whose answers the test sets per path.
/// Unknown paths echo the request as JSON (method, path, headers, body) with status 200, or the
/// status given by an `x-echo-status` request header.
pub struct TestUpstream {
    pub addr: SocketAddr,
    /// "http", or "https" for one started with `start_tls` (tls.rs).
    scheme: &'static str,
    state: Arc<Mutex<UpstreamState>>,
    stop: CancellationToken,
    join: JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener).await
    }

    pub async fn start_on(listener: TcpListener) -> TestUpstream {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(UpstreamState::default()));
        let stop = CancellationToken::new();
        let join = tokio::spawn(accept_loop(listener, state.clone(), stop.clone()));
        TestUpstream {
            addr,
            scheme: "http",
            state,
            stop,
            join,
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn set(&self, path: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .replies
            .insert(path.to_string(), reply);
    }

    /// Answer `path` with `reply` for requests presenting `credential` (their `Authorization`
    /// header, else their `Cookie` header; see `credential_of`). Once a path has such answers,
    /// requests with any other credential (or none) get 401.
    pub fn set_for(&self, path: &str, credential: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .by_credential
            .insert((path.to_string(), credential.to_string()), reply);
    }

    /// Requests seen for `path` (exact path and query) presenting `credential`.
    pub fn hits_by(&self, path_and_query: &str, credential: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| {
                s.path_and_query == path_and_query && credential_of(&s.headers) == credential
            })
            .count()
    }

    pub fn set_json(&self, path: &str, v: serde_json::Value) {
        self.set(path, Reply::json(v));
    }

    /// Requests seen for exactly this path-and-query (any method).
    pub fn hits(&self, path_and_query: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.path_and_query == path_and_query)
            .count()
    }

    pub fn total_hits(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.join)
            .await
            .expect("upstream stops")
            .unwrap();
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<UpstreamState>>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn handle(
    state: Arc<Mutex<UpstreamState>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let reply = {
        let mut st = state.lock().unwrap();
        st.seen.push(Seen {
            method: parts.method.to_string(),
            path_and_query: pq.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
            version: parts.version,
        });
        let path = parts.uri.path().to_string();
        if st.by_credential.keys().any(|(p, _)| *p == path) {
            // A per-user path: known credentials get their own answer, anyone else a 401.
            let cred = credential_of(&parts.headers);
            Some(
                st.by_credential
                    .get(&(path, cred))
                    .cloned()
                    .unwrap_or_else(|| Reply::status(401, r#"{"error":"unauthorized"}"#)),
            )
        } else {
            st.replies
                .get(&pq)
                .or_else(|| st.replies.get(parts.uri.path()))
                .cloned()
        }
    };
    let reply = match reply {
        Some(r) => r,
        None => {
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        serde_json::Value::String(v.to_str().unwrap_or("").to_string()),
                    )
                })
                .collect();
            let status = parts
                .headers
                .get("x-echo-status")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(200);
            let mut r = Reply::json(serde_json::json!({
                "method": parts.method.as_str(),
                "path": pq,
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            }));
            r.status = status;
            r
        }
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    // Conditional GET: a matching ETag gets 304.
    let etag = reply
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("etag"))
        .map(|(_, v)| v.clone());
    let inm = parts
        .headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok());
    let mut resp = if etag.is_some() && inm == etag.as_deref() {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(reply.body.clone()));
        *r.status_mut() = StatusCode::from_u16(reply.status).unwrap();
        if let Some(ct) = reply.content_type {
            r.headers_mut().insert("content-type", ct.parse().unwrap());
        }
        r
    };
    for (k, v) in &reply.headers {
        resp.headers_mut().insert(*k, v.parse().unwrap());
    }
    Ok(resp)
}

/// A herald instance serving on 127.0.0.1:0.
pub struct TestHerald {
    pub addr: SocketAddr,
    pub hub: herald::hub::Hub,
    pub shutdown: CancellationToken,
    pub join: JoinHandle<herald::Result<()>>,
    /// The `[tls]` acceptor when configured (tests reload it directly; see tls.rs).
    pub tls: Option<herald::server::tls::Acceptor>,
}

impl TestHerald {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stop (drain) and wait; panics if herald does not stop within 15 s.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.join)
            .await
            .expect("herald stops within 15s")
            .unwrap()
            .unwrap();
    }
}

/// A config for `upstream` with the given extra TOML (routes, sections).
pub fn config(upstream: &str, extra: &str) -> herald::Config {
    let text = format!("listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}");
    herald::config::parse(&text, "test.toml").unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

pub async fn start_herald(config: herald::Config) -> TestHerald {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_herald_on(config, listener).await
}

pub async fn start_herald_on(config: herald::Config, listener: TcpListener) -> TestHerald {
    let addr = listener.local_addr().unwrap();
    let herald = herald::Herald::new(config).unwrap();
    let hub = herald.hub().clone();
    let tls = herald.tls().cloned();
    let shutdown = CancellationToken::new();
    let join = tokio::spawn(herald.serve(listener, shutdown.clone()));
    TestHerald {
        addr,
        hub,
        shutdown,
        join,
        tls,
    }
}

/// One parsed SSE event (or comment, when `comment` is set).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
    pub retry: Option<u64>,
    pub comment: Option<String>,
}

impl SseEvent {
    /// The JSON envelope in `data`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

/// Incremental SSE parser (WHATWG HTML §9.2.6), fed with arbitrary chunks.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    cur: SseEvent,
    has_data: bool,
    /// `buf[..scanned]` holds no line break: a long line arriving in small chunks is scanned once.
    scanned: usize,
    pub last_event_id: Option<String>,
}

impl SseParser {
    /// Feed bytes; returns complete events and comments in order. A `retry:` line alone is
    /// reported as an event with only `retry` set.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf[self.scanned..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .map(|p| p + self.scanned)
        {
            // A CR at the very end may be the first half of CRLF: wait for more.
            if self.buf[pos] == b'\r' && pos + 1 == self.buf.len() {
                self.scanned = pos;
                break;
            }
            self.scanned = 0;
            let line = String::from_utf8(self.buf[..pos].to_vec()).expect("SSE is UTF-8");
            let skip = if self.buf[pos] == b'\r' && self.buf.get(pos + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            self.buf.drain(..pos + skip);
            if line.is_empty() {
                if self.has_data {
                    let mut ev = std::mem::take(&mut self.cur);
                    if ev.event.is_empty() {
                        ev.event = "message".into();
                    }
                    if ev.data.ends_with('\n') {
                        ev.data.pop();
                    }
                    ev.id = self.last_event_id.clone();
                    out.push(ev);
                } else if self.cur.retry.is_some() {
                    out.push(std::mem::take(&mut self.cur));
                } else {
                    self.cur = SseEvent::default();
                }
                self.has_data = false;
                continue;
            }
            if let Some(c) = line.strip_prefix(':') {
                out.push(SseEvent {
                    comment: Some(c.trim_start().to_string()),
                    ..Default::default()
                });
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => self.cur.event = value,
                "data" => {
                    self.cur.data.push_str(&value);
                    self.cur.data.push('\n');
                    self.has_data = true;
                }
                "id" if !value.contains('\0') => self.last_event_id = Some(value),
                "retry" => self.cur.retry = value.parse().ok(),
                _ => {}
            }
        }
        // No line break is left in `buf` (a trailing CR already set `scanned` to itself).
        if self.buf.last() != Some(&b'\r') {
            self.scanned = self.buf.len();
        }
        out
    }
}

/// An open SSE stream over a real HTTP connection (reqwest), parsed incrementally.
pub struct SseClient {
    pub status: u16,
    pub headers: HeaderMap,
    pub resp: reqwest::Response,
    parser: SseParser,
    queue: std::collections::VecDeque<SseEvent>,
    /// Every body byte as it came off the wire (before any content decoding).
    pub raw: Vec<u8>,
    /// Set when the response is `Content-Encoding: gzip`: decodes each chunk as it arrives.
    pub gzip: Option<GzipInflater>,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> SseClient {
        Self::connect_with(&reqwest::Client::new(), url, last_event_id, &[]).await
    }

    pub async fn connect_with(
        client: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
        headers: &[(&str, &str)],
    ) -> SseClient {
        let mut req = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("connect to herald");
        let gzip = resp
            .headers()
            .get("content-encoding")
            .is_some_and(|v| v == "gzip")
            .then(GzipInflater::default);
        SseClient {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            resp,
            parser: SseParser::default(),
            queue: Default::default(),
            raw: Vec::new(),
            gzip,
        }
    }

    /// The next item (event, comment or bare retry), or None on end of stream / timeout.
    pub async fn next_any(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?
                .ok()??;
            self.feed(&chunk);
        }
    }

    /// The next real event (skipping comments and bare retry lines).
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_any(left).await?;
            if ev.comment.is_none() && !ev.data.is_empty()
                || (ev.comment.is_none() && !ev.event.is_empty())
            {
                return Some(ev);
            }
        }
    }

    /// Like `next_event`, but panics with `what` if nothing arrives in time.
    pub async fn expect_event(&mut self, what: &str, timeout: Duration) -> SseEvent {
        match self.next_event(timeout).await {
            Some(ev) => ev,
            None => panic!("no event within {timeout:?}: expected {what}"),
        }
    }

    pub fn last_event_id(&self) -> Option<String> {
        self.parser.last_event_id.clone()
    }
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Apply an event to a client-side state the way a browser would (snapshot replaces; patch applies).
pub fn apply_event(state: &mut Option<serde_json::Value>, ev: &SseEvent) {
    let env = ev.json();
    match ev.event.as_str() {
        "snapshot" => *state = Some(env["data"].clone()),
        "patch" => {
            let doc = state.as_mut().expect("a patch needs a snapshot first");
            if env["data"].is_array() {
                // From text, as a browser reads it: with serde_json's `arbitrary_precision`,
                // `from_value` hands integers past 64 bits to serde as u128, which the
                // tagged-enum buffering in `json_patch` refuses.
                let patch: json_patch::Patch =
                    serde_json::from_str(&env["data"].to_string()).expect("RFC 6902 patch");
                json_patch::patch(doc, &patch).expect("patch applies");
            } else {
                json_patch::merge(doc, &env["data"]);
            }
        }
        _ => {}
    }
}

/// Send raw bytes on a fresh TCP connection and read the response head and whatever body arrives
/// within `wait` (for requests a URL library would normalize or refuse to send).
pub async fn raw_request(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// What `SseClient::next_item` found: an item, a clean end of stream, a broken stream, or nothing
/// in time. Tests that check how a stream *ends* need these told apart (`next_any` cannot).
#[derive(Debug)]
pub enum Next {
    Item(SseEvent),
    End,
    Broken(String),
    Timeout,
}

impl SseClient {
    /// The next item (event, comment or bare retry), or how the stream ended.
    pub async fn next_item(&mut self, timeout: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Next::Item(ev);
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return Next::Timeout,
                Ok(Err(e)) => return Next::Broken(e.to_string()),
                Ok(Ok(None)) => return Next::End,
                Ok(Ok(Some(chunk))) => self.feed(&chunk),
            }
        }
    }

    /// Every item until a clean end of stream; panics if the stream breaks or does not end in time.
    pub async fn read_to_end(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut items = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_item(left).await {
                Next::Item(ev) => items.push(ev),
                Next::End => return items,
                Next::Broken(e) => panic!("stream broke instead of ending ({e}) after {items:?}"),
                Next::Timeout => panic!("stream did not end within {timeout:?}; got {items:?}"),
            }
        }
    }
}

/// A 127.0.0.1 address with nothing listening on it (bound, then released), for an upstream
/// that is down; bind it again later to bring the upstream up.
pub async fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

impl SseClient {
    /// Record a body chunk, decode it if the stream is gzip, and parse what it yields.
    fn feed(&mut self, chunk: &[u8]) {
        self.raw.extend_from_slice(chunk);
        let events = match self.gzip.as_mut() {
            Some(g) => {
                let text = g.feed(chunk);
                self.parser.feed(&text)
            }
            None => self.parser.feed(chunk),
        };
        self.queue.extend(events);
    }
}

/// Incremental gzip decoding as a browser does it: the 10-byte header, then raw deflate decoded
/// with sync flushes, so every complete block yields its text the moment its bytes arrive.
/// The trailer is left to whole-stream checks (`flate2::read::GzDecoder`).
pub struct GzipInflater {
    header: Vec<u8>,
    inflate: flate2::Decompress,
    ended: bool,
    /// Everything decoded so far.
    pub text: Vec<u8>,
}

impl Default for GzipInflater {
    fn default() -> Self {
        GzipInflater {
            header: Vec::new(),
            inflate: flate2::Decompress::new(false),
            ended: false,
            text: Vec::new(),
        }
    }
}

impl GzipInflater {
    /// Feed compressed bytes; returns the text they complete.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Vec<u8> {
        if self.header.len() < 10 {
            let take = (10 - self.header.len()).min(chunk.len());
            self.header.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.header.len() == 10 {
                assert_eq!(
                    &self.header[..4],
                    &[0x1f, 0x8b, 8, 0],
                    "gzip header without flags"
                );
            }
        }
        let mut out = Vec::with_capacity(chunk.len() * 8 + 1024);
        while !chunk.is_empty() && !self.ended {
            if out.capacity() - out.len() < 1024 {
                out.reserve(64 * 1024);
            }
            let (before, produced) = (self.inflate.total_in(), out.len());
            let status = self
                .inflate
                .decompress_vec(chunk, &mut out, flate2::FlushDecompress::Sync)
                .expect("valid deflate data");
            let used = (self.inflate.total_in() - before) as usize;
            chunk = &chunk[used..];
            self.ended = status == flate2::Status::StreamEnd;
            if used == 0 && out.len() == produced && out.capacity() > out.len() {
                break; // nothing more to do with this input
            }
        }
        self.text.extend_from_slice(&out);
        out
    }
}
