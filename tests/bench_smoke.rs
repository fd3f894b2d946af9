//! The load generator, seconds-long, so the benchmark code cannot rot: herald in-process on port
//! 0 polling `herald-bench upstream`, then `herald-bench run --strict` with a few hundred streams
//! over two worker processes. The table must parse and show every stream open, events delivered,
//! no gaps or duplicates, and the upstream polled once per topic per interval (per-user topics
//! once per user).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{config, start_herald};

const BENCH: &str = env!("CARGO_BIN_EXE_herald-bench");

/// Kills the child on drop so a failing test leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_smoke() {
    let mut up = Child(
        Command::new(BENCH)
            .args(["upstream", "--listen", "127.0.0.1:0", "--rate", "5"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the bench upstream"),
    );
    let mut line = String::new();
    BufReader::new(up.0.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let up_url = line
        .trim()
        .strip_prefix("bench upstream on ")
        .unwrap_or_else(|| panic!("upstream said {line:?}"))
        .to_string();

    let herald = start_herald(config(
        &up_url,
        "[[route]]\npath = \"/topic/{n}\"\ninterval = \"100ms\"\n",
    ))
    .await;
    let target = format!("http://{}", herald.addr);
    let pid = std::process::id().to_string();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(BENCH)
            .args([
                "run",
                "--target",
                &target,
                "--path",
                "/topic/{n}",
                "--topics",
                "4",
                // Two of them per-user: one path watched by two users, each with their own
                // credential, so herald keeps two topics for it and polls it twice.
                "--per-user",
                "2",
                "--users",
                "2",
                "--keyed-by-credential",
                "--streams",
                "200",
                "--ramp",
                "1000",
                "--hold",
                "3",
                "--workers",
                "2",
                "--settle",
                "0",
                "--strict",
                "--pid",
                &pid,
                "--label",
                "smoke",
                "--upstream-stats",
                &up_url,
                "--poll-interval-ms",
                "100",
            ])
            .output()
            .expect("run herald-bench")
    });
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("herald-bench finishes within 30 s")
        .unwrap();
    herald.stop().await;
    drop(up);

    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "herald-bench failed\n{stdout}\n{stderr}"
    );
    // The markdown table: header, separator, one row.
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let cells = |l: &str| -> Vec<String> {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let (head, row) = (cells(lines[0]), cells(lines[2]));
    assert_eq!(head.len(), row.len(), "{stdout}");
    let col = |name: &str| -> String {
        let i = head
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {name}: {stdout}"));
        row[i].clone()
    };
    let num = |name: &str| -> f64 {
        col(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name} = {:?}: {stdout}", col(name)))
    };
    assert_eq!(col("label"), "smoke");
    assert_eq!(num("opened"), 200.0);
    assert_eq!(num("failed"), 0.0);
    assert_eq!(num("gaps"), 0.0);
    assert_eq!(num("dups"), 0.0);
    // A snapshot per stream at least, and live patches on top.
    assert!(num("events") > 200.0, "{stdout}");
    assert!(num("fanout p99 ms") >= 0.0);
    assert!(num("KiB/stream").is_finite());
    // Four topics (two public, two per-user) polled every 100 ms: four requests per interval,
    // two of them with a user's credential (a little slack for timing).
    let per_interval = num("upstream req/interval");
    assert!((3.0..=5.0).contains(&per_interval), "{stdout}");
    let per_user = num("per-user req/interval");
    assert!((1.0..=3.0).contains(&per_user), "{stdout}");
}
