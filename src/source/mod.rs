//! Where a topic's documents come from. A [`Source`] feeds one topic until cancelled, sending each
//! [`Update`] through the topic's [`Feed`]; the hub's writer does the rest (coalescing, diff,
//! sequence). Polling (`poll`) is one source, upstream SSE (`sse`) and JSON lines (`ndjson`)
//! push sources sharing one reconnect loop (`push`); [`Sources`] picks one per route. [`Origin`]
//! is the HTTP client they share, [`Budget`] the upstream's request budget.
//!
//! ```text
//! Source::run(target, feed, cancel) ──Update──► Feed ──► hub writer (coalesce → diff → publish)
//! ```

pub mod budget;
pub mod hints;
mod ndjson;
pub mod origin;
mod poll;
mod push;
mod sse;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::HeaderMap;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::routes::Route;
use crate::telemetry::RouteMetrics;

pub use budget::Budget;
pub use origin::Origin;
pub use poll::Poller;
pub use stats::{Connection, StatsView, TopicStats};

/// A document as a source read it, checked as far as its content type allows.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    /// Valid JSON, as compact text (whitespace outside strings removed, nothing else touched:
    /// numbers, escapes and member order are the upstream's). Parsed again only to diff.
    Json(Bytes),
    /// A body that is not JSON (served as a snapshot-only topic).
    Text(String),
}

impl Document {
    /// `value` as a JSON document (a source that built the value itself).
    pub fn json(value: &serde_json::Value) -> Document {
        Document::Json(Bytes::from(value.to_string()))
    }
}

/// What a source learned about its topic.
#[derive(Debug)]
pub enum Update {
    /// The resource's current state (it may equal the last one; the writer decides).
    Document(Document),
    /// The source knows the state did not change (a 304, or the same bytes as last time).
    Unchanged,
    /// The source could not read the resource; the last good state stays.
    Failed(SourceError),
    /// An upstream event to re-broadcast as is (a pass-through push route): its data as JSON
    /// text (a `data:` that is not JSON as a JSON string).
    Pass(Bytes),
    /// The source lost track of the upstream (a push stream that could not resume): what comes
    /// next is not a continuation, so watchers must start over from a fresh snapshot.
    Reset,
}

/// Why a source could not read its resource. `Clone` so one failure can be told to every watcher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach upstream")]
    Connect,
    #[error("upstream answered {0}")]
    Status(u16),
    #[error("upstream body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("upstream body is not valid JSON")]
    InvalidJson,
    /// A 2xx answer that is an HTML page: a login form served instead of the data, most often.
    #[error("upstream answered with an HTML page")]
    Html,
    #[error("upstream request failed")]
    Other,
}

impl SourceError {
    /// A short machine-readable reason for the `upstream-error` event.
    pub fn code(&self) -> &'static str {
        match self {
            SourceError::Timeout(_) => "timeout",
            SourceError::Connect => "unreachable",
            SourceError::Status(_) => "status",
            SourceError::TooLarge(_) => "too-large",
            SourceError::InvalidJson => "invalid-json",
            SourceError::Html => "html",
            SourceError::Other => "request-failed",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            SourceError::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// The topic a source is asked to feed.
#[derive(Debug, Clone)]
pub struct Target {
    pub route: Arc<Route>,
    /// The upstream path and canonical query (`/api/builds/42?page=2`).
    pub resource: Arc<str>,
    /// Headers every upstream request for this topic carries (its credentials, when it varies by
    /// them); never logged.
    pub credentials: HeaderMap,
    /// The route's metric handles (upstream requests by status, latency).
    pub metrics: Arc<RouteMetrics>,
    /// Notified to ask for a fresh read now (a poke), whatever the schedule says.
    pub poke: Arc<Notify>,
    /// What the source reports about itself (status page).
    pub stats: Arc<TopicStats>,
}

/// Feeds one topic until `cancel` fires. Implementations send every update through `feed`, in
/// order, and return when cancelled or when the feed is closed (the topic is gone).
pub trait Source: Send + Sync + 'static {
    fn run(&self, target: Target, feed: Feed, cancel: CancellationToken) -> BoxFuture<'static, ()>;
}

/// Every kind of source, chosen per route (`source = { kind = ... }`).
#[derive(Debug, Clone)]
pub struct Sources {
    origin: Origin,
    budget: Arc<Budget>,
}

impl Sources {
    pub fn new(origin: Origin, budget: Arc<Budget>) -> Sources {
        Sources { origin, budget }
    }
}

impl Source for Sources {
    fn run(&self, target: Target, feed: Feed, cancel: CancellationToken) -> BoxFuture<'static, ()> {
        use crate::config::source::SourceKind;
        let origin = self.origin.clone();
        match target.route.config.source.kind {
            SourceKind::Poll => Poller::new(origin, self.budget.clone()).run(target, feed, cancel),
            SourceKind::Sse => {
                let decoder = sse::Decoder::new(
                    target.route.config.source.mode,
                    target.route.config.max_body,
                );
                Box::pin(push::run(origin, target, feed, cancel, decoder))
            }
            SourceKind::Ndjson => {
                let decoder = ndjson::Decoder::new(target.route.config.max_body);
                Box::pin(push::run(origin, target, feed, cancel, decoder))
            }
        }
    }
}

/// The sending side of a topic's updates. Bounded: a source that outpaces its writer waits.
#[derive(Debug, Clone)]
pub struct Feed {
    tx: mpsc::Sender<Update>,
}

/// The topic is gone: its source should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the topic no longer takes updates")]
pub struct Closed;

impl Feed {
    /// A feed and the receiving side its writer reads.
    pub fn channel() -> (Feed, mpsc::Receiver<Update>) {
        let (tx, rx) = mpsc::channel(1);
        (Feed { tx }, rx)
    }

    pub async fn send(&self, update: Update) -> Result<(), Closed> {
        self.tx.send(update).await.map_err(|_| Closed)
    }
}

/// Parse a body by its content type: JSON types must parse; other types are text; no type at all
/// is tried as JSON first.
///
/// JSON keeps the upstream's text: 17-digit floats, integers of any length and values beyond
/// `f64` (`1e400`) pass through as written (patches carry the same digits, serde_json's
/// `arbitrary_precision` keeping each number's text when it is diffed).
pub fn parse_body(bytes: &Bytes, content_type: Option<&str>) -> Result<Document, SourceError> {
    let ct = content_type.map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    let is_json = ct
        .as_deref()
        .is_some_and(|c| c == "application/json" || c.ends_with("+json"));
    // An HTML page is never a resource's state (a login form or an error page is): refused, so
    // the route's `refuse` rules can end the streams of credentials that got one.
    if ct
        .as_deref()
        .is_some_and(|c| c == "text/html" || c == "application/xhtml+xml")
    {
        return Err(SourceError::Html);
    }
    if is_json || ct.is_none() {
        // Checked without building a tree (a tree of a large body is many times its size, and
        // its allocations outlive nothing but fragment the heap).
        match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => return Ok(Document::Json(compact(bytes))),
            Err(_) if is_json => return Err(SourceError::InvalidJson),
            Err(_) => {}
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(Document::Text(s.to_string())),
        Err(_) => Err(SourceError::InvalidJson),
    }
}

/// Valid JSON text without the whitespace between tokens. Only bytes outside strings are
/// dropped, so everything a value says (numbers, escapes) stays exactly as written.
pub fn compact(json: &[u8]) -> Bytes {
    if !json
        .iter()
        .any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        return Bytes::copy_from_slice(json);
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            out.push(b);
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(b);
            in_string = b == b'"';
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_text(body: &str) -> String {
        match parse_body(&Bytes::copy_from_slice(body.as_bytes()), None) {
            Ok(Document::Json(v)) => String::from_utf8(v.to_vec()).unwrap(),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn compact_keeps_strings_and_numbers() {
        let body = "{ \"a\" : [1E5 , 2.50,\n\t\"x \\\" y\\\\\" ],\r\n \"b\":\"  \"}";
        let c = compact(body.as_bytes());
        assert_eq!(&c[..], br#"{"a":[1E5,2.50,"x \" y\\"],"b":"  "}"#);
        let v: serde_json::Value = serde_json::from_slice(&c).unwrap();
        let w: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v, w);
    }

    /// The reported case, and numbers an `f64` cannot hold, come out as the upstream wrote them.
    #[test]
    fn json_numbers_keep_their_text() {
        for body in [
            r#"{"f":1796195052.4752579,"l":123456789012345678901234567890}"#,
            r#"[0.30000000000000004,-0,-0.0,0.10,1.0,9007199254740993,-123456789012345678901234567890]"#,
            r#"{"big":1e+400,"tiny":1e-400,"neg":-1.5e-7}"#,
        ] {
            assert_eq!(json_text(body), body);
        }
        // Not even an exponent is respelled: the text is the upstream's.
        assert_eq!(json_text("[1E5,2e5,3E-5]"), "[1E5,2e5,3E-5]");
        assert_eq!(json_text("{\n  \"a\": 1.0\n}"), "{\"a\":1.0}");
    }
}
