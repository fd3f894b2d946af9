//! The operator's side of herald, on its own listener (`[admin] listen`): Prometheus `/metrics`,
//! `/healthz` and `/readyz`, a live status page (fed over SSE by this same listener), and
//! `POST /reload`. It only serves: what it shows comes through a stats handle (hub, routes,
//! metrics) and reloads go to the `Reloader`; nothing below imports it.

pub mod health;
pub mod status;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::hub::Hub;
use crate::reload::Reloader;
use crate::reply::{json_error, text, ResponseBody};
use crate::routes::LiveRoutes;
use crate::telemetry::Metrics;

/// Admin connections at most: operators and scrapers, not clients.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// What the status page and `/readyz` read: the hub's topics, the routes in force, the metrics.
#[derive(Clone)]
pub struct Stats {
    pub hub: Hub,
    pub routes: Arc<LiveRoutes>,
    pub metrics: Arc<Metrics>,
}

/// The admin listener's state: what it reads (`Stats`), what it asks (`Reloader`), what it owns
/// (readiness).
pub struct Admin {
    pub metrics: Arc<Metrics>,
    stats: Stats,
    reloader: Arc<Reloader>,
    /// Listeners bound and serving, and not draining (`/readyz`).
    ready: AtomicBool,
    started: SystemTime,
    /// Ends status streams and admin connections once herald has drained.
    stop: CancellationToken,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Admin {
    pub fn new(stats: Stats, reloader: Arc<Reloader>, stop: CancellationToken) -> Arc<Admin> {
        Arc::new(Admin {
            metrics: stats.metrics.clone(),
            stats,
            reloader,
            ready: AtomicBool::new(false),
            started: SystemTime::now(),
            stop,
        })
    }

    /// The config reload behind `POST /reload` (and SIGHUP).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The path templates of the stream routes in force, in match order.
    pub fn app_routes(&self) -> Vec<String> {
        let table = self.stats.routes.current();
        table
            .routes()
            .iter()
            .map(|r| r.config.template.source.clone())
            .collect()
    }

    /// Serve the admin endpoints on `listener` until `stop` (given to `new`) fires. `draining`
    /// fires when herald stops accepting clients: `/readyz` turns 503 from then on, while metrics
    /// and health stay available through the drain.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, draining: CancellationToken) {
        let addr = listener
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string());
        info!(
            %addr,
            "admin listener serving /metrics, /healthz, /readyz, /status, POST /reload"
        );
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        let builder = Arc::new(builder);
        let graceful = GracefulShutdown::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
        let mut draining_seen = false;
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = draining.cancelled(), if !draining_seen => {
                    draining_seen = true;
                    self.set_ready(false);
                    continue;
                }
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                debug!(%peer, "admin connection refused: too many");
                continue;
            };
            let admin = self.clone();
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let (builder, watcher) = (builder.clone(), graceful.watcher());
            tokio::spawn(
                async move {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn).await {
                        debug!(error = %e, "admin connection ended with an error");
                    }
                    drop(permit);
                }
                .instrument(tracing::debug_span!("admin", %peer)),
            );
        }
        if tokio::time::timeout(Duration::from_secs(2), graceful.shutdown())
            .await
            .is_err()
        {
            debug!("admin connections did not close within 2s");
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET | &Method::HEAD, "/metrics") => {
                self.metrics.set_topics_alive(self.stats.hub.topic_count());
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            (&Method::GET | &Method::HEAD, "/healthz") => health::healthz(),
            (&Method::GET | &Method::HEAD, "/readyz") => health::readyz(&self),
            (&Method::GET | &Method::HEAD, "/" | "/status") => text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                status::PAGE.to_string(),
            ),
            (&Method::GET | &Method::HEAD, "/status.json") => text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&status::snapshot(&self)).unwrap_or_default(),
            ),
            (&Method::GET, "/status/events") => status::events(self.clone()),
            (&Method::POST, "/reload") => {
                let reloader = self.reloader.clone();
                // Reading and checking the file blocks; keep it off the async workers.
                let result = tokio::task::spawn_blocking(move || reloader.reload()).await;
                match result {
                    Ok(Ok(report)) => text(
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_string(&report).unwrap_or_default(),
                    ),
                    Ok(Err(e)) => json_error(e.status(), e.code(), &e.to_string()),
                    Err(_) => json_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "reload-failed",
                        "the reload task failed",
                    ),
                }
            }
            (_, "/metrics" | "/healthz" | "/readyz" | "/status" | "/status.json" | "/reload") => {
                json_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    "method not allowed here",
                )
            }
            _ => json_error(StatusCode::NOT_FOUND, "not-found", "no such admin endpoint"),
        }
    }
}
