//! Measures gzip for SSE two ways on realistic events (a ~2 KB build snapshot, then small JSON
//! patches): herald's shared full-flush blocks (each event deflated once for all watchers; each
//! watcher only folds CRCs) against one streaming compressor per client (sync flush per event).
//! Reports bytes on the wire, CPU, and the memory a per-client compressor holds. Not run in CI:
//!
//! ```text
//! cargo run --release --example gzip_ratio [watchers] [events]
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use herald::sse::gzip;
use herald::wire as encode;
use serde_json::{json, Value};

/// Resident memory of this process in bytes (Linux), to see what per-client compressors keep.
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// a(x)·b(x) modulo the CRC-32 polynomial (reflected), as zlib's `multmodp`.
fn multiply(a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    for i in 0..32 {
        p ^= b & ((a >> (31 - i)) & 1).wrapping_neg();
        b = (b >> 1) ^ ((b & 1).wrapping_neg() & 0xedb8_8320);
    }
    p
}

/// x^(8·len) modulo the CRC-32 polynomial: appending `len` bytes shifts a CRC by this.
fn x8n(len: u64) -> u32 {
    let (mut p, mut sq, mut n) = (0x8000_0000u32, 0x0080_0000u32, len);
    while n != 0 {
        if n & 1 != 0 {
            p = multiply(sq, p);
        }
        sq = multiply(sq, sq);
        n >>= 1;
    }
    p
}

/// A deterministic xorshift, so every run measures the same events.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn build() -> Value {
    let steps: Vec<Value> = (0..14)
        .map(|i| {
            json!({
                "id": i,
                "name": format!("step {i}: cargo test --workspace -p crate-{i}"),
                "status": "queued",
                "duration_ms": null,
                "log_url": format!("https://ci.example.com/builds/48213/steps/{i}/log"),
            })
        })
        .collect();
    json!({
        "id": 48213, "pipeline": "herald/main", "commit": "9f2c1e7a4b3d",
        "author": "dev@example.com", "status": "running", "queued_at": "2025-01-14T09:12:03.120Z",
        "started_at": "2025-01-14T09:12:05.877Z", "progress": 0, "steps": steps,
    })
}

/// The SSE text of one herald event around `data`.
fn sse(seq: u64, kind: &str, data: &Value) -> Vec<u8> {
    let envelope = json!({
        "type": kind, "topic": "/api/builds/48213",
        "timestamp": format!("2025-01-14T09:{:02}:{:02}.{:03}Z", seq / 60 % 60, seq % 60, seq * 37 % 1000),
        "data": data,
    });
    encode::event(
        Some(&format!("k3x9a1-{seq:x}")),
        Some(kind),
        envelope.to_string().as_bytes(),
    )
    .to_vec()
}

/// A snapshot, then `n` patches that touch one to three fields, as a running build does.
fn events(n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = vec![sse(1, "snapshot", &build())];
    for seq in 2..=n as u64 + 1 {
        let step = rng.below(14);
        let status = ["running", "passed", "failed"][rng.below(3) as usize];
        let mut ops = vec![
            json!({"op": "replace", "path": format!("/steps/{step}/status"), "value": status}),
        ];
        if rng.below(2) == 0 {
            ops.push(
                json!({"op": "replace", "path": format!("/steps/{step}/duration_ms"),
                "value": rng.below(600_000)}),
            );
        }
        if rng.below(3) == 0 {
            ops.push(json!({"op": "replace", "path": "/progress", "value": rng.below(100)}));
        }
        out.push(sse(seq, "patch", &Value::Array(ops)));
    }
    out
}

fn per_watcher(d: Duration, watchers: usize, events: usize) -> f64 {
    d.as_secs_f64() * 1e9 / (watchers * events) as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let watchers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(300);
    let evs = events(n);
    let text: usize = evs.iter().map(Vec::len).sum();
    let snap = evs[0].len();
    let patch_avg = (text - snap) / n;
    println!(
        "events: 1 snapshot of {snap} B + {n} patches of {patch_avg} B avg = {text} B of SSE text"
    );
    println!("watchers: {watchers}\n");

    // Shared: each event deflated once (what Event::encoded(Gzip) caches) ...
    {
        let t = Instant::now();
        let blocks: Vec<(Vec<u8>, u32, u64)> = evs
            .iter()
            .map(|e| {
                let mut b = Vec::new();
                gzip::deflate_block(e, &mut b);
                (b, crc32fast::hash(e), e.len() as u64)
            })
            .collect();
        let compress = t.elapsed();
        // ... and each watcher folds every event's CRC into its own with the cached x^(8n)
        // operator (what GzipStream does) ...
        let ops: Vec<(u32, u32)> = blocks.iter().map(|(_, c, l)| (*c, x8n(*l))).collect();
        let t = Instant::now();
        let mut sink = 0u32;
        for _ in 0..watchers {
            let mut crc = 0u32;
            for (c, op) in &ops {
                crc = multiply(*op, crc) ^ c;
            }
            sink ^= crc;
        }
        let fold = t.elapsed();
        let wire: usize = 10 + blocks.iter().map(|b| b.0.len()).sum::<usize>() + 13;
        let snap_wire = blocks[0].0.len();
        let patch_wire = (wire - 23 - snap_wire) / n;
        println!("shared full-flush blocks (herald, level 6)");
        println!(
            "  bytes per client: {wire} ({:.1}% of text); snapshot {snap_wire} B, patch {patch_wire} B avg",
            100.0 * wire as f64 / text as f64
        );
        println!(
            "  CPU: {:.2} ms to compress all events once (all watchers); CRC fold {:.0} ns per event per watcher",
            compress.as_secs_f64() * 1e3,
            per_watcher(fold, watchers, evs.len())
        );
        println!(
            "  CPU total for {watchers} watchers: {:.1} ms",
            (compress + fold).as_secs_f64() * 1e3
        );

        // ... rather than crc32fast's combine (which recomputes the operator) or re-hashing.
        let t = Instant::now();
        for _ in 0..watchers {
            let mut crc = crc32fast::Hasher::new();
            for (_, c, l) in &blocks {
                crc.combine(&crc32fast::Hasher::new_with_initial_len(*c, *l));
            }
            sink ^= crc.finalize();
        }
        let combine = t.elapsed();
        let t = Instant::now();
        for _ in 0..watchers {
            let mut crc = crc32fast::Hasher::new();
            for e in &evs {
                crc.update(e);
            }
            sink ^= crc.finalize();
        }
        let rehash = t.elapsed();
        std::hint::black_box(sink);
        println!(
            "  trailer CRC alternatives: crc32fast::Hasher::combine {:.0} ns; re-hash the shared \
             text {:.0} ns (per event per watcher)",
            per_watcher(combine, watchers, evs.len()),
            per_watcher(rehash, watchers, evs.len()),
        );
    }

    // Shared blocks at other levels (bytes only; herald uses 6).
    for level in [1u32, 9] {
        let mut c = flate2::Compress::new(Compression::new(level), false);
        let mut wire = 23;
        let t = Instant::now();
        for e in &evs {
            c.reset();
            let mut out = Vec::with_capacity(e.len() * 2 + 64);
            c.compress_vec(e, &mut out, flate2::FlushCompress::Full)
                .expect("deflating into a Vec cannot fail");
            wire += out.len();
        }
        println!(
            "  same at level {level}: {wire} B ({:.1}% of text), {:.2} ms to compress once",
            100.0 * wire as f64 / text as f64,
            t.elapsed().as_secs_f64() * 1e3
        );
    }

    // Shared, but with history: one compressor per topic, sync flush per event and a full flush
    // every 16 events (not built: watchers would have to join in lockstep at a full flush).
    {
        let mut c = flate2::Compress::new(Compression::new(6), false);
        let mut out = Vec::with_capacity(text * 2);
        for (i, e) in evs.iter().enumerate() {
            let flush = if i % 16 == 0 {
                flate2::FlushCompress::Full
            } else {
                flate2::FlushCompress::Sync
            };
            c.compress_vec(e, &mut out, flush)
                .expect("deflating into a Vec cannot fail");
        }
        let wire = 10 + out.len() + 13;
        println!(
            "\nper-topic compressor, full flush every 16 events (for comparison, not built)\n  \
             bytes per client: {wire} ({:.1}% of text)",
            100.0 * wire as f64 / text as f64
        );
    }

    // Per client: one streaming compressor per watcher, sync flush after every event.
    for level in [1u32, 6] {
        let measured = watchers.min(200);
        let mut wire = 0;
        let mut snap_wire = 0;
        let t = Instant::now();
        for _ in 0..measured {
            let mut enc = GzEncoder::new(Vec::new(), Compression::new(level));
            for (i, e) in evs.iter().enumerate() {
                enc.write_all(e).expect("deflating into a Vec cannot fail");
                enc.flush().expect("deflating into a Vec cannot fail");
                if i == 0 {
                    snap_wire = enc.get_ref().len() - 10;
                }
            }
            wire = enc
                .finish()
                .expect("deflating into a Vec cannot fail")
                .len();
        }
        let took = t.elapsed();
        let per = per_watcher(took, measured, evs.len());
        let patch_wire = (wire - 18 - snap_wire) / n;
        println!("\nper-client streaming compressor, level {level}, sync flush per event");
        println!(
            "  bytes per client: {wire} ({:.1}% of text); snapshot {snap_wire} B, patch {patch_wire} B avg",
            100.0 * wire as f64 / text as f64
        );
        println!(
            "  CPU: {per:.0} ns per event per watcher (measured on {measured} watchers); \
             total for {watchers} watchers: {:.1} ms",
            per * (watchers * evs.len()) as f64 / 1e6
        );
    }

    // Memory a per-client compressor holds after a stream's worth of events.
    let before = rss();
    let mut encs: Vec<GzEncoder<Vec<u8>>> = (0..200)
        .map(|_| GzEncoder::new(Vec::new(), Compression::new(6)))
        .collect();
    for enc in &mut encs {
        for e in &evs {
            enc.write_all(e).expect("deflating into a Vec cannot fail");
            enc.flush().expect("deflating into a Vec cannot fail");
            enc.get_mut().clear();
        }
    }
    let held = rss().saturating_sub(before) / encs.len();
    drop(encs);
    println!(
        "\nmemory: a per-client compressor keeps ~{} KiB resident after {} events; a shared-block \
         watcher keeps 16 B (CRC, length, flags), plus one deflate state per worker thread",
        held / 1024,
        evs.len()
    );
}
