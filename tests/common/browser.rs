//! The headless-Chromium driver shared by the browser tests: `tests/browser/cdp.mjs` (the
//! DevTools protocol over a pipe, no npm packages) behind a one-JSON-line-per-command protocol.
//! Commands go to the current tab; `open`, `tab` and `close_tab` drive several.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest wait for one browser step (page load, a DOM change).
pub const STEP: Duration = Duration::from_secs(20);

/// The driver process and its line protocol.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    /// Start the driver, or `None` (with a note naming `test`) where Chromium or Node is missing.
    pub async fn start(test: &str) -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() {
            eprintln!("note: {CHROMIUM} not found; skipping {test} (CI installs it)");
            return None;
        }
        let node_ok = std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !node_ok {
            eprintln!("note: `node` not found; skipping {test}");
            return None;
        }
        let mut child = Command::new("node")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/browser/cdp.mjs"
            ))
            .arg(CHROMIUM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the browser driver");
        let stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut b = Browser {
            child,
            stdin,
            lines,
        };
        let ready = b.read().await;
        assert_eq!(ready["ready"], true, "{ready}");
        Some(b)
    }

    pub async fn read(&mut self) -> Value {
        let line = tokio::time::timeout(STEP + Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("the driver answers in time")
            .expect("read from the driver")
            .expect("the driver is running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("driver said {line:?}: {e}"))
    }

    /// Run one command; panics with the driver's error (and the page's console) if it fails.
    pub async fn cmd(&mut self, cmd: Value) -> Value {
        let line = format!("{cmd}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to the driver");
        let r = self.read().await;
        assert_eq!(r["ok"], true, "browser command {cmd} failed: {r:#}");
        r["value"].clone()
    }

    pub async fn eval(&mut self, expr: &str) -> Value {
        self.cmd(json!({"cmd": "eval", "expr": expr})).await
    }

    pub async fn wait(&mut self, expr: &str) -> Value {
        self.cmd(json!({"cmd": "wait", "expr": expr, "timeout": STEP.as_millis() as u64}))
            .await
    }

    /// Open `url` in a new tab, which becomes the current one; returns its id (the first is 0).
    pub async fn open(&mut self, url: &str) -> u64 {
        let id = self.cmd(json!({"cmd": "open", "url": url})).await;
        id.as_u64().expect("a tab id")
    }

    /// Send the next commands to tab `id`.
    pub async fn tab(&mut self, id: u64) {
        self.cmd(json!({"cmd": "tab", "id": id})).await;
    }

    /// Close tab `id` as a user would (its `pagehide` runs).
    pub async fn close_tab(&mut self, id: u64) {
        self.cmd(json!({"cmd": "close", "id": id})).await;
    }

    pub async fn quit(mut self) {
        let _ = self.stdin.write_all(b"{\"cmd\":\"quit\"}\n").await;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the driver exits");
        assert!(status.is_ok());
    }
}
