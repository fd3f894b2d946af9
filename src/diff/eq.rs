//! Fast structural equality and hashing of JSON values, both agreeing exactly with
//! `serde_json::Value`'s `==` (object member order ignored, `-0.0 == 0.0`, `1 != 1.0`).

use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde_json::Value;

/// `a == b`, faster for the common case of objects whose members are in the same order:
/// members are compared position by position, with a key lookup only where the order differs
/// (`Value`'s own `==` looks up every key).
pub(crate) fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|((ka, va), (kb, vb))| {
                    if ka == kb {
                        json_eq(va, vb)
                    } else {
                        y.get(ka).is_some_and(|vb| json_eq(va, vb))
                    }
                })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        _ => a == b,
    }
}

/// A hash consistent with [`json_eq`].
pub(crate) fn hash_of(v: &Value) -> u64 {
    let mut h = FxHasher::default();
    hash_value(v, &mut h);
    h.finish()
}

fn hash_value(v: &Value, h: &mut FxHasher) {
    match v {
        Value::Null => h.add(0),
        Value::Bool(b) => h.add(1 + u64::from(*b)),
        Value::Number(n) => {
            // Integers have one representation each (non-negative ones are always u64); floats
            // compare as f64, where -0.0 == 0.0.
            if let Some(u) = n.as_u64() {
                h.add(3);
                h.add(u);
            } else if let Some(i) = n.as_i64() {
                h.add(4);
                h.add(i as u64);
            } else {
                h.add(5);
                h.add(
                    n.as_f64()
                        .map_or(0, |f| if f == 0.0 { 0 } else { f.to_bits() }),
                );
            }
        }
        Value::String(s) => {
            h.add(6);
            s.hash(h);
        }
        Value::Array(a) => {
            h.add(7);
            h.add(a.len() as u64);
            for x in a {
                hash_value(x, h);
            }
        }
        Value::Object(m) => {
            h.add(8);
            h.add(m.len() as u64);
            // Order-independent: a sum of per-member hashes.
            let mut sum = 0u64;
            for (k, x) in m {
                let mut member = FxHasher::default();
                k.hash(&mut member);
                hash_value(x, &mut member);
                sum = sum.wrapping_add(member.finish());
            }
            h.add(sum);
        }
    }
}

/// For hash maps keyed by values that are already hashes (or small integers).
pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;

/// A small, fast, non-cryptographic hasher (rustc's "Fx" word mixing, with a final avalanche so
/// every output bit depends on every input bit). Collisions only cost extra equality checks,
/// and nothing the diff outputs depends on hash values.
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // murmur3's fmix64.
        let mut z = self.0;
        z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        z ^ (z >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn agrees_with_value_eq() {
        let values = [
            parse(r#"{"a":1,"b":[0.0]}"#),
            parse(r#"{"b":[-0.0],"a":1}"#),
            parse(r#"{"b":[0],"a":1}"#),
            parse(r#"{"a":1,"c":[0.0]}"#),
            parse(r#"{"a":1}"#),
            json!([1, 2]),
            json!([2, 1]),
            json!(1),
            json!(1.0),
            json!(-1),
            json!(u64::MAX),
            json!(""),
            json!("a"),
            json!(null),
            json!(false),
            json!({}),
            json!([]),
            json!({"x": {"y": [null, {"z": "é"}]}, "w": true}),
            json!({"w": true, "x": {"y": [null, {"z": "é"}]}}),
            json!({"w": true, "x": {"y": [null, {"z": "e"}]}}),
        ];
        for a in &values {
            for b in &values {
                assert_eq!(json_eq(a, b), a == b, "{a} vs {b}");
                if a == b {
                    assert_eq!(hash_of(a), hash_of(b), "{a} vs {b}");
                }
            }
        }
        // Strings differing only past a word boundary or in length hash differently.
        assert_ne!(
            hash_of(&json!("abcdefgh")),
            hash_of(&json!("abcdefgh\u{0}"))
        );
        assert_ne!(hash_of(&json!(["a", ""])), hash_of(&json!(["", "a"])));
    }
}
