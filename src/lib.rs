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
//! `auth` sits between `hub` and `server`: before a stream joins a topic it decides who may watch
//! it and which topic (credentials, sharing, checks, JWT), and it ends revoked streams.
//!
//! `admin` watches from the side: its metric handles are one-line hooks in the hub, the poller,
//! the stream and the connection; its own listener serves `/metrics`, health, the status page and
//! `POST /reload`, which (like SIGHUP) swaps the route table (`routes::LiveRoutes`) under live
//! streams.
//!
//! `main.rs` parses arguments, loads the config and calls [`Herald::serve`]; tests bind
//! `127.0.0.1:0` themselves and do the same.

pub mod admin;
pub mod auth;
pub mod config;
pub mod demo;
pub mod diff;
pub mod error;
pub mod hub;
pub mod logging;
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
    /// Metrics, health, status page and reload (`[admin]`).
    admin: Arc<admin::Admin>,
    /// The `[admin]` listener once bound (`bind_admin`), until `serve` takes it.
    admin_listener: Option<TcpListener>,
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
        let metrics = Arc::new(admin::metrics::Metrics::new());
        let hub = hub::Hub::new(
            &config,
            upstream.clone(),
            background.clone(),
            tracker.clone(),
            metrics.clone(),
        );
        tracker.spawn(hub.clone().run_maintenance(background.clone()));
        // One task serves every stream's re-checks and token deadlines.
        let auth = auth::Auth::new(upstream.clone());
        tracker.spawn(auth.clone().run(background.clone()));
        let app = Arc::new(server::App {
            routes: routes::LiveRoutes::new(routes::RouteTable::new(&config.routes)),
            metrics,
            admission: server::admission::Admission::new(&config.server),
            config,
            hub,
            upstream,
            streams: crate::shutdown::Flag::default(),
            mux: Default::default(),
            auth,
        });
        let admin = admin::Admin::new(app.clone(), background.clone());
        // SIGHUP reloads the certificate (if any) and the config, through one signal listener.
        let on_hangup = admin::reload::on_hangup(&admin, &tracker);
        match &tls {
            Some(acceptor) => tracker.spawn(
                acceptor
                    .clone()
                    .watch_with(background.clone(), Some(on_hangup)),
            ),
            None => tracker.spawn(server::tls::ignore_hangup(
                background.clone(),
                Some(on_hangup),
            )),
        };
        Ok(Herald {
            app,
            admin,
            admin_listener: None,
            background,
            tracker,
            tls,
        })
    }

    /// The topic registry (for inspection: tests, status).
    pub fn hub(&self) -> &hub::Hub {
        &self.app.hub
    }

    /// Metrics, readiness and config reload (`admin`): the admin listener serves these.
    pub fn admin(&self) -> &Arc<admin::Admin> {
        &self.admin
    }

    /// Bind the `[admin]` listener now, so that its address is known before serving (tests use
    /// `127.0.0.1:0`); `serve` binds it otherwise. None without `[admin]`.
    pub async fn bind_admin(&mut self) -> Result<Option<std::net::SocketAddr>> {
        if self.admin_listener.is_none() {
            let Some(cfg) = &self.app.config.admin else {
                return Ok(None);
            };
            let listener = TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| Error::Listen {
                    addr: cfg.listen.to_string(),
                    source,
                })?;
            self.admin_listener = Some(listener);
        }
        Ok(self
            .admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok()))
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
        mut self,
        listeners: Vec<server::Listener>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        self.bind_admin().await?;
        if let Some(l) = self.admin_listener.take() {
            self.tracker
                .spawn(self.admin.clone().serve(l, shutdown.clone()));
        }
        self.admin.set_ready(true);
        server::serve(listeners, self.app.clone(), shutdown).await;
        self.admin.set_ready(false);
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
    let mut herald = Herald::new(config)?;
    herald.bind_admin().await?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_string(),
            source,
        })?;
    tracing::info!(%addr, tls = herald.tls().is_some(), "listening");
    herald.serve(listener, shutdown).await
}
