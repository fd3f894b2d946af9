//! The upstream side: one shared `reqwest::Client` for pollers (pooled connections to the legacy
//! API), one poller task per topic, and the pass-through client (`pass`). Pollers know nothing of
//! watchers: they hand each outcome to a `Sink` (the hub's topic), which diffs and fans out.

pub mod pass;
mod poller;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::{Error, Result};

pub use poller::PollSpec;

/// A fetched upstream body, parsed as far as its content type allows.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    Json(serde_json::Value),
    /// A body that is not JSON (served as a snapshot-only topic).
    Text(String),
}

/// What one poll found.
#[derive(Debug)]
pub enum Outcome {
    /// A 2xx body that differs from the previous one (bytewise).
    Changed(Document),
    /// 304 Not Modified, or the same bytes as last time.
    Unchanged,
    /// The poll failed; the last good state stays.
    Failed(FetchError),
}

/// Why a poll failed. `Clone` so that one failure can be told to every watcher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
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
    #[error("upstream request failed")]
    Other,
}

impl FetchError {
    /// A short machine-readable reason for the `upstream-error` event.
    pub fn code(&self) -> &'static str {
        match self {
            FetchError::Timeout(_) => "timeout",
            FetchError::Connect => "unreachable",
            FetchError::Status(_) => "status",
            FetchError::TooLarge(_) => "too-large",
            FetchError::InvalidJson => "invalid-json",
            FetchError::Other => "request-failed",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// Receives every poll outcome of one topic, in order.
pub trait Sink: Send + Sync + 'static {
    fn deliver(&self, outcome: Outcome);
}

/// The legacy API: its base URL, the pooled client its pollers share, and the pass-through client.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: reqwest::Client,
    base: Arc<str>,
    pass: pass::PassClient,
}

impl Upstream {
    pub fn new(config: &Config) -> Result<Upstream> {
        // https upstreams: HTTP/2 when the upstream's ALPN offers it (HTTP/1.1 otherwise), trusting
        // the system's roots, the built-in Mozilla roots and `[proxy] ca`. Plain http upstreams
        // get HTTP/1.1, which every legacy API speaks.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.proxy.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .no_proxy()
            // A pooled HTTP/2 connection that died quietly is found by a ping between polls,
            // rather than by the next poll's timeout.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true);
        if let Some(ca) = &config.proxy.ca {
            for der in &ca.certs {
                let cert = reqwest::Certificate::from_der(der)
                    .map_err(|e| Error::Client(format!("{}: {e}", ca.path.display())))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| Error::Client(e.to_string()))?;
        let base = config.upstream.as_str().trim_end_matches('/').into();
        let pass = pass::PassClient::new(config)?;
        Ok(Upstream { client, base, pass })
    }

    /// The client pollers and access checks share. Pass-through uses [`Upstream::pass`].
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The pass-through client.
    pub fn pass(&self) -> &pass::PassClient {
        &self.pass
    }

    /// The upstream URL for a topic's or an access check's path and query (`/api/x?y=1`), on the
    /// configured host only. Those paths are built from a matched route, whose parameters are
    /// single safe segments; a dot segment is refused here all the same, since `Url::parse`
    /// would resolve it and climb out of the prefix. Pass-through builds its URIs with
    /// [`pass::Base::target`] instead, which keeps the target byte for byte.
    pub fn url_for(&self, path_and_query: &str) -> Result<reqwest::Url, url_error::Invalid> {
        debug_assert!(path_and_query.starts_with('/'));
        let path = path_and_query.split('?').next().unwrap_or("");
        if crate::routes::has_dot_segment(path) {
            return Err(url_error::Invalid);
        }
        reqwest::Url::parse(&format!("{}{}", self.base, path_and_query))
            .map_err(|_| url_error::Invalid)
    }

    /// Start polling `spec` until `cancel` fires; outcomes go to `sink`.
    pub fn spawn_poller(
        &self,
        spec: PollSpec,
        sink: Arc<dyn Sink>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let client = self.client.clone();
        tracker.spawn(poller::run(client, spec, sink, cancel));
    }
}

pub mod url_error {
    /// A request target that does not form a valid URL on the upstream.
    #[derive(Debug, Clone, Copy, thiserror::Error)]
    #[error("invalid request target")]
    pub struct Invalid;
}

/// Parse a body by its content type: JSON types must parse; other types are text; no type at all
/// is tried as JSON first.
pub fn parse_body(bytes: &Bytes, content_type: Option<&str>) -> Result<Document, FetchError> {
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
    if is_json || ct.is_none() {
        match serde_json::from_slice(bytes) {
            Ok(v) => return Ok(Document::Json(v)),
            Err(_) if is_json => return Err(FetchError::InvalidJson),
            Err(_) => {}
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(Document::Text(s.to_string())),
        Err(_) => Err(FetchError::InvalidJson),
    }
}
