//! The legacy API as herald reaches it: its base URL and one pooled `reqwest::Client`, shared by
//! every source, every access check and the pass-through proxy.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};

/// The legacy API: its base URL and the pooled client shared by sources and pass-through.
#[derive(Clone, Debug)]
pub struct Origin {
    client: reqwest::Client,
    base: Arc<str>,
}

impl Origin {
    pub fn new(config: &Config) -> Result<Origin> {
        // https upstreams: HTTP/2 when the upstream's ALPN offers it (HTTP/1.1 otherwise), trusting
        // the system's roots, the built-in Mozilla roots and `[proxy] ca`. Plain http upstreams
        // get HTTP/1.1, which every legacy API speaks.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.proxy.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // A push source's stream can be silent for long: keepalive probes find an upstream
            // that vanished (a half-open connection) instead of waiting on it forever.
            .tcp_keepalive(Duration::from_secs(30))
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
        Ok(Origin { client, base })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The upstream URL for a topic's or an access check's path and query (`/api/x?y=1`), on the
    /// configured host only. Those paths are built from a matched route, whose parameters are
    /// single safe segments; a dot segment is refused here all the same, since `Url::parse`
    /// would resolve it and climb out of the prefix. (Pass-through builds its URIs itself,
    /// keeping the target byte for byte: `server::proxy::pass`.)
    pub fn url_for(&self, path_and_query: &str) -> Result<reqwest::Url, url_error::Invalid> {
        debug_assert!(path_and_query.starts_with('/'));
        let path = path_and_query.split('?').next().unwrap_or("");
        if crate::routes::has_dot_segment(path) {
            return Err(url_error::Invalid);
        }
        reqwest::Url::parse(&format!("{}{}", self.base, path_and_query))
            .map_err(|_| url_error::Invalid)
    }
}

pub mod url_error {
    /// A request target that does not form a valid URL on the upstream.
    #[derive(Debug, Clone, Copy, thiserror::Error)]
    #[error("invalid request target")]
    pub struct Invalid;
}
