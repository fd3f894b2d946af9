//! What exact numbers (serde_json's `arbitrary_precision`) cost the diff path: parse, diff and
//! serialize a realistic ~1 MB document full of numbers, and the memory one parsed document
//! holds. Not run in CI:
//!
//! ```text
//! cargo run --release --example number_diff [rounds]
//! ```
//!
//! herald no longer builds without the feature (it reads numbers' text), so the "without"
//! column comes from this file built on 11163d5, the commit before it.
//!
//! Results (2 shared cores under load average 5-8, so wall times are the fastest of 4 x 100
//! rounds and rough; instruction counts from `valgrind --tool=callgrind ... 3` are not):
//!
//! | 920 KB, 36,003 numbers         | without (11163d5) | `arbitrary_precision` (3f0b528) |
//! |--------------------------------|-------------------|---------------------------------|
//! | memory per parsed document     | 8.75 MiB          | 10.35 MiB (+18%, +46 B/number)  |
//! | parse                          | 15.6 ms           | 20.2 ms (2x the instructions)   |
//! | diff, equal documents          | 1.7 ms            | 2.2 ms                          |
//! | diff, keyed by id              | 4.9 ms            | 8.2 ms                          |
//! | diff, by content (LCS)         | 6.3 ms            | 8.6 ms                          |
//! | diff, merge patch              | 13.7 ms           | 20.5 ms                         |
//! | all diff calls, instructions   | 342.8 M           | 343.1 M (the same work)         |
//! | serialize snapshot             | 2.9 ms            | 2.7 ms                          |
//! | clone                          | 10.5 ms           | 14.9 ms                         |
//!
//! The diff does the same work; it waits longer on memory, each number now being a pointer to
//! its own small allocation. The patch grows from 20,932 to 21,825 bytes because it now carries
//! the exact digits.
//!
//! The document is a market-data style list: `{"generated": .., "items": [{"id", "symbol",
//! "price", "bid", "ask", "volume", "change", "ts", "ref"}, ..]}` with 16–17-significant-digit
//! floats, small integers, timestamps with 7 decimals and 30-digit references. The next version
//! changes about 2% of the items' prices and timestamps, drops two items and adds two.

use std::hint::black_box;
use std::time::{Duration, Instant};

use herald::diff::{diff, Change, Mode, Options};
use serde_json::Value;

/// Resident memory of this process in bytes (Linux).
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// xorshift64*: deterministic, so every build measures the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A float in [0, 1) with 53 random bits.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One item as JSON text. `version` > 0 perturbs price and timestamp.
fn item(id: u64, seed: u64, version: u64) -> String {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let price = 10.0 + r.unit() * 5000.0 + version as f64 * 0.01;
    let spread = r.unit() * 0.5;
    format!(
        concat!(
            r#"{{"id":{},"symbol":"SYM{:05}","price":{:.13},"bid":{:.13},"ask":{:.13},"#,
            r#""volume":{},"change":{:.6},"ts":{}.{:07},"ref":{}{:012}}}"#
        ),
        id,
        id,
        price,
        price - spread,
        price + spread,
        r.below(10_000_000),
        r.unit() * 2.0 - 1.0,
        1_796_195_052 + version,
        r.below(10_000_000),
        123_456_789_012_345_678u64 + id,
        r.below(1_000_000_000_000),
    )
}

/// The document as text: `count` items, version 0, or version 1 with the edits described above.
fn document(count: u64, next: bool) -> String {
    let mut edits = Rng(7);
    let mut items = Vec::with_capacity(count as usize + 2);
    for id in 0..count {
        if next && (id == 10 || id == count / 2) {
            continue; // dropped
        }
        let changed = next && edits.below(50) == 0;
        items.push(item(id, id, u64::from(changed)));
    }
    if next {
        items.push(item(count, count, 0));
        items.insert(count as usize / 3, item(count + 1, count + 1, 0));
    }
    format!(
        r#"{{"generated":1796195052.4752579,"count":{},"items":[{}]}}"#,
        items.len(),
        items.join(",")
    )
}

/// Fastest and median wall time of `rounds` runs of `f` (the fastest is the steadier figure on
/// a shared machine).
fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .collect();
    times.sort();
    (times[0], times[times.len() / 2])
}

fn ms((fastest, median): (Duration, Duration)) -> String {
    format!(
        "{:8.2} ms {:8.2} ms",
        fastest.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3
    )
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let count = 4_500;
    let (a_text, b_text) = (document(count, false), document(count, true));
    let a: Value = serde_json::from_str(&a_text).expect("valid JSON");
    let b: Value = serde_json::from_str(&b_text).expect("valid JSON");
    let numbers = a_text.matches(':').count() - a_text.matches("\"SYM").count();
    let exact = serde_json::to_string(&a["generated"]).is_ok_and(|t| t == "1796195052.4752579");
    println!(
        "document: {} bytes, {} items, {} numbers; numbers kept exactly: {}",
        a_text.len(),
        count,
        numbers,
        exact
    );
    println!(
        "size_of::<Value>() = {} bytes",
        std::mem::size_of::<Value>()
    );

    let keyed = Options {
        array_key: Some("id".into()),
    };
    let by_content = Options::default();
    let patch_len = |c: Change| match c {
        Change::Patch(p) => serde_json::to_vec(&p).map_or(0, |v| v.len()),
        Change::Snapshot => usize::MAX,
        Change::None => 0,
    };
    println!(
        "patch bytes: keyed {}, by content {}",
        patch_len(diff(&a, &b, Mode::JsonPatch, &keyed)),
        patch_len(diff(&a, &b, Mode::JsonPatch, &by_content)),
    );

    println!("{rounds} rounds:                    fastest      median");
    let parse = time(rounds, || {
        serde_json::from_str::<Value>(&b_text).expect("valid JSON")
    });
    println!("  parse 1 document            {}", ms(parse));
    let a2 = a.clone();
    println!(
        "  diff, equal documents       {}",
        ms(time(rounds, || diff(&a, &a2, Mode::JsonPatch, &keyed)))
    );
    println!(
        "  diff, keyed by id           {}",
        ms(time(rounds, || diff(&a, &b, Mode::JsonPatch, &keyed)))
    );
    println!(
        "  diff, by content (LCS)      {}",
        ms(time(rounds, || diff(&a, &b, Mode::JsonPatch, &by_content)))
    );
    println!(
        "  diff, merge patch           {}",
        ms(time(rounds, || diff(&a, &b, Mode::MergePatch, &keyed)))
    );
    println!(
        "  serialize snapshot          {}",
        ms(time(rounds, || serde_json::to_vec(&b).map(|v| v.len())))
    );
    println!(
        "  clone document              {}",
        ms(time(rounds, || b.clone()))
    );

    // Memory: keep several parsed copies alive and divide the growth of resident memory.
    let copies = 20;
    let before = rss();
    let kept: Vec<Value> = (0..copies)
        .map(|_| serde_json::from_str(&a_text).expect("valid JSON"))
        .collect();
    let per_doc = rss().saturating_sub(before) / copies;
    black_box(&kept);
    println!(
        "memory: {} bytes ({:.2} MiB) per parsed document ({:.1} per number in it)",
        per_doc,
        per_doc as f64 / (1024.0 * 1024.0),
        per_doc as f64 / numbers as f64,
    );
}
