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

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::{self, Secret};
use crate::hub::Hub;
use crate::reload::Reloader;
use crate::reply::{json_error, text, ResponseBody};
use crate::routes::LiveRoutes;
use crate::telemetry::Metrics;

/// Admin connections at most: operators and scrapers, not clients.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Connections past that are still answered on `/healthz` and `/readyz` (and refused on
/// everything else), up to this many more: a supervisor's probe gets through when the listener
/// is full of idle sockets or status pages.
const MAX_PROBE_CONNECTIONS: usize = 64;
/// A connection must send a complete request head within this (also between keep-alive
/// requests), or it is closed.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Live status pages (`/status/events`) at most; each holds a connection.
const MAX_STATUS_STREAMS: usize = 16;

/// What the status page and `/readyz` read: the hub's topics, the routes in force, the metrics.
#[derive(Clone)]
pub struct Stats {
    pub hub: Hub,
    pub routes: Arc<LiveRoutes>,
    pub metrics: Arc<Metrics>,
    /// `POST /_herald/publish`.
    pub publish: Arc<crate::server::publish::Publisher>,
}

/// Who may use the admin listener beyond health: the reload token and the host names it answers.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `POST /reload` needs it as a bearer token; None: reload over HTTP is off.
    pub token: Option<Secret>,
    /// Host names accepted besides IP literals and `localhost`.
    pub hosts: Vec<String>,
}

impl Access {
    pub fn new(admin: Option<&config::Admin>) -> Access {
        admin.map_or_else(Access::default, |a| Access {
            token: a.token.clone(),
            hosts: a.hosts.clone(),
        })
    }

    /// Whether `Host` names this listener: an IP literal, `localhost`, or a configured name. A
    /// page on another site that rebinds its DNS name to this address sends its own name.
    fn host_allowed(&self, headers: &http::HeaderMap) -> bool {
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            // HTTP/1.0 without Host: not a browser.
            return true;
        };
        let host = host.trim().to_ascii_lowercase();
        let name = match host.strip_prefix('[') {
            Some(v6) => {
                return v6
                    .split(']')
                    .next()
                    .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
            }
            None => host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n),
        };
        name.parse::<std::net::Ipv4Addr>().is_ok()
            || name == "localhost"
            || self.hosts.iter().any(|h| h == name)
    }

    /// The refusal of a reload request, unless a token is configured and presented and the
    /// request does not come from a browser page (`Origin`).
    fn refuse_reload(&self, headers: &http::HeaderMap) -> Option<Response<ResponseBody>> {
        if headers.contains_key(header::ORIGIN) {
            return Some(json_error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "reload is not for browser pages",
            ));
        }
        let Some(token) = &self.token else {
            return Some(json_error(
                StatusCode::FORBIDDEN,
                "reload-disabled",
                "reload over HTTP needs [admin] token (or HERALD_ADMIN_TOKEN); or send herald SIGHUP",
            ));
        };
        if crate::auth::bearer_matches(headers, &token.0) {
            None
        } else {
            let mut resp = json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "reload needs the admin token: Authorization: Bearer <token>",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            Some(resp)
        }
    }
}

/// The admin listener's state: what it reads (`Stats`), what it asks (`Reloader`), what it owns
/// (readiness).
pub struct Admin {
    pub metrics: Arc<Metrics>,
    stats: Stats,
    reloader: Arc<Reloader>,
    access: Access,
    /// Live `/status/events` streams.
    status_streams: Arc<tokio::sync::Semaphore>,
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
    pub fn new(
        stats: Stats,
        reloader: Arc<Reloader>,
        access: Access,
        stop: CancellationToken,
    ) -> Arc<Admin> {
        Arc::new(Admin {
            metrics: stats.metrics.clone(),
            stats,
            reloader,
            access,
            status_streams: Arc::new(tokio::sync::Semaphore::new(MAX_STATUS_STREAMS)),
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
        // HTTP/1.1 only (operators, scrapers, probes): its header timeout runs from the first
        // byte awaited, so a socket that says nothing is closed too.
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(ADMIN_HEADER_TIMEOUT)
            .keep_alive(true);
        let builder = Arc::new(builder);
        let graceful = GracefulShutdown::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
        let probes = Arc::new(tokio::sync::Semaphore::new(MAX_PROBE_CONNECTIONS));
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
            let (permit, probe_only) = match limit.clone().try_acquire_owned() {
                Ok(p) => (p, false),
                Err(_) => match probes.clone().try_acquire_owned() {
                    Ok(p) => {
                        debug!(%peer, "admin listener full: health only on this connection");
                        (p, true)
                    }
                    Err(_) => {
                        debug!(%peer, "admin connection refused: too many");
                        continue;
                    }
                },
            };
            let admin = self.clone();
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move {
                    let resp = if probe_only {
                        admin.probe(&req)
                    } else {
                        admin.handle(req).await
                    };
                    Ok::<_, Infallible>(resp)
                }
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

    /// The answer on a connection past the limit: health, and nothing else.
    fn probe<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => health::healthz(),
            (&Method::GET | &Method::HEAD, "/readyz") => health::readyz(self),
            _ => json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the admin listener is full; only /healthz and /readyz are answered",
            ),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        let path = req.uri().path();
        if !matches!(path, "/healthz" | "/readyz") && !self.access.host_allowed(req.headers()) {
            return json_error(
                StatusCode::MISDIRECTED_REQUEST,
                "host-not-allowed",
                "this listener answers to its IP address, localhost or [admin] hosts",
            );
        }
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
            (&Method::GET, "/status/events") => {
                match self.status_streams.clone().try_acquire_owned() {
                    Ok(permit) => status::events(self.clone(), permit),
                    Err(_) => json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "too many status pages are open",
                    ),
                }
            }
            (_, crate::server::publish::ADMIN_PATH) => self.stats.publish.handle(req).await,
            (&Method::POST, "/reload") => {
                if let Some(refused) = self.access.refuse_reload(req.headers()) {
                    return refused;
                }
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
