//! One event as a Redis stream entry: its position (`e` epoch, `s` seq), kind (`k`), envelope
//! (`v`), the document after it (`d`, `j`: JSON or text) and when that document changed (`c`, ms).
//! Every node decodes the same entry into the same `Event`, so ids match across nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::streams::StreamId;
use redis::Value;

use crate::hub::{Doc, EventKind, Position};

/// A decoded entry.
#[derive(Debug)]
pub(super) struct Entry {
    pub position: Position,
    pub kind: EventKind,
    pub envelope: Vec<u8>,
    pub doc: Option<Arc<Doc>>,
    pub changed_at: SystemTime,
    /// The entry id's milliseconds: when Redis appended it.
    pub appended_ms: u64,
}

/// The `k` field of a kind.
pub(super) fn kind_code(kind: EventKind) -> String {
    match kind {
        EventKind::Snapshot => "s".into(),
        EventKind::Patch => "p".into(),
        EventKind::UpstreamError => "e".into(),
        EventKind::Pass => "m".into(),
        EventKind::Reset => "x".into(),
        EventKind::Refused(status) => format!("r{status}"),
    }
}

fn kind_of(code: &[u8]) -> Option<EventKind> {
    match code {
        b"s" => Some(EventKind::Snapshot),
        b"p" => Some(EventKind::Patch),
        b"e" => Some(EventKind::UpstreamError),
        b"m" => Some(EventKind::Pass),
        b"x" => Some(EventKind::Reset),
        [b'r', status @ ..] => std::str::from_utf8(status)
            .ok()?
            .parse()
            .ok()
            .map(EventKind::Refused),
        _ => None,
    }
}

fn field<'a>(map: &'a HashMap<String, Value>, name: &str) -> Option<&'a [u8]> {
    match map.get(name)? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn number<T: std::str::FromStr>(map: &HashMap<String, Value>, name: &str) -> Option<T> {
    std::str::from_utf8(field(map, name)?).ok()?.parse().ok()
}

/// Milliseconds of a stream entry id (`<ms>-<n>`).
pub(super) fn id_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

/// Decode an entry; None for one this version cannot read (skipped, never a panic).
pub(super) fn decode(entry: &StreamId) -> Option<Entry> {
    let map = &entry.map;
    let epoch: u32 = number(map, "e")?;
    let seq: u64 = number(map, "s")?;
    let kind = kind_of(field(map, "k")?)?;
    let envelope = field(map, "v")?.to_vec();
    let doc = match (kind, field(map, "d"), field(map, "j")) {
        (EventKind::Snapshot | EventKind::Patch, Some(d), Some(j)) if !d.is_empty() => {
            Some(Arc::new(Doc {
                data: bytes::Bytes::copy_from_slice(d),
                json: j == b"1",
            }))
        }
        _ => None,
    };
    let changed_ms: u64 = number(map, "c").unwrap_or(0);
    Some(Entry {
        position: Position::new(epoch, seq),
        kind,
        envelope,
        doc,
        changed_at: UNIX_EPOCH + Duration::from_millis(changed_ms),
        appended_ms: id_ms(&entry.id),
    })
}

/// Milliseconds since the Unix epoch.
pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1700000000123-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn entries_decode_and_garbage_is_skipped() {
        let e = decode(&entry(&[
            ("e", "77"),
            ("s", "5"),
            ("k", "p"),
            ("v", "{}"),
            ("d", "{\"a\":1}"),
            ("j", "1"),
            ("c", "1000"),
        ]))
        .unwrap();
        assert_eq!(e.position, Position::new(77, 5));
        assert_eq!(e.kind, EventKind::Patch);
        assert_eq!(&e.doc.unwrap().data[..], b"{\"a\":1}");
        assert_eq!(e.appended_ms, 1_700_000_000_123);
        let r = decode(&entry(&[
            ("e", "1"),
            ("s", "2"),
            ("k", "r403"),
            ("v", "{}"),
        ]))
        .unwrap();
        assert_eq!(r.kind, EventKind::Refused(403));
        assert!(r.doc.is_none());
        for bad in [
            vec![("e", "x"), ("s", "1"), ("k", "s"), ("v", "{}")],
            vec![("e", "1"), ("s", "1"), ("k", "?"), ("v", "{}")],
            vec![("e", "1"), ("k", "s"), ("v", "{}")],
            vec![("e", "99999999999"), ("s", "1"), ("k", "s"), ("v", "{}")],
        ] {
            assert!(decode(&entry(&bad)).is_none(), "{bad:?}");
        }
        assert_eq!(kind_code(EventKind::Refused(401)), "r401");
    }
}
