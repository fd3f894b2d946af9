//! TLS end to end, with certificates made by rcgen for each test: real handshakes with a rustls
//! client trusting the test CA, ALPN, SSE over TLS + HTTP/2 (reqwest and hyper), certificate
//! rotation under an open stream (reload call, file watcher, SIGHUP), startup errors that name the
//! bad file, and https upstreams trusted through `[proxy] ca`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::h2::{self, H2Sse, Windows};
use common::tls::{handshake, TestCa, TlsFiles};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);
const ROUTES: &str = "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"20ms\"\n";

async fn tls_herald(up: &TestUpstream, files: &TlsFiles) -> TestHerald {
    start_herald(config(&up.url(), &format!("{ROUTES}{}", files.toml()))).await
}

/// The next event brings `state` to `want` (a patch, or a snapshot when that is smaller).
async fn expect_change(c: &mut SseClient, state: serde_json::Value, want: serde_json::Value) {
    let ev = c.expect_event("a change", T).await;
    assert!(ev.event == "patch" || ev.event == "snapshot", "{ev:?}");
    let mut state = Some(state);
    apply_event(&mut state, &ev);
    assert_eq!(state.unwrap(), want);
}

/// Poll new handshakes until one presents `want` (true) or `timeout` passes (false).
async fn eventually_presents(h: &TestHerald, ca: &TestCa, want: &[u8], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if handshake(h.addr, ca, &[b"h2"]).await.leaf.as_ref() == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn alpn_picks_h2_or_http11_and_plain_http11_works() {
    let up = TestUpstream::start().await;
    let ca = TestCa::new();
    let leaf = ca.leaf("herald-alpn", 1);
    let files = TlsFiles::new(&leaf);
    let h = tls_herald(&up, &files).await;

    let mut times = Vec::new();
    for _ in 0..5 {
        let hs = handshake(h.addr, &ca, &[b"h2", b"http/1.1"]).await;
        assert_eq!(hs.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(hs.leaf, leaf.der);
        times.push(hs.elapsed);
    }
    times.sort();
    eprintln!(
        "TLS handshake (connect + TLS 1.3, loopback, debug build): median {:?}",
        times[2]
    );

    let hs = handshake(h.addr, &ca, &[b"http/1.1"]).await;
    assert_eq!(hs.alpn.as_deref(), Some(&b"http/1.1"[..]));

    // No ALPN at all: HTTP/1.1, spoken by hand over the TLS stream.
    let mut hs = handshake(h.addr, &ca, &[]).await;
    assert_eq!(hs.alpn, None);
    hs.stream
        .write_all(b"GET /echo HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(T, hs.stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .ok();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // The pass-through tells the upstream the client came over https.
    let seen = up.seen();
    assert_eq!(seen.last().unwrap().headers["x-forwarded-proto"], "https");

    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_other_handshakes() {
    let up = TestUpstream::start().await;
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-slow", 2));
    let h = tls_herald(&up, &files).await;
    // Connected but never says hello: its handshake waits in its own task (up to 10 s).
    let _silent = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let _half = {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        s
    };
    let hs = handshake(h.addr, &ca, &[b"h2"]).await;
    assert!(
        hs.elapsed < Duration::from_secs(1),
        "handshake took {:?}",
        hs.elapsed
    );
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn sse_over_tls_and_h2_with_reqwest_and_hyper() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/3", json!({"id": 3, "status": "queued"}));
    let ca = TestCa::new();
    let files = TlsFiles::new(&ca.leaf("herald-sse", 3));
    let h = tls_herald(&up, &files).await;

    // reqwest: ALPN picks h2.
    let client = ca.https_client();
    let head = client
        .get(h.https_url("/api/builds/3"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.version(), http::Version::HTTP_2);
    assert_eq!(head.status(), 200);
    let mut r = SseClient::connect_with(&client, &h.https_url("/api/builds/3"), None, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    assert_eq!(r.expect_event("snapshot", T).await.event, "snapshot");

    // hyper's h2 client on a rustls stream.
    let hs = handshake(h.addr, &ca, &[b"h2"]).await;
    let (mut sender, conn) = h2::handshake(hs.stream, Windows::default()).await;
    let mut s = H2Sse::open(&mut sender, &h.https_url("/api/builds/3")).await;
    assert_eq!(s.version, http::Version::HTTP_2);
    assert_eq!(s.expect_event("snapshot", T).await.event, "snapshot");

    up.set_json("/api/builds/3", json!({"id": 3, "status": "running"}));
    expect_change(
        &mut r,
        json!({"id": 3, "status": "queued"}),
        json!({"id": 3, "status": "running"}),
    )
    .await;
    let ev = s.expect_event("a change", T).await;
    let mut state = Some(json!({"id": 3, "status": "queued"}));
    apply_event(&mut state, &ev);
    assert_eq!(state.unwrap(), json!({"id": 3, "status": "running"}));

    drop((r, s, sender));
    h.stop().await;
    conn.abort();
    up.stop().await;
}

#[tokio::test]
async fn loads_rsa_ecdsa_and_ed25519_keys_in_every_pem_format() {
    let up = TestUpstream::start().await;
    let ca = TestCa::new();
    let leaves = [
        ("ECDSA P-256, PKCS#8", ca.leaf("herald-p256", 10)),
        ("Ed25519, PKCS#8", ca.leaf_ed25519("herald-ed25519", 11)),
        (
            "RSA 2048, PKCS#1",
            ca.leaf_from_fixture("herald-rsa", 12, "rsa2048-pkcs1.key"),
        ),
        (
            "ECDSA P-256, SEC1",
            ca.leaf_from_fixture("herald-sec1", 13, "p256-sec1.key"),
        ),
    ];
    for (label, leaf) in leaves {
        let files = TlsFiles::new(&leaf);
        let h = tls_herald(&up, &files).await;
        let hs = handshake(h.addr, &ca, &[b"h2"]).await;
        assert_eq!(hs.leaf, leaf.der, "{label}");
        h.stop().await;
    }
    up.stop().await;
}

#[tokio::test]
async fn reload_rotates_the_certificate_under_an_open_stream() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1, "n": 0}));
    let ca = TestCa::new();
    let (a, b) = (ca.leaf("herald-a", 100), ca.leaf("herald-b", 200));
    let files = TlsFiles::new(&a);
    let h = tls_herald(&up, &files).await;

    let client = ca.https_client();
    let mut stream =
        SseClient::connect_with(&client, &h.https_url("/api/builds/1"), None, &[]).await;
    stream.expect_event("snapshot", T).await;
    assert_eq!(handshake(h.addr, &ca, &[b"h2"]).await.leaf, a.der);

    files.write(&b);
    h.tls.as_ref().unwrap().reload().expect("reload B");
    assert_eq!(handshake(h.addr, &ca, &[b"h2"]).await.leaf, b.der);

    // The stream opened under A is untouched and keeps flowing.
    up.set_json("/api/builds/1", json!({"id": 1, "n": 1}));
    expect_change(
        &mut stream,
        json!({"id": 1, "n": 0}),
        json!({"id": 1, "n": 1}),
    )
    .await;
    // And the pooled connection it came on still serves new requests.
    let resp = client
        .get(h.https_url("/api/builds/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    drop(stream);
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn watcher_reloads_changed_files_and_survives_a_broken_write() {
    let up = TestUpstream::start().await;
    up.set_json("/api/builds/1", json!({"id": 1, "n": 0}));
    let ca = TestCa::new();
    let (a, b) = (ca.leaf("herald-a", 300), ca.leaf("herald-b", 400));
    let files = TlsFiles::new(&a);
    let h = tls_herald(&up, &files).await;
    let client = ca.https_client();
    let mut stream =
        SseClient::connect_with(&client, &h.https_url("/api/builds/1"), None, &[]).await;
    stream.expect_event("snapshot", T).await;

    // A broken write: the reload fails, names the file, and A stays in use.
    std::fs::write(
        &files.cert,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    match h.tls.as_ref().unwrap().reload() {
        Err(herald::Error::Tls { path, message }) => {
            assert_eq!(path, files.cert, "{message}");
            assert!(message.contains("certificate"), "{message}");
        }
        other => panic!("expected a TLS error naming the cert, got {other:?}"),
    }
    assert_eq!(handshake(h.addr, &ca, &[b"h2"]).await.leaf, a.der);

    // The files are fixed, with B: the watcher (every 2 s) notices without being told.
    let started = Instant::now();
    files.write(&b);
    assert!(
        eventually_presents(&h, &ca, &b.der, Duration::from_secs(6)).await,
        "watcher never loaded B"
    );
    eprintln!(
        "mtime watcher picked up the new certificate after {:?}",
        started.elapsed()
    );

    up.set_json("/api/builds/1", json!({"id": 1, "n": 1}));
    expect_change(
        &mut stream,
        json!({"id": 1, "n": 0}),
        json!({"id": 1, "n": 1}),
    )
    .await;
    drop(stream);
    h.stop().await;
    up.stop().await;
}

/// Set `path`'s modification time back to `t`.
fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[tokio::test]
async fn sighup_reloads_even_when_the_files_look_unchanged() {
    let up = TestUpstream::start().await;
    // Ed25519 CA and leaves, same-length names and serials: A's and B's files have equal sizes,
    // so with their mtimes put back the watcher cannot tell them apart and only SIGHUP reloads.
    let ca = TestCa::new_ed25519();
    let (a, b) = (
        ca.leaf_ed25519("herald-a", 500),
        ca.leaf_ed25519("herald-b", 501),
    );
    assert_eq!(
        (a.cert_pem.len(), a.key_pem.len()),
        (b.cert_pem.len(), b.key_pem.len())
    );
    let files = TlsFiles::new(&a);
    let h = tls_herald(&up, &files).await;
    let acceptor = h.tls.clone().unwrap();
    assert_eq!(handshake(h.addr, &ca, &[b"h2"]).await.leaf, a.der);

    let mtimes =
        [&files.cert, &files.key].map(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    files.write(&b);
    set_mtime(&files.cert, mtimes[0]);
    set_mtime(&files.key, mtimes[1]);
    assert!(
        acceptor.reload_if_changed().is_none(),
        "the change should be invisible to the watcher"
    );
    assert_eq!(acceptor.current_chain()[0], a.der);

    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    assert!(
        eventually_presents(&h, &ca, &b.der, Duration::from_secs(3)).await,
        "SIGHUP did not load B"
    );

    h.stop().await;
    up.stop().await;
}

/// Herald::new's error for `files` (a panic if it starts).
fn startup_error(tls_toml: &str) -> (std::path::PathBuf, String) {
    let cfg = config("http://127.0.0.1:9", &format!("{ROUTES}{tls_toml}"));
    match herald::Herald::new(cfg) {
        Err(herald::Error::Tls { path, message }) => (path, message),
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("herald started with bad TLS files"),
    }
}

#[tokio::test]
async fn bad_cert_or_key_files_stop_startup_naming_the_file() {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf("herald-a", 600), ca.leaf("herald-b", 601));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cert = write("cert.pem", &a.cert_pem);
    let key = write("key.pem", &a.key_pem);
    let other_key = write("other-key.pem", &b.key_pem);
    let garbage = write("garbage.pem", "this is not PEM at all\n");
    let bad_der = write(
        "bad-der.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let broken_pem = write("broken.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n");
    let missing = dir.path().join("missing.pem");
    let toml =
        |c: &Path, k: &Path| format!("[tls]\ncert = '{}'\nkey = '{}'\n", c.display(), k.display());

    let cases = [
        (toml(&missing, &key), &missing, "cannot read"),
        (toml(&cert, &missing), &missing, "cannot read"),
        (toml(&garbage, &key), &garbage, "no certificate found"),
        (toml(&cert, &garbage), &garbage, "no private key found"),
        (toml(&cert, &cert), &cert, "no private key found"),
        (toml(&cert, &broken_pem), &broken_pem, "invalid PEM"),
        (toml(&bad_der, &key), &bad_der, "certificate"),
        (toml(&cert, &other_key), &other_key, "does not match"),
    ];
    for (tls, path, expect) in &cases {
        let (got, message) = startup_error(tls);
        assert_eq!(&got, *path, "{tls} → {message}");
        assert!(
            message.contains(expect),
            "{tls}: {message:?} should say {expect:?}"
        );
        let shown = herald::Error::Tls { path: got, message }.to_string();
        assert!(shown.starts_with(&path.display().to_string()), "{shown}");
    }
    // The right pair starts.
    assert!(herald::Herald::new(config("http://127.0.0.1:9", &toml(&cert, &key))).is_ok());

    // `herald check` reports the same, with the config exit code, before anything is bound.
    let file = write(
        "proxy.toml",
        &format!(
            "listen = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:9\"\n{}",
            toml(&cert, &other_key)
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["-c", file.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&other_key.display().to_string()),
        "{stderr}"
    );
}

#[tokio::test]
async fn https_upstream_trusted_through_proxy_ca_speaks_h2() {
    let ca = TestCa::new();
    let up = TestUpstream::start_tls(&ca.leaf("upstream", 700)).await;
    up.set_json("/api/builds/1", json!({"id": 1, "n": 0}));
    let extra = format!("{ROUTES}[proxy]\nca = '{}'\n", ca.path.display());
    let h = start_herald(config(&up.url(), &extra)).await;

    let mut s = SseClient::connect(&h.url("/api/builds/1"), None).await;
    let snap = s.expect_event("snapshot", T).await;
    assert_eq!(snap.json()["data"], json!({"id": 1, "n": 0}));
    up.set_json("/api/builds/1", json!({"id": 1, "n": 1}));
    expect_change(&mut s, json!({"id": 1, "n": 0}), json!({"id": 1, "n": 1})).await;
    let resp = reqwest::get(h.url("/legacy/echo")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.seen();
    assert!(seen.iter().any(|r| r.path_and_query == "/legacy/echo"));
    assert!(
        seen.iter().all(|r| r.version == http::Version::HTTP_2),
        "herald → upstream should be h2 by ALPN"
    );
    drop(s);
    h.stop().await;

    // Without the CA, the upstream's certificate is not trusted: polls and pass-through fail.
    let h = start_herald(config(&up.url(), ROUTES)).await;
    let mut s = SseClient::connect(&h.url("/api/builds/1"), None).await;
    let ev = s.expect_event("upstream-error", T).await;
    assert_eq!(ev.event, "upstream-error");
    let resp = reqwest::get(h.url("/legacy/echo")).await.unwrap();
    assert_eq!(resp.status(), 502);
    drop(s);
    h.stop().await;
    up.stop().await;
}

#[test]
fn proxy_ca_is_checked_at_load_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let not_ca = dir.path().join("not-ca.pem");
    std::fs::write(
        &not_ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    for (path, expect) in [
        (&missing, "cannot read"),
        (&garbage, "no certificate found"),
        (&not_ca, "not usable as a CA"),
    ] {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nupstream = \"https://127.0.0.1:9\"\n\n[proxy]\nca = '{}'\n",
            path.display()
        );
        let err = herald::config::parse(&text, "proxy.toml").expect_err("a bad CA file is refused");
        let msg = err.to_string();
        assert!(msg.starts_with("proxy.toml:5:"), "{msg}");
        assert!(msg.contains("proxy.ca"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(expect), "{msg} should say {expect:?}");
    }
    let ca = TestCa::new();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nupstream = \"https://127.0.0.1:9\"\n[proxy]\nca = '{}'\n",
        ca.path.display()
    );
    let cfg = herald::config::parse(&text, "proxy.toml").unwrap();
    assert_eq!(cfg.proxy.ca.unwrap().certs.len(), 1);
}
