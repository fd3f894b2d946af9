//! A raw HTTP/1.1 upstream on 127.0.0.1:0: it records each request exactly as it arrived on the
//! wire (request line, header lines in order, body, and which TCP connection carried it) and
//! answers with bytes the test writes. For checks a parsing server would hide: dot segments a
//! URL library resolved, headers a client library added, which connection served whom.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One request as the upstream read it.
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// Which accepted TCP connection carried it (0, 1, …).
    pub conn: usize,
    /// The request line, e.g. `GET /legacy/x HTTP/1.1`.
    pub line: String,
    /// Header lines in wire order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    /// The request target (`/legacy/x?y`).
    pub fn target(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or("")
    }

    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Header names, lowercased, sorted.
    pub fn header_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        names.sort();
        names
    }
}

/// State the answer function keeps per TCP connection (e.g. who authenticated it).
#[derive(Debug, Default)]
pub struct ConnState {
    pub id: usize,
    pub user: Option<String>,
    /// Anything else a test wants to remember about the connection.
    pub note: Option<String>,
}

/// Builds the raw response bytes for a request; the connection stays open for more unless the
/// request or the response says `Connection: close`.
pub type Answer = Arc<dyn Fn(&RawRequest, &mut ConnState) -> Vec<u8> + Send + Sync>;

pub struct RawUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    stop: CancellationToken,
    join: JoinHandle<()>,
}

/// A complete response with a body and `Content-Length`.
pub fn response(status: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

impl RawUpstream {
    /// An upstream that answers every request 200 with its request line as the body.
    pub async fn echo() -> RawUpstream {
        RawUpstream::start(Arc::new(|req: &RawRequest, _: &mut ConnState| {
            response("200 OK", &[("Content-Type", "text/plain")], &req.line)
        }))
        .await
    }

    pub async fn start(answer: Answer) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let join = tokio::spawn(accept_loop(listener, answer, seen.clone(), stop.clone()));
        RawUpstream {
            addr,
            seen,
            stop,
            join,
        }
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("http://{}{prefix}", self.addr)
    }

    pub fn seen(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.join)
            .await
            .expect("raw upstream stops")
            .unwrap();
    }
}

async fn accept_loop(
    listener: TcpListener,
    answer: Answer,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    stop: CancellationToken,
) {
    let mut next_id = 0;
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
        };
        let state = ConnState {
            id: next_id,
            ..Default::default()
        };
        next_id += 1;
        let (answer, seen, stop) = (answer.clone(), seen.clone(), stop.clone());
        conns.spawn(async move {
            tokio::select! {
                _ = serve(stream, state, answer, seen) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    conns.close();
    conns.wait().await;
}

async fn serve(
    mut stream: TcpStream,
    mut state: ConnState,
    answer: Answer,
    seen: Arc<Mutex<Vec<RawRequest>>>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut stream, &mut buf, state.id).await else {
            return;
        };
        seen.lock().unwrap().push(req.clone());
        let resp = answer(&req, &mut state);
        if stream.write_all(&resp).await.is_err() {
            return;
        }
        let head = String::from_utf8_lossy(&resp[..resp.len().min(2048)]).to_ascii_lowercase();
        let asked = req
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        if asked || head.contains("\r\nconnection: close\r\n") {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Read one request (head, then a `Content-Length` body) from `stream`; `buf` keeps what was
/// read past it.
pub async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    conn: usize,
) -> Option<RawRequest> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..len).collect();
    Some(RawRequest {
        conn,
        line,
        headers,
        body,
    })
}
