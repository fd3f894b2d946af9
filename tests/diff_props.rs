//! Property tests for `herald::diff`, checked against the independent `json-patch` crate, and
//! the shared fixture `tests/fixtures/patch-cases.json` (also used by the browser client's tests).
//!
//! Regenerate the fixture after changing the diff algorithm (it is deterministic: a fixed seed
//! and our own generator, not proptest's, so dependency updates do not change it):
//!
//! ```text
//! cargo test --test diff_props -- --ignored regenerate_patch_cases
//! ```

use herald::diff::{
    apply_json_patch, apply_merge_patch, diff, json_patch, merge_patch, Change, Mode, Options,
};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const CASES: u32 = 2_000;
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/patch-cases.json"
);

// --- documents ------------------------------------------------------------------------------

/// A small key alphabet so keys collide; includes keys that need JSON Pointer escaping.
const KEYS: &[&str] = &["id", "a", "b", "name", "a/b", "~", "~1/", "é", ""];
const STRINGS: &[&str] = &[
    "",
    "x",
    "y",
    "hello",
    "a/b",
    "~0",
    "é",
    "日本",
    "🎉",
    "\"q\"",
    "back\\slash",
    "line\nbreak",
];
const FLOATS: &[f64] = &[1.5, -0.0, 2.5e-3, -7.25, 1e21];
/// Numbers as the upstream's text: kept exactly, and equal only to the same text (`1` and `1.0`
/// differ), so every diff path must treat them by text (`src/diff/eq.rs`).
const NUMBER_TEXTS: &[&str] = &[
    "1796195052.4752579",
    "1796195052.475258",
    "123456789012345678901234567890",
    "123456789012345678901234567891",
    "1e400",
    "-0",
    "0",
    "0.10",
    "0.1",
    "1.0",
    "1",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..10).prop_map(Value::from),
        prop::sample::select(FLOATS).prop_map(Value::from),
        prop::sample::select(NUMBER_TEXTS)
            .prop_map(|t| serde_json::from_str(t).expect("a JSON number")),
        prop::sample::select(STRINGS).prop_map(Value::from),
    ]
}

fn object(members: Vec<(&str, Value)>) -> Value {
    Value::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// Filler that makes elements big enough for element-level operations to beat replacing a
/// whole array (otherwise small documents mostly collapse into one `replace`).
const NOTE: &str = "some filler text so elements are not tiny";

/// `[{"id": .., "v": ..}, ..]`: usually with unique ids, sometimes with repeats (which must make
/// the keyed diff fall back to content alignment), sometimes with a filler member.
fn items(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    (
        prop::collection::vec((0u8..24, inner), 0..10),
        prop::bool::weighted(0.75),
        any::<bool>(),
    )
        .prop_map(|(v, unique, padded)| {
            let mut seen = std::collections::HashSet::new();
            Value::Array(
                v.into_iter()
                    .filter(|(id, _)| !unique || seen.insert(*id))
                    .map(|(id, x)| item(id.into(), x, padded))
                    .collect(),
            )
        })
}

fn item(id: u64, v: Value, padded: bool) -> Value {
    if padded {
        json!({"id": id, "v": v, "note": NOTE})
    } else {
        json!({"id": id, "v": v})
    }
}

/// A longer list of small items with unique ids (exercises alignment and moves).
fn long_items() -> impl Strategy<Value = Value> {
    (
        prop::collection::btree_set(0u64..200, 10..60),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(ids, padded, seed)| {
            let mut ids: Vec<u64> = ids.into_iter().collect();
            // A few local shuffles so ids are not always sorted.
            let mut rng = Rng(seed);
            for _ in 0..rng.below(4) {
                let (i, j) = (rng.below(ids.len()), rng.below(ids.len()));
                ids.swap(i, j);
            }
            Value::Array(
                ids.into_iter()
                    .map(|id| item(id, Value::from(id % 7), padded))
                    .collect(),
            )
        })
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner.clone()), 0..6)
                .prop_map(object),
            items(inner),
        ]
    })
}

/// A document: mostly an object or an array at the top, sometimes anything.
fn doc() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::collection::vec((prop::sample::select(KEYS), value()), 0..7).prop_map(object),
        2 => items(value()),
        1 => long_items(),
        1 => long_items().prop_map(|l| json!({"list": l, "other": {"a": 1}})),
        1 => prop::collection::vec(value(), 0..7).prop_map(Value::Array),
        1 => value(),
    ]
}

/// (a, b): usually b is a few random edits of a, sometimes an unrelated document.
fn pair() -> impl Strategy<Value = (Value, Value)> {
    prop_oneof![
        5 => (doc(), any::<u64>()).prop_map(|(a, seed)| {
            let b = mutate(&a, &mut Rng(seed));
            (a, b)
        }),
        1 => (doc(), doc()),
    ]
}

/// splitmix64: the deterministic randomness for mutations and the fixture.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<'s, T>(&mut self, xs: &'s [T]) -> &'s T {
        &xs[self.below(xs.len())]
    }
}

fn random_scalar(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => Value::Null,
        1 => Value::Bool(rng.percent(50)),
        2 => Value::from(rng.below(13) as i64 - 3),
        3 => Value::from(*rng.pick(FLOATS)),
        _ => Value::from(*rng.pick(STRINGS)),
    }
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    if depth == 0 || rng.percent(55) {
        return random_scalar(rng);
    }
    let n = rng.below(5);
    match rng.below(3) {
        0 => Value::Array((0..n).map(|_| random_value(rng, depth - 1)).collect()),
        1 => Value::Object(
            (0..n)
                .map(|_| (rng.pick(KEYS).to_string(), random_value(rng, depth - 1)))
                .collect(),
        ),
        _ => Value::Array((0..n).map(|_| random_item(rng, depth - 1)).collect()),
    }
}

fn random_item(rng: &mut Rng, depth: usize) -> Value {
    let id = rng.below(40) as u64;
    let padded = rng.percent(50);
    item(id, random_value(rng, depth), padded)
}

/// One to four random edits anywhere in `doc`.
fn mutate(doc: &Value, rng: &mut Rng) -> Value {
    let mut out = doc.clone();
    for _ in 0..1 + rng.below(4) {
        mutate_once(&mut out, rng);
    }
    out
}

fn mutate_once(v: &mut Value, rng: &mut Rng) {
    match v {
        Value::Array(a) if !a.is_empty() && rng.percent(55) => {
            let i = rng.below(a.len());
            mutate_once(&mut a[i], rng);
        }
        Value::Object(m) if !m.is_empty() && rng.percent(55) => {
            let i = rng.below(m.len());
            if let Some((_, child)) = m.iter_mut().nth(i) {
                mutate_once(child, rng);
            }
        }
        Value::Array(a) => {
            let len = a.len();
            match rng.below(8) {
                0 | 1 => {
                    // Insert something new, or a changed copy of a neighbour.
                    let x = if len > 0 && rng.percent(50) {
                        let mut x = a[rng.below(len)].clone();
                        mutate_once(&mut x, rng);
                        x
                    } else if rng.percent(50) {
                        random_item(rng, 2)
                    } else {
                        random_value(rng, 2)
                    };
                    a.insert(rng.below(len + 1), x);
                }
                2 if len > 0 => {
                    a.remove(rng.below(len));
                }
                3 if len > 0 => {
                    let x = a.remove(rng.below(len));
                    a.insert(rng.below(len), x);
                }
                4 if len > 1 => a.swap(rng.below(len), rng.below(len)),
                5 => a.reverse(),
                6 if len > 0 => {
                    let i = rng.below(len);
                    a.drain(i..(i + 1 + rng.below(3)).min(len));
                }
                _ => a.push(random_value(rng, 2)),
            }
        }
        Value::Object(m) => match rng.below(5) {
            0 | 1 => {
                m.insert(rng.pick(KEYS).to_string(), random_value(rng, 2));
            }
            2 => {
                let k = rng.pick(KEYS).to_string();
                m.shift_remove(&k);
                if let Some(k) = m.keys().next().cloned() {
                    m.shift_remove(&k);
                }
            }
            3 => {
                m.insert(rng.pick(KEYS).to_string(), Value::Null);
            }
            _ => {
                m.insert(rng.pick(KEYS).to_string(), Value::Array(Vec::new()));
            }
        },
        _ => *v = random_value(rng, 2),
    }
}

// --- checks ---------------------------------------------------------------------------------

fn all_options() -> [Options; 2] {
    [
        Options::default(),
        Options {
            array_key: Some("id".into()),
        },
    ]
}

fn len(v: &Value) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX)
}

fn same_kind(a: &Value, b: &Value) -> bool {
    matches!(
        (a, b),
        (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_))
    )
}

/// Apply an RFC 6902 patch with our applier and with the `json-patch` crate.
fn apply_both(doc: &Value, patch: &Value) -> Result<(Value, Value), String> {
    let mut ours = doc.clone();
    apply_json_patch(&mut ours, patch).map_err(|e| format!("our applier: {e}"))?;
    // From text, as clients read it: with `arbitrary_precision`, `from_value` hands integers
    // past 64 bits to serde as u128, which `json_patch`'s tagged-enum buffering refuses.
    let parsed: json_patch::Patch =
        serde_json::from_str(&patch.to_string()).map_err(|e| format!("not a json-patch: {e}"))?;
    let mut theirs = doc.clone();
    json_patch::patch(&mut theirs, &parsed).map_err(|e| format!("json-patch crate: {e}"))?;
    Ok((ours, theirs))
}

fn ops_value(a: &Value, b: &Value, opts: &Options) -> Value {
    Value::Array(
        json_patch(a, b, opts)
            .into_iter()
            .map(Value::from)
            .collect(),
    )
}

/// Every object member order reversed, recursively: an equal document.
fn reorder(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .rev()
                .map(|(k, x)| (k.clone(), reorder(x)))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(reorder).collect()),
        x => x.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// The raw JSON Patch always applies (ours and json-patch) to exactly `b`; `diff` in
    /// JsonPatch mode is None iff equal, and otherwise exactly that patch when it is smaller than
    /// `b`, else a Snapshot.
    #[test]
    fn json_patch_round_trips((a, b) in pair()) {
        for opts in all_options() {
            let raw = ops_value(&a, &b, &opts);
            let (ours, theirs) = apply_both(&a, &raw).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&ours, &b, "our applier, patch {}", raw);
            prop_assert_eq!(&theirs, &b, "json-patch crate, patch {}", raw);
            prop_assert_eq!(raw.as_array().map(Vec::is_empty), Some(a == b));

            match diff(&a, &b, Mode::JsonPatch, &opts) {
                Change::None => prop_assert_eq!(&a, &b),
                Change::Patch(p) => {
                    prop_assert!(same_kind(&a, &b));
                    prop_assert!(len(&p) < len(&b), "patch {} not smaller than {}", p, b);
                    prop_assert_eq!(&p, &raw);
                }
                Change::Snapshot => {
                    prop_assert_ne!(&a, &b);
                    prop_assert!(!same_kind(&a, &b) || len(&raw) >= len(&b));
                }
            }
            let snapshot = diff(&a, &b, Mode::Snapshot, &opts);
            prop_assert_eq!(snapshot, if a == b { Change::None } else { Change::Snapshot });
        }
    }

    /// Merge patches apply (ours and json-patch's `merge`) to exactly `b`, are None only when
    /// RFC 7386 cannot express the change, and `diff` in MergePatch mode follows the size rule.
    #[test]
    fn merge_patch_round_trips((a, b) in pair()) {
        let raw = merge_patch(&a, &b);
        match &raw {
            Some(p) => {
                let mut ours = a.clone();
                apply_merge_patch(&mut ours, p);
                prop_assert_eq!(&ours, &b, "our merge, patch {}", p);
                let mut theirs = a.clone();
                json_patch::merge(&mut theirs, p);
                prop_assert_eq!(&theirs, &b, "json-patch merge, patch {}", p);
                prop_assert_eq!(p.as_object().map(Map::is_empty), Some(a == b));
            }
            None => prop_assert!(
                !(a.is_object() && b.is_object()) || serde_json::to_string(&b).unwrap_or_default().contains("null"),
                "merge patch refused without a reason: {} -> {}", a, b
            ),
        }
        for opts in all_options() {
            match diff(&a, &b, Mode::MergePatch, &opts) {
                Change::None => prop_assert_eq!(&a, &b),
                Change::Patch(p) => {
                    prop_assert!(len(&p) < len(&b), "patch {} not smaller than {}", p, b);
                    prop_assert_eq!(Some(&p), raw.as_ref());
                }
                Change::Snapshot => {
                    prop_assert_ne!(&a, &b);
                    let patch_not_smaller = match &raw {
                        Some(p) => len(p) >= len(&b),
                        None => true,
                    };
                    prop_assert!(patch_not_smaller);
                }
            }
        }
    }

    /// Lists of items with unique ids, edited like real collections (moves, inserts, deletes,
    /// changed fields, sometimes wholesale shuffles of long lists that exceed the exact
    /// alignment's reach): the patch applies, keyed or not, and keyed diffs never re-send an
    /// unchanged item that only moved.
    #[test]
    fn item_lists_round_trip(seed in any::<u64>()) {
        let (a, b) = edited_lists(&mut Rng(seed));
        for opts in all_options() {
            let raw = ops_value(&a, &b, &opts);
            let (ours, theirs) = apply_both(&a, &raw).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&ours, &b, "our applier, patch {}", raw);
            prop_assert_eq!(&theirs, &b, "json-patch crate, patch {}", raw);
            if opts.array_key.is_some() {
                let old_ids: Vec<&Value> = a.as_array().into_iter().flatten().map(|x| &x["id"]).collect();
                for op in raw.as_array().into_iter().flatten() {
                    if op["op"] == "add" {
                        prop_assert!(!old_ids.contains(&&op["value"]["id"]), "re-sent {}", op);
                    }
                }
            }
        }
    }

    /// A document diffed against itself (or an equal copy with members reordered) is no change.
    #[test]
    fn equal_documents_are_no_change(a in doc()) {
        let copies = [a.clone(), reorder(&a)];
        for b in &copies {
            prop_assert_eq!(&a, b);
            for opts in all_options() {
                for mode in [Mode::JsonPatch, Mode::MergePatch, Mode::Snapshot] {
                    prop_assert_eq!(diff(&a, b, mode, &opts), Change::None);
                }
                prop_assert!(json_patch(&a, b, &opts).is_empty());
            }
            if a.is_object() {
                prop_assert_eq!(merge_patch(&a, b), Some(json!({})));
            }
        }
    }
}

/// Two lists of `{"id", "v"}` items with unique ids: the second an edited copy of the first.
fn edited_lists(rng: &mut Rng) -> (Value, Value) {
    let long = rng.percent(10);
    let n = if long {
        200 + rng.below(600)
    } else {
        rng.below(40)
    };
    let padded = rng.percent(50);
    let mut next_id = 0u64;
    let mut fresh = |rng: &mut Rng| {
        next_id += 1 + rng.below(3) as u64;
        item(next_id, Value::from(rng.below(5) as u64), padded)
    };
    let old: Vec<Value> = (0..n).map(|_| fresh(rng)).collect();
    let mut new = old.clone();
    let edits = if long && rng.percent(50) {
        n
    } else {
        rng.below(8)
    };
    for _ in 0..edits {
        let len = new.len();
        match rng.below(6) {
            0 => {
                let x = fresh(rng);
                new.insert(rng.below(len + 1), x);
            }
            1 if len > 0 => {
                new.remove(rng.below(len));
            }
            2 if len > 0 => {
                let x = new.remove(rng.below(len));
                new.insert(rng.below(len), x);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                new[i]["v"] = Value::from(rng.below(5) as u64 + 10);
            }
            4 if len > 1 => new.swap(rng.below(len), rng.below(len)),
            _ if len > 1 && rng.percent(20) => {
                let i = rng.below(len);
                new[i..].reverse();
            }
            _ => {}
        }
    }
    (Value::Array(old), Value::Array(new))
}

// --- the shared fixture ---------------------------------------------------------------------

/// Hand-written cases covering what the browser client must get right, then deterministic
/// random ones.
fn fixture_cases() -> Vec<Value> {
    let item =
        |id: u64, status: &str| json!({"id": id, "name": format!("build {id}"), "status": status});
    let list = |ids: &[u64]| Value::Array(ids.iter().map(|&i| item(i, "ok")).collect());
    let range = |lo: u64, hi: u64| (lo..hi).collect::<Vec<_>>();
    let pad = "p".repeat(64);
    let big_pad = "p".repeat(400);
    let mut changed_status = json!({"items": list(&range(0, 30))});
    changed_status["items"][12]["status"] = json!("failed");
    let mut reordered = range(0, 20);
    reordered.swap(2, 15);
    reordered.rotate_left(1);
    let ints: Vec<Value> = (0..60).map(|i| Value::from(1000 + i * 7)).collect();
    let mut numbers = ints.clone();
    numbers[3] = json!(1.5);
    numbers[7] = json!(-0.0);
    numbers[12] = json!(1e21);
    numbers[15] = json!(-7.25);
    numbers.push(json!(0.001));
    let word = |w: &str| format!("{w} {}", "lorem ipsum ".repeat(3));
    let words = |ws: &[&str]| Value::Array(ws.iter().map(|w| Value::from(word(w))).collect());
    let row = |r: usize| {
        words(
            &["a", "b", "c", "d", "e", "f", "g", "h"]
                .map(|c| format!("{c}{r}"))
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    };
    let rows = |rs: Vec<Value>| json!({"m": rs, "pad": pad});
    let mut grid: Vec<Value> = (0..4).map(row).collect();
    grid[1].as_array_mut().unwrap().remove(2);
    grid[2]
        .as_array_mut()
        .unwrap()
        .insert(0, Value::from(word("new")));
    grid.push(json!([]));
    let hand: Vec<(&str, Value, Value, bool)> = vec![
        (
            "add a member",
            json!({"a": 1, "pad": pad}),
            json!({"a": 1, "b": 2, "pad": pad}),
            false,
        ),
        (
            "remove a member",
            json!({"a": 1, "b": 2, "pad": pad}),
            json!({"a": 1, "pad": pad}),
            false,
        ),
        (
            "replace a nested member",
            json!({"a": {"b": {"c": 1, "pad": pad}}}),
            json!({"a": {"b": {"c": 2, "pad": pad}}}),
            false,
        ),
        (
            "keys needing escapes",
            json!({"a/b": 1, "m~n": {"~1": 2, "pad": pad}, "": 3, "pad": pad}),
            json!({"a/b": 10, "m~n": {"~1": 20, "pad": pad}, "": 30, "/": 4, "~": 5, "pad": pad}),
            false,
        ),
        (
            "unicode keys and values",
            json!({"日本": "語", "é": ["ü"], "pad": pad}),
            json!({"日本": "語🎉", "é": ["ü", "ß"], "🎉": "party", "pad": pad}),
            false,
        ),
        (
            "escaped characters in strings",
            json!({"s": "plain", "pad": pad}),
            json!({"s": "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7}", "pad": pad}),
            false,
        ),
        (
            "numbers",
            json!({"n": ints, "pad": pad}),
            json!({"n": numbers, "pad": pad}),
            false,
        ),
        (
            "integer to float and back",
            json!({"x": 1, "y": 2.5, "pad": pad}),
            json!({"x": 1.5, "y": 2, "pad": pad}),
            false,
        ),
        (
            "empty containers appear",
            json!({"pad": big_pad}),
            json!({"o": {}, "a": [], "aa": [[]], "oo": {"x": {}}, "pad": big_pad}),
            false,
        ),
        (
            "empty containers filled",
            json!({"o": {}, "a": [], "pad": pad}),
            json!({"o": {"k": "v"}, "a": [1, {}], "pad": pad}),
            false,
        ),
        (
            "containers emptied",
            json!({"o": {"k": "v", "j": 1}, "a": [1, 2, 3], "pad": pad}),
            json!({"o": {}, "a": [], "pad": pad}),
            false,
        ),
        (
            "type changes",
            json!({"a": [1], "b": {"0": 1}, "c": "s", "pad": pad}),
            json!({"a": {"0": 1}, "b": [1], "c": null, "pad": pad}),
            false,
        ),
        (
            "null member (merge patch cannot say it)",
            json!({"a": 1, "pad": pad}),
            json!({"a": null, "pad": pad}),
            false,
        ),
        (
            "null inside arrays is fine for merge patch",
            json!({"a": [1], "pad": pad}),
            json!({"a": [null, 1], "pad": pad}),
            false,
        ),
        (
            "nested arrays",
            rows((0..4).map(row).collect()),
            rows(grid),
            false,
        ),
        (
            "top-level array insert at front",
            list(&range(1, 30)),
            list(&range(0, 30)),
            false,
        ),
        (
            "top-level array remove several",
            list(&range(0, 30)),
            list(&[
                0, 1, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                26, 27, 28,
            ]),
            false,
        ),
        (
            "insert in the middle",
            json!({"items": list(&range(0, 30))}),
            json!({"items": list(&[range(0, 10), vec![100, 101], range(10, 30)].concat())}),
            false,
        ),
        (
            "append",
            json!({"items": list(&range(0, 30))}),
            json!({"items": list(&range(0, 32))}),
            false,
        ),
        (
            "changed field inside one element",
            json!({"items": list(&range(0, 30))}),
            changed_status.clone(),
            false,
        ),
        (
            "changed field inside one element, keyed",
            json!({"items": list(&range(0, 30))}),
            changed_status,
            true,
        ),
        (
            "reorder, keyed (moves)",
            json!({"items": list(&range(0, 20))}),
            json!({"items": list(&reordered)}),
            true,
        ),
        (
            "reorder, by content",
            json!({"items": list(&range(0, 20))}),
            json!({"items": list(&reordered)}),
            false,
        ),
        (
            "strings with duplicates",
            json!({"xs": words(&["1", "1", "2", "3", "1", "2", "2", "5"]), "pad": pad}),
            json!({"xs": words(&["1", "2", "1", "3", "2", "2", "9", "5", "1"]), "pad": pad}),
            false,
        ),
        (
            "top-level scalar (root replace)",
            json!(1),
            json!("one"),
            false,
        ),
        (
            "no change",
            json!({"a": [1, {"b": null}]}),
            json!({"a": [1, {"b": null}]}),
            false,
        ),
    ];
    let mut cases: Vec<Value> = hand
        .into_iter()
        .map(|(name, before, after, keyed)| case(name, before, after, keyed))
        .collect();

    let mut rng = Rng(0x4845_5241_4C44); // "HERALD"
    let mut n = 0;
    while cases.len() < 200 {
        n += 1;
        let before = random_doc(&mut rng);
        let (kind, after) = if rng.percent(85) {
            ("mutation", mutate(&before, &mut rng))
        } else {
            ("unrelated", random_doc(&mut rng))
        };
        if before == after {
            continue;
        }
        let keyed = rng.percent(50);
        cases.push(case(&format!("random {n} ({kind})"), before, after, keyed));
    }
    cases
}

fn random_doc(rng: &mut Rng) -> Value {
    let n = rng.below(7);
    let doc = match rng.below(5) {
        0 | 1 => Value::Object(
            (0..n)
                .map(|_| (rng.pick(KEYS).to_string(), random_value(rng, 3)))
                .collect(),
        ),
        2 => Value::Array((0..n).map(|_| random_item(rng, 2)).collect()),
        3 => {
            let mut ids: Vec<u64> = (0..8 + rng.below(16) as u64).map(|i| i * 3).collect();
            for _ in 0..rng.below(3) {
                let (i, j) = (rng.below(ids.len()), rng.below(ids.len()));
                ids.swap(i, j);
            }
            let padded = rng.percent(50);
            Value::Array(
                ids.into_iter()
                    .map(|id| item(id, random_scalar(rng), padded))
                    .collect(),
            )
        }
        _ => Value::Array((0..n).map(|_| random_value(rng, 3)).collect()),
    };
    if rng.percent(40) {
        json!({"data": doc, "pad": NOTE})
    } else {
        doc
    }
}

fn case(name: &str, before: Value, after: Value, keyed: bool) -> Value {
    let opts = Options {
        array_key: keyed.then(|| "id".to_string()),
    };
    json!({
        "name": name,
        "array_key": opts.array_key,
        "json_patch": ops_value(&before, &after, &opts),
        "merge_patch": merge_patch(&before, &after),
        "before": before,
        "after": after,
    })
}

/// One case per line: compact, and a regenerated file diffs case by case.
fn render(cases: &[Value]) -> String {
    let lines: Vec<String> = cases.iter().map(Value::to_string).collect();
    format!("[\n{}\n]\n", lines.join(",\n"))
}

#[test]
#[ignore = "writes tests/fixtures/patch-cases.json; run it after changing the diff algorithm"]
fn regenerate_patch_cases() {
    std::fs::write(FIXTURE, render(&fixture_cases())).unwrap();
}

fn load_fixture() -> Vec<Value> {
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every fixture case's patches reproduce `after` with our appliers and json-patch's.
#[test]
fn patch_cases_fixture_applies() {
    let cases = load_fixture();
    assert!(cases.len() >= 200, "{}", cases.len());
    for c in &cases {
        let name = &c["name"];
        let (before, after) = (&c["before"], &c["after"]);
        let (ours, theirs) = apply_both(before, &c["json_patch"]).unwrap();
        assert_eq!(&ours, after, "{name}: our applier");
        assert_eq!(&theirs, after, "{name}: json-patch crate");
        match &c["merge_patch"] {
            Value::Null => assert!(merge_patch(before, after).is_none(), "{name}"),
            p => {
                let mut doc = before.clone();
                apply_merge_patch(&mut doc, p);
                assert_eq!(&doc, after, "{name}: merge patch");
            }
        }
    }
}

/// The fixture is what the current code generates (compared as text, so number forms such as
/// `-0.0` and member order are pinned too).
#[test]
fn patch_cases_fixture_is_current() {
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    assert!(
        text == render(&fixture_cases()),
        "tests/fixtures/patch-cases.json is stale: run \
         `cargo test --test diff_props -- --ignored regenerate_patch_cases`"
    );
}

/// The numbers the brief cares about, printed with `--nocapture` (release:
/// `cargo test --release --test diff_props -- --ignored --nocapture measure`).
#[test]
#[ignore = "a measurement, not a check"]
fn measure() {
    let item = |i: u64| json!({"id": i, "name": format!("build {i}"), "status": "ok"});
    for opts in all_options() {
        let old = json!({"items": (1..=500).map(item).collect::<Vec<_>>()});
        let new = json!({"items": (0..=500).map(item).collect::<Vec<_>>()});
        let naive = serde_json::to_vec(&json_patch::diff(&old, &new))
            .unwrap()
            .len();
        let Change::Patch(p) = diff(&old, &new, Mode::JsonPatch, &opts) else {
            panic!("expected a patch")
        };
        println!(
            "500-item front insert (array_key {:?}): {} op(s), {} bytes; body {} bytes; json_patch::diff {} ops {} bytes",
            opts.array_key,
            p.as_array().map_or(0, Vec::len),
            len(&p),
            len(&new),
            json_patch::diff(&old, &new).0.len(),
            naive
        );
    }
    // ~1 MB: 10,000 items; a few edits.
    let big_item = |i: u64| {
        json!({"id": i, "name": format!("build {i}"), "status": "ok", "tags": ["a", "b"],
               "meta": {"owner": format!("user{}", i % 97), "duration_ms": i * 13 % 10_000, "ratio": 0.5}})
    };
    let old = json!({"items": (0..10_000).map(big_item).collect::<Vec<_>>()});
    let mut new = old.clone();
    {
        let items = new["items"].as_array_mut().unwrap();
        items.insert(0, big_item(99_999));
        items.remove(5_000);
        items[7_000]["status"] = json!("failed");
        let x = items.remove(9_000);
        items.insert(100, x);
    }
    let copy = old.clone();
    let start = std::time::Instant::now();
    let equal = (0..10).filter(|_| old == copy).count();
    let eq_time = start.elapsed() / 10;
    let start = std::time::Instant::now();
    let bytes: usize = (0..10).map(|_| len(&new)).sum();
    println!(
        "reference on that doc: `old == old.clone()` {eq_time:?} ({equal}/10), serde_json::to_vec {:?} ({} bytes)",
        start.elapsed() / 10,
        bytes / 10
    );
    for opts in all_options() {
        for mode in [Mode::JsonPatch, Mode::MergePatch] {
            let start = std::time::Instant::now();
            let runs = 10;
            let mut out = Change::None;
            for _ in 0..runs {
                out = diff(&old, &new, mode, &opts);
            }
            let per = start.elapsed() / runs;
            let size = match &out {
                Change::Patch(p) => format!("patch {} bytes", len(p)),
                other => format!("{other:?}"),
            };
            println!(
                "{} byte doc, {mode:?}, array_key {:?}: {per:?} per diff, {size}",
                len(&new),
                opts.array_key
            );
        }
    }
    let shuffled = {
        let mut v = old["items"].as_array().unwrap().clone();
        v.reverse();
        json!({"items": v})
    };
    let start = std::time::Instant::now();
    let out = diff(&old, &shuffled, Mode::JsonPatch, &Options::default());
    println!(
        "reversed 10,000-item list, no key: {:?}, {:?}",
        start.elapsed(),
        matches!(out, Change::Snapshot)
    );
}
