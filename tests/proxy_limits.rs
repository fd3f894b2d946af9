//! A pass-through exchange is bounded. `[proxy] timeout` covers the whole of it, head and body,
//! and a client that takes no bytes for `[proxy] send_timeout` is cut off. In both cases the
//! upstream connection is closed, so slow or stalled readers cannot pin upstream responses.
//! The upstream here writes a real 100 MB body as fast as the connection allows and records
//! when its connection was closed under it.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

const BODY: usize = 100 * 1024 * 1024;

/// An upstream whose `/big` is a 100 MB body written flat out, `/trickle` a body of one byte
/// every 50 ms, anything else a short body. It records when each big or trickled response was
/// cut off by its reader (a write failed).
struct BigUpstream {
    addr: SocketAddr,
    /// (path, when the write failed).
    closed: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: CancellationToken,
}

impl BigUpstream {
    async fn start() -> BigUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (c, s) = (closed.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap().0,
                };
                let (c, s) = (c.clone(), s.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(stream, c) => {}
                        _ = s.cancelled() => {}
                    }
                });
            }
        });
        BigUpstream { addr, closed, stop }
    }

    fn closed(&self, path: &str) -> usize {
        self.closed
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .count()
    }
}

async fn serve(mut stream: TcpStream, closed: Arc<Mutex<Vec<(String, Instant)>>>) {
    let mut buf = Vec::new();
    while let Some(req) = common::raw::read_request(&mut stream, &mut buf, 0).await {
        let path = req.target().to_string();
        let ok = match path.as_str() {
            "/big" => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {BODY}\r\n\r\n");
                let chunk = vec![b'x'; 64 * 1024];
                let mut ok = stream.write_all(head.as_bytes()).await.is_ok();
                let mut sent = 0;
                while ok && sent < BODY {
                    ok = stream.write_all(&chunk).await.is_ok();
                    sent += chunk.len();
                }
                ok
            }
            "/trickle" => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n";
                let mut ok = stream.write_all(head.as_bytes()).await.is_ok();
                while ok {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    ok = stream.write_all(b"x").await.is_ok();
                }
                ok
            }
            _ => stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")
                .await
                .is_ok(),
        };
        if !ok {
            closed.lock().unwrap().push((path, Instant::now()));
            return;
        }
    }
}

/// A client socket with a small receive buffer that sends `GET path` and never reads.
async fn stalled_client(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: herald.test\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn clients_that_stop_reading_release_the_upstream_within_send_timeout() {
    let up = BigUpstream::start().await;
    let cfg = "[proxy]\ntimeout = \"60s\"\nsend_timeout = \"1s\"\n";
    let h = start_herald(config(&format!("http://{}", up.addr), cfg)).await;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(stalled_client(h.addr, "/big").await);
    }
    // Buffers along the way fill within a moment; then nothing is taken for 1s.
    let released = eventually(Duration::from_secs(10), || up.closed("/big") == 8).await;
    assert!(
        released,
        "{} of 8 upstream responses released after {:?} (send_timeout 1s, timeout 60s)",
        up.closed("/big"),
        started.elapsed()
    );
    // Each client's connection was closed too: reading drains what was buffered, then ends.
    for mut c in clients {
        let mut sink = vec![0u8; 1 << 16];
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match c.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "herald kept a stalled client's connection open"
        );
    }
    h.stop().await;
    up.stop.cancel();
}

#[tokio::test]
async fn timeout_bounds_the_whole_exchange_body_included() {
    let up = BigUpstream::start().await;
    let cfg = "[proxy]\ntimeout = \"1s\"\n";
    let h = start_herald(config(&format!("http://{}", up.addr), cfg)).await;
    let started = Instant::now();
    let mut resp = reqwest::get(h.url("/trickle")).await.unwrap();
    assert_eq!(resp.status(), 200, "the head came in time");
    let mut got = 0;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await {
            Ok(Ok(Some(c))) => got += c.len(),
            Ok(Ok(None)) => break "end",
            Ok(Err(_)) => break "error",
            Err(_) => break "hang",
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(
        ended, "error",
        "a cut-off body must not look complete ({got} bytes)"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "body ran for {elapsed:?} with timeout 1s"
    );
    assert!(eventually(Duration::from_secs(2), || up.closed("/trickle") == 1).await);
    h.stop().await;
    up.stop.cancel();
}

#[tokio::test]
async fn a_stalled_http2_stream_is_cut_alone() {
    let up = BigUpstream::start().await;
    let cfg = "[proxy]\ntimeout = \"60s\"\nsend_timeout = \"1s\"\n";
    let h = start_herald(config(&format!("http://{}", up.addr), cfg)).await;
    let windows = h2::Windows {
        stream: 65_535,
        connection: 4 * 1024 * 1024,
    };
    let (mut sender, conn) = h2::h2c(h.addr, windows).await;
    let big = h2::get(&mut sender, &h.url("/big"), false).await;
    assert_eq!(big.status(), 200);
    // Never read `big`; the upstream is released once the stream has stalled for 1s...
    assert!(
        eventually(Duration::from_secs(10), || up.closed("/big") == 1).await,
        "stalled h2 stream still holds its upstream response"
    );
    // ...while the connection's other streams go on.
    let small = h2::get(&mut sender, &h.url("/small"), false).await;
    use http_body_util::BodyExt;
    let body = small.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"small");
    drop(big);
    drop(sender);
    conn.abort();
    h.stop().await;
    up.stop.cancel();
}
