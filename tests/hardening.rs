//! What an attacker on loopback found, each reproduced here with real sockets: connections that
//! send nothing, one address taking every connection, and the other findings of the hardening
//! issue that are not the pass-through proxy's (those are in `proxy_*.rs`).

mod common;

use std::time::{Duration, Instant};

use common::tls::{TestCa, TlsFiles};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const T: Duration = Duration::from_secs(5);

/// Whether the server closes `s` within `within` (EOF or reset).
async fn closed_within(s: &mut (impl AsyncReadExt + Unpin), within: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A connection from `ip` (127.0.0.x), so per-address limits can be exercised on loopback.
async fn connect_from(ip: [u8; 4], addr: std::net::SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(ip), 0).into()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// A plain GET over a fresh connection from `ip`: its status line.
async fn get_status(ip: [u8; 4], addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = connect_from(ip, addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

fn server(extra: &str) -> String {
    format!("[server]\nheader_timeout = \"400ms\"\nidle_timeout = \"1s\"\n{extra}\n[[route]]\npath = \"/api/builds/{{id}}\"\ninterval = \"50ms\"\n")
}

#[tokio::test]
async fn silent_connections_are_closed_plain_and_after_a_tls_handshake() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    // Plain: no byte at all, and half a request head.
    let h = start_herald(config(&up.url(), &server(""))).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    let mut half = TcpStream::connect(h.addr).await.unwrap();
    half.write_all(b"GET /api/builds/1 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    assert!(closed_within(&mut half, Duration::from_secs(3)).await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
    // A keep-alive connection that stops asking is closed after idle_timeout.
    let mut kept = TcpStream::connect(h.addr).await.unwrap();
    kept.write_all(b"GET /api/builds/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut kept, Duration::from_secs(4)).await);
    h.stop().await;

    // TLS: handshaken, then silent.
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("localhost", 1));
    let h = start_herald(config(
        &up.url(),
        &format!("{}{}", files.toml(), server("")),
    ))
    .await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let mut hs = common::tls::handshake(h.addr, &ca, &[alpn]).await;
        assert!(
            closed_within(&mut hs.stream, Duration::from_secs(3)).await,
            "{}",
            String::from_utf8_lossy(alpn)
        );
    }
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn silent_sockets_cannot_deny_service_for_long() {
    // Every connection slot taken by sockets that say nothing: they are closed within
    // header_timeout, and a real client is served again right after.
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    let h = start_herald(config(&up.url(), &server("max_connections = 10"))).await;
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(connect_from([127, 0, 0, 2], h.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = get_status([127, 0, 0, 1], h.addr, "/api/builds/1").await;
    assert!(busy.contains(" 503 "), "at the limit: {busy}");
    let started = Instant::now();
    let served = loop {
        let status = get_status([127, 0, 0, 1], h.addr, "/api/builds/1").await;
        if status.contains(" 200 ") {
            break true;
        }
        if started.elapsed() > Duration::from_secs(4) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        served,
        "still refused {:?} after the silent sockets",
        started.elapsed()
    );
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    let cfg = server("header_timeout = \"30s\"\nmax_connections = 10\nmax_connections_per_ip = 3")
        .replacen("header_timeout = \"400ms\"\n", "", 1);
    let h = start_herald(config(&up.url(), &cfg)).await;
    let mut hog = Vec::new();
    for _ in 0..3 {
        hog.push(connect_from([127, 0, 0, 3], h.addr).await);
    }
    // The fourth from the same address is closed without a word...
    let mut fourth = connect_from([127, 0, 0, 3], h.addr).await;
    assert!(closed_within(&mut fourth, Duration::from_secs(2)).await);
    // ...while another address is served at once.
    let status = get_status([127, 0, 0, 1], h.addr, "/api/builds/1").await;
    assert!(status.contains(" 200 "), "{status}");
    drop(hog);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_stream_is_never_idle() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    let h = start_herald(config(
        &up.url(),
        &format!("[sse]\nheartbeat = \"200ms\"\n{}", server("")),
    ))
    .await;
    let mut c = SseClient::connect(&h.url("/api/builds/1"), None).await;
    c.expect_event("snapshot", T).await;
    // Well past idle_timeout, the stream still delivers.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    up.set_json(
        "/api/builds/1",
        json!({"id": 1, "status": "done", "log": "x".repeat(100)}),
    );
    c.expect_event("change after idle_timeout", T).await;
    drop(c);
    h.stop().await;
    up.stop().await;
}

// ---- topics and credentials ------------------------------------------------------------------

const ME: &str = "/api/me";

fn per_user(extra: &str) -> String {
    format!("[[route]]\npath = \"{ME}\"\ninterval = \"50ms\"\n{extra}\n")
}

async fn stream(h: &TestHerald, path: &str, headers: &[(&str, &str)]) -> SseClient {
    SseClient::connect_with(&reqwest::Client::new(), &h.url(path), None, headers).await
}

#[tokio::test]
async fn junk_cookies_make_no_topics_and_no_polls() {
    let up = TestUpstream::start().await;
    up.set_json(ME, json!({"me": "anonymous"}));
    let h = start_herald(config(&up.url(), &per_user(""))).await;
    let mut clients = Vec::new();
    for n in 0..40 {
        let cookie = format!("junk={n}; _ga=GA1.{n}");
        let mut c = stream(&h, ME, &[("cookie", &cookie)]).await;
        assert_eq!(c.status, 200);
        c.expect_event("snapshot", T).await;
        clients.push(c);
    }
    // Cookies that name no session are not credentials: one topic, polled without them.
    assert_eq!(h.hub.topic_count(), 1);
    assert!(up.seen().iter().all(|s| s.headers.get("cookie").is_none()));
    drop(clients);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn one_client_holds_a_bounded_share_of_topics() {
    let up = TestUpstream::start().await;
    up.set_json(ME, json!({"me": "someone"}));
    let h = start_herald(config(
        &up.url(),
        &format!(
            "[server]\nmax_topics_per_ip = 5\nmax_streams_per_credential = 0\n{}",
            per_user("")
        ),
    ))
    .await;
    let mut held = Vec::new();
    for n in 0..5 {
        let cookie = format!("session=junk{n}");
        let mut c = stream(&h, ME, &[("cookie", &cookie)]).await;
        assert_eq!(c.status, 200, "topic {n}");
        c.expect_event("snapshot", T).await;
        held.push(c);
    }
    // The sixth made-up session from the same address: refused before any upstream request.
    let polls = up.seen().len();
    let c = stream(&h, ME, &[("cookie", "session=junk6")]).await;
    assert_eq!(c.status, 429);
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(
        up.seen()
            .iter()
            .skip(polls)
            .all(|s| common::credential_of(&s.headers) != "session=junk6"),
        "no poll for the refused topic"
    );
    // Joining a topic that exists costs nothing: allowed.
    let mut again = stream(&h, ME, &[("cookie", "session=junk0")]).await;
    assert_eq!(again.status, 200);
    again.expect_event("snapshot", T).await;
    // Topics given back when their watchers leave and they close: room again.
    drop(held);
    drop(again);
    let room = eventually(Duration::from_secs(10), || h.hub.topic_count() == 0).await;
    assert!(room, "topics closed");
    let c = stream(&h, ME, &[("cookie", "session=fresh")]).await;
    assert_eq!(c.status, 200);
    drop(c);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn junk_cookies_do_not_multiply_a_credential() {
    let up = TestUpstream::start().await;
    up.set_json(ME, json!({"me": "alice"}));
    let h = start_herald(config(
        &up.url(),
        &format!(
            "[server]\nmax_streams_per_credential = 3\n{}",
            per_user("access_token = \"access_token\"")
        ),
    ))
    .await;
    let mut held = Vec::new();
    for n in 0..3 {
        let cookie = format!("j={n}");
        let mut c = stream(
            &h,
            ME,
            &[("authorization", "Bearer alice"), ("cookie", &cookie)],
        )
        .await;
        assert_eq!(c.status, 200);
        c.expect_event("snapshot", T).await;
        held.push(c);
    }
    let c = stream(
        &h,
        ME,
        &[("authorization", "Bearer alice"), ("cookie", "j=99")],
    )
    .await;
    assert_eq!(c.status, 429, "the same bearer token, whatever the cookies");
    // A multiplexed stream with the token in its query counts as the same credential.
    let url = format!("/_herald/stream?watch={ME}&access_token=alice");
    let c = stream(&h, &url, &[]).await;
    assert_eq!(c.status, 429, "multiplexed streams count too");
    drop(held);
    h.stop().await;
    up.stop().await;
}

/// A per-user upstream: `session=good` is served, anything else as `answer` says.
async fn revoked_behind(answer: Reply, extra: &str) {
    let up = TestUpstream::start().await;
    up.set_for(
        ME,
        "session=good",
        Reply::json(json!({"me": "good", "secret": 42})),
    );
    let h = start_herald(config(&up.url(), &per_user(extra))).await;
    let mut c = stream(&h, ME, &[("cookie", "session=good")]).await;
    let snap = c.expect_event("snapshot", T).await;
    assert_eq!(snap.json()["data"]["secret"], 42);
    // The session is revoked: the upstream now answers `answer` for it.
    up.set_for(ME, "session=good", answer.clone());
    let ev = c.expect_event("the end of access", T).await;
    assert_eq!(ev.event, "error", "{ev:?}");
    assert_eq!(ev.json()["data"]["error"], "unauthorized");
    // A new stream with the revoked session is never shown the cached state.
    let mut again = stream(&h, ME, &[("cookie", "session=good")]).await;
    if again.status == 200 {
        let ev = again.expect_event("refusal", T).await;
        assert_ne!(ev.event, "snapshot", "cached state served: {ev:?}");
    }
    drop((c, again));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_revoked_session_behind_a_redirect_ends_and_keeps_nothing() {
    revoked_behind(Reply::status(302, "").header("location", "/login"), "").await;
}

#[tokio::test]
async fn a_revoked_session_behind_a_login_page_ends_and_keeps_nothing() {
    revoked_behind(
        Reply::raw(Some("text/html; charset=utf-8"), b"<form action=/login>"),
        "",
    )
    .await;
}

#[tokio::test]
async fn a_revoked_session_behind_a_404_ends_when_configured() {
    revoked_behind(
        Reply::status(404, "{\"error\":\"not found\"}"),
        "refuse = [401, 403, \"3xx\", 404]",
    )
    .await;
}

// ---- JWT topics -------------------------------------------------------------------------------

const JWT_SECRET: &str = "a-test-secret-of-32-bytes-length";

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600
}

async fn jwt_herald(up: &TestUpstream, extra: &str) -> (TestHerald, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, JWT_SECRET).unwrap();
    let jwt = format!(
        "jwt = {{ alg = \"HS256\", key = \"{}\"{extra} }}",
        key.display()
    );
    (start_herald(config(&up.url(), &per_user(&jwt))).await, dir)
}

#[tokio::test]
async fn a_token_the_upstream_refuses_never_sees_another_tokens_data() {
    let up = TestUpstream::start().await;
    let wide = hs256(json!({"sub": "dave", "exp": exp(), "scope": "read:all"}));
    let narrow = hs256(json!({"sub": "dave", "exp": exp(), "scope": "none"}));
    up.set_for(
        ME,
        &format!("Bearer {wide}"),
        Reply::json(json!({"all": "secrets"})),
    );
    up.set_for(ME, &format!("Bearer {narrow}"), Reply::status(401, "{}"));
    let (h, _dir) = jwt_herald(&up, "").await;
    let mut a = stream(&h, ME, &[("authorization", &format!("Bearer {wide}"))]).await;
    assert_eq!(
        a.expect_event("snapshot", T).await.json()["data"]["all"],
        "secrets"
    );
    // Same `sub`, a scope the upstream rejects: its own topic, polled with its own token.
    let mut b = stream(&h, ME, &[("authorization", &format!("Bearer {narrow}"))]).await;
    if b.status == 200 {
        let ev = b.expect_event("refusal", T).await;
        assert_eq!(ev.event, "error", "the narrow token got {ev:?}");
    } else {
        assert_eq!(b.status, 401);
    }
    assert!(
        up.hits_by(ME, &format!("Bearer {narrow}")) >= 1,
        "polled with its own token"
    );
    drop((a, b));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn claim_keyed_topics_tell_a_number_from_a_string() {
    let up = TestUpstream::start().await;
    up.set_json(ME, json!({"ok": true}));
    let (h, _dir) = jwt_herald(&up, ", topic_claims = [\"sub\"]").await;
    let numeric = hs256(json!({"sub": 42, "exp": exp()}));
    let string = hs256(json!({"sub": "42", "exp": exp()}));
    let again = hs256(json!({"sub": 42, "exp": exp() + 1}));
    let mut held = Vec::new();
    for t in [&numeric, &string, &again] {
        let mut c = stream(&h, ME, &[("authorization", &format!("Bearer {t}"))]).await;
        c.expect_event("snapshot", T).await;
        held.push(c);
    }
    // 42 and "42" are two users; two tokens of sub 42 share one topic.
    assert_eq!(h.hub.topic_count(), 2);
    drop(held);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_configured_audience_is_required() {
    let up = TestUpstream::start().await;
    up.set_json(ME, json!({"ok": true}));
    let (h, _dir) = jwt_herald(&up, ", audience = [\"herald\"]").await;
    let none = hs256(json!({"sub": "a", "exp": exp()}));
    let right = hs256(json!({"sub": "a", "exp": exp(), "aud": "herald"}));
    let c = stream(&h, ME, &[("authorization", &format!("Bearer {none}"))]).await;
    assert_eq!(c.status, 401, "a token without aud");
    let mut c = stream(&h, ME, &[("authorization", &format!("Bearer {right}"))]).await;
    assert_eq!(c.status, 200);
    c.expect_event("snapshot", T).await;
    drop(c);
    h.stop().await;
    up.stop().await;
}

// ---- memory of topics -------------------------------------------------------------------------

/// RSS of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A document of about 1 MB: 7,000 small objects, as a list API returns them.
fn big_document() -> serde_json::Value {
    let items: Vec<_> = (0..7000)
        .map(|i| {
            json!({"id": i, "name": format!("item {i}"), "price": i as f64 * 1.25 + 0.1,
                   "tags": ["a", "b", "c"], "desc": "x".repeat(50)})
        })
        .collect();
    json!({ "items": items })
}

/// The herald binary (the process operators run: its allocator settings included), serving
/// `config`; killed on drop.
fn herald_process(config: &str) -> (tokio::process::Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_memory_is_proportional_and_given_back() {
    let up = TestUpstream::start().await;
    let doc = big_document();
    let body = doc.to_string().len() as u64;
    up.set_json(ME, doc);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let cfg = format!(
        "listen = \"{addr}\"\nupstream = \"{}\"\n[sse]\ngrace = \"300ms\"\n[[route]]\npath = \"{ME}\"\ninterval = \"1s\"\n",
        up.url(),
    );
    let (child, _dir) = herald_process(&cfg);
    let pid = child.id().expect("running");
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(started.elapsed() < T, "herald did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = rss(pid);
    // 20 sessions: 20 topics of the same 1 MB resource, each with its own copy.
    let topics = 20u64;
    let mut clients = Vec::new();
    for n in 0..topics {
        let cookie = format!("session=s{n}");
        let url = format!("http://{addr}{ME}");
        let mut c =
            SseClient::connect_with(&reqwest::Client::new(), &url, None, &[("cookie", &cookie)])
                .await;
        c.expect_event("snapshot", Duration::from_secs(20)).await;
        clients.push(c);
    }
    let peak = rss(pid);
    let per_topic = peak.saturating_sub(base) / topics;
    eprintln!(
        "body {body} B; RSS {base} → {peak} B: {per_topic} B per topic ({:.1}× the body)",
        per_topic as f64 / body as f64
    );
    assert!(
        per_topic < 4 * body,
        "a topic costs {per_topic} B for a {body} B body"
    );
    // Every stream gone, every topic closed after grace: the memory goes back.
    drop(clients);
    let back = eventually(Duration::from_secs(10), || {
        rss(pid) < base + (peak - base) / 5
    })
    .await;
    let after = rss(pid);
    eprintln!("after closing: {after} B");
    assert!(back, "RSS stayed at {after} B (from {base}, peak {peak})");
    drop(child);
    up.stop().await;
}

// ---- the admin listener ------------------------------------------------------------------------

use common::admin::{AdminHerald, ADMIN};

/// A raw request to the admin listener: its status code.
async fn admin_raw(addr: std::net::SocketAddr, req: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn health_answers_when_the_admin_listener_is_full() {
    let up = TestUpstream::start().await;
    let h = AdminHerald::start(config(&up.url(), ADMIN)).await;
    // Every admin connection taken by sockets that say nothing, and status pages.
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(TcpStream::connect(h.admin_addr).await.unwrap());
    }
    let mut pages = Vec::new();
    for _ in 0..20 {
        let resp = reqwest::get(h.admin_url("/status/events")).await;
        if let Ok(r) = resp {
            pages.push(r.status().as_u16());
        }
    }
    // Health still answers, at once.
    let started = Instant::now();
    let health = reqwest::get(h.admin_url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    let ready = reqwest::get(h.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    // Status pages are bounded: the overflow is told so rather than held.
    assert!(pages.iter().all(|s| *s == 200 || *s == 503), "{pages:?}");
    // The silent sockets are closed after the admin header timeout.
    let mut first = idle.remove(0);
    assert!(closed_within(&mut first, Duration::from_secs(8)).await);
    drop(idle);
    h.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), h.join).await;
    up.stop().await;
}

#[tokio::test]
async fn reload_is_not_for_browser_pages_or_strangers() {
    let up = TestUpstream::start().await;
    // Without a token: reload over HTTP is off (SIGHUP reloads).
    let h = AdminHerald::start(config(&up.url(), ADMIN)).await;
    let a = h.admin_addr;
    let csrf = format!(
        "POST /reload HTTP/1.1\r\nHost: {a}\r\nOrigin: https://evil.example\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(admin_raw(a, &csrf).await, 403);
    let plain = format!(
        "POST /reload HTTP/1.1\r\nHost: {a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(admin_raw(a, &plain).await, 403, "no token configured");
    h.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), h.join).await;

    // With one: only its bearer may, and never from a page.
    let token = "an-admin-token-of-some-length";
    let h = AdminHerald::start(config(&up.url(), &format!("{ADMIN}token = \"{token}\"\n"))).await;
    let a = h.admin_addr;
    let wrong = format!("POST /reload HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!(admin_raw(a, &wrong).await, 401);
    let from_page = format!("POST /reload HTTP/1.1\r\nHost: {a}\r\nOrigin: http://{a}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!(admin_raw(a, &from_page).await, 403);
    // (The right token reaches the reload itself: 409, as this herald has no config file.)
    let right = format!("POST /reload HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!(admin_raw(a, &right).await, 409);
    h.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), h.join).await;
    up.stop().await;
}

#[tokio::test]
async fn the_status_page_answers_only_its_own_host_names() {
    let up = TestUpstream::start().await;
    let h = AdminHerald::start(config(
        &up.url(),
        &format!("{ADMIN}hosts = [\"herald.internal\"]\n"),
    ))
    .await;
    let a = h.admin_addr;
    let get = |host: &str| {
        format!("GET /status.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    // A page on evil.example whose DNS name was rebound to this address sends its own name.
    assert_eq!(admin_raw(a, &get("evil.example")).await, 421);
    assert_eq!(admin_raw(a, &get(&a.to_string())).await, 200);
    assert_eq!(admin_raw(a, &get("localhost:9090")).await, 200);
    assert_eq!(admin_raw(a, &get("herald.internal")).await, 200);
    // Probes answer whatever the name.
    let probe = "GET /healthz HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    assert_eq!(admin_raw(a, probe).await, 200);
    h.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), h.join).await;
    up.stop().await;
}

#[tokio::test]
async fn a_stream_request_names_exactly_one_host() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1}));
    let h = start_herald(config(&up.url(), &server(""))).await;
    let status = |hosts: &'static str| {
        let addr = h.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let req = format!("GET /api/builds/1 HTTP/1.1\r\n{hosts}Accept: text/event-stream\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 512];
            let n = tokio::time::timeout(T, s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        }
    };
    // None and two are both ambiguous, on the stream path as on the pass-through one.
    assert!(status("").await.contains(" 400 "), "no Host");
    assert!(
        status("Host: a\r\nHost: b\r\n").await.contains(" 400 "),
        "two Hosts"
    );
    assert!(status("Host: a\r\n").await.contains(" 200 "), "one Host");
    h.stop().await;
    up.stop().await;
}
