//! Pass-through paths stay under the upstream's prefix, byte for byte: a path with a dot segment
//! in any encoding is refused (400) and never reaches the upstream; every other path reaches it
//! exactly as the client sent it, under the prefix. Checked with a raw upstream that records the
//! request line, and by property tests over raw request targets.

mod common;

use std::time::Duration;

use common::raw::RawUpstream;
use common::*;
use herald::server::proxy::pass::{Base, TargetError};
use proptest::prelude::*;

const ROUTES: &str = "[[route]]\npath = \"/api/builds/{id}\"\ninterval = \"1s\"\n";

/// `GET <target>` on a fresh connection; the raw response.
async fn get(addr: std::net::SocketAddr, target: &str) -> String {
    let req = format!("GET {target} HTTP/1.1\r\nHost: herald.test\r\nConnection: close\r\n\r\n");
    raw_request(addr, req.as_bytes(), Duration::from_secs(3)).await
}

#[tokio::test]
async fn dot_segments_are_refused_and_never_reach_the_upstream() {
    let up = RawUpstream::echo().await;
    let h = start_herald(config(&up.url("/legacy"), ROUTES)).await;
    for target in [
        "/../secret",
        "/%2e%2e/secret",
        "/.%2e/secret",
        "/%2E%2E/secret",
        "/echo/%2e%2e/%2e%2e/secret",
        "/echo/%2e%2e/x/./y//z",
        "/./secret",
        "/echo/..;/..;/secret",
        "/echo/%252e%252e/%252e%252e/secret",
        "/echo/%c0%ae%c0%ae/secret",
        "/echo\\..\\..\\secret",
        "/echo/..",
        "/echo/%2e?x=1",
    ] {
        let resp = get(h.addr, target).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{target}: {resp}");
        assert!(
            resp.contains("\"error\":\"bad-request\""),
            "{target}: {resp}"
        );
        assert!(resp.contains("dot segment"), "{target}: {resp}");
    }
    assert_eq!(
        up.seen().iter().map(|r| r.line.clone()).collect::<Vec<_>>(),
        Vec::<String>::new(),
        "refused paths reach nothing"
    );
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn targets_reach_the_upstream_byte_for_byte_under_the_prefix() {
    let up = RawUpstream::echo().await;
    let h = start_herald(config(&up.url("/legacy"), ROUTES)).await;
    for (target, upstream_sees) in [
        ("/", "/legacy/"),
        ("/echo/x//y///z", "/legacy/echo/x//y///z"),
        (
            "/echo/%2e%2ex/.x/x./..x/a..b",
            "/legacy/echo/%2e%2ex/.x/x./..x/a..b",
        ),
        (
            "/echo/{a}/%7b%7D/a%2Fb/a%5Cb",
            "/legacy/echo/{a}/%7b%7D/a%2Fb/a%5Cb",
        ),
        ("/echo/a\\b", "/legacy/echo/a\\b"),
        (
            "/echo/caf%C3%A9/%25/~!$&'()*+,;=:@",
            "/legacy/echo/caf%C3%A9/%25/~!$&'()*+,;=:@",
        ),
        (
            "/echo?q='x'&r=%20&s=../..&t",
            "/legacy/echo?q='x'&r=%20&s=../..&t",
        ),
        ("//evil.example/x", "/legacy//evil.example/x"),
        // Stream routes without Accept: text/event-stream are ordinary pass-through.
        ("/api/builds/7?verbose=1", "/legacy/api/builds/7?verbose=1"),
    ] {
        up.clear();
        let resp = get(h.addr, target).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{target}: {resp}");
        let seen = up.seen();
        assert_eq!(seen.len(), 1, "{target}");
        assert_eq!(
            seen[0].line,
            format!("GET {upstream_sees} HTTP/1.1"),
            "{target}"
        );
    }
    h.stop().await;

    // Without a prefix, the target is the upstream's as it came.
    let h = start_herald(config(&up.url(""), ROUTES)).await;
    for target in ["//x//y", "/a\\b?c=d"] {
        up.clear();
        assert!(get(h.addr, target).await.starts_with("HTTP/1.1 200"));
        assert_eq!(up.seen()[0].line, format!("GET {target} HTTP/1.1"));
    }
    h.stop().await;
    up.stop().await;
}

#[tokio::test]
async fn stream_parameters_that_decode_to_dots_are_refused() {
    let up = TestUpstream::start().await;
    let h = start_herald(config(&up.url(), ROUTES)).await;
    for path in [
        "/api/builds/..;",
        "/api/builds/..;x=1",
        "/api/builds/%252e%252e",
        "/api/builds/%c0%ae%c0%ae",
        "/api/builds/%c0%ae",
        "/api/builds/%252f",
        "/api/builds/%u002e%u002e",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
        );
        let resp = raw_request(h.addr, req.as_bytes(), Duration::from_secs(2)).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
        assert!(
            resp.contains("must be one plain path segment"),
            "{path}: {resp}"
        );
    }
    assert_eq!(up.total_hits(), 0, "no poll for a refused stream");
    h.stop().await;
    up.stop().await;
}

// --- Properties ----------------------------------------------------------------------------

fn lossy_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where backends could take `path`: resolved by a WHATWG URL parser (dot segments, `%2e`, `\`
/// as a separator), as sent and after one or two more rounds of decoding, with and without
/// Tomcat-style `;params` cut from each segment.
fn resolutions(path: &str) -> Vec<String> {
    let once = lossy_decode(path);
    let twice = lossy_decode(&once);
    let mut out = Vec::new();
    for form in [path.to_string(), once, twice] {
        let no_params: String = form
            .split('/')
            .map(|seg| seg.split(';').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("/");
        for f in [form.clone(), no_params] {
            // `#` and `?` would end the path for the parser: escape them to keep it a path.
            let f = f.replace('#', "%23").replace('?', "%3F");
            if let Ok(u) = reqwest::Url::parse(&format!("http://h{f}")) {
                out.push(u.path().to_string());
            }
        }
    }
    out
}

fn under(path: &str, prefix: &str) -> bool {
    path == prefix || path.starts_with(&format!("{prefix}/"))
}

fn path_like() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("."),
            Just(".."),
            Just("/"),
            Just("\\"),
            Just("%2e"),
            Just("%2E"),
            Just("%25"),
            Just("%252e"),
            Just("%c0%ae"),
            Just("%2f"),
            Just("%5c"),
            Just(";"),
            Just("a"),
            Just("%"),
            Just("?"),
            Just("#"),
        ],
        0..16,
    )
    .prop_map(|parts| format!("/{}", parts.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Whatever the target, the URI built for it names the configured host and a path under the
    /// prefix, which no backend's resolution of it leaves; and any target it accepts is appended
    /// byte for byte.
    #[test]
    fn no_target_escapes_the_prefix(
        raw in prop_oneof![
            path_like(),
            "/[./\\\\%2eEcC05afF;?#]{0,32}",
            any::<String>().prop_map(|s| format!("/{s}")),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| format!("/{}", String::from_utf8_lossy(&b))),
        ]
    ) {
        let base = Base::new(&reqwest::Url::parse("http://up.internal:3200/legacy").unwrap()).unwrap();
        match base.target(&raw) {
            Ok(uri) => {
                prop_assert_eq!(uri.authority().unwrap().as_str(), "up.internal:3200");
                prop_assert!(under(uri.path(), "/legacy"), "{} -> {}", raw, uri);
                // A `#` ends a request target (what follows is a fragment, never sent).
                let sent = raw.split('#').next().unwrap_or("");
                prop_assert_eq!(uri.path_and_query().unwrap().as_str(), format!("/legacy{sent}"));
                for resolved in resolutions(uri.path()) {
                    prop_assert!(under(&resolved, "/legacy"), "{} -> {} -> {}", raw, uri, resolved);
                }
            }
            Err(TargetError::DotSegment) | Err(TargetError::Invalid) => {}
        }
    }
}

/// A smaller sample end to end: whatever herald forwards arrives exactly as sent, under the
/// prefix; the rest is refused before anything is sent.
#[test]
fn sampled_targets_end_to_end() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (up, h) = rt.block_on(async {
        let up = RawUpstream::echo().await;
        let h = start_herald(config(&up.url("/legacy"), ROUTES)).await;
        (up, h)
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(150));
    let result = runner.run(&path_like(), |target| {
        up.clear();
        let resp = rt.block_on(get(h.addr, &target));
        let seen = up.seen();
        if resp.starts_with("HTTP/1.1 200") {
            prop_assert_eq!(seen.len(), 1);
            let sent = target.split('#').next().unwrap_or("");
            prop_assert_eq!(&seen[0].line, &format!("GET /legacy{sent} HTTP/1.1"));
            let sent = seen[0].target().split('?').next().unwrap_or("").to_string();
            for resolved in resolutions(&sent) {
                prop_assert!(under(&resolved, "/legacy"), "{} -> {}", target, resolved);
            }
        } else {
            prop_assert!(resp.starts_with("HTTP/1.1 400"), "{}: {}", target, resp);
            prop_assert!(
                seen.is_empty(),
                "{} reached the upstream: {:?}",
                target,
                seen
            );
        }
        Ok(())
    });
    rt.block_on(async {
        h.stop().await;
        up.stop().await;
    });
    result.unwrap();
}
