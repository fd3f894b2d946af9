//! Server-Sent Events framing (WHATWG HTML §9.2): events, comments and `retry:` as bytes. Field
//! values may not contain line breaks (refused), and multi-line data becomes several `data:`
//! lines, so any payload round-trips through a conforming parser. Imports nothing from herald:
//! the hub frames each event once with it, streams their own per-client lines.
//!
//! ```
//! let bytes = herald::wire::event(Some("1-2"), Some("patch"), b"{\"a\":1}\nsecond");
//! assert_eq!(&bytes[..], b"id: 1-2\nevent: patch\ndata: {\"a\":1}\ndata: second\n\n");
//! ```

use bytes::{BufMut, Bytes, BytesMut};

/// Encode one event. `id` and `name` with a CR, LF or NUL are dropped (they cannot be framed);
/// `data` is split on CRLF, CR and LF into one `data:` line each.
pub fn event(id: Option<&str>, name: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 64);
    if let Some(id) = id.filter(|v| field_ok(v) && !v.contains('\0')) {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(name) = name.filter(|v| field_ok(v)) {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    for line in split_lines(data) {
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// A comment line (`: text`), ignored by clients; used for heartbeats.
pub fn comment(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 4);
    out.put_slice(b": ");
    for line in split_lines(text.as_bytes()) {
        out.put_slice(line);
    }
    out.put_slice(b"\n\n");
    out.freeze()
}

/// `retry: <ms>`: how long the client waits before reconnecting.
pub fn retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

fn field_ok(v: &str) -> bool {
    !v.contains(['\r', '\n'])
}

/// Lines of `data`, split on CRLF, CR or LF; always at least one (possibly empty) line.
fn split_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let cur = rest?;
        match cur.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                let skip = if cur[i] == b'\r' && cur.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = Some(&cur[i + skip..]);
                Some(&cur[..i])
            }
            None => {
                rest = None;
                Some(cur)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_data_and_refused_fields() {
        let b = event(Some("a\nb"), Some("x\r"), b"one\r\ntwo\rthree\nfour");
        assert_eq!(&b[..], b"data: one\ndata: two\ndata: three\ndata: four\n\n");
        assert_eq!(&event(None, None, b"")[..], b"data: \n\n");
        assert_eq!(&event(None, None, b"x\n")[..], b"data: x\ndata: \n\n");
        assert_eq!(&comment("heart\nbeat")[..], b": heartbeat\n\n");
        assert_eq!(&retry(1500)[..], b"retry: 1500\n\n");
    }
}
