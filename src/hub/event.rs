//! What a topic publishes: events at positions (`<epoch>-<seq>`), framed as SSE once by the hub
//! and shared by every watcher, with room for the other encodings streams make of them.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};

/// Where an event stands in its topic: `seq` counts the topic's events; `epoch` names the history
/// they belong to and changes whenever that history is lost. The broker that runs a topic's
/// writer decides both. Written `<epoch>-<seq>` in base 36 (`1k3f9a-2f`), the SSE event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: u32,
    pub seq: u64,
}

/// A `Last-Event-ID` (or part of one) that is not a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an event position (expected <epoch>-<seq> in base 36)")]
pub struct BadPosition;

impl Position {
    pub const fn new(epoch: u32, seq: u64) -> Position {
        Position { epoch, seq }
    }

    /// Append the position's text to `buf`, without an allocation.
    pub fn put(&self, buf: &mut BytesMut) {
        put_base36(buf, u64::from(self.epoch));
        buf.put_u8(b'-');
        put_base36(buf, self.seq);
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = BytesMut::with_capacity(24);
        self.put(&mut buf);
        // Base-36 digits and '-' are ASCII.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for Position {
    type Err = BadPosition;

    /// Strict: lowercase base 36, no sign, no padding beyond what fits (7 digits of epoch, 12 of
    /// seq), surrounding whitespace ignored.
    fn from_str(text: &str) -> Result<Position, BadPosition> {
        let (epoch, seq) = text.trim().split_once('-').ok_or(BadPosition)?;
        let digits = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        };
        if !digits(epoch, 7) || !digits(seq, 12) {
            return Err(BadPosition);
        }
        let epoch = u64::from_str_radix(epoch, 36)
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(BadPosition)?;
        let seq = u64::from_str_radix(seq, 36).map_err(|_| BadPosition)?;
        Ok(Position { epoch, seq })
    }
}

fn put_base36(buf: &mut BytesMut, mut n: u64) {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut tmp = [0u8; 13];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = DIGITS[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    buf.put_slice(&tmp[i..]);
}

/// The kinds of event a topic publishes (the SSE `event:` name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Snapshot,
    Patch,
    UpstreamError,
    /// An upstream event re-broadcast as is (a `pass` push route).
    Pass,
    /// The upstream stream could not resume: events may have been missed; start over.
    Reset,
    /// The upstream refused the topic's credentials (status 401, 403…): every watcher's access
    /// ends. Never written to a stream; each watcher ends with its own `error` event.
    Refused(u16),
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Snapshot => "snapshot",
            EventKind::Patch => "patch",
            EventKind::UpstreamError => "upstream-error",
            EventKind::Pass => "message",
            EventKind::Reset => "reset",
            EventKind::Refused(_) => "refused",
        }
    }
}

/// How a patch is written: the envelope's `format`, so a client never guesses from the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchFormat {
    /// RFC 6902: an array of operations.
    JsonPatch,
    /// RFC 7386: a partial document.
    MergePatch,
}

impl PatchFormat {
    pub fn name(self) -> &'static str {
        match self {
            PatchFormat::JsonPatch => "json-patch",
            PatchFormat::MergePatch => "merge-patch",
        }
    }
}

/// The JSON envelope of an event (`{"type","topic","timestamp","format"?,"data"}`), written
/// around `data`, which is already JSON text (a document is never parsed again to be sent).
pub fn envelope(
    kind: EventKind,
    topic: &str,
    at: SystemTime,
    format: Option<PatchFormat>,
    data: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + topic.len() + 96);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.name().as_bytes());
    out.extend_from_slice(b"\",\"topic\":");
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, topic);
    out.extend_from_slice(b",\"timestamp\":\"");
    out.extend_from_slice(humantime::format_rfc3339_millis(at).to_string().as_bytes());
    out.push(b'"');
    if let Some(f) = format {
        out.extend_from_slice(b",\"format\":\"");
        out.extend_from_slice(f.name().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
    out
}

/// One published event, framed as SSE once (`id:`, `event:`, `data:` lines) and shared by every
/// watcher of its topic on this node; other encodings of it are cached here too.
#[derive(Debug)]
pub struct Event {
    pub position: Position,
    pub kind: EventKind,
    /// When the change was seen (for the change-to-delivery latency metric).
    pub made: Instant,
    /// The SSE text, `id:` line first.
    text: Bytes,
    /// Where the text goes on after its `id:` line.
    bare_from: usize,
    /// The JSON envelope: a view into `text` (an envelope is one line of JSON).
    envelope: Bytes,
    /// gzip encodings, made on first use by a gzip stream (`sse::gzip`).
    encoded: [OnceLock<Encoded>; 2],
    /// Memory held, as counted against history limits: fixed at creation, so what is added
    /// when it is removed is exactly what was added (the gzip encodings, a fraction of the
    /// text, are not counted).
    weight: usize,
}

/// One cached wire encoding of an event.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Bytes,
    /// CRC-32 and length of the SSE text a compressed encoding stands for, and x^(8·len) modulo
    /// the CRC polynomial: with them a gzip stream folds the event into its trailer's CRC in one
    /// multiplication (`sse::gzip`), without reading the text again.
    pub crc: u32,
    pub len: u64,
    pub crc_shift: u32,
}

/// Which cached encoding of an event (see `Event::encoded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip = 0,
    /// gzip of the event without its `id:` line (multiplexed streams write their own id).
    GzipBare = 1,
}

impl Event {
    /// Frame `envelope` as the event at `position`.
    pub fn new(position: Position, kind: EventKind, envelope: &[u8], made: Instant) -> Event {
        let mut id = BytesMut::with_capacity(24);
        position.put(&mut id);
        let id = std::str::from_utf8(&id).unwrap_or_default().to_string();
        let text = crate::wire::event(Some(&id), Some(kind.name()), envelope);
        let bare_from = 4 + id.len() + 1;
        // `data: <envelope>\n` is the last line but one: find it rather than assume framing.
        let head = bare_from + "event: ".len() + kind.name().len() + 1 + "data: ".len();
        let single_line = !envelope.iter().any(|&b| b == b'\n' || b == b'\r');
        let envelope = if single_line && text.len() >= head + envelope.len() {
            text.slice(head..head + envelope.len())
        } else {
            Bytes::copy_from_slice(envelope)
        };
        let own = if envelope.as_ptr() >= text.as_ptr() && envelope.len() <= text.len() {
            0
        } else {
            envelope.len()
        };
        Event {
            position,
            kind,
            made,
            weight: text.len() + own + 96,
            text,
            bare_from,
            envelope,
            encoded: Default::default(),
        }
    }

    /// The SSE text of the event (id, name, data), the same bytes for every watcher.
    pub fn text(&self) -> &Bytes {
        &self.text
    }

    /// The SSE text without its `id:` line: a view into `text`.
    pub fn bare(&self) -> Bytes {
        self.text.slice(self.bare_from..)
    }

    /// The event's JSON envelope.
    pub fn envelope(&self) -> &Bytes {
        &self.envelope
    }

    /// The wire bytes of this event in `enc`, made by `make` the first time they are asked for.
    pub fn encoded(&self, enc: Encoding, make: impl FnOnce(&Event) -> Encoded) -> Encoded {
        self.encoded[enc as usize]
            .get_or_init(|| make(self))
            .clone()
    }

    /// Approximate memory held by the event, for history limits.
    pub fn weight(&self) -> usize {
        self.weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip() {
        for (epoch, seq) in [
            (1u32, 0u64),
            (u32::MAX, 1),
            (12345, 36),
            (7, 4_000_000_000_000),
            (0, u64::from(u32::MAX) * 1000),
        ] {
            let p = Position::new(epoch, seq);
            let text = p.to_string();
            assert_eq!(text.parse::<Position>(), Ok(p), "{text}");
        }
        assert_eq!(Position::new(1_234_567, 0).to_string(), "qglj-0");
        assert_eq!(" qglj-z\n".parse(), Ok(Position::new(1_234_567, 35)));
    }

    #[test]
    fn garbage_is_not_a_position() {
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "zzzzzzzz-1",
            "1-zzzzzzzzzzzzz",
            "1_2",
            "ü-1",
            "1-2-3",
            "+1-2",
            "1-+2",
            "A-1",
            "1 -2",
            "1~2",
            "\u{0}-1",
        ] {
            assert_eq!(bad.parse::<Position>(), Err(BadPosition), "{bad:?}");
        }
    }

    #[test]
    fn an_event_is_framed_once_and_sliced() {
        let env = envelope(
            EventKind::Patch,
            "/a?b=\"c\"",
            SystemTime::UNIX_EPOCH,
            Some(PatchFormat::MergePatch),
            br#"{"x":1}"#,
        );
        let ev = Event::new(Position::new(36, 1), EventKind::Patch, &env, Instant::now());
        let text = std::str::from_utf8(ev.text()).unwrap();
        assert!(
            text.starts_with("id: 10-1\nevent: patch\ndata: {"),
            "{text}"
        );
        assert!(text.ends_with("}\n\n"));
        assert_eq!(&ev.envelope()[..], &env[..]);
        assert_eq!(&ev.bare()[..], &ev.text()[b"id: 10-1\n".len()..]);
        let parsed: serde_json::Value = serde_json::from_slice(ev.envelope()).unwrap();
        assert_eq!(parsed["topic"], "/a?b=\"c\"");
        assert_eq!(parsed["format"], "merge-patch");
        assert_eq!(parsed["data"]["x"], 1);
    }
}
