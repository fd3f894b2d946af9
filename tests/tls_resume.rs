//! TLS session resumption, checked from the client side (rustls's `handshake_kind`): a returning
//! TLS 1.3 client resumes by ticket and a TLS 1.2 client by ticket or session ID, still after a
//! thousand other clients' handshakes, and a ticket older than its key's rotation is refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::tls::{TestCa, TlsFiles};
use common::*;
use rustls::client::{Resumption, Tls12Resumption};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::time_provider::TimeProvider;
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which protocol and which way of resuming a test client uses.
#[derive(Clone, Copy, Debug)]
enum Flavour {
    Tls13,
    Tls12Tickets,
    Tls12SessionId,
}

/// A client config with its own session store, like one browser.
fn client(
    ca: &TestCa,
    flavour: Flavour,
    time: Option<Arc<dyn TimeProvider>>,
) -> Arc<rustls::ClientConfig> {
    let versions: &[&rustls::SupportedProtocolVersion] = match flavour {
        Flavour::Tls13 => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS12],
    };
    let builder = match time {
        Some(time) => rustls::ClientConfig::builder_with_details(provider(), time),
        None => rustls::ClientConfig::builder_with_provider(provider()),
    };
    let mut config = builder
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let resumption = Resumption::in_memory_sessions(16);
    config.resumption = match flavour {
        Flavour::Tls12SessionId => resumption.tls12_resumption(Tls12Resumption::SessionIdOnly),
        _ => resumption,
    };
    Arc::new(config)
}

/// Handshake, make one request (which also takes in the TLS 1.3 tickets sent after the
/// handshake), and say how the handshake went.
async fn visit(addr: std::net::SocketAddr, config: &Arc<rustls::ClientConfig>) -> HandshakeKind {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let mut tls = tokio::time::timeout(
        T,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake succeeds");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    tls.write_all(b"GET /api/builds/1 HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(T, tls.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .ok();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    kind
}

async fn herald_with(up: &TestUpstream, files: &TlsFiles, tls_extra: &str) -> TestHerald {
    let routes = "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"1s\"\n";
    start_herald(config(
        &up.url(),
        &format!("{routes}{}{tls_extra}", files.toml()),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_clients_resume_even_after_a_thousand_other_handshakes() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", serde_json::json!({"id": 1}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-resume", 1));
    let h = herald_with(&up, &files, "").await;

    let flavours = [
        Flavour::Tls13,
        Flavour::Tls12Tickets,
        Flavour::Tls12SessionId,
    ];
    let returning: Vec<_> = flavours.iter().map(|f| client(&ca, *f, None)).collect();
    for (config, flavour) in returning.iter().zip(flavours) {
        assert_eq!(
            visit(h.addr, config).await,
            HandshakeKind::Full,
            "{flavour:?}"
        );
        assert_eq!(
            visit(h.addr, config).await,
            HandshakeKind::Resumed,
            "{flavour:?}"
        );
    }

    // A thousand other clients, each a full TLS 1.2 handshake that fills the session cache
    // (rustls's default cache holds 256): eight at a time.
    let others = 1000;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let addr = h.addr;
        let configs: Vec<_> = (0..others / 8)
            .map(|_| client(&ca, Flavour::Tls12SessionId, None))
            .collect();
        tasks.spawn(async move {
            for config in configs {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let connector = tokio_rustls::TlsConnector::from(config);
                let tls = tokio::time::timeout(
                    T,
                    connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
                )
                .await
                .unwrap_or_else(|_| panic!("worker {worker}: handshake in time"))
                .unwrap();
                assert_eq!(tls.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }

    for (config, flavour) in returning.iter().zip(flavours) {
        assert_eq!(
            visit(h.addr, config).await,
            HandshakeKind::Resumed,
            "{flavour:?} after {others} other handshakes"
        );
    }
    h.stop().await;
    up.stop().await;
}

/// A client clock that stands still, so the client keeps offering a ticket the server's clock
/// has moved past (the server, not the client, must refuse it).
#[derive(Debug)]
struct Frozen(UnixTime);

impl TimeProvider for Frozen {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.0)
    }
}

#[tokio::test]
async fn ticket_keys_rotate_and_an_old_ticket_is_refused() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", serde_json::json!({"id": 1}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-rotate", 2));
    // Keys rotate every second: a ticket opens in its second and the next, never later.
    let h = herald_with(&up, &files, "ticket_lifetime = \"1s\"\nsession_cache = 0\n").await;

    for flavour in [Flavour::Tls13, Flavour::Tls12Tickets] {
        let frozen: Arc<dyn TimeProvider> = Arc::new(Frozen(UnixTime::now()));
        let config = client(&ca, flavour, Some(frozen));
        assert_eq!(
            visit(h.addr, &config).await,
            HandshakeKind::Full,
            "{flavour:?}"
        );
        // A ticket is issued at some instant in second `s` and opens until `s + 2`.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        assert_eq!(
            visit(h.addr, &config).await,
            HandshakeKind::Full,
            "{flavour:?}: a ticket two rotations old must be refused"
        );
        // The full handshake brought a fresh ticket, sealed with the new key.
        assert_eq!(
            visit(h.addr, &config).await,
            HandshakeKind::Resumed,
            "{flavour:?}"
        );
    }

    // TLS 1.2 without tickets and with the session cache turned off: always full.
    let config = client(&ca, Flavour::Tls12SessionId, None);
    assert_eq!(visit(h.addr, &config).await, HandshakeKind::Full);
    assert_eq!(visit(h.addr, &config).await, HandshakeKind::Full);
    h.stop().await;
    up.stop().await;
}

/// A deploy: the herald that issued the ticket is gone and a new one (here: a second one,
/// started with the same `ticket_key`) takes the client back without a full handshake. Without
/// the shared secret the new herald cannot open the ticket.
#[tokio::test]
async fn a_shared_ticket_key_lets_another_herald_resume_the_session() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", serde_json::json!({"id": 1}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-shared", 3));
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ticket.key");
    std::fs::write(&key, [0x5au8; 48]).unwrap();
    let shared = format!("ticket_key = '{}'\n", key.display());
    let first = herald_with(&up, &files, &shared).await;
    let second = herald_with(&up, &files, &shared).await;
    let stranger = herald_with(&up, &files, "").await;

    for flavour in [Flavour::Tls13, Flavour::Tls12Tickets] {
        let config = client(&ca, flavour, None);
        assert_eq!(
            visit(first.addr, &config).await,
            HandshakeKind::Full,
            "{flavour:?}"
        );
        // The client offers one herald's ticket to the others (same server name).
        assert_eq!(
            visit(second.addr, &config).await,
            HandshakeKind::Resumed,
            "{flavour:?}: the secret's other herald resumes"
        );
        assert_eq!(
            visit(first.addr, &config).await,
            HandshakeKind::Resumed,
            "{flavour:?}"
        );
        assert_eq!(
            visit(stranger.addr, &config).await,
            HandshakeKind::Full,
            "{flavour:?}: a herald without the secret cannot open the ticket"
        );
    }
    for h in [first, second, stranger] {
        h.stop().await;
    }

    // A secret too short to be one: herald does not start, and says which file.
    std::fs::write(&key, b"too short").unwrap();
    let routes = "[[route]]\npath = \"/api/builds/{id}\"\n";
    let err = herald::Herald::new(config(
        &up.url(),
        &format!("{routes}{}{shared}", files.toml()),
    ))
    .err()
    .expect("a short ticket key is refused");
    let err = err.to_string();
    assert!(err.contains("ticket.key") && err.contains("32"), "{err}");
    up.stop().await;
}

/// Rotating `ticket_key` (the file rewritten, then a reload as SIGHUP or the file watcher does it)
/// is a clean cut: a ticket sealed under the old secret no longer opens, the next handshake is full
/// and its ticket opens under the new secret (here and in a herald started with the new file). A
/// broken new file is refused and the secret in use stays.
#[tokio::test]
async fn a_rotated_ticket_key_takes_effect_on_reload_and_old_tickets_stop_opening() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", serde_json::json!({"id": 1}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-rotate", 4));
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ticket.key");
    std::fs::write(&key, [0x11u8; 48]).unwrap();
    let shared = format!("ticket_key = '{}'\n", key.display());
    let h = herald_with(&up, &files, &shared).await;
    let acceptor = h.tls.clone().expect("a TLS listener");
    let config = client(&ca, Flavour::Tls13, None);
    assert_eq!(visit(h.addr, &config).await, HandshakeKind::Full);
    assert_eq!(visit(h.addr, &config).await, HandshakeKind::Resumed);

    // The same file read again changes nothing.
    acceptor.reload().unwrap();
    assert_eq!(visit(h.addr, &config).await, HandshakeKind::Resumed);

    // Rotated.
    std::fs::write(&key, [0x22u8; 48]).unwrap();
    acceptor.reload().unwrap();
    assert_eq!(
        visit(h.addr, &config).await,
        HandshakeKind::Full,
        "a ticket of the old secret no longer opens"
    );
    assert_eq!(visit(h.addr, &config).await, HandshakeKind::Resumed);
    // A herald started with the new file opens the tickets issued since.
    let fresh = herald_with(&up, &files, &shared).await;
    assert_eq!(visit(fresh.addr, &config).await, HandshakeKind::Resumed);

    // A broken file: the reload fails naming it, and the new secret stays in use.
    std::fs::write(&key, b"too short").unwrap();
    let err = acceptor
        .reload()
        .expect_err("a short ticket key is refused");
    assert!(err.to_string().contains("ticket.key"), "{err}");
    assert_eq!(visit(h.addr, &config).await, HandshakeKind::Resumed);
    h.stop().await;
    fresh.stop().await;
    up.stop().await;
}
