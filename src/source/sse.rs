//! An upstream SSE stream, read as a browser would (WHATWG parsing: `data`, `event`, `id`,
//! `retry`, comments, any line ending). In `states` mode each event's data is the resource's full
//! JSON state; in `pass` mode each event is handed on as is. On reconnect the upstream gets its
//! own last id as `Last-Event-ID`; an event repeating that id is dropped, and an upstream that
//! gave no ids cannot resume.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL};
use http::{HeaderMap, HeaderValue};

use super::push::Decode;
use super::{compact, parse_body, SourceError, Update};
use crate::config::source::{PushMode, SourceKind};

pub(super) struct Decoder {
    mode: PushMode,
    /// Longest line or event accepted.
    max: usize,
    /// Input not yet cut into lines.
    buf: Vec<u8>,
    /// A `\r` ended the last chunk: a `\n` starting the next one belongs to it.
    after_cr: bool,
    /// The event being read.
    data: String,
    has_data: bool,
    /// The id buffer (kept across events, as the WHATWG rules say).
    id: Option<String>,
    /// The id of the last event handed on: sent as `Last-Event-ID` on reconnect.
    last_id: Option<String>,
    /// Right after a resume: an event repeating this id was already handed on.
    skip_id: Option<String>,
    retry: Option<Duration>,
}

impl Decoder {
    pub(super) fn new(mode: PushMode, max: usize) -> Decoder {
        Decoder {
            mode,
            max,
            buf: Vec::new(),
            after_cr: false,
            data: String::new(),
            has_data: false,
            id: None,
            last_id: None,
            skip_id: None,
            retry: None,
        }
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Update>) -> Result<(), SourceError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| SourceError::InvalidJson)?;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() > self.max {
                    return Err(SourceError::TooLarge(self.max));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            "retry" => {
                if let Ok(ms) = value.parse::<u64>() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            // `event` names are not kept: a state is a state, and passed events keep their data.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<Update>) {
        let data = std::mem::take(&mut self.data);
        let had_data = std::mem::take(&mut self.has_data);
        let id = self.id.clone().filter(|i| !i.is_empty());
        if let Some(skip) = self.skip_id.take() {
            if id.as_deref() == Some(skip.as_str()) {
                return; // the upstream repeated the event it resumed after
            }
        }
        if !had_data {
            return;
        }
        self.last_id = id.or(self.last_id.take());
        let bytes = Bytes::from(data);
        out.push(match self.mode {
            PushMode::States => match parse_body(&bytes, Some("application/json")) {
                Ok(doc) => Update::Document(doc),
                Err(e) => Update::Failed(e),
            },
            PushMode::Pass => {
                if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
                    Update::Pass(compact(&bytes))
                } else {
                    let text = String::from_utf8_lossy(&bytes);
                    Update::Pass(Bytes::from(
                        serde_json::to_vec(&text).unwrap_or_else(|_| b"null".to_vec()),
                    ))
                }
            }
        });
    }
}

impl Decode for Decoder {
    fn kind(&self) -> SourceKind {
        SourceKind::Sse
    }

    fn request_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Some(id) = self.last_id.as_deref() {
            if let Ok(v) = HeaderValue::from_str(id) {
                h.insert("last-event-id", v);
            }
        }
        h
    }

    fn connected(&mut self) -> bool {
        self.buf.clear();
        self.after_cr = false;
        self.data.clear();
        self.has_data = false;
        self.skip_id = self.last_id.clone();
        self.last_id.is_some()
    }

    fn feed(&mut self, chunk: &[u8], out: &mut Vec<Update>) -> Result<(), SourceError> {
        let mut chunk = chunk;
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        self.buf.extend_from_slice(chunk);
        let buf = std::mem::take(&mut self.buf);
        let mut start = 0;
        let mut i = 0;
        while i < buf.len() {
            match buf[i] {
                b'\n' => {
                    self.line(&buf[start..i], out)?;
                    i += 1;
                    start = i;
                }
                b'\r' => {
                    self.line(&buf[start..i], out)?;
                    i += 1;
                    if i == buf.len() {
                        self.after_cr = true;
                    } else if buf[i] == b'\n' {
                        i += 1;
                    }
                    start = i;
                }
                _ => i += 1,
            }
        }
        if buf.len() - start > self.max {
            return Err(SourceError::TooLarge(self.max));
        }
        // Strip a BOM at the very start of a stream.
        let rest = &buf[start..];
        self.buf = rest.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(rest).to_vec();
        Ok(())
    }

    fn retry(&self) -> Option<Duration> {
        self.retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(out: &[Update]) -> Vec<String> {
        out.iter()
            .map(|u| match u {
                Update::Document(super::super::Document::Json(b)) | Update::Pass(b) => {
                    String::from_utf8(b.to_vec()).unwrap()
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn parses_split_events_and_line_endings() {
        let mut d = Decoder::new(PushMode::States, 1 << 20);
        let mut out = Vec::new();
        d.feed(b": hi\r\nid: 1\r", &mut out).unwrap();
        d.feed(b"\ndata: {\"a\":\r\n", &mut out).unwrap();
        d.feed(b"data: 1}\n\nretry: 250\nid: 2\rdata: [1, 2]\r\r", &mut out)
            .unwrap();
        assert_eq!(
            docs(&out),
            ["{\"a\":\n1}".replace('\n', ""), "[1,2]".into()]
        );
        assert_eq!(d.retry(), Some(Duration::from_millis(250)));
        assert_eq!(d.request_headers()["last-event-id"], "2");
        // A resume that repeats the last event drops it.
        assert!(d.connected());
        out.clear();
        d.feed(b"id: 2\ndata: [1,2]\n\nid: 3\ndata: [3]\n\n", &mut out)
            .unwrap();
        assert_eq!(docs(&out), ["[3]"]);
    }

    #[test]
    fn pass_mode_keeps_text_and_refuses_huge_events() {
        let mut d = Decoder::new(PushMode::Pass, 16);
        let mut out = Vec::new();
        d.feed(b"data: hello\n\ndata: {\"x\": 1}\n\n", &mut out)
            .unwrap();
        assert_eq!(docs(&out), ["\"hello\"", "{\"x\":1}"]);
        assert!(!d.connected(), "no ids: cannot resume");
        assert!(d.feed(b"data: 0123456789abcdefghij\n", &mut out).is_err());
    }
}
