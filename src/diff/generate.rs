//! JSON Patch generation: the recursive walk, the path being built, and the emitted operations.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Map, Value};

use super::size::{json_len, json_len_capped};
use super::{array, Op, Options};

/// Work units (roughly: element comparisons) that array alignment may spend over one whole
/// diff before falling back to positional pairing. Bounds time on pathological inputs.
const ALIGN_BUDGET: u64 = 40_000_000;

/// An operation borrowing its value from the new document, so nothing is cloned until we know
/// the patch will be sent.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum RawOp<'a> {
    Add { path: String, value: &'a Value },
    Remove { path: String },
    Replace { path: String, value: &'a Value },
    Move { from: String, path: String },
}

impl RawOp<'_> {
    pub(crate) fn to_op(&self) -> Op {
        match self {
            RawOp::Add { path, value } => Op::Add {
                path: path.clone(),
                value: (*value).clone(),
            },
            RawOp::Remove { path } => Op::Remove { path: path.clone() },
            RawOp::Replace { path, value } => Op::Replace {
                path: path.clone(),
                value: (*value).clone(),
            },
            RawOp::Move { from, path } => Op::Move {
                from: from.clone(),
                path: path.clone(),
            },
        }
    }

    /// The same JSON `serde_json::to_value(self)` would give (member order included).
    pub(crate) fn to_value(&self) -> Value {
        self.to_op().into()
    }
}

/// A generated patch and its serialized size.
pub(crate) struct Patch<'a> {
    pub ops: Vec<RawOp<'a>>,
    /// Sum of the serialized sizes of `ops`.
    bytes: usize,
}

impl Patch<'_> {
    /// `serde_json::to_vec(&ops).len()`: brackets, ops and the commas between them.
    pub(crate) fn serialized_len(&self) -> usize {
        2 + self.bytes + self.ops.len().saturating_sub(1)
    }
}

pub(crate) fn generate<'a>(old: &'a Value, new: &'a Value, opts: &Options) -> Patch<'a> {
    let mut g = Gen {
        opts,
        ops: Vec::new(),
        bytes: 0,
        path: String::new(),
        budget: ALIGN_BUDGET,
    };
    g.value(old, new);
    Patch {
        ops: g.ops,
        bytes: g.bytes,
    }
}

/// The generator's state while walking both documents.
pub(crate) struct Gen<'a, 'o> {
    pub opts: &'o Options,
    ops: Vec<RawOp<'a>>,
    bytes: usize,
    /// JSON Pointer of the values being compared (escaped).
    path: String,
    /// Remaining alignment work; see [`ALIGN_BUDGET`].
    pub budget: u64,
}

impl<'a> Gen<'a, '_> {
    /// Emit the operations turning `old` (now at `self.path`) into `new`.
    pub fn value(&mut self, old: &'a Value, new: &'a Value) {
        match (old, new) {
            (Value::Object(a), Value::Object(b)) => {
                let mark = self.mark();
                self.object(a, b);
                self.collapse(mark, new);
            }
            (Value::Array(a), Value::Array(b)) => {
                let mark = self.mark();
                array::diff_array(self, a, b);
                self.collapse(mark, new);
            }
            _ => {
                if old != new {
                    self.replace(new);
                }
            }
        }
    }

    fn object(&mut self, a: &'a Map<String, Value>, b: &'a Map<String, Value>) {
        // Members usually come in the same order on both sides: try the member at the same
        // position before looking the key up.
        let mut same_position = b.iter();
        let mut common = 0;
        for (k, old) in a {
            let new = same_position
                .next()
                .filter(|(kb, _)| *kb == k)
                .map(|(_, v)| v)
                .or_else(|| b.get(k));
            self.with_token(k, |g| match new {
                Some(new) => g.value(old, new),
                None => g.remove(),
            });
            common += usize::from(new.is_some());
        }
        if common < b.len() {
            for (k, new) in b {
                if !a.contains_key(k) {
                    self.with_token(k, |g| g.add(new));
                }
            }
        }
    }

    fn mark(&self) -> (usize, usize) {
        (self.ops.len(), self.bytes)
    }

    /// If the operations emitted since `mark` (for the value now at `self.path`) take at least as
    /// many bytes as one `replace` with `new`, swap them for that `replace`.
    fn collapse(&mut self, (len, bytes): (usize, usize), new: &'a Value) {
        let count = self.ops.len() - len;
        if count < 2 {
            return;
        }
        // The ops' share of the patch: their bytes plus the commas between them.
        let emitted = self.bytes - bytes + (count - 1);
        let replace = RawOp::Replace {
            path: self.path.clone(),
            value: new,
        };
        if json_len_capped(&replace, emitted) <= emitted {
            self.ops.truncate(len);
            self.bytes = bytes;
            self.push(replace);
        }
    }

    fn push(&mut self, op: RawOp<'a>) {
        self.bytes += json_len(&op);
        self.ops.push(op);
    }

    pub fn add(&mut self, value: &'a Value) {
        let path = self.path.clone();
        self.push(RawOp::Add { path, value });
    }

    pub fn remove(&mut self) {
        let path = self.path.clone();
        self.push(RawOp::Remove { path });
    }

    fn replace(&mut self, value: &'a Value) {
        let path = self.path.clone();
        self.push(RawOp::Replace { path, value });
    }

    /// Move the value at pointer `from` to `self.path`.
    pub fn move_from(&mut self, from: String) {
        let path = self.path.clone();
        self.push(RawOp::Move { from, path });
    }

    /// Run `f` with `self.path` extended by the object member `key`.
    pub fn with_token<R>(&mut self, key: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        let len = self.path.len();
        push_token(&mut self.path, key);
        let r = f(self);
        self.path.truncate(len);
        r
    }

    /// Run `f` with `self.path` extended by the array index `index`.
    pub fn with_index<R>(&mut self, index: usize, f: impl FnOnce(&mut Self) -> R) -> R {
        let len = self.path.len();
        self.path.push_str(&index_token(index));
        let r = f(self);
        self.path.truncate(len);
        r
    }

    /// `self.path` extended by the array index `index`.
    pub fn index_path(&self, index: usize) -> String {
        let mut p = self.path.clone();
        p.push_str(&index_token(index));
        p
    }
}

fn index_token(index: usize) -> String {
    let mut s = String::with_capacity(8);
    // Writing to a String cannot fail.
    let _ = write!(s, "/{index}");
    s
}

/// Append `/key` to a JSON Pointer, escaping `~` as `~0` and `/` as `~1` (RFC 6901).
pub(crate) fn push_token(path: &mut String, key: &str) {
    path.push('/');
    if !key.contains(['~', '/']) {
        path.push_str(key);
        return;
    }
    for c in key.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}
