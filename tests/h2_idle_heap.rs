//! What an idle HTTP/2 connection with one SSE stream (a browser tab's) keeps on herald's heap:
//! counted by a global allocator around a real herald, with clients that speak HTTP/2 from raw
//! frames so that nothing of theirs is on the heap. h2's codec used to hold 28 KiB of empty
//! buffers per connection (write 16 KiB, read 8 KiB, hpack 4 KiB); vendor/h2 releases them. The
//! tab's request indexes a 1,000-byte header into HPACK's table, as browsers index their user
//! agent and cookies, before it acknowledges herald's SETTINGS (a header table of 0): the table
//! must be emptied then, not kept for the stream's life.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes allocated and not yet freed, by everything in this test process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const CONNECTIONS: usize = 40;
/// Heap per idle connection that this test accepts: herald's own stream state, hyper's and h2's
/// connection (tasks, streams) come to about 5.4 KB; h2's empty codec buffers alone were 28 KiB,
/// and the indexed header keeps 1 KB more (and the frame it came in) while the table is not
/// emptied.
const LIMIT: isize = 6 * 1024 + 512;

/// One h2c connection from raw frames: preface, SETTINGS, one GET for an event stream with a
/// header HPACK indexes, then the ACK for the server's SETTINGS; returns once the stream's
/// snapshot arrived. Reading uses a buffer on the stack, so the client adds nothing to the heap
/// but its socket's registration.
async fn open_tab(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    out.extend_from_slice(&frame_head(0, 0x4, 0, 0)); // SETTINGS
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
    literal(&mut block, 4, path.as_bytes()); // :path
    literal(&mut block, 1, addr.to_string().as_bytes()); // :authority
    literal_long(&mut block, 19, b"text/event-stream"); // accept
                                                        // x-tab-note: 1,000 bytes, literal with incremental indexing (a new name; the length 1,000
                                                        // as a 7-bit-prefix integer: 127, then 873 in two bytes).
    block.extend_from_slice(&[0x40, 10]);
    block.extend_from_slice(b"x-tab-note");
    block.extend_from_slice(&[0x7f, 0xe9, 0x06]);
    block.extend_from_slice(&[b'n'; 1000]);
    out.extend_from_slice(&frame_head(block.len(), 0x1, 0x5, 1)); // HEADERS, END_STREAM|END_HEADERS
    out.extend_from_slice(&block);
    out.extend_from_slice(&frame_head(0, 0x4, 0x1, 0)); // SETTINGS ACK (the server's came first)
    s.write_all(&out).await.unwrap();
    drop(out);
    drop(block);
    // Frames until the DATA on stream 1 that carries the snapshot (after the `retry:` prelude).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut head = [0u8; 9];
        tokio::time::timeout_at(deadline.into(), s.read_exact(&mut head))
            .await
            .expect("frames in time")
            .unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, stream) = (
            head[3],
            u32::from_be_bytes([head[5], head[6], head[7], head[8]]),
        );
        let mut left = len;
        let mut chunk = [0u8; 1024];
        let mut first = Vec::new();
        while left > 0 {
            let n = left.min(chunk.len());
            s.read_exact(&mut chunk[..n]).await.unwrap();
            if first.is_empty() {
                first.extend_from_slice(&chunk[..n]);
            }
            left -= n;
        }
        assert_ne!(kind, 0x7, "GOAWAY from herald");
        assert_ne!(kind, 0x3, "RST_STREAM from herald");
        if kind == 0x0 && stream == 1 && String::from_utf8_lossy(&first).contains("snapshot") {
            return s;
        }
    }
}

fn frame_head(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// HPACK literal without indexing, name from the static table (index < 15), short value.
fn literal(block: &mut Vec<u8>, index: u8, value: &[u8]) {
    assert!(index < 15 && value.len() < 127);
    block.push(index);
    block.push(value.len() as u8);
    block.extend_from_slice(value);
}

/// The same for a static-table index of 15 or more (a 4-bit prefix and one continuation byte).
fn literal_long(block: &mut Vec<u8>, index: u8, value: &[u8]) {
    assert!((15..15 + 127).contains(&index) && value.len() < 127);
    block.push(0x0f);
    block.push(index - 15);
    block.push(value.len() as u8);
    block.extend_from_slice(value);
}

/// The live heap once it has stopped moving (writes finishing, buffers being let go), within 5 s.
async fn settled_heap() -> isize {
    let mut last = LIVE.load(Ordering::Relaxed);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = LIVE.load(Ordering::Relaxed);
        if (now - last).abs() < 4096 {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_stream_holds_no_empty_codec_buffers() {
    let up = TestUpstream::start().await;
    up.set_json("/api/tab", json!({"open": true}));
    let h = start_herald(config(
        &up.url(),
        "[[route]]\npath = \"/api/tab\"\ninterval = \"60s\"\n",
    ))
    .await;
    // The first tab makes the topic, its history and the metrics' label sets: not per connection.
    let first = open_tab(h.addr, "/api/tab").await;
    let before = settled_heap().await;
    let mut tabs = Vec::new();
    for _ in 0..CONNECTIONS {
        tabs.push(open_tab(h.addr, "/api/tab").await);
    }
    let after = settled_heap().await;
    let per = (after - before) / CONNECTIONS as isize;
    eprintln!("heap per idle h2 connection with one stream: {per} B");
    assert!(
        per < LIMIT,
        "an idle h2 connection keeps {per} B on the heap (limit {LIMIT} B)"
    );
    drop((tabs, first));
    h.stop().await;
}
