//! `herald-bench`: the load generator and its companions, never run by `cargo test` except as a
//! seconds-long smoke test.
//!
//! * `run`: the coordinator. Spawns worker processes (each under the 20k open-files cap), ramps N SSE
//!   streams up at a set rate, samples the server's RSS and CPU from `/proc`, and prints a table.
//! * `worker`: opens its share of streams (HTTP/1.1 one connection each, or HTTP/2 with many
//!   streams per connection; gzip or not), spreading source addresses over 127.0.0.x, parses every
//!   event and reports latency, throughput, gaps and duplicates as JSON lines.
//! * `upstream`: a legacy API for herald to poll: `/topic/{n}` bodies that change at a set rate and
//!   carry their own sequence and timestamp, so end-to-end latency can be measured.
//! * `publish`: pushes the same bodies to a push server (Nchan, the Node server) for comparisons.
//! * TLS: an `https://` target is reached over TLS (ALPN `http/1.1` or `h2` by `--proto`; the
//!   server's certificate is not checked, its signature is), and `--storm` makes every client
//!   drop and reconnect within a window: handshakes, how many resumed, and how long until all
//!   streams were back.
//! * `floor`: the no-logic floor: a tokio server that writes the same pre-encoded bytes to every
//!   socket (task per stream, broadcast of `Bytes`, `write_all`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpSocket};

#[derive(Parser)]
#[command(
    name = "herald-bench",
    about = "Load generator for herald and the alternatives"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq)]
enum Proto {
    H1,
    H2,
}

#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
struct Load {
    /// Server base URL (http only; loopback).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Path of stream i: `{n}` is replaced by i % topics.
    #[arg(long, default_value = "/topic/{n}")]
    path: String,
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Streams in total.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// New streams per second (all workers together).
    #[arg(long, default_value_t = 2000)]
    ramp: usize,
    /// Seconds to hold all streams open after the ramp.
    #[arg(long, default_value_t = 10)]
    hold: u64,
    #[arg(long, value_enum, default_value_t = Proto::H1)]
    proto: Proto,
    /// HTTP/2 streams per connection.
    #[arg(long, default_value_t = 100)]
    per_conn: usize,
    /// Ask for gzip.
    #[arg(long)]
    gzip: bool,
    /// Source addresses 127.0.0.1 ..= 127.0.0.K, so more than 64k connections fit.
    #[arg(long, default_value_t = 16)]
    src_ips: u8,
    /// Expect herald's envelope (`{"type","topic","timestamp","data"}` and `<inc>-<seq>` ids); off
    /// for servers that send raw bodies.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    envelope: bool,
    /// Churn: each HTTP/1.1 stream lives a random 0.5..2x this many seconds, then closes and a
    /// new one takes its place (0: streams stay open for the whole run).
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Per-user topics: the last N of `--topics` belong to one of `--users` users each, and their
    /// streams send that user's `Authorization`. A server that keys topics by credential
    /// (`--keyed-by-credential`, herald) gets `--users` users on each of N / users shared paths;
    /// a push server gets one channel per user and path, as one builds it by hand.
    #[arg(long, default_value_t = 0)]
    per_user: usize,
    #[arg(long, default_value_t = 10)]
    users: usize,
    #[arg(long)]
    keyed_by_credential: bool,
    /// https targets: each client keeps its own TLS session store, so its reconnects resume
    /// (false: every handshake is a full one).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    resume: bool,
    /// https targets: offer TLS 1.2 only (ECDHE with AES-GCM or ChaCha20-Poly1305), as older
    /// clients do; default: TLS 1.3 and 1.2, so 1.3 is chosen.
    #[arg(long)]
    tls12: bool,
    /// Reconnect storm: this many seconds after the ramp, every connection closes at a random
    /// instant within `--storm-window` seconds and reconnects at once (0: no storm).
    #[arg(long, default_value_t = 0.0)]
    storm: f64,
    #[arg(long, default_value_t = 5.0)]
    storm_window: f64,
    /// The share of connections that take part in the storm; the others stay open, and their
    /// delivery latency during the storm (its window + 5 s) is reported as `steady p99`.
    #[arg(long, default_value_t = 1.0)]
    storm_share: f64,
}

impl Load {
    /// Stream `i`'s path and, for a per-user topic, the credential it sends.
    fn stream_target(&self, i: usize) -> (String, Option<String>) {
        let topics = self.topics.max(1);
        let t = i % topics;
        let public = topics - self.per_user.min(topics);
        let (n, user) = if t < public {
            (t, None)
        } else {
            let j = t - public;
            let users = self.users.max(1);
            let n = if self.keyed_by_credential {
                public + j / users
            } else {
                t
            };
            (n, Some(j % users))
        };
        (
            self.path.replace("{n}", &n.to_string()),
            user.map(|u| format!("Bearer bench-user-{u}")),
        )
    }
}

// `Run` is much larger than the others, but a `Cmd` exists once per process.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Coordinate a run: workers, ramp, /proc sampling, table.
    Run {
        #[command(flatten)]
        load: Load,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Server processes to sample (RSS, CPU, fds), summed: e.g. nginx's master and workers.
        #[arg(long, value_delimiter = ',')]
        pid: Vec<u32>,
        /// A label for the table row.
        #[arg(long, default_value = "herald")]
        label: String,
        /// Append the result table (markdown) to this file.
        #[arg(long)]
        append: Option<std::path::PathBuf>,
        /// Stop with a non-zero exit if any stream saw a gap or duplicate, or fewer events arrived.
        #[arg(long)]
        strict: bool,
        /// Also append the row as one JSON object per line (for `summarize`).
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// The bench upstream's base URL: count the requests it served during the hold.
        #[arg(long)]
        upstream_stats: Option<String>,
        /// herald's poll interval (ms), to report upstream requests per interval.
        #[arg(long)]
        poll_interval_ms: Option<u64>,
        /// Seconds to wait after the clients are gone before the last sample (fd and RSS leaks).
        #[arg(long, default_value_t = 3)]
        settle: u64,
    },
    /// Median and spread of repeated runs (JSON rows from `run --json`), as markdown tables,
    /// with ratios of the first label to every other.
    Summarize {
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// One worker process (started by `run`).
    Worker {
        #[arg(long)]
        spec: String,
    },
    /// A polled upstream with changing topics.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: SocketAddr,
        /// Changes per second of every topic.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Approximate body size in bytes.
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Also publish every change to herald: `POST <url>` with `{"resource": "/topic/{n}",
        /// "data": <body>}` for each of `--topics` topics (a backend that publishes its writes).
        #[arg(long)]
        publish_url: Option<String>,
        /// The bearer token for `--publish-url`.
        #[arg(long, default_value = "")]
        publish_token: String,
        #[arg(long, default_value_t = 1)]
        topics: usize,
    },
    /// Publish changing bodies to a push server's publish endpoint.
    Publish {
        /// URL with `{n}` for the topic, e.g. http://127.0.0.1:8081/pub?id={n}.
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1)]
        topics: usize,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value_t = 200)]
        size: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// The no-logic floor server.
    Floor {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value_t = 200)]
        size: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            load,
            workers,
            pid,
            label,
            append,
            strict,
            json,
            upstream_stats,
            poll_interval_ms,
            settle,
        } => coordinate(
            load,
            workers,
            &Sampling {
                pids: pid,
                upstream_stats,
                poll_interval_ms,
                settle,
            },
            &label,
            Output {
                append,
                json,
                strict,
            },
        ),
        Cmd::Summarize { file } => summarize(&file),
        Cmd::Worker { spec } => {
            let spec: WorkerSpec = serde_json::from_str(&spec).context("worker spec")?;
            runtime()?.block_on(worker(spec))
        }
        Cmd::Upstream {
            listen,
            rate,
            size,
            publish_url,
            publish_token,
            topics,
        } => runtime()?.block_on(upstream(
            listen,
            rate,
            size,
            publish_url.map(|url| (url, publish_token, topics)),
        )),
        Cmd::Publish {
            url,
            topics,
            rate,
            size,
            seconds,
        } => runtime()?.block_on(publish(&url, topics, rate, size, seconds)),
        // The floor gets every core, like herald (the clients' helpers get one thread each).
        Cmd::Floor { listen, rate, size } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(floor(listen, rate, size)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The body every source publishes: a sequence, a microsecond timestamp and padding that
/// compresses like real JSON text (words from a small vocabulary, the same in every version, so
/// a change is small: `seq` and `ts`).
fn body(seq: u64, size: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"ts\":{},\"pad\":\"", now_micros());
    let want = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", &padding(want))
}

fn padding(len: usize) -> String {
    const WORDS: &[&str] = &[
        "build", "step", "passed", "failed", "queued", "running", "agent", "linux", "artifact",
        "commit", "branch", "main", "duration", "cache", "hit", "miss", "test", "suite", "owner",
        "pipeline", "stage", "deploy", "review", "id", "42", "1337", "2024", "ok", "warn",
    ];
    let mut out = String::with_capacity(len + 16);
    let mut x: u32 = 0x9e37_79b9;
    while out.len() < len {
        // xorshift: the same words for every version of the body.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push_str(WORDS[x as usize % WORDS.len()]);
        out.push(' ');
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------------
// Coordinator

#[derive(Serialize, Deserialize, Clone, Debug)]
struct WorkerSpec {
    load: Load,
    /// Stream indexes [first, first + count).
    first: usize,
    count: usize,
    /// This worker's share of the ramp rate.
    ramp: f64,
    /// Source IP offset so workers use different addresses.
    ip_offset: u8,
}

/// What a worker reports every second (cumulative counters, latency histograms since start).
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct Report {
    worker: usize,
    /// Streams currently open.
    open: u64,
    /// Streams that were opened successfully at some point.
    opened: u64,
    failed: u64,
    events: u64,
    bytes: u64,
    gaps: u64,
    dups: u64,
    snapshots: u64,
    /// TLS handshakes completed, and how many of them resumed a session.
    handshakes: u64,
    resumed: u64,
    /// Storm: streams open again after their reconnect, the first instant a storm was due
    /// (micros since the epoch) and the last instant a stream came back.
    storm_back: u64,
    storm_start_us: u64,
    storm_last_us: u64,
    /// Storm: delivery latency of the streams that stayed open, during the storm (ms buckets).
    steady: Vec<u64>,
    /// Fan-out latency (herald's envelope timestamp → receipt), ms buckets.
    fanout: Vec<u64>,
    /// End-to-end latency (source timestamp → receipt), 0.1 ms buckets up to 10 s.
    e2e: Vec<u64>,
    done: bool,
    /// Summed reports only: some worker has finished (its streams are closing).
    #[serde(skip)]
    done_any: bool,
}

const E2E_BUCKETS: usize = 100_000; // 0.1 ms each: up to 10 s
const FANOUT_BUCKETS: usize = 10_000; // 1 ms each

fn percentile(hist: &[u64], p: f64, unit_ms: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(i as f64 * unit_ms);
        }
    }
    Some((hist.len() - 1) as f64 * unit_ms)
}

fn max_of(hist: &[u64], unit_ms: f64) -> Option<f64> {
    hist.iter()
        .rposition(|&n| n > 0)
        .map(|i| i as f64 * unit_ms)
}

#[derive(Default, Clone, Copy, Debug)]
struct ProcSample {
    /// Proportional set size (RSS with shared pages split among the processes sharing them), so
    /// nginx's master and workers add up to what they really hold; VmRSS where PSS is unreadable.
    rss_kib: u64,
    cpu_ticks: u64,
    fds: u64,
    threads: u64,
}

fn sample_one(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| field(&t, "Pss:"));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcSample {
        rss_kib: pss.or_else(|| field(&status, "VmRSS:")).unwrap_or(0),
        cpu_ticks: utime + stime,
        fds,
        threads: field(&status, "Threads:").unwrap_or(0),
    })
}

/// The processes summed; `None` if there are none or one has gone.
fn sample_proc(pids: &[u32]) -> Option<ProcSample> {
    if pids.is_empty() {
        return None;
    }
    let mut total = ProcSample::default();
    for &pid in pids {
        let s = sample_one(pid)?;
        total.rss_kib += s.rss_kib;
        total.cpu_ticks += s.cpu_ticks;
        total.fds += s.fds;
        total.threads += s.threads;
    }
    Some(total)
}

/// Requests the bench upstream has served so far (its `/_stats` endpoint).
/// Requests the bench upstream served: all, and those that carried an `Authorization`.
fn upstream_requests(base: &str) -> Option<(u64, u64)> {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /_stats HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    let v = serde_json::from_str::<serde_json::Value>(body).ok()?;
    Some((
        v["requests"].as_u64()?,
        v["with_credentials"].as_u64().unwrap_or(0),
    ))
}

/// What the coordinator watches besides its workers.
struct Sampling {
    pids: Vec<u32>,
    upstream_stats: Option<String>,
    poll_interval_ms: Option<u64>,
    settle: u64,
}

/// Where the result goes.
struct Output {
    append: Option<std::path::PathBuf>,
    json: Option<std::path::PathBuf>,
    strict: bool,
}

/// A sample taken while every stream was open.
#[derive(Clone, Copy)]
struct FullSample {
    at: Instant,
    proc: Option<ProcSample>,
    events: u64,
    upstream: Option<(u64, u64)>,
}

fn coordinate(
    load: Load,
    workers: usize,
    sampling: &Sampling,
    label: &str,
    out: Output,
) -> Result<()> {
    let workers = workers.clamp(1, 64);
    let conns = match load.proto {
        Proto::H1 => load.streams,
        Proto::H2 => load.streams.div_ceil(load.per_conn.max(1)),
    };
    if conns / workers > 18_000 {
        bail!(
            "more than 18,000 connections per worker would hit the open-files cap: add --workers"
        );
    }
    let pids = &sampling.pids[..];
    let exe = std::env::current_exe()?;
    let baseline = sample_proc(pids);
    let started = Instant::now();
    let mut children = Vec::new();
    let per = load.streams.div_ceil(workers);
    for w in 0..workers {
        let first = w * per;
        let count = per.min(load.streams.saturating_sub(first));
        let spec = WorkerSpec {
            load: load.clone(),
            first,
            count,
            ramp: load.ramp as f64 / workers as f64,
            ip_offset: (w as u8).wrapping_mul(load.src_ips.max(1)),
        };
        let child = Command::new(&exe)
            .args(["worker", "--spec", &serde_json::to_string(&spec)?])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning a worker")?;
        children.push(child);
    }
    let reports: Arc<Mutex<HashMap<usize, Report>>> = Arc::default();
    let mut readers = Vec::new();
    for (w, child) in children.iter_mut().enumerate() {
        let Some(stdout) = child.stdout.take() else {
            continue;
        };
        let reports = reports.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut r) = serde_json::from_str::<Report>(&line) {
                    r.worker = w;
                    reports
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(w, r);
                }
            }
        }));
    }
    // Sample the server while the load runs. The hold is measured between the first and the last
    // sample at which every stream was open: RSS per stream at its end (steady, after the ramp's
    // transients), CPU, deliveries and upstream requests between the two.
    let ramp_secs = load.streams as f64 / load.ramp.max(1) as f64;
    let total = Duration::from_secs_f64(ramp_secs) + Duration::from_secs(load.hold);
    let mut first_full: Option<FullSample> = None;
    let mut last_full: Option<FullSample> = None;
    let mut peak_rss = 0;
    let mut rss_track: Vec<u64> = Vec::new();
    // Every sample with its wall-clock time: the storm's CPU is read between two of them.
    let mut timeline: Vec<(u64, ProcSample)> = Vec::new();
    while started.elapsed() < total + Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(500));
        let sum = summed(&reports.lock().unwrap_or_else(|p| p.into_inner()));
        let proc = sample_proc(pids);
        if let Some(s) = proc {
            peak_rss = peak_rss.max(s.rss_kib);
            timeline.push((now_micros(), s));
        }
        // With churn a few streams are always between close and reopen.
        let full_at = if load.churn > 0.0 {
            load.streams * 9 / 10
        } else {
            load.streams
        };
        if sum.open as usize >= full_at.max(1) && !sum.done_any {
            let s = FullSample {
                at: Instant::now(),
                proc,
                events: sum.events,
                upstream: sampling
                    .upstream_stats
                    .as_deref()
                    .and_then(upstream_requests),
            };
            first_full.get_or_insert(s);
            last_full = Some(s);
            if let Some(p) = proc {
                rss_track.push(p.rss_kib);
            }
        }
        if children
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            break;
        }
    }
    for c in &mut children {
        let _ = c.wait();
    }
    for r in readers {
        let _ = r.join();
    }
    // After the clients are gone: fds back to the baseline means no connection or task leaked.
    std::thread::sleep(Duration::from_secs(sampling.settle));
    let after = sample_proc(pids);
    let sum = summed(&reports.lock().unwrap_or_else(|p| p.into_inner()));
    let elapsed = started.elapsed().as_secs_f64();
    let mut row = vec![
        ("label", label.to_string()),
        (
            "proto",
            format!(
                "{:?}{}{}",
                load.proto,
                if load.target.starts_with("https:") {
                    "+tls"
                } else {
                    ""
                },
                if load.gzip { "+gzip" } else { "" }
            ),
        ),
        ("streams", load.streams.to_string()),
        ("opened", sum.opened.to_string()),
        ("failed", sum.failed.to_string()),
        ("events", sum.events.to_string()),
        ("gaps", sum.gaps.to_string()),
        ("dups", sum.dups.to_string()),
    ];
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let fanout_p99 = percentile(&sum.fanout, 0.99, 1.0);
    let e2e_p99 = percentile(&sum.e2e, 0.99, 0.1);
    row.push(("fanout p50 ms", fmt(percentile(&sum.fanout, 0.5, 1.0))));
    row.push(("fanout p99 ms", fmt(fanout_p99)));
    row.push(("fanout max ms", fmt(max_of(&sum.fanout, 1.0))));
    row.push(("e2e p50 ms", fmt(percentile(&sum.e2e, 0.5, 0.1))));
    row.push(("e2e p99 ms", fmt(e2e_p99)));
    row.push(("e2e max ms", fmt(max_of(&sum.e2e, 0.1))));
    // The latency the comparison uses: from the moment the server has the new state to the
    // client. herald stamps that moment in its envelope; a push server has it when the publisher
    // sends (the body's own timestamp).
    row.push((
        "deliver p99 ms",
        fmt(if load.envelope { fanout_p99 } else { e2e_p99 }),
    ));
    row.push(("events/s", format!("{:.0}", sum.events as f64 / elapsed)));
    row.push(("MB/s", format!("{:.3}", sum.bytes as f64 / elapsed / 1e6)));
    row.push((
        "bytes/event",
        format!("{:.0}", sum.bytes as f64 / sum.events.max(1) as f64),
    ));
    if let (Some(first), Some(last)) = (first_full, last_full) {
        let hold = last.at.duration_since(first.at).as_secs_f64();
        row.push(("hold s", format!("{hold:.1}")));
        if let (Some(base), Some(p0), Some(p1)) = (baseline, first.proc, last.proc) {
            let streams = load.streams.max(1) as f64;
            let per_stream = p1.rss_kib.saturating_sub(base.rss_kib) as f64 / streams;
            let cpu_s = p1.cpu_ticks.saturating_sub(p0.cpu_ticks) as f64 / 100.0;
            let deliveries = last.events.saturating_sub(first.events) as f64;
            row.push((
                "base RSS MiB",
                format!("{:.1}", base.rss_kib as f64 / 1024.0),
            ));
            row.push(("RSS MiB", format!("{:.1}", p1.rss_kib as f64 / 1024.0)));
            row.push(("peak RSS MiB", format!("{:.1}", peak_rss as f64 / 1024.0)));
            row.push(("KiB/stream", format!("{per_stream:.2}")));
            row.push((
                "server CPU %",
                format!("{:.1}", cpu_s / hold.max(0.001) * 100.0),
            ));
            row.push((
                "deliveries/CPU-s",
                if cpu_s > 0.0 {
                    format!("{:.0}", deliveries / cpu_s)
                } else {
                    "-".into()
                },
            ));
            // RSS over the hold: the second half's mean against the first half's (churn: flat?).
            if rss_track.len() >= 4 {
                let h = rss_track.len() / 2;
                let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64 / 1024.0;
                row.push((
                    "RSS drift MiB",
                    format!("{:+.1}", mean(&rss_track[h..]) - mean(&rss_track[..h])),
                ));
            }
            row.push(("fds base", base.fds.to_string()));
            row.push(("fds", p1.fds.to_string()));
            row.push(("threads", p1.threads.to_string()));
        }
        if let (Some((u0, c0)), Some((u1, c1))) = (first.upstream, last.upstream) {
            let reqs = u1.saturating_sub(u0) as f64;
            row.push(("upstream req/s", format!("{:.1}", reqs / hold.max(0.001))));
            row.push((
                "upstream req/hour",
                format!("{:.0}", reqs / hold.max(0.001) * 3600.0),
            ));
            if let Some(ms) = sampling.poll_interval_ms {
                let intervals = (hold * 1000.0 / ms.max(1) as f64).max(0.001);
                row.push(("upstream req/interval", format!("{:.0}", reqs / intervals)));
                if load.per_user > 0 {
                    // Polls made with a user's credential: one per per-user topic per interval.
                    let with = c1.saturating_sub(c0) as f64;
                    row.push(("per-user req/interval", format!("{:.0}", with / intervals)));
                }
            }
        }
    }
    if sum.handshakes > 0 {
        row.push(("handshakes", sum.handshakes.to_string()));
        row.push((
            "resumed %",
            format!("{:.1}", sum.resumed as f64 * 100.0 / sum.handshakes as f64),
        ));
    }
    if load.storm > 0.0 && sum.storm_start_us > 0 && sum.storm_last_us > sum.storm_start_us {
        // From the first instant a storm was due to the last stream back.
        let (t0, t1) = (sum.storm_start_us, sum.storm_last_us);
        let secs = (t1 - t0) as f64 / 1e6;
        row.push(("storm back", sum.storm_back.to_string()));
        if load.storm_share < 1.0 {
            // Delivery to the streams that stayed open, during the storm.
            row.push(("steady p99 ms", fmt(percentile(&sum.steady, 0.99, 1.0))));
            row.push(("steady events", sum.steady.iter().sum::<u64>().to_string()));
        }
        row.push(("storm s", format!("{secs:.2}")));
        row.push((
            "reconnects/s",
            format!("{:.0}", sum.storm_back as f64 / secs.max(0.001)),
        ));
        let before = timeline.iter().rev().find(|(t, _)| *t <= t0);
        let after = timeline.iter().find(|(t, _)| *t >= t1);
        if let (Some((a, p0)), Some((b, p1))) = (before, after) {
            let cpu_s = p1.cpu_ticks.saturating_sub(p0.cpu_ticks) as f64 / 100.0;
            row.push(("storm CPU-s", format!("{cpu_s:.2}")));
            row.push((
                "storm CPU %",
                format!("{:.0}", cpu_s / ((b - a) as f64 / 1e6).max(0.001) * 100.0),
            ));
            row.push((
                "reconnects/CPU-s",
                if cpu_s > 0.0 {
                    format!("{:.0}", sum.storm_back as f64 / cpu_s)
                } else {
                    "-".into()
                },
            ));
        }
    }
    if let Some(a) = after {
        row.push(("fds after", a.fds.to_string()));
        row.push(("RSS after MiB", format!("{:.1}", a.rss_kib as f64 / 1024.0)));
    }
    let header = format!(
        "| {} |",
        row.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(" | ")
    );
    let sep = format!("|{}", "---|".repeat(row.len()));
    let line = format!(
        "| {} |",
        row.iter()
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("{header}\n{sep}\n{line}");
    if let Some(path) = out.append {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        writeln!(f, "{header}\n{sep}\n{line}\n")?;
    }
    if let Some(path) = out.json {
        let obj: serde_json::Map<String, serde_json::Value> = row
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        writeln!(f, "{}", serde_json::Value::Object(obj))?;
    }
    if out.strict
        && (sum.gaps > 0 || sum.dups > 0 || sum.failed > 0 || (sum.opened as usize) < load.streams)
    {
        bail!(
            "strict: {} gaps, {} dups, {} failed, {}/{} opened",
            sum.gaps,
            sum.dups,
            sum.failed,
            sum.opened,
            load.streams
        );
    }
    Ok(())
}

/// Columns `summarize` reports, and whether more is better (for the ratio table).
const SUMMARY: &[&str] = &[
    "KiB/stream",
    "RSS MiB",
    "server CPU %",
    "deliveries/CPU-s",
    "deliver p99 ms",
    "fanout p50 ms",
    "fanout p99 ms",
    "fanout max ms",
    "e2e p50 ms",
    "e2e p99 ms",
    "e2e max ms",
    "bytes/event",
    "MB/s",
    "gaps",
    "dups",
    "failed",
    "RSS drift MiB",
    "fds base",
    "fds",
    "fds after",
    "upstream req/interval",
    "per-user req/interval",
    "upstream req/hour",
    "handshakes",
    "resumed %",
    "storm s",
    "steady p99 ms",
    "steady events",
    "reconnects/s",
    "storm CPU-s",
    "storm CPU %",
    "reconnects/CPU-s",
];

fn summarize(file: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let rows: Vec<serde_json::Map<String, serde_json::Value>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    // Groups in order of first appearance: label + protocol.
    let mut groups: Vec<(String, Vec<&serde_json::Map<String, serde_json::Value>>)> = Vec::new();
    for r in &rows {
        let key = format!(
            "{} {}",
            r["label"].as_str().unwrap_or("?"),
            r["proto"].as_str().unwrap_or("")
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let num = |r: &serde_json::Map<String, serde_json::Value>, col: &str| {
        r.get(col)
            .and_then(|v| v.as_str())
            .and_then(|v| v.trim_start_matches('+').parse::<f64>().ok())
    };
    let stat = |rs: &[&serde_json::Map<String, serde_json::Value>], col: &str| {
        let mut v: Vec<f64> = rs.iter().filter_map(|r| num(r, col)).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return None;
        }
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Some((median, v[0], v[v.len() - 1]))
    };
    let show = |x: f64| {
        if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else if x.abs() >= 10.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.2}")
        }
    };
    let cols: Vec<&str> = SUMMARY
        .iter()
        .copied()
        .filter(|c| rows.iter().any(|r| num(r, c).is_some()))
        .collect();
    println!("Median of each group's runs, with (min–max) when it ran more than once.\n");
    println!("| server | runs | {} |", cols.join(" | "));
    println!("|---|---|{}", "---|".repeat(cols.len()));
    for (key, rs) in &groups {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match stat(rs, c) {
                None => "-".into(),
                Some((m, lo, hi)) if rs.len() > 1 && lo != hi => {
                    format!("{} ({}–{})", show(m), show(lo), show(hi))
                }
                Some((m, _, _)) => show(m),
            })
            .collect();
        println!("| {key} | {} | {} |", rs.len(), cells.join(" | "));
    }
    // Ratios of the first group (herald) to each other, on the medians.
    let Some((first_key, first_rows)) = groups.first() else {
        return Ok(());
    };
    let med =
        |rs: &[&serde_json::Map<String, serde_json::Value>], c: &str| stat(rs, c).map(|s| s.0);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let per_gib = |kib: Option<f64>| kib.filter(|k| *k > 0.0).map(|k| 1024.0 * 1024.0 / k);
    if groups.len() > 1 {
        println!(
            "\nRatios {first_key} / alternative (medians; streams per GiB and deliveries per CPU-s: \
             higher is better for herald above 1x; p99: lower is better for herald below 1x).\n"
        );
        println!("| alternative | streams per GiB | deliveries per CPU-s | deliver p99 |");
        println!("|---|---|---|---|");
        for (key, rs) in groups.iter().skip(1) {
            println!(
                "| {key} | {} | {} | {} |",
                ratio(
                    per_gib(med(first_rows, "KiB/stream")),
                    per_gib(med(rs, "KiB/stream"))
                ),
                ratio(
                    med(first_rows, "deliveries/CPU-s"),
                    med(rs, "deliveries/CPU-s")
                ),
                ratio(med(first_rows, "deliver p99 ms"), med(rs, "deliver p99 ms")),
            );
        }
    }
    Ok(())
}

fn summed(reports: &HashMap<usize, Report>) -> Report {
    let mut s = Report {
        fanout: vec![0; FANOUT_BUCKETS],
        e2e: vec![0; E2E_BUCKETS],
        steady: vec![0; FANOUT_BUCKETS],
        ..Default::default()
    };
    for r in reports.values() {
        s.open += r.open;
        s.opened += r.opened;
        s.failed += r.failed;
        s.events += r.events;
        s.bytes += r.bytes;
        s.gaps += r.gaps;
        s.dups += r.dups;
        s.snapshots += r.snapshots;
        s.handshakes += r.handshakes;
        s.resumed += r.resumed;
        s.storm_back += r.storm_back;
        if r.storm_start_us > 0 {
            s.storm_start_us = match s.storm_start_us {
                0 => r.storm_start_us,
                v => v.min(r.storm_start_us),
            };
        }
        s.storm_last_us = s.storm_last_us.max(r.storm_last_us);
        for (a, b) in s.steady.iter_mut().zip(&r.steady) {
            *a += b;
        }
        s.done_any |= r.done;
        for (a, b) in s.fanout.iter_mut().zip(&r.fanout) {
            *a += b;
        }
        for (a, b) in s.e2e.iter_mut().zip(&r.e2e) {
            *a += b;
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Worker

#[derive(Default)]
struct Stats {
    open: AtomicU64,
    opened: AtomicU64,
    failed: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
    gaps: AtomicU64,
    dups: AtomicU64,
    snapshots: AtomicU64,
    handshakes: AtomicU64,
    resumed: AtomicU64,
    storm_back: AtomicU64,
    storm_start_us: AtomicU64,
    storm_last_us: AtomicU64,
    steady: Mutex<Vec<u64>>,
    fanout: Mutex<Vec<u64>>,
    e2e: Mutex<Vec<u64>>,
}

impl Stats {
    fn report(&self, done: bool) -> Report {
        Report {
            worker: 0,
            open: self.open.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
            dups: self.dups.load(Ordering::Relaxed),
            snapshots: self.snapshots.load(Ordering::Relaxed),
            handshakes: self.handshakes.load(Ordering::Relaxed),
            resumed: self.resumed.load(Ordering::Relaxed),
            storm_back: self.storm_back.load(Ordering::Relaxed),
            storm_start_us: self.storm_start_us.load(Ordering::Relaxed),
            storm_last_us: self.storm_last_us.load(Ordering::Relaxed),
            steady: if done {
                self.steady
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            } else {
                Vec::new()
            },
            // Histograms (110k buckets) only in the last report: the per-second ones carry
            // counters, so that reporting costs the clients next to nothing.
            fanout: if done {
                self.fanout
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            } else {
                Vec::new()
            },
            e2e: if done {
                self.e2e.lock().unwrap_or_else(|p| p.into_inner()).clone()
            } else {
                Vec::new()
            },
            done,
            done_any: false,
        }
    }
}

async fn worker(spec: WorkerSpec) -> Result<()> {
    let stats = Arc::new(Stats {
        fanout: Mutex::new(vec![0; FANOUT_BUCKETS]),
        e2e: Mutex::new(vec![0; E2E_BUCKETS]),
        steady: Mutex::new(vec![0; FANOUT_BUCKETS]),
        ..Default::default()
    });
    let uri: hyper::Uri = spec.load.target.parse().context("target URL")?;
    let host = uri.host().unwrap_or("127.0.0.1").to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let ip: IpAddr = host.parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let target = SocketAddr::new(ip, port);
    let stop_at = tokio::time::Instant::now()
        + Duration::from_secs_f64(spec.count as f64 / spec.ramp.max(1.0))
        + Duration::from_secs(spec.load.hold);
    let reporter = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                t.tick().await;
                println!(
                    "{}",
                    serde_json::to_string(&stats.report(false)).unwrap_or_default()
                );
            }
        })
    };
    let gap = Duration::from_secs_f64(1.0 / spec.ramp.max(1.0));
    // The storm: the same instant for every stream of this worker, `--storm` after its ramp.
    let storm_at = (spec.load.storm > 0.0).then(|| {
        let after =
            Duration::from_secs_f64(spec.count as f64 / spec.ramp.max(1.0) + spec.load.storm);
        stats
            .storm_start_us
            .store(now_micros() + after.as_micros() as u64, Ordering::Relaxed);
        tokio::time::Instant::now() + after
    });
    let mut tasks = Vec::new();
    let per_conn = if spec.load.proto == Proto::H2 {
        spec.load.per_conn.max(1)
    } else {
        1
    };
    let mut i = 0;
    let mut next = tokio::time::Instant::now();
    while i < spec.count {
        let n = per_conn.min(spec.count - i);
        let streams: Vec<usize> = (spec.first + i..spec.first + i + n).collect();
        let src = Ipv4Addr::new(
            127,
            0,
            0,
            1 + ((spec.ip_offset as usize + i / per_conn) % spec.load.src_ips.max(1) as usize)
                as u8,
        );
        let (load, stats) = (spec.load.clone(), stats.clone());
        // One client: its TLS session store lives across its reconnects.
        let tls = https.then(|| tls_client(&load));
        // Whether this connection takes part in the storm (the first `--storm-share` of every
        // hundred connections do); the others are the steady ones.
        let storms = (i / per_conn) % 100 < (load.storm_share.clamp(0.0, 1.0) * 100.0) as usize;
        let storm_at = storm_at.filter(|_| storms);
        let steady = spec.load.storm > 0.0 && !storms;
        tasks.push(tokio::spawn(async move {
            let mut reconnect = false;
            loop {
                // Churn: this connection ends after a random lifetime and a new one replaces it.
                let now = tokio::time::Instant::now();
                let until = if let (Some(at), false) = (storm_at, reconnect) {
                    let jitter = load.storm_window.max(0.0)
                        * rand::Rng::gen_range(&mut rand::thread_rng(), 0.0..1.0);
                    stop_at.min(at + Duration::from_secs_f64(jitter))
                } else if load.churn > 0.0 && load.proto == Proto::H1 {
                    let life = load.churn * rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..2.0);
                    stop_at.min(now + Duration::from_secs_f64(life))
                } else {
                    stop_at
                };
                let conn = Conn {
                    load: &load,
                    target,
                    src,
                    tls: tls.as_ref(),
                    stats: &stats,
                    gap,
                    stop_at: until,
                    reconnect,
                    steady,
                };
                reconnect |= storm_at.is_some();
                if let Err(e) = connection(conn, streams.clone()).await {
                    stats
                        .failed
                        .fetch_add(streams.len() as u64, Ordering::Relaxed);
                    eprintln!("connection from {src}: {e:#}");
                }
                if until >= stop_at || tokio::time::Instant::now() >= stop_at {
                    break;
                }
            }
        }));
        i += n;
        next += gap * n as u32;
        tokio::time::sleep_until(next).await;
    }
    tokio::time::sleep_until(stop_at).await;
    for t in &tasks {
        t.abort();
    }
    reporter.abort();
    println!("{}", serde_json::to_string(&stats.report(true))?);
    Ok(())
}

/// One connection's settings.
struct Conn<'a> {
    load: &'a Load,
    target: SocketAddr,
    src: Ipv4Addr,
    /// This client's TLS config (with its session store) for an https target.
    tls: Option<&'a Arc<rustls::ClientConfig>>,
    stats: &'a Arc<Stats>,
    gap: Duration,
    stop_at: tokio::time::Instant,
    /// A reconnect after the storm: its stream's return is counted.
    reconnect: bool,
    /// Stays open through the storm: its latency during the storm is counted apart.
    steady: bool,
}

async fn connection(c: Conn<'_>, streams: Vec<usize>) -> Result<()> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(c.src), 0))?;
    let tcp = sock.connect(c.target).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let Some(config) = c.tls else {
        return exchange(TokioIo::new(tcp), &c, streams).await;
    };
    let name = rustls::pki_types::ServerName::IpAddress(c.target.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    c.stats.handshakes.fetch_add(1, Ordering::Relaxed);
    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        c.stats.resumed.fetch_add(1, Ordering::Relaxed);
    }
    exchange(TokioIo::new(tls), &c, streams).await
}

/// The HTTP exchange on an established connection (plain or TLS).
async fn exchange<I>(io: TokioIo<I>, c: &Conn<'_>, streams: Vec<usize>) -> Result<()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Conn {
        load,
        target,
        stats,
        gap,
        stop_at,
        reconnect,
        steady,
        ..
    } = *c;
    let request = |i: usize| -> Result<hyper::Request<Empty<Bytes>>> {
        let (path, credential) = load.stream_target(i);
        // HTTP/1.1: origin-form and a Host header (nginx and Node refuse requests without);
        // HTTP/2: the full URI, whose authority becomes `:authority`.
        let mut b = match load.proto {
            Proto::H1 => hyper::Request::get(path).header("host", target.to_string()),
            Proto::H2 => {
                hyper::Request::get(format!("{}{}", load.target.trim_end_matches('/'), path))
            }
        }
        .header("accept", "text/event-stream");
        if load.gzip {
            b = b.header("accept-encoding", "gzip");
        }
        if let Some(c) = credential {
            b = b.header("authorization", c);
        }
        Ok(b.body(Empty::new())?)
    };
    match load.proto {
        Proto::H1 => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            let resp = send.send_request(request(streams[0])?).await?;
            consume(resp, load, stats, stop_at, reconnect, steady).await
        }
        Proto::H2 => {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(256 * 1024)
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            let mut handles = Vec::new();
            for (k, &i) in streams.iter().enumerate() {
                if k > 0 {
                    tokio::time::sleep(gap).await;
                }
                let mut send = send.clone();
                let req = request(i)?;
                let (load, stats) = (load.clone(), stats.clone());
                handles.push(tokio::spawn(async move {
                    match send.send_request(req).await {
                        Ok(resp) => {
                            if let Err(e) =
                                consume(resp, &load, &stats, stop_at, reconnect, steady).await
                            {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                eprintln!("h2 stream: {e:#}");
                            }
                        }
                        Err(e) => {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("h2 request: {e:#}");
                        }
                    }
                }));
            }
            tokio::time::sleep_until(stop_at).await;
            for h in handles {
                h.abort();
            }
            Ok(())
        }
    }
}

/// Read one SSE response to the end (or `stop_at`), parsing and timing every event.
async fn consume(
    resp: hyper::Response<Incoming>,
    load: &Load,
    stats: &Stats,
    stop_at: tokio::time::Instant,
    reconnect: bool,
    steady: bool,
) -> Result<()> {
    if !resp.status().is_success() {
        // Counted as failed by the caller.
        bail!("status {}", resp.status());
    }
    let gz = resp
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    stats.open.fetch_add(1, Ordering::Relaxed);
    stats.opened.fetch_add(1, Ordering::Relaxed);
    if reconnect {
        stats.storm_back.fetch_add(1, Ordering::Relaxed);
        stats
            .storm_last_us
            .fetch_max(now_micros(), Ordering::Relaxed);
    }
    let mut body = resp.into_body();
    let mut decoder = gz.then(|| flate2::write::GzDecoder::new(Vec::new()));
    let mut parser = EventParser::default();
    let mut last_seq: Option<(String, u64)> = None;
    let mut first = true;
    // One timer for the whole stream: a sleep made per event would register with the timer
    // wheel every time, client CPU that competes with the server on a shared machine.
    let stop = tokio::time::sleep_until(stop_at);
    tokio::pin!(stop);
    let result = loop {
        let frame = tokio::select! {
            biased;
            f = body.frame() => f,
            _ = &mut stop => break Ok(()),
        };
        let Some(frame) = frame else { break Ok(()) };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        let text = match decoder.as_mut() {
            Some(d) => {
                d.write_all(&data)?;
                d.flush()?;
                std::mem::take(d.get_mut())
            }
            None => data.to_vec(),
        };
        let received = now_micros();
        // A steady stream's events during the storm (its window and 5 s after) are counted apart.
        let start = stats.storm_start_us.load(Ordering::Relaxed);
        let during = steady
            && received >= start
            && received <= start + ((load.storm_window + 5.0) * 1e6) as u64;
        for ev in parser.feed(&text) {
            stats.events.fetch_add(1, Ordering::Relaxed);
            // A stream's first event is the state as it was when the client arrived (herald's
            // snapshot is stamped with the time of the last change, seconds ago on a quiet
            // topic): not a change travelling, so it is left out of the latencies.
            record(load, stats, &ev, received, &mut last_seq, !first, during);
            first = false;
        }
    };
    stats.open.fetch_sub(1, Ordering::Relaxed);
    result
}

/// A TLS client for the bench: ALPN by `--proto`, its own session store (or none), and a
/// verifier that checks the server's signature but not who signed its certificate (loopback
/// servers with a throwaway certificate).
fn tls_client(load: &Load) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = if load.tls12 {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![match load.proto {
        Proto::H1 => b"http/1.1".to_vec(),
        Proto::H2 => b"h2".to_vec(),
    }];
    config.resumption = if load.resume {
        rustls::client::Resumption::in_memory_sessions(4)
    } else {
        rustls::client::Resumption::disabled()
    };
    Arc::new(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn record(
    load: &Load,
    stats: &Stats,
    ev: &ParsedEvent,
    received: u64,
    last: &mut Option<(String, u64)>,
    timed: bool,
    during_storm: bool,
) {
    let data: serde_json::Value = serde_json::from_str(&ev.data).unwrap_or(serde_json::Value::Null);
    let payload = if load.envelope { &data["data"] } else { &data };
    // Gaps and duplicates, by herald's `<inc>-<seq>` ids: a snapshot may skip ahead (resync).
    if load.envelope {
        if let Some((inc, seq)) = ev.id.as_deref().and_then(|id| id.split_once('-')) {
            if let Ok(seq) = u64::from_str_radix(seq, 36) {
                let snapshot = ev.event == "snapshot";
                if snapshot {
                    stats.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                if let Some((li, ls)) = last.as_ref() {
                    if li == inc {
                        if seq <= *ls && ev.event != "upstream-error" {
                            stats.dups.fetch_add(1, Ordering::Relaxed);
                        } else if seq > ls + 1 && !snapshot {
                            stats.gaps.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                *last = Some((inc.to_string(), seq));
            }
        }
        if let Some(ts) = data["timestamp"]
            .as_str()
            .filter(|_| timed)
            .and_then(|t| humantime::parse_rfc3339(t).ok())
        {
            let sent = ts
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0);
            let ms = received.saturating_sub(sent) / 1000;
            let mut h = stats.fanout.lock().unwrap_or_else(|p| p.into_inner());
            h[(ms as usize).min(FANOUT_BUCKETS - 1)] += 1;
            if during_storm {
                let mut h = stats.steady.lock().unwrap_or_else(|p| p.into_inner());
                h[(ms as usize).min(FANOUT_BUCKETS - 1)] += 1;
            }
        }
    }
    // Servers without ids: gaps and duplicates by the body's own sequence.
    if !load.envelope {
        if let Some(seq) = payload["seq"].as_u64() {
            if let Some((_, ls)) = last.as_ref() {
                if seq <= *ls {
                    stats.dups.fetch_add(1, Ordering::Relaxed);
                } else if seq > ls + 1 {
                    stats.gaps.fetch_add(1, Ordering::Relaxed);
                }
            }
            *last = Some((String::new(), seq));
        }
    }
    // The source's own timestamp: a field of a snapshot, or the value of a `/ts` patch op.
    let ts = payload["ts"].as_u64().or_else(|| {
        payload
            .as_array()?
            .iter()
            .find(|op| op["path"] == "/ts")
            .and_then(|op| op["value"].as_u64())
    });
    if let Some(ts) = ts.filter(|_| timed) {
        let tenths = received.saturating_sub(ts) / 100;
        let mut h = stats.e2e.lock().unwrap_or_else(|p| p.into_inner());
        h[(tenths as usize).min(E2E_BUCKETS - 1)] += 1;
        // Servers without herald's envelope: the deliver latency is this one.
        if during_storm && !load.envelope {
            let mut h = stats.steady.lock().unwrap_or_else(|p| p.into_inner());
            h[((tenths / 10) as usize).min(FANOUT_BUCKETS - 1)] += 1;
        }
    }
}

#[derive(Default, Debug)]
struct ParsedEvent {
    id: Option<String>,
    event: String,
    data: String,
}

/// A minimal SSE parser: `id`, `event`, `data` lines, events ended by a blank line.
#[derive(Default)]
struct EventParser {
    buf: Vec<u8>,
    cur: ParsedEvent,
    last_id: Option<String>,
}

impl EventParser {
    fn feed(&mut self, chunk: &[u8]) -> Vec<ParsedEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.buf[start..start + nl])
                .trim_end_matches('\r')
                .to_string();
            start += nl + 1;
            if line.is_empty() {
                if !self.cur.data.is_empty() {
                    let mut ev = std::mem::take(&mut self.cur);
                    ev.id = self.last_id.clone();
                    out.push(ev);
                }
                self.cur = ParsedEvent::default();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !self.cur.data.is_empty() {
                    self.cur.data.push('\n');
                }
                self.cur.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            } else if let Some(v) = line.strip_prefix("event:") {
                self.cur.event = v.trim_start().to_string();
            } else if let Some(v) = line.strip_prefix("id:") {
                self.last_id = Some(v.trim_start().to_string());
            }
        }
        self.buf.drain(..start);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream, publisher, floor

/// The bench's legacy API: `/topic/{n}` answers the current body (polls); `/topic/{n}/events`
/// streams every change as an SSE event (`id:` = its sequence; herald's `kind = "sse"`); with
/// `publish`, each change is also POSTed to herald's publish endpoint.
async fn upstream(
    listen: SocketAddr,
    rate: f64,
    size: usize,
    publish: Option<(String, String, usize)>,
) -> Result<()> {
    use http_body_util::combinators::BoxBody;
    let listener = TcpListener::bind(listen).await?;
    eprintln!("bench upstream on http://{}", listener.local_addr()?);
    let seq = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new(Bytes::from(body(0, size))));
    let (changes, _) = tokio::sync::broadcast::channel::<(u64, Bytes)>(64);
    {
        let (seq, current, changes) = (seq.clone(), current.clone(), changes.clone());
        let client = reqwest::Client::new();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            loop {
                t.tick().await;
                let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
                let b = Bytes::from(body(n, size));
                *current.lock().unwrap_or_else(|p| p.into_inner()) = b.clone();
                let _ = changes.send((n, b.clone()));
                if let Some((url, token, topics)) = &publish {
                    for t in 0..(*topics).max(1) {
                        let msg = format!(
                            "{{\"resource\":\"/topic/{t}\",\"data\":{}}}",
                            String::from_utf8_lossy(&b)
                        );
                        let req = client
                            .post(url)
                            .bearer_auth(token)
                            .header("content-type", "application/json")
                            .body(msg);
                        tokio::spawn(async move {
                            if let Err(e) = req.send().await {
                                eprintln!("publish: {e}");
                            }
                        });
                    }
                }
            }
        });
    }
    // Requests served, for `run --upstream-stats`: herald must poll once per topic per interval.
    let requests = Arc::new(AtomicU64::new(0));
    let with_credentials = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let (current, requests) = (current.clone(), requests.clone());
        let with_credentials = with_credentials.clone();
        let changes = changes.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let path = req.uri().path().to_string();
                let stream = path.ends_with("/events");
                let b = if path == "/_stats" {
                    let n = requests.load(Ordering::Relaxed);
                    let c = with_credentials.load(Ordering::Relaxed);
                    Bytes::from(format!("{{\"requests\":{n},\"with_credentials\":{c}}}"))
                } else {
                    requests.fetch_add(1, Ordering::Relaxed);
                    if req.headers().contains_key("authorization") {
                        with_credentials.fetch_add(1, Ordering::Relaxed);
                    }
                    current.lock().unwrap_or_else(|p| p.into_inner()).clone()
                };
                let rx = changes.subscribe();
                async move {
                    let (body, ct): (BoxBody<Bytes, Infallible>, _) = if stream {
                        // The current state first, then every change.
                        let first =
                            Bytes::from(format!("data: {}\n\n", String::from_utf8_lossy(&b)));
                        let events = futures_util::stream::unfold(rx, |mut rx| async move {
                            loop {
                                match rx.recv().await {
                                    Ok((n, b)) => {
                                        let ev = format!(
                                            "id: {n}\ndata: {}\n\n",
                                            String::from_utf8_lossy(&b)
                                        );
                                        return Some((Bytes::from(ev), rx));
                                    }
                                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                        continue
                                    }
                                    Err(_) => return None,
                                }
                            }
                        });
                        let all = futures_util::StreamExt::chain(
                            futures_util::stream::iter([first]),
                            events,
                        );
                        let frames = futures_util::StreamExt::map(all, |b| {
                            Ok::<_, Infallible>(hyper::body::Frame::data(b))
                        });
                        (
                            BodyExt::boxed(http_body_util::StreamBody::new(frames)),
                            "text/event-stream",
                        )
                    } else {
                        (BodyExt::boxed(Full::new(b)), "application/json")
                    };
                    let mut r = hyper::Response::new(body);
                    r.headers_mut()
                        .insert("content-type", hyper::header::HeaderValue::from_static(ct));
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn publish(url: &str, topics: usize, rate: f64, size: usize, seconds: u64) -> Result<()> {
    let client = reqwest::Client::new();
    let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut seq = 0;
    while Instant::now() < end {
        t.tick().await;
        seq += 1;
        // Topics in parallel (64 at a time), so thousands fit in one tick.
        let posts = (0..topics.max(1)).map(|n| {
            let u = url.replace("{n}", &n.to_string());
            let req = client.post(&u).body(body(seq, size));
            async move {
                match req.send().await {
                    Ok(r) if !r.status().is_success() => eprintln!("publish {u}: {}", r.status()),
                    Err(e) => eprintln!("publish {u}: {e}"),
                    Ok(_) => {}
                }
            }
        });
        futures_util::stream::StreamExt::for_each_concurrent(
            futures_util::stream::iter(posts),
            64,
            |f| f,
        )
        .await;
    }
    Ok(())
}

async fn floor(listen: SocketAddr, rate: f64, size: usize) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind(listen).await?;
    eprintln!("floor server on http://{}", listener.local_addr()?);
    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(64);
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            let mut seq = 0u64;
            loop {
                t.tick().await;
                seq += 1;
                // Pre-encoded once: an SSE event inside one HTTP/1.1 chunk.
                let ev = format!("data: {}\n\n", body(seq, size));
                let _ = tx.send(Bytes::from(format!("{:x}\r\n{ev}\r\n", ev.len())));
            }
        });
    }
    loop {
        let (mut s, _) = listener.accept().await?;
        let mut rx = tx.subscribe();
        tokio::spawn(async move {
            let mut head = [0u8; 1024];
            if s.read(&mut head).await.unwrap_or(0) == 0 {
                return;
            }
            let hdr = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
            if s.write_all(hdr).await.is_err() {
                return;
            }
            while let Ok(b) = rx.recv().await {
                if s.write_all(&b).await.is_err() {
                    return;
                }
            }
        });
    }
}
