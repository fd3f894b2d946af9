//! Pure functions, no I/O, no async: diff two JSON documents into the smallest useful change.
//!
//! [`diff`] is what the hub calls once per upstream change per topic. Depending on the route's
//! [`Mode`] it answers with an RFC 6902 JSON Patch, an RFC 7386 JSON Merge Patch, or "send the
//! whole new document" ([`Change::Snapshot`]). A patch is only ever sent when it is strictly
//! smaller, serialized, than the document it describes.
//!
//! JSON Patch generation ([`json_patch`]):
//!
//! * objects are diffed key by key (`remove`, `add`, and recursion into members present on both
//!   sides), with keys escaped as JSON Pointer tokens (`~` → `~0`, `/` → `~1`);
//! * arrays first drop their common prefix and suffix; the differing middle is aligned by
//!   identity when [`Options::array_key`] is set and every element there is an object with a
//!   unique scalar value at that key (matched elements are diffed recursively, reordered ones
//!   become `move`s), and otherwise by a longest-common-subsequence alignment (Myers' O(ND)
//!   algorithm, with patience-style unique anchors for large inputs, all under a work budget so
//!   time and memory stay bounded). Unmatched removed and added elements at the same position
//!   are diffed against each other, so a changed field inside an element is a small `replace`;
//! * wherever the operations describing one object or array would be at least as large as a
//!   single `replace` of it, they are collapsed into that `replace`.
//!
//! Numbers are compared by their text as the upstream wrote it (serde_json's
//! `arbitrary_precision`): `1.0` → `1` is a change, the same text is not (`eq.rs` says why).
//!
//! Operations are emitted in application order: array indexes account for every earlier
//! operation, so any conforming RFC 6902 implementation reproduces the new document.
//! [`apply_json_patch`] and [`apply_merge_patch`] are this crate's own appliers, used by tests
//! and to pin the behaviour the browser client must match (`tests/fixtures/patch-cases.json`).

mod apply;
mod array;
mod eq;
mod generate;
mod merge;
mod size;

#[cfg(test)]
mod tests;

use serde::Serialize;
use serde_json::{Map, Value};

pub use apply::{apply_json_patch, ApplyError};
pub use merge::{apply_merge_patch, merge_patch};

/// How a route describes a change to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// RFC 6902 JSON Patch (a JSON array of operations).
    JsonPatch,
    /// RFC 7386 JSON Merge Patch (a partial document; `null` deletes).
    MergePatch,
    /// Always send the whole new document.
    Snapshot,
}

/// Per-route diff settings.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Identity key for arrays of objects (e.g. `"id"`): when every element on both sides of an
    /// array's changed range is an object with a unique scalar value under this key, elements
    /// are matched by that value instead of by content.
    pub array_key: Option<String>,
}

/// What to send clients after a poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The documents are equal: nothing to send.
    None,
    /// An RFC 6902 patch (a JSON array of operations) in [`Mode::JsonPatch`], an RFC 7386 merge
    /// patch document in [`Mode::MergePatch`]. Always strictly smaller than the new document.
    Patch(Value),
    /// Send the whole new document: [`Mode::Snapshot`], or a patch would not be smaller, or the
    /// mode cannot express the change.
    Snapshot,
}

/// One RFC 6902 operation. Paths are JSON Pointers, already escaped.
///
/// Serializes (and converts with `Value::from`) to the RFC form, e.g.
/// `{"op":"add","path":"/items/0","value":{..}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Add { path: String, value: Value },
    Remove { path: String },
    Replace { path: String, value: Value },
    Move { from: String, path: String },
    Copy { from: String, path: String },
    Test { path: String, value: Value },
}

impl From<Op> for Value {
    fn from(op: Op) -> Value {
        let mut m = Map::new();
        let (name, from, path, value) = match op {
            Op::Add { path, value } => ("add", None, path, Some(value)),
            Op::Remove { path } => ("remove", None, path, None),
            Op::Replace { path, value } => ("replace", None, path, Some(value)),
            Op::Move { from, path } => ("move", Some(from), path, None),
            Op::Copy { from, path } => ("copy", Some(from), path, None),
            Op::Test { path, value } => ("test", None, path, Some(value)),
        };
        m.insert("op".into(), Value::String(name.into()));
        if let Some(from) = from {
            m.insert("from".into(), Value::String(from));
        }
        m.insert("path".into(), Value::String(path));
        if let Some(value) = value {
            m.insert("value".into(), value);
        }
        Value::Object(m)
    }
}

/// Diff `old` against `new` for a route in `mode`.
///
/// Returns [`Change::None`] exactly when `old == new`. A [`Change::Patch`] is always strictly
/// smaller, serialized, than `new`; otherwise, and whenever the top-level values are not both
/// objects or both arrays (JSON Patch) or not both objects (merge patch), the answer is
/// [`Change::Snapshot`].
pub fn diff(old: &Value, new: &Value, mode: Mode, opts: &Options) -> Change {
    match mode {
        Mode::Snapshot => equal_or_snapshot(old, new),
        Mode::JsonPatch => {
            let same_kind = matches!(
                (old, new),
                (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_))
            );
            if !same_kind {
                return equal_or_snapshot(old, new);
            }
            let patch = generate::generate(old, new, opts);
            if patch.ops.is_empty() {
                // The generator emits nothing only for equal documents.
                return Change::None;
            }
            let patch_len = patch.serialized_len();
            if size::json_len_capped(new, patch_len) <= patch_len {
                return Change::Snapshot;
            }
            Change::Patch(Value::Array(
                patch.ops.iter().map(generate::RawOp::to_value).collect(),
            ))
        }
        Mode::MergePatch => match merge::raw(old, new) {
            None => equal_or_snapshot(old, new),
            Some(patch) if patch.is_empty() => Change::None,
            Some(patch) => {
                let patch_len = size::json_len(&patch);
                if size::json_len_capped(new, patch_len) <= patch_len {
                    Change::Snapshot
                } else {
                    Change::Patch(patch.to_value())
                }
            }
        },
    }
}

fn equal_or_snapshot(old: &Value, new: &Value) -> Change {
    if eq::json_eq(old, new) {
        Change::None
    } else {
        Change::Snapshot
    }
}

/// The RFC 6902 patch turning `old` into `new`, whatever its size (empty when they are equal).
///
/// Unlike [`diff`] this never gives up for size: a root-level change is a `replace` at path `""`.
pub fn json_patch(old: &Value, new: &Value, opts: &Options) -> Vec<Op> {
    generate::generate(old, new, opts)
        .ops
        .iter()
        .map(generate::RawOp::to_op)
        .collect()
}
