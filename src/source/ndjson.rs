//! An upstream that streams one JSON document per line (watch-style APIs, `application/x-ndjson`
//! or chunked JSON lines): each line is the resource's full state, diffed like a poll. Such a
//! stream has no position to resume from, so every reconnect starts watchers over.

use std::time::Duration;

use bytes::Bytes;
use http::header::ACCEPT;
use http::{HeaderMap, HeaderValue};

use super::push::Decode;
use super::{parse_body, SourceError, Update};
use crate::config::source::SourceKind;

pub(super) struct Decoder {
    max: usize,
    buf: Vec<u8>,
}

impl Decoder {
    pub(super) fn new(max: usize) -> Decoder {
        Decoder {
            max,
            buf: Vec::new(),
        }
    }
}

impl Decode for Decoder {
    fn kind(&self) -> SourceKind {
        SourceKind::Ndjson
    }

    fn request_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT,
            HeaderValue::from_static(
                "application/x-ndjson, application/jsonl, application/json;q=0.5",
            ),
        );
        h
    }

    fn connected(&mut self) -> bool {
        self.buf.clear();
        false
    }

    fn feed(&mut self, chunk: &[u8], out: &mut Vec<Update>) -> Result<(), SourceError> {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(n) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = self.buf[start..start + n].trim_ascii();
            if !line.is_empty() {
                out.push(
                    match parse_body(&Bytes::copy_from_slice(line), Some("application/json")) {
                        Ok(doc) => Update::Document(doc),
                        Err(e) => Update::Failed(e),
                    },
                );
            }
            start += n + 1;
        }
        self.buf.drain(..start);
        if self.buf.len() > self.max {
            self.buf.clear();
            return Err(SourceError::TooLarge(self.max));
        }
        Ok(())
    }

    fn retry(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_document_per_line_across_chunks() {
        let mut d = Decoder::new(64);
        let mut out = Vec::new();
        d.feed(b"{\"a\":1}\n{\"a\"", &mut out).unwrap();
        d.feed(b": 2}\r\n\n", &mut out).unwrap();
        d.feed(b"nope\n", &mut out).unwrap();
        assert!(matches!(out[0], Update::Document(_)));
        assert!(matches!(out[1], Update::Document(_)));
        assert!(matches!(out[2], Update::Failed(SourceError::InvalidJson)));
        assert_eq!(out.len(), 3);
        assert!(d.feed(&[b'x'; 100], &mut out).is_err());
    }
}
