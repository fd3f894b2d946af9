//! herald: a reverse proxy that turns a polled REST API into Server-Sent Events.
//!
//! Data flows one way. Each module imports only modules above it in this list (the order is
//! [`LAYERS`], and `tests/layering.rs` fails on any import that climbs it):
//!
//! ```text
//! telemetry, logging, reply, wire,   bottom: metric handles (plain numbers), log format and
//! shutdown                           access log, HTTP answers, SSE framing, signals
//! config ─► error ─► routes          proxy.toml → validated Config → RouteTable, TopicKey
//!   ─► source                        Source: feeds a topic's writer (poll; Origin = HTTP client)
//!   ─► diff                          pure JSON diff: patches, no I/O
//!   ─► hub                           writer (coalesce → diff → sequence) ─Broker─► channel
//!                                    (history ring + watchers); MemoryBroker by default
//!   ─► cluster                       RedisBroker: leases, streams, one reader per node
//!   ─► auth ─► reload                who may watch which topic; config reload
//!   ─► sse                           one stream lifecycle; single / multiplexed events; gzip
//!   ─► server                        listeners, TLS, stream-open phases, pass-through proxy
//!   ─► admin ─► demo                 metrics, health, status page, reload endpoint; the demo
//! ```
//!
//! The two seams new wings plug into:
//!
//! ```text
//! trait Source: fn run(&self, target: Target, feed: Feed, cancel) -> BoxFuture<'static, ()>
//!               (sends Update::{Document, Unchanged, Failed(SourceError)} through `feed`)
//! trait Broker: attach(id, &channel) · detach(id, &channel) · lead(id) -> Lease
//!               publish(id, &lease, Draft) -> Position · history(id, since) -> Replay
//! ```
//!
//! `main.rs` parses arguments, loads the config and calls [`run`]; tests bind `127.0.0.1:0`
//! themselves and use [`Herald`].

pub mod telemetry;
pub mod logging;
pub mod reply;
pub mod wire;
pub mod shutdown;
pub mod config;
pub mod error;
pub mod routes;
pub mod source;
pub mod diff;
pub mod hub;
pub mod cluster;
pub mod auth;
pub mod reload;
pub mod sse;
pub mod server;
pub mod admin;
pub mod demo;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use error::{Error, Result};

/// The module order data flows in: a module may import only those listed before it.
/// `tests/layering.rs` checks every `crate::` path in `src/` against it.
pub const LAYERS: &[&str] = &[
    "telemetry",
    "logging",
    "reply",
    "wire",
    "shutdown",
    "config",
    "error",
    "routes",
    "source",
    "diff",
    "hub",
    "cluster",
    "auth",
    "reload",
    "sse",
    "server",
    "admin",
    "demo",
];

/// A configured herald, ready to serve on a listener.
pub struct Herald {
    service: Arc<server::Service>,
    /// Stops writers and maintenance once the listener has drained.
    background: CancellationToken,
    tracker: TaskTracker,
    /// The `[tls]` certificate, loaded and watched for changes; `serve` listens with it.
    tls: Option<server::tls::Acceptor>,
    /// Metrics, health, status page and reload (`[admin]`).
    admin: Arc<admin::Admin>,
    /// `[admin] listen`, if configured.
    admin_addr: Option<std::net::SocketAddr>,
    /// The `[admin]` listener once bound (`bind_admin`), until `serve` takes it.
    admin_listener: Option<TcpListener>,
}

impl Herald {
    /// Check everything that can fail before serving (the TLS files included) and start the
    /// background tasks. Needs a Tokio runtime. A config with `[cluster] redis` needs
    /// [`Herald::start`], which connects to Redis first.
    pub fn new(config: Config) -> Result<Herald> {
        if config.cluster.redis.is_some() {
            return Err(Error::Cluster(
                "[cluster] redis is set: start herald with Herald::start (it connects first)"
                    .into(),
            ));
        }
        let metrics = Arc::new(telemetry::Metrics::new());
        let broker: Arc<dyn hub::Broker> = Arc::new(hub::MemoryBroker::default());
        Herald::build(
            config,
            broker,
            metrics,
            CancellationToken::new(),
            TaskTracker::new(),
        )
    }

    /// Like [`Herald::new`], and with `[cluster] redis`, connect to Redis first: unreachable, it
    /// fails with a message naming the server, or (with `on_unavailable = "local"`) serves alone.
    pub async fn start(config: Config) -> Result<Herald> {
        let Some(redis) = config.cluster.redis.clone() else {
            return Herald::new(config);
        };
        let metrics = Arc::new(telemetry::Metrics::new());
        let background = CancellationToken::new();
        let tracker = TaskTracker::new();
        let broker: Arc<dyn hub::Broker> = match cluster::RedisBroker::connect(
            &redis,
            metrics.cluster.clone(),
            background.clone(),
            &tracker,
        )
        .await
        {
            Ok(b) => Arc::new(b),
            Err(e) if redis.local_fallback => {
                tracing::warn!(error = %e, "cluster: serving alone (on_unavailable = \"local\")");
                Arc::new(hub::MemoryBroker::default())
            }
            Err(e) => return Err(Error::Cluster(e)),
        };
        let built = Herald::build(config, broker, metrics, background.clone(), tracker);
        if built.is_err() {
            background.cancel();
        }
        built
    }

    fn build(
        config: Config,
        broker: Arc<dyn hub::Broker>,
        metrics: Arc<telemetry::Metrics>,
        background: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Herald> {
        let config = Arc::new(config);
        let tls = config
            .tls
            .as_ref()
            .map(server::tls::Acceptor::from_files)
            .transpose()?;
        let origin = source::Origin::new(&config)?;
        let budget = Arc::new(source::Budget::new(
            &config.polling,
            metrics.upstream_budget_waits.clone(),
        ));
        let source: Arc<dyn source::Source> =
            Arc::new(source::Sources::new(origin.clone(), budget.clone()));
        let hub = hub::Hub::new(
            hub::HubSettings::new(&config.sse, &config.server),
            broker,
            source,
            metrics.clone(),
            background.clone(),
            tracker.clone(),
        );
        tracker.spawn(hub.clone().run_maintenance(background.clone()));
        let key = match &config.cluster.secret {
            Some(secret) => auth::VaryKey::from_secret(secret.0.as_bytes()),
            None => auth::VaryKey::random(),
        };
        // One task serves every stream's re-checks and token deadlines.
        let auth = auth::Auth::new(origin.clone(), key, config.sse.expiry_notice);
        tracker.spawn(auth.clone().run(background.clone()));
        let routes = Arc::new(routes::LiveRoutes::new(routes::RouteTable::new(
            &config.routes,
        )));
        let shutdown = shutdown::Flag::default();
        let publisher =
            server::publish::Publisher::new(&config.publish, routes.clone(), hub.clone());
        let service = Arc::new(server::Service {
            publish: publisher.clone(),
            routes: routes.clone(),
            hub: hub.clone(),
            auth,
            pass: server::proxy::pass::PassClient::new(
                &config,
                server::proxy::pass::PassStats::of(&metrics),
            )?,
            streams: server::Streams::new(&config.sse, shutdown),
            mux: server::mux::Endpoints::new(&config.mux),
            cors: config.cors.clone(),
            proxy: config.proxy.clone(),
            compression: config.compression.clone(),
            admission: server::admission::Admission::new(&config.server),
            metrics: metrics.clone(),
            connections: server::Connections::from(&config.server),
            access_log: config.log.access,
        });
        let reloader = Arc::new(reload::Reloader::new(
            config.clone(),
            routes.clone(),
            hub.clone(),
            metrics.clone(),
        ));
        let stats = admin::Stats {
            hub,
            routes,
            metrics,
            publish: publisher,
        };
        let admin = admin::Admin::new(
            stats,
            reloader.clone(),
            admin::Access::new(config.admin.as_ref()),
            background.clone(),
        );
        // SIGHUP, heard once: the certificate watcher and the config reload both follow it.
        let hangups = shutdown::Hangups::listen(background.clone());
        tracker.spawn(reloader.on_hangups(hangups.clone(), background.clone()));
        if let Some(acceptor) = &tls {
            tracker.spawn(acceptor.clone().watch(background.clone(), hangups));
        }
        Ok(Herald {
            service,
            admin,
            admin_addr: config.admin.as_ref().map(|a| a.listen),
            admin_listener: None,
            background,
            tracker,
            tls,
        })
    }

    /// The topic registry (for inspection: tests, status).
    pub fn hub(&self) -> &hub::Hub {
        &self.service.hub
    }

    /// Metrics, readiness and config reload (`admin`): the admin listener serves these.
    pub fn admin(&self) -> &Arc<admin::Admin> {
        &self.admin
    }

    /// The topic a stream request for `path_and_query` with `headers` would join (after access
    /// checks), for inspection: the same key on every node given the same config and secret.
    pub async fn topic_for(
        &self,
        path_and_query: &str,
        headers: &http::HeaderMap,
    ) -> Option<routes::TopicKey> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let (route, key) = self.service.routes.resolve(path, query).ok()??;
        let grant = self
            .service
            .auth
            .authorize(&route, key, headers, query)
            .await
            .ok()?;
        Some(grant.key)
    }

    /// Bind the `[admin]` listener now, so that its address is known before serving (tests use
    /// `127.0.0.1:0`); `serve` binds it otherwise. None without `[admin]`.
    pub async fn bind_admin(&mut self) -> Result<Option<std::net::SocketAddr>> {
        if self.admin_listener.is_none() {
            let Some(addr) = self.admin_addr else {
                return Ok(None);
            };
            self.admin_listener = Some(bind(addr).await?);
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
    /// and stop every writer before returning.
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
        server::serve(listeners, self.service.clone(), shutdown).await;
        self.admin.set_ready(false);
        self.service.hub.close_all().await;
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
    let mut herald = Herald::start(config).await?;
    herald.bind_admin().await?;
    let listener = bind(addr).await?;
    tracing::info!(%addr, tls = herald.tls().is_some(), "listening");
    herald.serve(listener, shutdown).await
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_string(),
            source,
        })
}
