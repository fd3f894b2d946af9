//! Fast structural equality and hashing of JSON values, both agreeing exactly with
//! `serde_json::Value`'s `==` (object member order ignored), and the numeric comparison that
//! JSON Patch's `test` needs ([`numeric_eq`]).
//!
//! # When two numbers are equal
//!
//! herald keeps every number as the text the upstream sent (serde_json's `arbitrary_precision`
//! feature), and for the diff **two numbers are equal exactly when their text is the same**.
//! `1.0` and `1`, `1e2` and `100`, `0.10` and `0.1`, `-0` and `0` all differ, and changing one
//! into the other sends a patch. Why not compare values:
//!
//! * a client must end up with exactly what the upstream now says. Clients that read numbers by
//!   their text (decimal and bignum libraries, typed languages telling integers from floats,
//!   `JSON.parse` with a reviver that sees the source) can tell `1.0` from `1`; swallowing that
//!   change would leave them with text the upstream no longer sends;
//! * a client that joins later gets a snapshot with the new text. Had the change been
//!   swallowed, it and a client that has been patching along would hold different documents;
//!   with text equality, applying the patches to a snapshot always gives the byte-identical
//!   current document, which is what `tests/numbers.rs` checks;
//! * value equality is not cheap or obvious either (`1e400` is no `f64`, 30-digit integers round
//!   as `f64`), while text equality is a string comparison. A spurious-looking patch costs one
//!   small `replace`, and upstreams rarely change how they spell an unchanged value.
//!
//! One normalization happens before we see the text: serde_json writes exponents as `e+N` or
//! `e-N` (`1E5`, `1e5` and `1e+5` all read as `1e+5`). Those therefore compare equal here, and
//! clients are sent `1e+5` for each; the value and every digit are kept.

use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde_json::{Number, Value};

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
        (Value::Number(x), Value::Number(y)) => x.as_str() == y.as_str(),
        _ => a == b,
    }
}

/// Whether two JSON numbers have the same mathematical value, computed exactly (never through
/// `f64`, which would call 30-digit integers one apart equal): `1`, `1.0`, `1e0` and `10e-1`
/// are equal, and so are `0` and `-0`. This is RFC 6902's rule for `test`; the diff itself
/// compares text (see the module doc).
///
/// Numbers whose exponent does not fit an `i64` (`1e99999999999999999999`) are only equal to
/// the same text.
pub(crate) fn numeric_eq(a: &Number, b: &Number) -> bool {
    a.as_str() == b.as_str()
        || matches!(
            (Decimal::parse(a.as_str()), Decimal::parse(b.as_str())),
            (Some(x), Some(y)) if x == y
        )
}

/// A number's exact value: sign, significant digits (no leading or trailing zeros) and the
/// power of ten of the last digit. Zero has no digits, no sign and exponent 0.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    exponent: i64,
}

impl Decimal {
    /// Parse JSON number text (`-?int(.frac)?([eE][+-]?exp)?`); `None` if it is not one or its
    /// exponent overflows.
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(at) => {
                let exp = rest[at + 1..].strip_prefix('+').unwrap_or(&rest[at + 1..]);
                (&rest[..at], exp.parse::<i64>().ok()?)
            }
            None => (rest, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || !all_digits(int) || !all_digits(frac) {
            return None;
        }
        let frac_len = i64::try_from(frac.len()).ok()?;
        let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
        let mut exponent = exp.checked_sub(frac_len)?;
        let trailing = digits.iter().rev().take_while(|&&d| d == b'0').count();
        digits.truncate(digits.len() - trailing);
        exponent = exponent.checked_add(i64::try_from(trailing).ok()?)?;
        let leading = digits.iter().take_while(|&&d| d == b'0').count();
        digits.drain(..leading);
        if digits.is_empty() {
            return Some(Decimal {
                negative: false,
                digits,
                exponent: 0,
            });
        }
        Some(Decimal {
            negative,
            digits,
            exponent,
        })
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
            // Numbers are equal when their text is (see the module doc).
            h.add(3);
            n.as_str().hash(h);
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

    /// Numbers are equal exactly when their text is (module doc): no patch for the same text,
    /// a patch for the same value spelled differently.
    #[test]
    fn numbers_are_equal_when_their_text_is() {
        let same = [
            ("1796195052.4752579", "1796195052.4752579"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567890",
            ),
            ("1e400", "1e400"),
            ("-0", "-0"),
            // serde_json writes every exponent with a sign; the value and digits are kept.
            ("1E5", "1e+5"),
            ("1e5", "1e+5"),
        ];
        for (a, b) in same {
            let (x, y) = (parse(a), parse(b));
            assert!(json_eq(&x, &y), "{a} vs {b}");
            assert_eq!(hash_of(&x), hash_of(&y), "{a} vs {b}");
        }
        let different = [
            // One ULP apart as f64 (what a lossy parse would merge), and f64-equal texts.
            ("1796195052.4752579", "1796195052.475258"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567891",
            ),
            ("1e400", "1e401"),
            // Same value, different text.
            ("1.0", "1"),
            ("1e2", "100"),
            ("0.10", "0.1"),
            ("-0", "0"),
            ("-0.0", "0.0"),
        ];
        for (a, b) in different {
            let (x, y) = (parse(a), parse(b));
            assert!(!json_eq(&x, &y), "{a} vs {b}");
            assert_eq!(
                x == y,
                json_eq(&x, &y),
                "{a} vs {b}: agrees with Value's =="
            );
            assert_ne!(hash_of(&x), hash_of(&y), "{a} vs {b}");
        }
    }

    #[test]
    fn numeric_eq_compares_exact_values() {
        let num = |s: &str| match parse(s) {
            Value::Number(n) => n,
            other => panic!("{s} is {other}"),
        };
        let equal = [
            ("1", "1.0"),
            ("1", "1e0"),
            ("100", "1e2"),
            ("100", "1E+2"),
            ("1.5", "15e-1"),
            ("0.1", "0.10"),
            ("0", "-0"),
            ("0", "-0.0e7"),
            ("0.000", "0e-9"),
            ("1e400", "10e399"),
            (
                "123456789012345678901234567890",
                "1.23456789012345678901234567890e29",
            ),
            ("-2.50", "-25e-1"),
        ];
        for (a, b) in equal {
            assert!(numeric_eq(&num(a), &num(b)), "{a} == {b}");
            assert!(numeric_eq(&num(b), &num(a)), "{b} == {a}");
        }
        let unequal = [
            ("1", "-1"),
            ("1", "10"),
            ("0.1", "0.01"),
            // Equal as f64, different values.
            (
                "123456789012345678901234567890",
                "123456789012345678901234567891",
            ),
            ("1796195052.4752579", "1796195052.475258"),
            ("9007199254740993", "9007199254740992"),
            ("1e400", "1e401"),
            ("1e-400", "0"),
        ];
        for (a, b) in unequal {
            assert!(!numeric_eq(&num(a), &num(b)), "{a} != {b}");
        }
        // An exponent past i64 is only equal to itself.
        let huge = "1e99999999999999999999";
        assert!(numeric_eq(&num(huge), &num(huge)));
        assert!(!numeric_eq(&num(huge), &num("10e99999999999999999998")));
    }
}
