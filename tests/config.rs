//! Configuration errors name the file, the line and the key, and say what was expected; a valid
//! file (the shipped example) passes `herald check`.

use std::process::Command;

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "proxy.toml");
    (out.status.code().unwrap_or(-1), stderr)
}

const HEAD: &str = "listen = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:3000\"\n";

#[test]
fn example_config_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml.example"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn errors_name_file_line_and_key() {
    let cases: &[(&str, &str)] = &[
        // unknown key
        ("[sse]\nhistroy = 10\n", "proxy.toml:4:1: [sse] histroy: unknown field `histroy`"),
        // bad duration
        ("[[route]]\npath = \"/a\"\ninterval = \"2x\"\n", "proxy.toml:5:12: [[route]] interval: invalid duration \"2x\""),
        // interval too short (validation, with the route named)
        ("[[route]]\npath = \"/a/{id}\"\ninterval = \"1ms\"\n", "proxy.toml:5:12: route \"/a/{id}\" interval: must be at least 10ms"),
        // duplicate route
        ("[[route]]\npath = \"/a\"\n[[route]]\npath = \"/a\"\n", "proxy.toml:6:8: route \"/a\" path: the same path is listed twice"),
        // bad template
        ("[[route]]\npath = \"/a/{id\"\n", "proxy.toml:4:8: [[route]] path: invalid path \"/a/{id\": a parameter must be a whole segment"),
        ("[[route]]\npath = \"/a/../b\"\n", "no '.' or '..' segments"),
        ("[[route]]\npath = \"a\"\n", "it must start with '/'"),
        // bad enum
        ("[[route]]\npath = \"/a\"\ndiff = \"xml\"\n", "proxy.toml:5:8: [[route]] diff: unknown variant `xml`, expected one of `json-patch`, `merge-patch`, `snapshot`"),
        // missing key
        ("[[route]]\ninterval = \"1s\"\n", "proxy.toml:3:1: [[route]] path: missing field `path`"),
        // bad size
        ("[sse]\nhistory_bytes = \"12 parsecs\"\n", "proxy.toml:4:17: [sse] history_bytes: invalid size"),
        // wrong type
        ("[sse]\nhistory = \"many\"\n", "proxy.toml:4:11: [sse] history: invalid type: string \"many\", expected usize"),
        // heartbeat too short
        ("[sse]\nheartbeat = \"1ms\"\n", "proxy.toml:4:13: sse.heartbeat: must be at least 10ms"),
        // TLS session-ticket key rotation out of range
        ("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nticket_lifetime = \"0s\"\n", "proxy.toml:6:19: tls.ticket_lifetime: must be at least 1s"),
        ("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nticket_lifetime = \"8days\"\n", "proxy.toml:6:19: tls.ticket_lifetime: must be at most 7 days"),
        ("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nsession_cache = \"big\"\n", "proxy.toml:6:17: [tls] session_cache: invalid type"),
        // cluster keys, each at its line
        ("[cluster]\nredis = \"http://x\"\nsecret = \"0123456789abcdef\"\n", "proxy.toml:4:9: cluster.redis: expected a URL like"),
        ("[cluster]\nredis = \"redis://x\"\n", "proxy.toml:4:9: cluster.redis: needs cluster.secret"),
        ("[cluster]\nredis = \"redis://x\"\nsecret = \"0123456789abcdef\"\nlease = \"10ms\"\n", "proxy.toml:6:9: cluster.lease: must be at least 500ms"),
        ("[cluster]\nredis = \"redis://x\"\nsecret = \"0123456789abcdef\"\non_unavailable = \"maybe\"\n", "proxy.toml:6:18: cluster.on_unavailable: expected \"fail\" or \"local\""),
        ("[cluster]\nredis = \"redis://x\"\nsecret = \"0123456789abcdef\"\nnode = \"a b\"\n", "proxy.toml:6:8: cluster.node: expected 1 to 64 letters"),
        ("[cluster]\nredis = \"redis://x\"\nsecret = \"0123456789abcdef\"\nretention = 0\n", "proxy.toml:6:13: cluster.retention: must be at least 1"),
    ];
    for (extra, expected) in cases {
        let (code, err) = check(&format!("{HEAD}{extra}"));
        assert_eq!(code, 64, "exit code for {extra:?}: {err}");
        assert!(
            err.contains(expected),
            "for {extra:?}\n expected: {expected}\n got: {err}"
        );
    }
    let (code, err) = check("listen = \"nope\"\nupstream = \"ftp://x\"\n");
    assert_eq!(code, 64);
    assert!(
        err.contains("proxy.toml:1:10: listen: invalid socket address syntax"),
        "{err}"
    );
    let (code, err) = check("listen = \"127.0.0.1:1\"\nupstream = \"ftp://x\"\n");
    assert_eq!(code, 64);
    assert!(err.contains("proxy.toml:2:12: upstream: invalid upstream \"ftp://x\": the scheme must be http or https"), "{err}");
    let (code, err) = check("upstream = \"http://x\"\n");
    assert_eq!(code, 64);
    assert!(err.contains("listen: missing field `listen`"), "{err}");
    let (code, err) = check("this is not toml");
    assert_eq!(code, 64);
    assert!(err.starts_with("proxy.toml:1:"), "{err}");
}

#[test]
fn every_validation_problem_is_reported_at_once() {
    let (code, err) = check(&format!(
        "{HEAD}[[route]]\npath = \"/a\"\ninterval = \"1ms\"\n[[route]]\npath = \"/a\"\ninterval = \"5ms\"\n"
    ));
    assert_eq!(code, 64);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].starts_with("proxy.toml:5:"));
    assert!(lines[1].contains("the same path is listed twice"));
    assert!(lines[2].starts_with("proxy.toml:8:"));
}

#[test]
fn missing_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["check", "--config", "/nonexistent/herald.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/herald.toml: cannot read"));
}

#[test]
fn run_refuses_bad_config_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nupstream = \"http://x\"\n[[route]]\npath = \"/a\"\ninterval = \"0s\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interval: must be at least 10ms"));
}

/// Unknown keys in two tables: both reported in one run, each at its own line, with the key
/// that was probably meant.
#[test]
fn unknown_keys_of_every_table_are_reported_together() {
    let (code, err) = check(&format!(
        "{HEAD}\n[sse]\nhistroy = 5\n\n[[route]]\npath = \"/api/builds/{{id}}\"\nintervall = \"1s\"\n"
    ));
    assert_eq!(code, 64, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "proxy.toml:5:1: [sse] histroy: unknown field `histroy` (did you mean `history`?)",
            "proxy.toml:9:1: [[route]] intervall: unknown field `intervall` (did you mean `interval`?)",
        ],
        "{err}"
    );
}

/// A bad value in one route (a duplicate `{a}`) hides nothing: the other route's interval, the
/// route that overlaps the multiplexed stream's default path, and `*` with credentials are all
/// reported, in file order, each at the line where it is written.
#[test]
fn a_bad_route_hides_no_other_problem() {
    let text = format!(
        "{HEAD}\n\
         [cors]\n\
         origins = [\"*\"]\n\
         credentials = true\n\
         \n\
         [[route]]\n\
         path = \"/api/{{a}}/x/{{a}}\"\n\
         \n\
         [[route]]\n\
         path = \"/api/builds/{{id}}\"\n\
         interval = \"1ms\"\n\
         \n\
         [[route]]\n\
         path = \"/_herald/{{name}}\"\n"
    );
    let (code, err) = check(&text);
    assert_eq!(code, 64, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let expect = [
        "proxy.toml:6:15: cors.credentials: cannot be true with origins = [\"*\"]",
        "proxy.toml:9:8: [[route]] path: invalid path \"/api/{a}/x/{a}\": parameter {a} appears twice",
        "proxy.toml:13:12: route \"/api/builds/{id}\" interval: must be at least 10ms, got 1ms",
        "proxy.toml:16:8: route \"/_herald/{name}\" path: also matches \"/_herald/stream\", herald's own mux.path",
        "proxy.toml:16:8: route \"/_herald/{name}\" path: also matches \"/_herald/client.js\", herald's own mux.client",
    ];
    assert_eq!(lines.len(), expect.len(), "{err}");
    for (line, want) in lines.iter().zip(expect) {
        assert!(
            line.starts_with(want),
            "expected {want}\n got {line}\n in {err}"
        );
    }
}

/// An unusable required key (`listen`, `upstream`) does not stop the check either.
#[test]
fn bad_required_keys_hide_nothing_else() {
    let (code, err) = check(
        "listen = \"nope\"\nupstream = \"ftp://x\"\n[server]\nmax_connections = 0\n[[route]]\npath = \"/a\"\ninterval = \"1ms\"\n",
    );
    assert_eq!(code, 64);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(lines[0].starts_with("proxy.toml:1:10: listen: invalid socket address"));
    assert!(lines[1].starts_with("proxy.toml:2:12: upstream: invalid upstream"));
    assert!(lines[2].starts_with("proxy.toml:4:19: server.max_connections: must be at least 1"));
    assert!(lines[3].starts_with("proxy.toml:7:12: route \"/a\" interval"));
}
