//! The pass-through client: how a client's request reaches the upstream. Pollers use reqwest;
//! pass-through does not, because it must send the request as it came and nothing more: the
//! target byte for byte under the configured prefix (reqwest parses it into a `Url`, which
//! resolves dot segments and re-encodes), no `Accept: */*` of its own, and connections that can be
//! held back from the pool. It knows nothing of the downstream side (`server::proxy` does).
//!
//! - [`Base::target`] builds the upstream URI from parts, never by parsing a joined string.
//! - The shared pool (hyper-util's client) serves every request that carries no connection-bound
//!   credentials, over HTTP/2 when an https upstream offers it.
//! - [`PassClient::connect_h1`] opens one HTTP/1.1 connection outside the pool: for a downstream
//!   connection's private upstream connection (NTLM/Negotiate) and for tunnels (`Upgrade`).

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tower_service::Service;
use tracing::debug;

use crate::config::Config;
use crate::error::{Error, Result};

/// The connector every pass-through connection is made with (TCP, then TLS for https).
pub type Connector = HttpsConnector<HttpConnector>;

/// Where pass-through requests go: the upstream's scheme and authority, and the path prefix every
/// request target is put under.
#[derive(Clone, Debug)]
pub struct Base {
    scheme: Scheme,
    authority: Authority,
    /// The upstream URL's path without its trailing `/` (`""` or `/legacy`), as written.
    prefix: String,
}

/// Why a request target cannot be passed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the path has a dot segment ('.' or '..', possibly encoded)")]
    DotSegment,
    #[error("invalid request target")]
    Invalid,
}

impl Base {
    /// The base of an upstream URL (`http://host:port/prefix`); only its scheme, host, port and
    /// path are used (the config refuses a query or fragment).
    pub fn new(upstream: &reqwest::Url) -> Result<Base, TargetError> {
        let scheme = Scheme::try_from(upstream.scheme()).map_err(|_| TargetError::Invalid)?;
        let host = upstream.host_str().ok_or(TargetError::Invalid)?;
        let authority = match upstream.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        Ok(Base {
            scheme,
            authority: Authority::try_from(authority).map_err(|_| TargetError::Invalid)?,
            prefix: upstream.path().trim_end_matches('/').to_string(),
        })
    }

    /// The upstream URI for a request target in origin form (`/path?query`): the target appended
    /// to the prefix byte for byte, built from parts so that nothing resolves dot segments or
    /// re-encodes. A path with a dot segment in any encoding (`routes::has_dot_segment`) is
    /// refused: appended, it could climb out of the prefix at the upstream.
    pub fn target(&self, raw: &str) -> Result<Uri, TargetError> {
        if !raw.starts_with('/') {
            return Err(TargetError::Invalid);
        }
        let mut pq = String::with_capacity(self.prefix.len() + raw.len());
        pq.push_str(&self.prefix);
        pq.push_str(raw);
        let pq = PathAndQuery::try_from(pq).map_err(|_| TargetError::Invalid)?;
        // The check reads the path as it will be sent (`PathAndQuery` ends it at `?` and drops a
        // `#` fragment), so nothing can hide a dot segment behind what gets cut.
        let path = pq
            .path()
            .strip_prefix(self.prefix.as_str())
            .filter(|p| p.starts_with('/'))
            .ok_or(TargetError::Invalid)?;
        if crate::routes::has_dot_segment(path) {
            return Err(TargetError::DotSegment);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| TargetError::Invalid)
    }

    /// The prefix (`""` or `/legacy`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `scheme://authority` of the upstream, as herald connects to it.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// The upstream's scheme and authority.
    pub fn parts(&self) -> (&Scheme, &Authority) {
        (&self.scheme, &self.authority)
    }
}

/// Tunnel counters (`Upgrade` exchanges): handles on the registered series, taken with
/// [`PassStats::of`].
#[derive(Debug, Default)]
pub struct PassStats {
    /// Tunnels opened since start.
    pub tunnels_opened: Counter,
    /// Tunnels open now.
    pub tunnels_open: Gauge,
}

impl PassStats {
    /// The tunnel counters of `metrics` (`herald_proxy_tunnels_opened_total`,
    /// `herald_proxy_tunnels_open`).
    pub fn of(metrics: &crate::telemetry::Metrics) -> PassStats {
        PassStats {
            tunnels_opened: metrics.tunnels_opened.clone(),
            tunnels_open: metrics.tunnels_open.clone(),
        }
    }
}

/// The pass-through client: the shared pool, and fresh HTTP/1.1 connections on demand.
#[derive(Clone, Debug)]
pub struct PassClient {
    shared: Client<Connector, Incoming>,
    /// ALPN `http/1.1` only: NTLM/Negotiate and `Upgrade` are HTTP/1.1 features.
    h1: Connector,
    base: Base,
    stats: Arc<PassStats>,
}

/// Why an exchange with the upstream failed, as the client is told.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The upstream's TLS certificate or handshake was refused; the message names the problem.
    #[error("{0}")]
    Tls(String),
    /// Connecting failed; the cause chain (no URL in it) is for logs.
    #[error("the upstream could not be reached: {0}")]
    Connect(String),
    #[error("the upstream request failed: {0}")]
    Other(String),
}

impl PassClient {
    pub fn new(config: &Config, stats: PassStats) -> Result<PassClient> {
        let base = Base::new(&config.upstream)
            .map_err(|_| Error::Client(format!("invalid upstream URL {}", config.upstream)))?;
        let tls = tls_config(config)?;
        let connector = |h2: bool| {
            let mut http = HttpConnector::new();
            http.set_connect_timeout(Some(config.proxy.connect_timeout));
            http.set_nodelay(true);
            http.enforce_http(false);
            let b = HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http();
            if h2 {
                b.enable_all_versions().wrap_connector(http)
            } else {
                b.enable_http1().wrap_connector(http)
            }
        };
        // https upstreams: HTTP/2 when ALPN offers it; plain http: HTTP/1.1, which every legacy
        // API speaks. Pooled HTTP/2 connections that died quietly are found by pings.
        let shared = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .build(connector(true));
        Ok(PassClient {
            shared,
            h1: connector(false),
            base,
            stats: Arc::new(stats),
        })
    }

    pub fn base(&self) -> &Base {
        &self.base
    }

    pub fn stats(&self) -> &Arc<PassStats> {
        &self.stats
    }

    /// The shared pool. Never send connection-bound credentials through it.
    pub fn shared(&self) -> &Client<Connector, Incoming> {
        &self.shared
    }

    /// A new HTTP/1.1 connection to the upstream, outside the pool, driven by its own task until
    /// the returned sender (and any upgrade) is dropped. `upgrades`: let a `101` hand the
    /// connection over (`hyper::upgrade::on`).
    pub async fn connect_h1(
        &self,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Incoming>, PassError> {
        let mut connector = self.h1.clone();
        let origin = Uri::builder()
            .scheme(self.base.scheme.clone())
            .authority(self.base.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| PassError::Other(e.to_string()))?;
        let io = connector
            .call(origin)
            .await
            .map_err(|e| classify(e.as_ref()))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| classify(&e))?;
        tokio::spawn(async move {
            let r = if upgrades {
                conn.with_upgrades().await
            } else {
                conn.await
            };
            if let Err(e) = r {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// What went wrong, for the client: a TLS problem named (a certificate the upstream presented is
/// refused: why), else unreachable or failed. Messages hold no secrets: rustls reports names,
/// reasons and times, never key material.
pub fn classify(e: &(dyn StdError + 'static)) -> PassError {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    let mut connect = false;
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return PassError::Tls(describe_tls(tls));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // An io::Error's `source` skips the error it wraps: unwrap them by hand (the TLS
            // connector nests one io::Error in another around the rustls error).
            let mut inner = io.get_ref();
            while let Some(i) = inner {
                if let Some(tls) = i.downcast_ref::<rustls::Error>() {
                    return PassError::Tls(describe_tls(tls));
                }
                inner = i
                    .downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref());
            }
            connect = true;
        }
        if let Some(h) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
            connect |= h.is_connect();
        }
        cur = err.source();
    }
    let cause = crate::logging::error_chain(e);
    if connect {
        PassError::Connect(cause)
    } else {
        PassError::Other(cause)
    }
}

fn describe_tls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let why = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "it is not signed by a trusted CA (unknown issuer; see [proxy] ca)".into()
            }
            C::Expired | C::ExpiredContext { .. } => "it has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "it is not valid for the upstream's host name".into()
            }
            C::Revoked => "it has been revoked".into(),
            C::BadSignature => "its signature is invalid".into(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "it is not meant for a TLS server".into()
            }
            other => format!("{other:?}"),
        },
        other => return format!("TLS handshake with the upstream failed: {other}"),
    };
    format!("the upstream's TLS certificate was refused: {why}")
}

/// The roots an https upstream is checked against: the system's, the built-in Mozilla roots and
/// `[proxy] ca`; ALPN is set by the connector.
fn tls_config(config: &Config) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Unreadable system roots are not fatal: the built-in roots and `[proxy] ca` remain.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = &config.proxy.ca {
        for der in &ca.certs {
            roots
                .add(rustls::pki_types::CertificateDer::from(der.clone()))
                .map_err(|e| Error::Client(format!("{}: {e}", ca.path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(url: &str) -> Base {
        Base::new(&reqwest::Url::parse(url).unwrap()).unwrap()
    }

    #[test]
    fn targets_are_appended_byte_for_byte() {
        let b = base("http://127.0.0.1:3200/legacy");
        for (raw, want) in [
            ("/", "/legacy/"),
            ("/echo/%2e%2ex/y//z", "/legacy/echo/%2e%2ex/y//z"),
            ("/a?q='x'&b=%22y%22", "/legacy/a?q='x'&b=%22y%22"),
            ("/a\\b\"c\"", "/legacy/a\\b\"c\""),
            ("/{a}/%7B", "/legacy/{a}/%7B"),
            ("//evil.example/x", "/legacy//evil.example/x"),
            ("/a?../../x", "/legacy/a?../../x"),
        ] {
            let uri = b.target(raw).unwrap();
            assert_eq!(uri.path_and_query().unwrap().as_str(), want, "{raw}");
            assert_eq!(uri.authority().unwrap().as_str(), "127.0.0.1:3200");
        }
        let root = base("http://h/");
        assert_eq!(root.target("/x").unwrap().to_string(), "http://h/x");
        assert_eq!(
            base("https://h:8443/a/b/")
                .target("/c")
                .unwrap()
                .to_string(),
            "https://h:8443/a/b/c"
        );
    }

    #[test]
    fn dot_segments_are_refused() {
        let b = base("http://h/legacy");
        for raw in [
            "/../secret",
            "/%2e%2e/secret",
            "/.%2e/secret",
            "/echo/%2e%2e/%2e%2e/secret",
            "/echo/%2e%2e/x/./y//z",
            "/a/..;/b",
            "/a/%252e%252e/b",
        ] {
            assert_eq!(b.target(raw), Err(TargetError::DotSegment), "{raw}");
        }
        assert_eq!(b.target("*"), Err(TargetError::Invalid));
    }
}
