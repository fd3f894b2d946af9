//! herald: a reverse proxy that turns a polled REST API into Server-Sent Events.
//!
//! Data flows one way, and each module imports only those before it:
//!
//! ```text
//! config ─► routes ─► upstream (pollers) ─► diff ─► hub (topics: state, history, fan-out)
//!                                                      │
//!                     server (HTTP/1.1 + HTTP/2) ◄─ sse (encode once, per-client stream)
//!                        ├─ tls (rustls, ALPN h2/http1.1, certificate reload)
//!                        └─ proxy (everything that is not a stream)
//! ```
//!
//! `main.rs` parses arguments, loads the config and calls [`Herald::serve`]; tests bind
//! `127.0.0.1:0` themselves and do the same.

pub mod config;
pub mod demo;
pub mod diff;
pub mod error;
pub mod hub;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use error::{Error, Result};

/// A configured herald, ready to serve on a listener.
pub struct Herald {
    app: Arc<server::App>,
    /// Stops pollers and maintenance once the listener has drained.
    background: CancellationToken,
    tracker: TaskTracker,
    /// The `[tls]` certificate, loaded and watched for changes; `serve` listens with it.
    tls: Option<server::tls::Acceptor>,
}

impl Herald {
    /// Check everything that can fail before serving (the TLS files included) and start the
    /// background tasks. Needs a Tokio runtime.
    pub fn new(config: Config) -> Result<Herald> {
        let config = Arc::new(config);
        let tls = config
            .tls
            .as_ref()
            .map(server::tls::Acceptor::from_files)
            .transpose()?;
        let upstream = upstream::Upstream::new(&config)?;
        let background = CancellationToken::new();
        let tracker = TaskTracker::new();
        let hub = hub::Hub::new(
            &config,
            upstream.clone(),
            background.clone(),
            tracker.clone(),
        );
        tracker.spawn(hub.clone().run_maintenance(background.clone()));
        match &tls {
            Some(acceptor) => tracker.spawn(acceptor.clone().watch(background.clone())),
            None => tracker.spawn(server::tls::ignore_hangup(background.clone())),
        };
        let app = Arc::new(server::App {
            routes: routes::RouteTable::new(&config.routes),
            config,
            hub,
            upstream,
            streams: CancellationToken::new(),
        });
        Ok(Herald {
            app,
            background,
            tracker,
            tls,
        })
    }

    /// The topic registry (for inspection: tests, status).
    pub fn hub(&self) -> &hub::Hub {
        &self.app.hub
    }

    /// The `[tls]` acceptor, if configured: `reload()` it to pick up new files at once.
    pub fn tls(&self) -> Option<&server::tls::Acceptor> {
        self.tls.as_ref()
    }

    /// Serve on `listener` (with the `[tls]` certificate if configured, plain HTTP otherwise)
    /// until `shutdown` fires; then drain streams and requests (within the configured deadline)
    /// and stop every poller before returning.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
        let listener = server::Listener {
            tcp: listener,
            tls: self.tls.clone(),
        };
        self.serve_on(vec![listener], shutdown).await
    }

    /// Like [`Herald::serve`], on several listeners at once (e.g. plain HTTP and HTTPS), each with
    /// its own TLS setting; they share one connection limit and one drain.
    pub async fn serve_on(
        self,
        listeners: Vec<server::Listener>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        server::serve(listeners, self.app.clone(), shutdown).await;
        self.background.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 5s");
        }
        Ok(())
    }
}

impl Drop for Herald {
    /// A herald dropped without serving (e.g. its port could not be bound) stops its background
    /// tasks rather than leaving them running.
    fn drop(&mut self) {
        self.background.cancel();
    }
}

/// Bind the configured address and serve until `shutdown` fires. Everything is checked (TLS files
/// included) before the port is bound.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let addr = config.listen;
    let herald = Herald::new(config)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_string(),
            source,
        })?;
    tracing::info!(%addr, tls = herald.tls().is_some(), "listening");
    herald.serve(listener, shutdown).await
}
