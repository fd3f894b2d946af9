//! RFC 7386 JSON Merge Patch: generation and application.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use super::eq::json_eq;

/// The merge patch turning `old` into `new`, or `None` when RFC 7386 cannot express the change:
/// the top level is not an object on both sides, or a member that must be set would be `null`
/// (in a merge patch `null` means "delete"), directly or inside a new object.
///
/// Objects are diffed recursively, removed members become `null`, and anything else that
/// changed (arrays included) is replaced whole. Equal objects give `Some({})`.
pub fn merge_patch(old: &Value, new: &Value) -> Option<Value> {
    raw(old, new).map(|p| p.to_value())
}

/// A merge patch borrowing from the new document, so nothing is cloned until we know it will
/// be sent.
#[derive(Debug)]
pub(crate) enum RawMerge<'a> {
    /// Set the member to this value.
    Set(&'a Value),
    /// Delete the member (`null`).
    Delete,
    /// Merge into the member.
    Object(Vec<(&'a str, RawMerge<'a>)>),
}

impl RawMerge<'_> {
    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, RawMerge::Object(members) if members.is_empty())
    }

    pub(crate) fn to_value(&self) -> Value {
        match self {
            RawMerge::Set(v) => (*v).clone(),
            RawMerge::Delete => Value::Null,
            RawMerge::Object(members) => Value::Object(
                members
                    .iter()
                    .map(|(k, m)| ((*k).to_string(), m.to_value()))
                    .collect(),
            ),
        }
    }
}

impl Serialize for RawMerge<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RawMerge::Set(v) => v.serialize(s),
            RawMerge::Delete => s.serialize_unit(),
            RawMerge::Object(members) => {
                let mut map = s.serialize_map(Some(members.len()))?;
                for (k, m) in members {
                    map.serialize_entry(k, m)?;
                }
                map.end()
            }
        }
    }
}

/// [`merge_patch`], borrowed.
pub(crate) fn raw<'a>(old: &'a Value, new: &'a Value) -> Option<RawMerge<'a>> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => object_patch(a, b).map(RawMerge::Object),
        _ => None,
    }
}

fn object_patch<'a>(
    a: &'a Map<String, Value>,
    b: &'a Map<String, Value>,
) -> Option<Vec<(&'a str, RawMerge<'a>)>> {
    let mut out = Vec::new();
    for (k, new) in b {
        match (a.get(k), new) {
            (Some(Value::Object(oa)), Value::Object(ob)) => {
                let sub = object_patch(oa, ob)?;
                if !sub.is_empty() {
                    out.push((k.as_str(), RawMerge::Object(sub)));
                }
            }
            (Some(old), _) if json_eq(old, new) => {}
            _ => {
                if !settable(new) {
                    return None;
                }
                out.push((k.as_str(), RawMerge::Set(new)));
            }
        }
    }
    for k in a.keys() {
        if !b.contains_key(k) {
            out.push((k.as_str(), RawMerge::Delete));
        }
    }
    Some(out)
}

/// Whether merging `v` into a missing or non-object member yields exactly `v`: no `null`
/// member values in it or in the objects it nests (arrays are copied verbatim).
fn settable(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Object(m) => m.values().all(settable),
        _ => true,
    }
}

/// Apply an RFC 7386 merge patch to `doc` (the RFC's MergePatch(Target, Patch)).
pub fn apply_merge_patch(doc: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *doc = patch.clone();
        return;
    };
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    if let Value::Object(target) = doc {
        for (k, v) in members {
            if v.is_null() {
                target.shift_remove(k);
            } else {
                apply_merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}
