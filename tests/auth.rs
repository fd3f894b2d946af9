//! Auth and per-user streams end to end: an upstream that answers per credential (and 401s
//! strangers), herald on port 0, real SSE clients with cookies, bearer tokens, access-token
//! parameters and JWTs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);
const ME: &str = "/api/me/notifications";

fn per_user_route(extra: &str) -> String {
    format!("[[route]]\npath = \"{ME}\"\ninterval = \"50ms\"\n{extra}\n")
}

/// Every log line of this test binary, at every level (to check no credential is ever logged).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn connect(h: &TestHerald, path: &str, headers: &[(&str, &str)]) -> SseClient {
    SseClient::connect_with(&reqwest::Client::new(), &h.url(path), None, headers).await
}

/// A stream refused before it started: the HTTP status itself (which `EventSource` does not
/// retry), with a JSON body naming why.
async fn expect_refused(c: SseClient, error: &str, status: u16) {
    assert_eq!(c.status, status, "the stream request itself is refused");
    let body = c.resp.text().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(v["error"], error, "{body}");
}

/// The final `error` event of a stream whose access ended, then a clean end.
async fn expect_access_error(c: &mut SseClient, error: &str, status: u64) {
    let ev = c.expect_event("an access error", T).await;
    assert_eq!(ev.event, "error", "{ev:?}");
    assert_eq!(ev.json()["data"], json!({"error": error, "status": status}));
    assert!(matches!(c.next_item(T).await, Next::End), "the stream ends");
}

#[tokio::test]
async fn two_users_never_see_each_others_events() {
    let up = TestUpstream::start().await;
    up.set_for(
        ME,
        "session=a",
        Reply::json(json!({"user": "alice", "n": 0})),
    );
    up.set_for(ME, "session=b", Reply::json(json!({"user": "bob", "n": 0})));
    let h = start_herald(config(
        &up.url(),
        &per_user_route("vary = [\"cookie:session\"]"),
    ))
    .await;

    let mut alice = connect(&h, ME, &[("cookie", "theme=dark; session=a")]).await;
    let mut bob = connect(&h, ME, &[("cookie", "session=b; theme=light")]).await;
    assert_eq!(
        alice.expect_event("snapshot", T).await.json()["data"]["user"],
        "alice"
    );
    assert_eq!(
        bob.expect_event("snapshot", T).await.json()["data"]["user"],
        "bob"
    );
    assert_eq!(h.hub.topic_count(), 2);

    // Alice changes first; Bob's next event must be his own change, not hers.
    up.set_for(
        ME,
        "session=a",
        Reply::json(json!({"user": "alice", "n": 1})),
    );
    let ev = alice.expect_event("alice's change", T).await;
    assert!(!ev.data.contains("bob"), "{ev:?}");
    up.set_for(ME, "session=b", Reply::json(json!({"user": "bob", "n": 7})));
    let ev = bob.expect_event("bob's change", T).await;
    // A body this small changes by snapshot (a patch would not be smaller).
    assert_eq!(ev.json()["data"], json!({"user": "bob", "n": 7}), "{ev:?}");

    // Only the varied cookie went upstream, never the other client's.
    for s in up.seen() {
        let c = credential_of(&s.headers);
        assert!(c == "session=a" || c == "session=b", "forwarded {c:?}");
    }
    drop((alice, bob));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn two_clients_of_one_user_share_one_poller() {
    let up = TestUpstream::start().await;
    up.set_for(ME, "session=a", Reply::json(json!({"user": "alice"})));
    let h = start_herald(config(
        &up.url(),
        &format!("[[route]]\npath = \"{ME}\"\ninterval = \"200ms\"\nvary = [\"cookie:session\"]\n"),
    ))
    .await;
    let mut tab1 = connect(&h, ME, &[("cookie", "session=a; tab=1")]).await;
    let mut tab2 = connect(&h, ME, &[("cookie", "tab=2; session=a")]).await;
    tab1.expect_event("snapshot", T).await;
    tab2.expect_event("snapshot", T).await;
    assert_eq!(h.hub.topic_count(), 1, "one topic, one poller");
    let before = up.hits_by(ME, "session=a");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let polls = up.hits_by(ME, "session=a") - before;
    assert!(
        (3..=6).contains(&polls),
        "{polls} polls in 1s at 200ms for two tabs"
    );
    drop((tab1, tab2));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn shared_route_costs_one_poll_per_interval_for_fifty_users() {
    let up = TestUpstream::start().await;
    up.set_json("/api/projects/7", json!({"project": 7, "status": "green"}));
    for i in 0..50 {
        up.set_for(
            "/api/projects/7/access",
            &format!("Bearer u{i}"),
            Reply::json(json!({})),
        );
    }
    up.set_for(
        "/api/projects/7/access",
        "Bearer outsider",
        Reply::status(403, "{}"),
    );
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/api/projects/{id}\"\ninterval = \"200ms\"\nshare = \"all\"\n\
         auth = { url = \"/api/projects/{id}/access\" }\n",
    ))
    .await;
    let mut clients = Vec::new();
    for i in 0..50 {
        let token = format!("Bearer u{i}");
        let mut c = connect(&h, "/api/projects/7", &[("authorization", &token)]).await;
        assert_eq!(c.status, 200);
        c.expect_event("snapshot", T).await;
        clients.push(c);
    }
    assert_eq!(h.hub.topic_count(), 1);
    assert_eq!(up.hits("/api/projects/7/access"), 50, "one check per user");
    // The shared poll never carries anyone's credentials.
    assert!(up
        .seen()
        .iter()
        .filter(|s| s.path_and_query == "/api/projects/7")
        .all(|s| credential_of(&s.headers).is_empty()));
    let before = up.hits("/api/projects/7");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let polls = up.hits("/api/projects/7") - before;
    assert!((3..=6).contains(&polls), "{polls} polls in 1s for 50 users");

    // A second tab of a user is answered from the cache; others are refused before any data.
    let again = connect(&h, "/api/projects/7", &[("authorization", "Bearer u3")]).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        up.hits("/api/projects/7/access"),
        50,
        "cached per credential"
    );
    let outsider = connect(
        &h,
        "/api/projects/7",
        &[("authorization", "Bearer outsider")],
    )
    .await;
    assert_eq!(outsider.status, 403);
    let stranger = connect(&h, "/api/projects/7", &[]).await;
    assert_eq!(stranger.status, 401);
    drop((clients, again, outsider, stranger));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn expired_session_is_cut_within_reauth() {
    let up = TestUpstream::start().await;
    up.set_json("/api/projects/1", json!({"project": 1}));
    up.set_for(
        "/api/projects/1/access",
        "session=a",
        Reply::json(json!({})),
    );
    up.set_for(
        "/api/projects/1/access",
        "session=b",
        Reply::json(json!({})),
    );
    let reauth = Duration::from_millis(300);
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/api/projects/{id}\"\ninterval = \"50ms\"\nshare = \"all\"\n\
         auth = { url = \"/api/projects/{id}/access\", cache = \"100ms\" }\nreauth = \"300ms\"\n",
    ))
    .await;
    let mut alice = connect(&h, "/api/projects/1", &[("cookie", "session=a")]).await;
    let mut bob = connect(&h, "/api/projects/1", &[("cookie", "session=b")]).await;
    alice.expect_event("snapshot", T).await;
    bob.expect_event("snapshot", T).await;

    // Alice's session expires upstream; Bob's does not.
    up.set_for(
        "/api/projects/1/access",
        "session=a",
        Reply::status(401, "{}"),
    );
    let expired = Instant::now();
    expect_access_error(&mut alice, "unauthorized", 401).await;
    let took = expired.elapsed();
    assert!(
        took <= reauth + Duration::from_millis(250),
        "cut after {took:?}"
    );
    // Bob is still streaming (re-checked as allowed meanwhile).
    up.set_json("/api/projects/1", json!({"project": 1, "status": "red"}));
    let ev = bob.expect_event("bob's change", T).await;
    assert_eq!(ev.json()["data"]["status"], "red", "{ev:?}");
    // Permission withdrawn: 403.
    up.set_for(
        "/api/projects/1/access",
        "session=b",
        Reply::status(403, "{}"),
    );
    expect_access_error(&mut bob, "forbidden", 403).await;
    drop((alice, bob));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn upstream_401_ends_the_users_streams_and_hides_cached_data() {
    let up = TestUpstream::start().await;
    up.set_for(
        ME,
        "Bearer alice",
        Reply::json(json!({"user": "alice", "secret": 1})),
    );
    let h = start_herald(config(&up.url(), &per_user_route(""))).await;
    let mut tab1 = connect(&h, ME, &[("authorization", "Bearer alice")]).await;
    let mut tab2 = connect(&h, ME, &[("authorization", "Bearer alice")]).await;
    tab1.expect_event("snapshot", T).await;
    tab2.expect_event("snapshot", T).await;

    up.set_for(ME, "Bearer alice", Reply::status(401, "{}"));
    expect_access_error(&mut tab1, "unauthorized", 401).await;
    expect_access_error(&mut tab2, "unauthorized", 401).await;
    // A new client with the refused credential is never shown the cached snapshot.
    let late = connect(&h, ME, &[("authorization", "Bearer alice")]).await;
    expect_refused(late, "unauthorized", 401).await;

    up.set_for(ME, "Bearer alice", Reply::status(403, "{}"));
    let denied = connect(&h, ME, &[("authorization", "Bearer alice")]).await;
    expect_refused(denied, "forbidden", 403).await;
    drop((tab1, tab2));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn replay_with_a_stolen_event_id_but_no_credentials_gets_nothing() {
    let up = TestUpstream::start().await;
    up.set_for(
        ME,
        "session=a",
        Reply::json(json!({"user": "alice", "n": 0})),
    );
    up.set_for(ME, "session=b", Reply::json(json!({"user": "bob", "n": 0})));
    let h = start_herald(config(&up.url(), &per_user_route(""))).await;
    let mut alice = connect(&h, ME, &[("cookie", "session=a")]).await;
    let snap = alice.expect_event("snapshot", T).await;
    up.set_for(
        ME,
        "session=a",
        Reply::json(json!({"user": "alice", "n": 1})),
    );
    alice.expect_event("patch", T).await;
    let stolen = snap.id.clone().expect("an id");

    // No credentials: the upstream refuses them; nothing of Alice's comes out.
    let thief = SseClient::connect(&h.url(ME), Some(&stolen)).await;
    expect_refused(thief, "unauthorized", 401).await;
    // Someone else's credentials: their own fresh snapshot, not Alice's patches.
    let mut bob = SseClient::connect_with(
        &reqwest::Client::new(),
        &h.url(ME),
        Some(&stolen),
        &[("cookie", "session=b")],
    )
    .await;
    let ev = bob.expect_event("bob's snapshot", T).await;
    assert_eq!(ev.event, "snapshot");
    assert_eq!(ev.json()["data"]["user"], "bob");
    drop((alice, bob));
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn access_token_parameter_works_and_never_reaches_topics_or_logs() {
    let logs = logs();
    let up = TestUpstream::start().await;
    let token = "tok-9f8e7d6c5b4a";
    up.set_for(
        ME,
        &format!("Bearer {token}"),
        Reply::json(json!({"user": "carol"})),
    );
    let h = start_herald(config(
        &up.url(),
        // `reject`: the token parameter is a credential, not an unknown topic parameter.
        &per_user_route(
            "access_token = \"access_token\"\nquery = [\"page\"]\nunknown_query = \"reject\"",
        ),
    ))
    .await;
    let mut c = connect(&h, &format!("{ME}?page=1&access_token={token}"), &[]).await;
    let ev = c.expect_event("snapshot", T).await;
    assert_eq!(ev.json()["data"]["user"], "carol");
    assert_eq!(ev.json()["topic"], "/api/me/notifications?page=1");
    let polled: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|s| s.path_and_query.starts_with(ME))
        .collect();
    assert!(!polled.is_empty());
    for s in &polled {
        assert_eq!(s.path_and_query, "/api/me/notifications?page=1");
        assert_eq!(
            s.headers["authorization"],
            format!("Bearer {token}").as_str()
        );
    }
    drop(c);
    h.stop().await;
    up.stop().await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("poller"), "logs were captured");
    assert!(!text.contains(token), "the token was logged");
}

// ---- JWT ----------------------------------------------------------------------------------

const SECRET: &str = "a-test-secret-of-32-bytes-length";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_valid_expired_bad_signature_and_closed_at_exp() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, format!("{SECRET}\n")).unwrap();
    let up = TestUpstream::start().await;
    // The upstream echoes what it is sent: herald forwards the bearer token it verified.
    let h = start_herald(config(
        &up.url(),
        &per_user_route(&format!(
            "jwt = {{ alg = \"HS256\", key = \"{}\" }}",
            key.display()
        )),
    ))
    .await;

    let good = hs256(json!({"sub": "dave", "exp": now() + 600}), SECRET);
    let bearer = format!("Bearer {good}");
    let mut ok = connect(&h, ME, &[("authorization", &bearer)]).await;
    assert_eq!(ok.status, 200);
    let ev = ok.expect_event("snapshot", T).await;
    assert_eq!(
        ev.json()["data"]["headers"]["authorization"],
        bearer.as_str()
    );
    // Another token of the same user is its own topic, polled with its own token: the upstream
    // decides on the token, not on `sub` (routes that know better list `topic_claims`).
    let other = hs256(json!({"sub": "dave", "exp": now() + 700, "n": 2}), SECRET);
    let mut ok2 = connect(&h, ME, &[("authorization", &format!("Bearer {other}"))]).await;
    let ev2 = ok2.expect_event("snapshot", T).await;
    assert_eq!(
        ev2.json()["data"]["headers"]["authorization"],
        format!("Bearer {other}").as_str()
    );
    assert_eq!(h.hub.topic_count(), 2);

    let expired = hs256(json!({"sub": "dave", "exp": now() - 10}), SECRET);
    let c = connect(&h, ME, &[("authorization", &format!("Bearer {expired}"))]).await;
    assert_eq!(c.status, 401);
    let forged = hs256(
        json!({"sub": "dave", "exp": now() + 600}),
        "another-secret-another-secret-!!",
    );
    let c = connect(&h, ME, &[("authorization", &format!("Bearer {forged}"))]).await;
    assert_eq!(c.status, 401);
    let c = connect(&h, ME, &[]).await;
    assert_eq!(c.status, 401, "no token");

    // A token valid for ~2 more seconds: the stream ends at exp with an error.
    let exp = now() + 2;
    let short = hs256(json!({"sub": "erin", "exp": exp}), SECRET);
    let mut s = connect(&h, ME, &[("authorization", &format!("Bearer {short}"))]).await;
    // Told at once that the token expires (sooner than `expiry_notice`), then the snapshot.
    let mut seen = Vec::new();
    let ev = loop {
        let ev = s.expect_event("auth-expired", T).await;
        if ev.event == "auth-expired" {
            break ev;
        }
        seen.push(ev.event);
    };
    assert_eq!(seen, ["auth-expiring", "snapshot"]);
    assert_eq!(ev.event, "auth-expired", "{ev:?}");
    assert_eq!(ev.json()["data"]["status"], 401);
    assert!(matches!(s.next_item(T).await, Next::End), "the stream ends");
    let ended = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let late = ended.saturating_sub(Duration::from_secs(exp));
    assert!(
        ended >= Duration::from_secs(exp) && late < Duration::from_millis(500),
        "closed {late:?} after exp"
    );
    drop((ok, ok2, s));
    h.stop().await;
    up.stop().await;
}

/// base64url without padding, for a hand-made JWKS.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn jwt_es256_from_a_jwks_in_a_cookie() {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw(); // 0x04 || x || y
    assert_eq!(raw.len(), 65);
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..]),
    }]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    let up = TestUpstream::start().await;
    let h = start_herald(config(
        &up.url(),
        &per_user_route(&format!(
            "jwt = {{ alg = \"ES256\", jwks = \"{}\", cookie = \"jwt\", claim = \"uid\" }}",
            path.display()
        )),
    ))
    .await;
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let token =
        jsonwebtoken::encode(&header, &json!({"uid": 42, "exp": now() + 600}), &signing).unwrap();
    let mut c = connect(&h, ME, &[("cookie", &format!("other=1; jwt={token}"))]).await;
    assert_eq!(c.status, 200);
    let ev = c.expect_event("snapshot", T).await;
    // Only the token's cookie is forwarded.
    assert_eq!(
        ev.json()["data"]["headers"]["cookie"],
        format!("jwt={token}").as_str()
    );
    let bad = jsonwebtoken::encode(
        &header,
        &json!({"uid": 42, "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_ec_pem(
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap()
                .serialize_pem()
                .as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    let refused = connect(&h, ME, &[("cookie", &format!("jwt={bad}"))]).await;
    assert_eq!(refused.status, 401);
    drop((c, refused));
    h.stop().await;
    up.stop().await;
}

#[test]
fn config_errors_name_the_key() {
    let bad = [
        ("share = \"all\"\nvary = [\"cookie\"]", "vary"),
        ("vary = []", "vary"),
        ("vary = [\"cookies\"]", "unknown credential source"),
        ("reauth = \"1m\"", "reauth"),
        ("access_token = \"t\"\nquery = [\"t\"]", "access_token"),
        (
            "access_token = \"t\"\nvary = [\"cookie:s\"]",
            "access_token",
        ),
        ("auth = { url = \"/x/{nope}\" }", "not a parameter"),
        ("jwt = { alg = \"HS256\" }", "exactly one of"),
        (
            "jwt = { alg = \"HS256\", key = \"/nonexistent/key\" }",
            "cannot read",
        ),
        ("jwt = { alg = \"XS256\", key = \"k\" }", "unknown variant"),
    ];
    for (extra, expect) in bad {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n[[route]]\npath = \"/a/{{id}}\"\n{extra}\n"
        );
        let err = herald::config::parse(&text, "t.toml")
            .expect_err(extra)
            .to_string();
        assert!(err.contains(expect), "{extra}: {err}");
        assert!(err.starts_with("t.toml:"), "{err}");
    }
}
