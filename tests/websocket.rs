//! WebSocket (and any HTTP/1.1 `Upgrade`) passes through herald as a tunnel. A real
//! tokio-tungstenite client talks to a real tokio-tungstenite server behind herald: messages go
//! both ways, ping gets its pong, close closes. A tunnel with nothing moving is closed after
//! `[proxy] tunnel_idle_timeout`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(5);

/// The next message, within `T`.
async fn next<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(T, ws.next())
        .await
        .expect("message in time")
        .expect("stream open")
        .expect("valid frame")
}

#[allow(clippy::result_large_err)] // tungstenite's callback signature
/// A WebSocket server: greets each client with the path it was asked for, then answers every
/// text message with `echo: <text>`. Records the request headers it saw.
async fn ws_upstream() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut path = String::new();
                let callback = |req: &Request, resp: Response| {
                    path = req.uri().to_string();
                    s.lock().unwrap().push(req.headers().clone());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                let _ = ws.send(Message::text(format!("hello {path}"))).await;
                // Reading on after a close sends tungstenite's close reply.
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        if ws.send(Message::text(format!("echo: {t}"))).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn websocket_both_ways_ping_and_close() {
    let (up, seen) = ws_upstream().await;
    let h = start_herald(config(&format!("http://{up}/legacy"), "")).await;
    let (mut ws, resp) = tokio::time::timeout(
        T,
        tokio_tungstenite::connect_async(format!("ws://{}/chat?room=1", h.addr)),
    )
    .await
    .expect("handshake in time")
    .expect("upgrade through herald");
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["via"], "1.1 herald");

    // Server to client, unprompted, with the path it was asked for under the prefix.
    assert_eq!(
        next(&mut ws).await,
        Message::text("hello /legacy/chat?room=1")
    );
    // Client to server and back, several times.
    for i in 0..3 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text(format!("echo: m{i}")));
    }
    // A ping is answered by the server's pong, through the tunnel.
    ws.send(Message::Ping(b"are you there".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut ws).await,
        Message::Pong(b"are you there".to_vec())
    );
    // Close: the server's close frame comes back, then the stream ends.
    ws.close(None).await.unwrap();
    let mut closed = false;
    while let Ok(Some(msg)) = tokio::time::timeout(T, ws.next()).await {
        match msg {
            Ok(Message::Close(_)) => closed = true,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(closed, "the server's close frame came through");

    let h0 = seen.lock().unwrap()[0].clone();
    assert_eq!(h0["upgrade"], "websocket");
    assert!(h0["connection"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("upgrade"));
    assert!(h0.contains_key("sec-websocket-key"));
    assert_eq!(h0["x-forwarded-for"], "127.0.0.1");
    h.stop().await;
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let (up, _) = ws_upstream().await;
    let cfg = "[proxy]\ntunnel_idle_timeout = \"1s\"\n";
    let h = start_herald(config(&format!("http://{up}"), cfg)).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/idle", h.addr))
        .await
        .unwrap();
    let hello = tokio::time::timeout(T, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(hello, Message::text("hello /idle"));
    // Traffic keeps it open past the idle timeout...
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ws.send(Message::text(format!("{i}"))).await.unwrap();
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::text(format!("echo: {i}")));
    }
    // ...silence closes it.
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(T, ws.next())
        .await
        .expect("closed in time");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "unexpected message: {end:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "closed after {waited:?} with tunnel_idle_timeout 1s"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_upgrade_the_upstream_refuses_is_an_ordinary_response() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), "")).await;
    // The test upstream does not upgrade: its answer comes back as it is, and the connection
    // keeps working as HTTP.
    let resp = raw_request(
        h.addr,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"path\":\"/echo\""), "{resp}");
    assert!(
        resp.contains("\"upgrade\":\"websocket\""),
        "upgrade forwarded: {resp}"
    );
    assert!(
        resp.contains("\"path\":\"/after\""),
        "next request served: {resp}"
    );
    h.stop().await;
    up.stop().await;
}
