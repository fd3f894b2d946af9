//! What the `herald` binary writes to stderr, read the way an operator reads it (a file, a pipe,
//! a terminal): no colour codes unless stderr is a terminal, no line a client can forge, an access
//! line per pass-through request, and no credentials.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

mod common;

const T: Duration = Duration::from_secs(15);

/// A running `herald` binary and the lines it has written so far (stderr, or the terminal).
struct Herald {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Arc<Notify>,
    _dir: tempfile::TempDir,
}

/// A free port on 127.0.0.1 (bound and released: `listening` logs the configured address, so
/// the test must know it in advance).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Herald {
    /// `herald run` with `config`, stderr to a pipe read line by line; `env` added to a clean
    /// logging environment (no RUST_LOG, no NO_COLOR unless given).
    async fn run(config: &str, env: &[(&str, &str)]) -> Herald {
        Self::run_with(config, env, &[]).await
    }

    /// `run`, with extra command-line arguments (`--log-format json`).
    async fn run_with(config: &str, env: &[(&str, &str)], args: &[&str]) -> Herald {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), config);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(args).arg("run").arg("--config").arg(&path);
        Self::spawn(cmd, env, None, dir)
    }

    /// Start `cmd` in a clean logging environment plus `env`; stderr to `stderr_file` if given
    /// (then only stdout is read), else read like stdout.
    fn spawn(
        mut cmd: Command,
        env: &[(&str, &str)],
        stderr_file: Option<std::fs::File>,
        dir: tempfile::TempDir,
    ) -> Herald {
        let to_file = stderr_file.is_some();
        cmd.env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_file.map_or_else(Stdio::piped, Stdio::from))
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        let mut outputs: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> =
            vec![Box::new(child.stdout.take().unwrap())];
        if !to_file {
            outputs.push(Box::new(child.stderr.take().unwrap()));
        }
        for out in outputs {
            let (lines, new_line) = (lines.clone(), new_line.clone());
            tokio::spawn(async move {
                let mut reader = BufReader::new(out).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(line);
                    new_line.notify_waiters();
                }
            });
        }
        Herald {
            child,
            lines,
            new_line,
            _dir: dir,
        }
    }

    /// The first line so far that satisfies `f`, waiting for it (panics after `T`).
    async fn line(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        tokio::time::timeout(T, async {
            loop {
                let notified = self.new_line.notified();
                if let Some(l) = self.lines.lock().unwrap().iter().find(|l| f(l)) {
                    return l.clone();
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} line in:\n{}", self.text()))
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// SIGTERM, then wait for it to drain and exit; everything it wrote.
    async fn stop(self) -> String {
        let pid = self.child.id().expect("still running").to_string();
        self.stop_process(&pid).await
    }

    /// SIGTERM to `pid` (herald itself, when the child runs it), then wait for the child's exit.
    async fn stop_process(mut self, pid: &str) -> String {
        let killed = std::process::Command::new("kill")
            .args(["-TERM", pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(T, self.child.wait())
            .await
            .expect("herald exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}: {}", self.text());
        // The readers end at EOF, right after the exit.
        tokio::time::timeout(T, async {
            while Arc::strong_count(&self.lines) > 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("output read to its end");
        self.text()
    }
}

/// `HEAD` plus `extra`, listening on `port`, the upstream at `upstream`.
fn config(port: u16, upstream: &str, extra: &str) -> String {
    format!("listen = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n{extra}")
}

/// A port with nothing listening on it: every request to it is refused.
fn closed_upstream() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// `s` with every byte but letters and digits percent-encoded.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn no_colour_codes_in_a_pipe() {
    let port = free_port();
    let h = Herald::run(&config(port, &closed_upstream(), ""), &[]).await;
    h.line("listening", |l| l.contains("listening")).await;
    let out = h.stop().await;
    assert!(out.contains("all connections drained"), "{out}");
    assert!(!out.contains("\x1b["), "colour codes in a pipe:\n{out:?}");
}

/// `herald demo 2>demo.err`: the file gets plain text.
#[tokio::test]
async fn no_colour_codes_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("demo.err");
    let err_file = std::fs::File::create(&err_path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("demo");
    for flag in [
        "--listen",
        "--upstream-listen",
        "--tls-listen",
        "--admin-listen",
    ] {
        cmd.args([flag, "127.0.0.1:0"]);
    }
    let h = Herald::spawn(cmd, &[], Some(err_file), tempfile::tempdir().unwrap());
    h.line("demo banner", |l| l.contains("Ctrl-C to stop"))
        .await;
    h.stop().await;
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(err.contains(" INFO "), "demo.err: {err}");
    assert!(!err.contains("\x1b["), "colour codes in demo.err:\n{err:?}");
}

/// On a terminal (a pty, from util-linux `script`) the colours stay, unless `NO_COLOR` is set.
#[tokio::test]
async fn colour_on_a_terminal_unless_no_color() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no `script` (util-linux) to give herald a terminal");
        return;
    }
    for (env, coloured) in [(&[][..], true), (&[("NO_COLOR", "1")][..], false)] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), &config(free_port(), &closed_upstream(), ""));
        // The shell prints its pid, then becomes herald: that pid is herald's.
        let shell = format!(
            "echo PID=$$; exec '{}' run --config '{}'",
            env!("CARGO_BIN_EXE_herald"),
            path.display()
        );
        let mut cmd = Command::new("script");
        cmd.args(["-qfec", &shell, "/dev/null"])
            .env("SHELL", "/bin/sh");
        let h = Herald::spawn(cmd, env, None, dir);
        let pid = h.line("pid", |l| l.starts_with("PID=")).await;
        let pid = pid.trim_start_matches("PID=").trim().to_string();
        h.line("listening", |l| l.contains("listening")).await;
        let out = h.stop_process(&pid).await;
        assert_eq!(out.contains("\x1b["), coloured, "{env:?}: {out:?}");
    }
}

/// A multiplexed stream's `watch=` value is percent-decoded into a topic, and the topic is in the
/// poller's span on its WARN line: a `%0A` in it must not start a line of its own.
#[tokio::test]
async fn a_client_cannot_forge_a_log_line() {
    let port = free_port();
    let route = "[[route]]\npath = \"/api/builds/{id}\"\nquery = [\"q\"]\n";
    let h = Herald::run(&config(port, &closed_upstream(), route), &[]).await;
    h.line("listening", |l| l.contains("listening")).await;
    let forged = "2025-01-01T00:00:00.000000Z  INFO herald::admin::reload: config reloaded";
    let watch = format!("/api/builds/1?q=x\n{forged}");
    let resp = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{port}/_herald/stream?watch={}",
            encode(&watch)
        ))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let warn = h
        .line("poll failure", |l| l.contains("upstream poll failed"))
        .await;
    drop(resp);
    let out = h.stop().await;
    assert!(
        out.lines().all(|l| !l.starts_with("2025-01-01")),
        "a forged line in the log:\n{out}"
    );
    assert!(warn.contains(&format!("q=x\\n{forged}")), "{warn}");
}

/// The JSON access lines in `out`.
fn access_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "herald::access")
        .collect()
}

/// Real pass-through requests, a 400 and a 502 among them: one access line each, when the
/// response has been sent, with what the client got.
#[tokio::test]
async fn pass_through_requests_are_access_logged() {
    let up = common::TestUpstream::start().await;
    let port = free_port();
    let h = Herald::run_with(&config(port, &up.url(), ""), &[], &["--log-format", "json"]).await;
    h.line("listening", |l| l.contains("listening")).await;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut sent = Vec::new();
    let get = client
        .get(format!("{base}/api/items?page=2&access%5Ftoken=SECRET"))
        .send()
        .await
        .unwrap();
    sent.push((200, get.bytes().await.unwrap().len()));
    let post = client
        .post(format!("{base}/api/items"))
        .body("a new item")
        .send()
        .await
        .unwrap();
    sent.push((200, post.bytes().await.unwrap().len()));
    let bad = client
        .get(format!("{base}/api/items/x"))
        .header("x-echo-status", "400")
        .send()
        .await
        .unwrap();
    sent.push((400, bad.bytes().await.unwrap().len()));
    let newline = client
        .get(format!("{base}/api/a%0Ab"))
        .send()
        .await
        .unwrap();
    sent.push((200, newline.bytes().await.unwrap().len()));
    up.stop().await;
    let gone = client
        .get(format!("{base}/api/items"))
        .send()
        .await
        .unwrap();
    sent.push((502, gone.bytes().await.unwrap().len()));
    // Written when each body has ended: wait for the last before stopping.
    h.line("502 access", |l| l.contains("\"status\":502")).await;
    let out = h.stop().await;

    let lines = access_lines(&out);
    assert_eq!(lines.len(), sent.len(), "{out}");
    let expect = [
        ("GET", "/api/items?page=2&access%5Ftoken=***"),
        ("POST", "/api/items"),
        ("GET", "/api/items/x"),
        ("GET", "/api/a%0Ab"),
        ("GET", "/api/items"),
    ];
    for ((line, (method, path)), (status, bytes)) in lines.iter().zip(expect).zip(&sent) {
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["path"], path, "{line}");
        assert_eq!(line["status"], *status, "{line}");
        assert_eq!(line["bytes"], *bytes as u64, "{line}");
        assert!(*bytes > 0);
        assert_eq!(line["protocol"], "HTTP/1.1", "{line}");
        assert!(
            line["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
        let duration = line["duration_ms"].as_f64().expect("a number");
        let upstream = line["upstream_ms"].as_f64().expect("a number");
        assert!(0.0 < upstream && upstream <= duration, "{line}");
    }
    assert!(!out.contains("SECRET"), "{out}");
}

#[tokio::test]
async fn access_log_can_be_turned_off() {
    let up = common::TestUpstream::start().await;
    let port = free_port();
    let text = config(port, &up.url(), "[log]\naccess = false\n");
    let h = Herald::run_with(&text, &[], &["--log-format", "json"]).await;
    h.line("listening", |l| l.contains("listening")).await;
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/api/items"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let out = h.stop().await;
    up.stop().await;
    assert!(access_lines(&out).is_empty(), "{out}");
}

/// With RUST_LOG=debug and the upstream unreachable, a pass-through with credentials in its query
/// logs why it failed, but neither the credentials nor the URL that carried them.
#[tokio::test]
async fn no_credentials_in_debug_logs_of_a_failed_pass_through() {
    let port = free_port();
    let upstream = closed_upstream();
    let h = Herald::run(&config(port, &upstream, ""), &[("RUST_LOG", "debug")]).await;
    h.line("listening", |l| l.contains("listening")).await;
    let resp = reqwest::get(format!(
        "http://127.0.0.1:{port}/api/items?access_token=SECRET1&token=SECRET2&%74oken=SECRET3"
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    resp.bytes().await.unwrap();
    let failed = h
        .line("pass-through failure", |l| {
            l.contains("pass-through failed")
        })
        .await;
    let access = h.line("access", |l| l.contains("herald::access")).await;
    let out = h.stop().await;
    let url = format!("{upstream}/api");
    for secret in ["SECRET1", "SECRET2", "SECRET3", &url] {
        assert!(!out.contains(secret), "{secret} in the log:\n{out}");
    }
    assert!(
        access.contains("path=/api/items?access_token=***&token=***&%74oken=*** status=502"),
        "{access}"
    );
    // Still useful: the cause is there.
    assert!(failed.contains("Connection refused"), "{failed}");
}

/// A route may make a credential-like parameter part of its topics (`query = ["api_key"]`); the
/// poller's WARN line names its topic, redacted like every other logged resource.
#[tokio::test]
async fn no_credentials_in_a_failing_pollers_warning() {
    let port = free_port();
    let route = "[[route]]\npath = \"/api/builds/{id}\"\nquery = [\"api_key\"]\n";
    let h = Herald::run(&config(port, &closed_upstream(), route), &[]).await;
    h.line("listening", |l| l.contains("listening")).await;
    let resp = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{port}/api/builds/1?api_key=SECRET4"
        ))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let warn = h
        .line("poll failure", |l| l.contains("upstream poll failed"))
        .await;
    drop(resp);
    let out = h.stop().await;
    assert!(!out.contains("SECRET4"), "{out}");
    assert!(warn.contains("topic=/api/builds/1?api_key=***"), "{warn}");
}
