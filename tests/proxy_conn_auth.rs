//! Connection-bound authentication (NTLM/Negotiate, as IIS does it) never leaks across clients.
//! The upstream in this test binds a user to its TCP connection once the handshake completes,
//! and then answers every request on that connection as that user, credentials or not. Through
//! herald, the authenticated client keeps its user on its own connection. Anyone else, on
//! another downstream connection, is answered as anonymous.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::raw::{response, ConnState, RawRequest, RawUpstream};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// IIS-style NTLM, reduced to its shape: `NTLM type1` gets a 401 challenge, `NTLM type3:<user>`
/// authenticates the connection. A connection's user answers every later request on it.
/// `/challenge` asks anyone unauthenticated for NTLM.
fn iis(req: &RawRequest, conn: &mut ConnState) -> Vec<u8> {
    match req.header("authorization") {
        Some("NTLM type1") => {
            return response(
                "401 Unauthorized",
                &[("WWW-Authenticate", "NTLM challenge")],
                "",
            )
        }
        Some(a) if a.starts_with("NTLM type3:") => {
            conn.user = Some(a["NTLM type3:".len()..].to_string());
        }
        _ => {}
    }
    match &conn.user {
        Some(user) => response("200 OK", &[], user),
        None if req.target().ends_with("/challenge") => {
            response("401 Unauthorized", &[("WWW-Authenticate", "NTLM")], "")
        }
        None => response("200 OK", &[], "anonymous"),
    }
}

/// A keep-alive client connection: one request at a time, response read by Content-Length.
struct Client(TcpStream);

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Client {
        Client(TcpStream::connect(addr).await.unwrap())
    }

    async fn get(&mut self, path: &str, auth: Option<&str>) -> (u16, String) {
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: herald.test\r\n{auth}\r\n");
        self.0.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let read = async {
            loop {
                let n = self.0.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "connection closed: {}",
                    String::from_utf8_lossy(&buf)
                );
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        let status = head[9..12].parse().unwrap();
                        return (status, body[..len].to_string());
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("response within 5s")
    }
}

#[tokio::test]
async fn connection_bound_auth_stays_with_its_client() {
    let up = RawUpstream::start(Arc::new(iis)).await;
    let h = start_herald(config(&up.url(""), "")).await;

    // Alice authenticates through herald on one connection, then keeps using it without
    // credentials, as NTLM clients do.
    let mut alice = Client::connect(h.addr).await;
    assert_eq!(alice.get("/whoami", Some("NTLM type1")).await.0, 401);
    assert_eq!(
        alice.get("/whoami", Some("NTLM type3:alice")).await,
        (200, "alice".into())
    );
    assert_eq!(alice.get("/whoami", None).await, (200, "alice".into()));

    // Bob, on his own connection, sends no credentials: he is anonymous, whatever the pool holds.
    for _ in 0..3 {
        let mut bob = Client::connect(h.addr).await;
        assert_eq!(bob.get("/whoami", None).await, (200, "anonymous".into()));
        assert_eq!(bob.get("/whoami", None).await, (200, "anonymous".into()));
    }
    // Alice is still herself, on her private upstream connection.
    assert_eq!(alice.get("/whoami", None).await, (200, "alice".into()));

    let seen = up.seen();
    let alice_conn = seen[1].conn;
    assert!(
        seen[..3]
            .iter()
            .chain(seen.last())
            .all(|r| r.conn == alice_conn),
        "alice's handshake and requests share one upstream connection: {seen:?}"
    );
    assert!(
        seen[3..seen.len() - 1].iter().all(|r| r.conn != alice_conn),
        "nobody else is served on alice's connection: {seen:?}"
    );
    drop(alice);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_connection_that_asked_for_ntlm_serves_no_one_else() {
    let up = RawUpstream::start(Arc::new(iis)).await;
    let h = start_herald(config(&up.url(""), "")).await;
    let mut carol = Client::connect(h.addr).await;
    assert_eq!(carol.get("/challenge", None).await.0, 401);
    let challenged = up.seen()[0].conn;
    for _ in 0..3 {
        let mut dave = Client::connect(h.addr).await;
        assert_eq!(dave.get("/whoami", None).await, (200, "anonymous".into()));
    }
    let seen = up.seen();
    assert!(
        seen[1..].iter().all(|r| r.conn != challenged),
        "the challenged connection was reused: {seen:?}"
    );
    h.stop().await;
    up.stop().await;
}
