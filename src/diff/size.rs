//! Serialized sizes, measured without building the bytes.

use std::io;

use serde::Serialize;

/// Counts bytes written, failing once more than `limit` have been seen.
struct Counter {
    n: usize,
    limit: usize,
}

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.n = self.n.saturating_add(buf.len());
        if self.n > self.limit {
            Err(io::Error::other("size limit reached"))
        } else {
            Ok(buf.len())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `serde_json::to_vec(v).len()`, without the allocation.
pub(crate) fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
    json_len_capped(v, usize::MAX)
}

/// `serde_json::to_vec(v).len()` when that is at most `limit`; otherwise some number greater than
/// `limit` (serialization stops as soon as the limit is passed, so this costs O(limit)).
pub(crate) fn json_len_capped<T: Serialize + ?Sized>(v: &T, limit: usize) -> usize {
    let mut counter = Counter { n: 0, limit };
    match serde_json::to_writer(&mut counter, v) {
        Ok(()) => counter.n,
        // Either our limit (n > limit already) or a value serde_json cannot serialize, which a
        // `Value` never is; both read as "too big".
        Err(_) => counter.n.max(limit.saturating_add(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_to_vec() {
        for v in [
            json!(null),
            json!({"a": [1, 2.5, -0.0, "é\"\\\n"], "b/c": {"~": true}}),
            json!([]),
            json!("日本"),
        ] {
            let n = serde_json::to_vec(&v).unwrap().len();
            assert_eq!(json_len(&v), n);
            assert_eq!(json_len_capped(&v, n), n);
            assert!(json_len_capped(&v, n - 1) > n - 1);
            assert!(json_len_capped(&v, 0) > 0);
        }
    }
}
