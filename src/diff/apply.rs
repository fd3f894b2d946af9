//! An RFC 6902 JSON Patch applier (with RFC 6901 JSON Pointers).

use serde_json::{Map, Value};

use super::eq::numeric_eq;

/// Why a JSON Patch could not be applied. `op` is the index of the failing operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("a JSON Patch must be an array of operations")]
    NotAnArray,
    /// Not an object, unknown `op`, or a missing or mistyped member.
    #[error("operation {op}: {reason}")]
    BadOp { op: usize, reason: String },
    #[error("operation {op}: {pointer:?} is not a JSON Pointer")]
    BadPointer { op: usize, pointer: String },
    /// A location (or its parent, for `add`) does not exist.
    #[error("operation {op}: {path:?} does not exist")]
    PathNotFound { op: usize, path: String },
    #[error("operation {op}: {token:?} in {path:?} is not an array index")]
    BadIndex {
        op: usize,
        path: String,
        token: String,
    },
    #[error("operation {op}: index {token} in {path:?} is out of range (array length {len})")]
    IndexOutOfRange {
        op: usize,
        path: String,
        token: String,
        len: usize,
    },
    #[error("operation {op}: test failed at {path:?}")]
    TestFailed { op: usize, path: String },
    #[error("operation {op}: cannot move {from:?} into its own child {path:?}")]
    MoveIntoChild {
        op: usize,
        from: String,
        path: String,
    },
}

/// Apply an RFC 6902 patch (a JSON array of operations) to `doc`, in order.
///
/// All six operations are supported. The patch is atomic: if any operation fails, `doc` is put
/// back to a value equal to the original (object members removed and restored may move to the
/// end of their object) and the error says which operation failed and why.
pub fn apply_json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApplyError> {
    let ops = patch.as_array().ok_or(ApplyError::NotAnArray)?;
    let mut undo = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = apply_op(doc, op, i, &mut undo) {
            rollback(doc, undo);
            return Err(e);
        }
    }
    Ok(())
}

fn apply_op(doc: &mut Value, op: &Value, i: usize, undo: &mut Vec<Undo>) -> Result<(), ApplyError> {
    let bad = |reason: String| ApplyError::BadOp { op: i, reason };
    let obj = op
        .as_object()
        .ok_or_else(|| bad("operation is not a JSON object".into()))?;
    let name = str_member(obj, "op").map_err(bad)?;
    let path_str = str_member(obj, "path").map_err(bad)?;
    let path = parse_pointer(path_str).ok_or_else(|| ApplyError::BadPointer {
        op: i,
        pointer: path_str.into(),
    })?;
    let at = |miss: Miss| miss.into_error(i, path_str);
    match name {
        "add" => {
            let value = value_member(obj).map_err(bad)?.clone();
            add(doc, &path, value, undo).map_err(at)
        }
        "remove" => {
            if path.is_empty() {
                return Err(bad("cannot remove the whole document".into()));
            }
            let (value, place) = take(doc, &path).map_err(at)?;
            undo.push(place.undo(value));
            Ok(())
        }
        "replace" => {
            let value = value_member(obj).map_err(bad)?.clone();
            let target = resolve_mut(doc, &path).map_err(at)?;
            let old = std::mem::replace(target, value);
            undo.push(Undo::Set(path, old));
            Ok(())
        }
        "move" => {
            let from_str = str_member(obj, "from").map_err(bad)?;
            let from = parse_pointer(from_str).ok_or_else(|| ApplyError::BadPointer {
                op: i,
                pointer: from_str.into(),
            })?;
            let at_from = |miss: Miss| miss.into_error(i, from_str);
            if from == path {
                return resolve(doc, &from).map(|_| ()).map_err(at_from);
            }
            if path.starts_with(&from) {
                return Err(ApplyError::MoveIntoChild {
                    op: i,
                    from: from_str.into(),
                    path: path_str.into(),
                });
            }
            // (`from` is not the root here: every path starts with the root's.)
            let (value, place) = take(doc, &from).map_err(at_from)?;
            undo.push(place.undo(value.clone()));
            add(doc, &path, value, undo).map_err(at)
        }
        "copy" => {
            let from_str = str_member(obj, "from").map_err(bad)?;
            let from = parse_pointer(from_str).ok_or_else(|| ApplyError::BadPointer {
                op: i,
                pointer: from_str.into(),
            })?;
            let value = resolve(doc, &from)
                .map_err(|miss| miss.into_error(i, from_str))?
                .clone();
            add(doc, &path, value, undo).map_err(at)
        }
        "test" => {
            let expected = value_member(obj).map_err(bad)?;
            let actual = resolve(doc, &path).map_err(at)?;
            if json_equal(actual, expected) {
                Ok(())
            } else {
                Err(ApplyError::TestFailed {
                    op: i,
                    path: path_str.into(),
                })
            }
        }
        other => Err(bad(format!("unknown op {other:?}"))),
    }
}

fn str_member<'p>(obj: &'p Map<String, Value>, name: &str) -> Result<&'p str, String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("member {name:?} is not a string")),
        None => Err(format!("member {name:?} is missing")),
    }
}

fn value_member(obj: &Map<String, Value>) -> Result<&Value, String> {
    obj.get("value")
        .ok_or_else(|| "member \"value\" is missing".to_string())
}

/// Parse an RFC 6901 JSON Pointer into unescaped tokens; `None` if malformed.
fn parse_pointer(s: &str) -> Option<Vec<String>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    let rest = s.strip_prefix('/')?;
    rest.split('/')
        .map(|raw| {
            if !raw.contains('~') {
                return Some(raw.to_string());
            }
            let mut out = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return None,
                    }
                } else {
                    out.push(c);
                }
            }
            Some(out)
        })
        .collect()
}

/// Why a pointer did not resolve; turned into an [`ApplyError`] by the caller.
#[derive(Debug)]
enum Miss {
    NotFound,
    BadIndex(String),
    OutOfRange(String, usize),
}

impl Miss {
    fn into_error(self, op: usize, path: &str) -> ApplyError {
        let path = path.to_string();
        match self {
            Miss::NotFound => ApplyError::PathNotFound { op, path },
            Miss::BadIndex(token) => ApplyError::BadIndex { op, path, token },
            Miss::OutOfRange(token, len) => ApplyError::IndexOutOfRange {
                op,
                path,
                token,
                len,
            },
        }
    }
}

/// The index named by `token` in an array of length `len`, which must be below `limit`
/// (`len` for an existing element, `len + 1` for an insertion point). `-` means `len`.
fn index(token: &str, len: usize, limit: usize) -> Result<usize, Miss> {
    let i = if token == "-" {
        len
    } else {
        let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
        if !digits || (token.len() > 1 && token.starts_with('0')) {
            return Err(Miss::BadIndex(token.into()));
        }
        token
            .parse::<usize>()
            .map_err(|_| Miss::OutOfRange(token.into(), len))?
    };
    if i < limit {
        Ok(i)
    } else {
        Err(Miss::OutOfRange(token.into(), len))
    }
}

fn resolve<'d>(doc: &'d Value, tokens: &[String]) -> Result<&'d Value, Miss> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get(t).ok_or(Miss::NotFound)?,
            Value::Array(a) => &a[index(t, a.len(), a.len())?],
            _ => return Err(Miss::NotFound),
        };
    }
    Ok(cur)
}

fn resolve_mut<'d>(doc: &'d mut Value, tokens: &[String]) -> Result<&'d mut Value, Miss> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t).ok_or(Miss::NotFound)?,
            Value::Array(a) => {
                let i = index(t, a.len(), a.len())?;
                &mut a[i]
            }
            _ => return Err(Miss::NotFound),
        };
    }
    Ok(cur)
}

/// The RFC 6902 `add`: set an object member, insert into an array, or replace the root.
fn add(doc: &mut Value, path: &[String], value: Value, undo: &mut Vec<Undo>) -> Result<(), Miss> {
    let Some((last, parent)) = path.split_last() else {
        let old = std::mem::replace(doc, value);
        undo.push(Undo::Set(Vec::new(), old));
        return Ok(());
    };
    match resolve_mut(doc, parent)? {
        Value::Object(m) => {
            undo.push(match m.insert(last.clone(), value) {
                Some(old) => Undo::Set(path.to_vec(), old),
                None => Undo::RemoveMember(parent.to_vec(), last.clone()),
            });
            Ok(())
        }
        Value::Array(a) => {
            let i = index(last, a.len(), a.len() + 1)?;
            a.insert(i, value);
            undo.push(Undo::RemoveElement(parent.to_vec(), i));
            Ok(())
        }
        _ => Err(Miss::NotFound),
    }
}

/// Where a removed value was.
enum Place {
    Member(Vec<String>, String),
    Element(Vec<String>, usize),
}

impl Place {
    /// How to put `value` back.
    fn undo(self, value: Value) -> Undo {
        match self {
            Place::Member(parent, key) => Undo::InsertMember(parent, key, value),
            Place::Element(parent, i) => Undo::InsertElement(parent, i, value),
        }
    }
}

/// Remove the value at `path` (not the root); returns it and where it was.
fn take(doc: &mut Value, path: &[String]) -> Result<(Value, Place), Miss> {
    let Some((last, parent)) = path.split_last() else {
        return Err(Miss::NotFound);
    };
    match resolve_mut(doc, parent)? {
        Value::Object(m) => {
            let value = m.shift_remove(last).ok_or(Miss::NotFound)?;
            Ok((value, Place::Member(parent.to_vec(), last.clone())))
        }
        Value::Array(a) => {
            let i = index(last, a.len(), a.len())?;
            Ok((a.remove(i), Place::Element(parent.to_vec(), i)))
        }
        _ => Err(Miss::NotFound),
    }
}

/// The inverse of one change made while applying a patch.
enum Undo {
    /// Put this value back at the pointer (tokens).
    Set(Vec<String>, Value),
    RemoveMember(Vec<String>, String),
    InsertMember(Vec<String>, String, Value),
    RemoveElement(Vec<String>, usize),
    InsertElement(Vec<String>, usize, Value),
}

/// Undo changes, newest first. Each inverse applies to exactly the state its change produced,
/// so none of these lookups can miss.
fn rollback(doc: &mut Value, undo: Vec<Undo>) {
    for u in undo.into_iter().rev() {
        match u {
            Undo::Set(path, v) => {
                if let Ok(target) = resolve_mut(doc, &path) {
                    *target = v;
                }
            }
            Undo::RemoveMember(parent, key) => {
                if let Ok(Value::Object(m)) = resolve_mut(doc, &parent) {
                    m.shift_remove(&key);
                }
            }
            Undo::InsertMember(parent, key, v) => {
                if let Ok(Value::Object(m)) = resolve_mut(doc, &parent) {
                    m.insert(key, v);
                }
            }
            Undo::RemoveElement(parent, i) => {
                if let Ok(Value::Array(a)) = resolve_mut(doc, &parent) {
                    if i < a.len() {
                        a.remove(i);
                    }
                }
            }
            Undo::InsertElement(parent, i, v) => {
                if let Ok(Value::Array(a)) = resolve_mut(doc, &parent) {
                    if i <= a.len() {
                        a.insert(i, v);
                    }
                }
            }
        }
    }
}

/// JSON equality for `test` (RFC 6902 §4.6): numbers compare by exact value (`1` equals `1.0`;
/// 30-digit integers one apart differ), objects ignore member order.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numeric_eq(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_equal(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, p)| y.get(k).is_some_and(|q| json_equal(p, q)))
        }
        _ => a == b,
    }
}
