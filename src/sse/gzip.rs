//! gzip for SSE streams without a compressor per client. Each hub event is deflated once, as a
//! standalone block sequence ended by a full flush (no reference to earlier data), cached on the
//! event and sent as the same bytes to every gzip watcher; a watcher keeps only its running CRC-32
//! and length, and writes the gzip trailer when its stream ends.
//!
//! The wire format of one gzip stream:
//!
//! ```text
//! 10-byte header │ block…sync │ block…sync │ … │ 01 00 00 ff ff │ CRC-32 │ ISIZE
//!                  (retry:)     (event 1, shared)  final empty stored block
//! ```
//!
//! Every block sequence ends byte-aligned with an empty stored block (`00 00 ff ff`), so a client
//! decodes each event as soon as it arrives.

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};
use http_body::{Body, Frame, SizeHint};

use super::lifecycle::{Item, ItemSource, StreamClosed, HEARTBEAT};
use crate::hub::{Delivery, Encoded, Encoding, Event};

/// RFC 1952 member header: magic, deflate, no flags, no mtime, no extra flags, OS unknown.
pub const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// A final (BFINAL=1) empty stored block: ends the deflate stream after the last full flush.
const FINAL_BLOCK: [u8; 5] = [0x01, 0x00, 0x00, 0xff, 0xff];

/// Level 6 (zlib's default). Events are compressed once per topic, not per watcher, so a higher
/// level would be affordable, but on build JSON (a 2.5 KB snapshot, 230 B patches) level 9 gives
/// the same bytes and level 1 only 0.3% more (`examples/gzip_ratio.rs`).
const LEVEL: u32 = 6;

thread_local! {
    /// One deflate state per worker thread (~300 KiB), reset before every block: blocks never
    /// depend on earlier data, so any thread's compressor can make any block, and no stream
    /// holds one.
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
}

/// Append `text` to `out` as raw deflate blocks ended by a full flush: decodable on its own,
/// byte-aligned, and valid after any other such sequence.
pub fn deflate_block(text: &[u8], out: &mut Vec<u8>) {
    COMPRESSOR.with(|c| match c.try_borrow_mut() {
        Ok(mut c) => deflate_with(&mut c, text, out),
        // Only reachable if deflating re-entered itself on this thread; a fresh state is correct,
        // merely slower.
        Err(_) => deflate_with(
            &mut Compress::new(Compression::new(LEVEL), false),
            text,
            out,
        ),
    })
}

fn deflate_with(c: &mut Compress, text: &[u8], out: &mut Vec<u8>) {
    c.reset();
    // Deflate never grows data by more than ~5 bytes per 16 KiB stored block plus the flush
    // marker, so this reservation normally makes one call enough.
    out.reserve(text.len() + text.len() / 1024 + 64);
    let mut input = text;
    loop {
        let before = c.total_in();
        // Writing into a Vec cannot fail for a raw deflate stream; the loop below only needs
        // progress, so an error (none is possible here) simply ends the block early.
        if c.compress_vec(input, out, FlushCompress::Full).is_err() {
            return;
        }
        let used = usize::try_from(c.total_in() - before).unwrap_or(input.len());
        input = input.get(used..).unwrap_or_default();
        // Room left over means the flush finished; a full buffer may hide pending output.
        if input.is_empty() && out.len() < out.capacity() {
            return;
        }
        out.reserve(out.capacity().max(64));
    }
}

/// The gzip encoding of a hub event: its SSE text deflated as one standalone block sequence,
/// with the text's CRC-32 and length for the watchers' trailers.
pub fn encode_event(ev: &Event) -> Encoded {
    block(ev.text())
}

/// The gzip encoding of a hub event without its `id:` line (`Event::bare`), for multiplexed
/// streams.
pub fn encode_bare(ev: &Event) -> Encoded {
    block(&ev.bare())
}

/// `text` as a standalone block, with what a watcher needs to fold it into its trailer.
fn block(text: &[u8]) -> Encoded {
    let mut out = Vec::new();
    deflate_block(text, &mut out);
    Encoded {
        bytes: Bytes::from(out),
        crc: crc32fast::hash(text),
        len: text.len() as u64,
        crc_shift: crc_shift(text.len() as u64),
    }
}

/// `: heartbeat` as a block, made once per process.
static HEARTBEAT_BLOCK: LazyLock<Encoded> = LazyLock::new(|| block(HEARTBEAT));

/// a(x)·b(x) modulo the CRC-32 polynomial, bit-reflected (zlib's `multmodp`).
fn gf2_multiply(a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    for i in 0..32 {
        p ^= b & ((a >> (31 - i)) & 1).wrapping_neg();
        b = (b >> 1) ^ ((b & 1).wrapping_neg() & 0xedb8_8320);
    }
    p
}

/// x^(8·len) modulo the CRC-32 polynomial: the CRC of `A ++ B` is
/// `gf2_multiply(crc_shift(len(B)), crc(A)) ^ crc(B)` (zlib's `crc32_combine_op`). Made once per
/// event, it turns each watcher's fold into one 32-step multiplication; recomputing it per watcher
/// (as `crc32fast::Hasher::combine` does) costs ~4× more (`examples/gzip_ratio.rs`).
fn crc_shift(len: u64) -> u32 {
    let (mut p, mut square, mut n) = (0x8000_0000u32, 0x0080_0000u32, len);
    while n != 0 {
        if n & 1 != 0 {
            p = gf2_multiply(square, p);
        }
        square = gf2_multiply(square, square);
        n >>= 1;
    }
    p
}

/// An SSE stream (a single topic's, or a multiplexed one) with `Content-Encoding: gzip`.
pub struct GzipStream<S> {
    inner: S,
    header_sent: bool,
    /// CRC-32 and length of all SSE text sent so far (the trailer's CRC and ISIZE): the only
    /// per-watcher compression state.
    crc: u32,
    len: u64,
    finished: bool,
}

impl<S: ItemSource> GzipStream<S> {
    pub fn new(inner: S) -> GzipStream<S> {
        GzipStream {
            inner,
            header_sent: false,
            crc: 0,
            len: 0,
            finished: false,
        }
    }

    /// Fold a shared block's text into the running checksum, without reading it.
    fn fold(&mut self, enc: &Encoded) {
        self.crc = gf2_multiply(enc.crc_shift, self.crc) ^ enc.crc;
        self.len += enc.len;
    }

    /// Continue the running checksum over per-client text.
    fn hash(&mut self, text: &[u8]) {
        let mut h = crc32fast::Hasher::new_with_initial_len(self.crc, self.len);
        h.update(text);
        self.crc = h.finalize();
        self.len += text.len() as u64;
    }

    /// The gzip bytes for one item. A single shared event is returned as the cached bytes
    /// themselves: no copy, no allocation, whatever the number of watchers.
    fn encode(&mut self, item: Item, last: bool) -> Bytes {
        let alone = self.header_sent && !last;
        let mut out = Vec::new();
        if !self.header_sent {
            self.header_sent = true;
            out.extend_from_slice(&HEADER);
        }
        match item {
            Item::Events(Delivery::One(ev)) => {
                let enc = ev.encoded(Encoding::Gzip, encode_event);
                self.fold(&enc);
                if alone {
                    return enc.bytes;
                }
                out.extend_from_slice(&enc.bytes);
            }
            Item::Events(Delivery::Many(evs)) => {
                for ev in &evs {
                    let enc = ev.encoded(Encoding::Gzip, encode_event);
                    self.fold(&enc);
                    out.extend_from_slice(&enc.bytes);
                }
            }
            Item::Events(Delivery::Nothing) => {}
            Item::Framed { id, event } => {
                // The client's own id line, then the shared text of the event.
                self.hash(&id);
                deflate_block(&id, &mut out);
                let enc = event.encoded(Encoding::GzipBare, encode_bare);
                self.fold(&enc);
                out.extend_from_slice(&enc.bytes);
            }
            Item::Heartbeat => {
                let hb = &*HEARTBEAT_BLOCK;
                self.fold(hb);
                if alone {
                    return hb.bytes.clone();
                }
                out.extend_from_slice(&hb.bytes);
            }
            Item::Own(text) => {
                // Per-client text (a `retry:` line, the last event): hashed and deflated here,
                // once, by the thread's shared compressor.
                self.hash(&text);
                deflate_block(&text, &mut out);
            }
        }
        if last {
            self.trailer(&mut out);
        }
        Bytes::from(out)
    }

    /// The end of the member: final empty block, CRC-32 and ISIZE (length mod 2^32), little-endian.
    fn trailer(&mut self, out: &mut Vec<u8>) {
        self.finished = true;
        out.extend_from_slice(&FINAL_BLOCK);
        out.extend_from_slice(&self.crc.to_le_bytes());
        // ISIZE is defined modulo 2^32; the truncation is the format.
        out.extend_from_slice(&(self.len as u32).to_le_bytes());
    }
}

impl<S: ItemSource + Unpin> Body for GzipStream<S> {
    type Data = Bytes;
    type Error = StreamClosed;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamClosed>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        let item = match this.inner.poll_item(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        let bytes = match item {
            // The last item normally carries the trailer (`last` below); this covers a stream
            // that ends without one.
            None => {
                let mut out = Vec::new();
                if !this.header_sent {
                    this.header_sent = true;
                    out.extend_from_slice(&HEADER);
                }
                this.trailer(&mut out);
                Bytes::from(out)
            }
            Some(item) => {
                let last = this.inner.is_done();
                this.encode(item, last)
            }
        };
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Blocks made separately, concatenated between a header and a trailer, form one valid gzip
    /// member whose CRC is the combination of theirs.
    #[test]
    fn standalone_blocks_concatenate() {
        let parts: [&[u8]; 4] = [
            b"retry: 10000\n\n",
            b"id: 1-1\nevent: snapshot\ndata: {\"a\":1}\n\n",
            HEARTBEAT,
            b"id: 1-2\nevent: patch\ndata: [{\"op\":\"replace\",\"path\":\"/a\",\"value\":2}]\n\n",
        ];
        let mut wire = HEADER.to_vec();
        let mut crc = crc32fast::Hasher::new();
        let mut decoder = flate2::Decompress::new(false);
        let mut decoded = Vec::with_capacity(4096);
        for p in parts {
            let start = wire.len();
            deflate_block(p, &mut wire);
            crc.combine(&crc32fast::Hasher::new_with_initial_len(
                crc32fast::hash(p),
                p.len() as u64,
            ));
            // Each block alone yields all of its text.
            let before = decoded.len();
            decoder
                .decompress_vec(&wire[start..], &mut decoded, flate2::FlushDecompress::Sync)
                .unwrap();
            assert_eq!(&decoded[before..], p);
        }
        wire.extend_from_slice(&FINAL_BLOCK);
        wire.extend_from_slice(&crc.clone().finalize().to_le_bytes());
        wire.extend_from_slice(&(crc.total_len() as u32).to_le_bytes());
        let mut all = String::new();
        flate2::read::GzDecoder::new(&wire[..])
            .read_to_string(&mut all)
            .unwrap();
        assert_eq!(all.as_bytes(), parts.concat());
    }

    /// Folding with a cached shift agrees with crc32fast over the concatenation.
    #[test]
    fn crc_fold_matches_crc32fast() {
        let parts: [&[u8]; 5] = [b"", b"a", b"retry: 10000\n\n", &[0xffu8; 3000], HEARTBEAT];
        let mut crc = 0u32;
        let mut all = Vec::new();
        for p in parts {
            crc = gf2_multiply(crc_shift(p.len() as u64), crc) ^ crc32fast::hash(p);
            all.extend_from_slice(p);
            assert_eq!(crc, crc32fast::hash(&all));
        }
    }

    /// Large and incompressible text still comes out whole (the output buffer grows as needed).
    #[test]
    fn large_random_block() {
        let text: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut out = Vec::new();
        deflate_block(&text, &mut out);
        let mut d = flate2::Decompress::new(false);
        let mut back = Vec::with_capacity(text.len() + 16);
        d.decompress_vec(&out, &mut back, flate2::FlushDecompress::Sync)
            .unwrap();
        assert_eq!(back, text);
    }
}
