//! The public listeners: accept connections (capped), serve HTTP/1.1 and HTTP/2 on each through
//! hyper-util's auto builder, over TLS where the listener has it, and drain them on shutdown. An
//! error on one connection is logged in that connection's task and goes no further.

pub mod admission;
pub mod compress;
mod conn;
pub mod cors;
mod fast;
pub mod mux;
pub mod proxy;
pub mod router;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::Config;
use crate::hub::Hub;
use crate::routes::LiveRoutes;
use crate::upstream::Upstream;

pub use router::ConnInfo;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Everything a request handler reads; immutable once serving starts.
pub struct App {
    pub config: Arc<Config>,
    /// Swapped whole by a config reload (`admin::reload`).
    pub routes: LiveRoutes,
    pub hub: Hub,
    pub upstream: Upstream,
    /// Cancelled when shutdown begins: every open stream sends its last event and ends.
    pub streams: crate::shutdown::Flag,
    /// Stream admission: new streams per second and open streams per client address.
    pub admission: Arc<admission::Admission>,
    /// Prometheus metrics (`admin::metrics`), shared with the hub and the admin listener.
    pub metrics: Arc<crate::admin::metrics::Metrics>,
    /// Live multiplexed streams by token, for their control requests (`mux`).
    pub mux: Arc<crate::sse::mux::Registry>,
    /// Credentials, sharing, access checks and revocation of streams (`crate::auth`).
    pub auth: crate::auth::Auth,
}

/// A JSON error response: `{"error":"<code>","message":"…"}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Connection settings shared by every listener. HTTP/2 flow control is per stream, so a client
/// that stops reading one stream stalls only that stream: its data waits in at most
/// `H2_SEND_BUFFER` here, after which its SSE body is no longer polled: its cursor stays behind in
/// the topic's history (a snapshot resyncs it if it falls out) while the connection's other
/// streams flow on. `tests/http2.rs` checks this with an unread stream next to four readers.
fn builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(config.server.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(u32::try_from(config.server.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find dead peers on connections whose streams are all quiet (SSE heartbeats go
        // one way and would not notice).
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_send_buf_size(H2_SEND_BUFFER)
        // Receive windows bound request bodies held per stream and per connection; a request
        // whose upstream reads slowly can hold a quarter of the connection window at most.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW);
    b
}

/// Concurrent streams one HTTP/2 client may open (each SSE watcher is one stream).
pub const H2_MAX_STREAMS: u32 = 256;
/// Response bytes buffered per HTTP/2 stream beyond what the client's window allows.
pub const H2_SEND_BUFFER: usize = 64 * 1024;
/// Request-body window per HTTP/2 stream.
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// Request-body window per HTTP/2 connection, shared by its streams.
pub const H2_CONN_WINDOW: u32 = 1024 * 1024;

/// A bound socket and, for HTTPS, the TLS acceptor its connections handshake with.
#[derive(Debug)]
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<tls::Acceptor>,
}

impl Listener {
    /// Plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub fn plain(tcp: TcpListener) -> Listener {
        Listener { tcp, tls: None }
    }

    /// HTTPS: HTTP/2 or HTTP/1.1 by ALPN.
    pub fn tls(tcp: TcpListener, acceptor: tls::Acceptor) -> Listener {
        Listener {
            tcp,
            tls: Some(acceptor),
        }
    }
}

/// Accept on every listener until `shutdown` fires, then drain within the configured deadline.
/// The listeners share one connection limit and one drain.
pub async fn serve(listeners: Vec<Listener>, app: Arc<App>, shutdown: CancellationToken) {
    let builder = Arc::new(builder(&app.config));
    let graceful = GracefulShutdown::new();
    let limits = Limits {
        connections: Arc::new(Semaphore::new(app.config.server.max_connections)),
        rejections: Arc::new(Semaphore::new(MAX_REJECTING)),
        force_close: CancellationToken::new(),
    };
    let loops = listeners
        .into_iter()
        .map(|l| accept_loop(l, &app, &builder, &graceful, &limits, &shutdown));
    futures_util::future::join_all(loops).await;
    info!("stopped accepting; draining");
    // Streams first: each sends its last event and ends, so their connections can close.
    app.streams.cancel();
    app.hub.wake_all();
    let deadline = app.config.server.drain_timeout;
    tokio::select! {
        _ = graceful.shutdown() => info!("all connections drained"),
        _ = tokio::time::sleep(deadline) => {
            warn!(?deadline, "drain deadline passed; closing remaining connections");
            limits.force_close.cancel();
        }
    }
}

/// Connections over `max_connections` are answered 503 by at most this many tasks at once;
/// beyond that they are closed at once, so an overload cannot grow without bound.
const MAX_REJECTING: usize = 1024;

/// The connection budget shared by every listener.
struct Limits {
    connections: Arc<Semaphore>,
    rejections: Arc<Semaphore>,
    /// Parent of every connection's kill token: cancelled when the drain deadline passes.
    force_close: CancellationToken,
}

/// Accept until `shutdown`; each connection (TLS handshake included) runs in its own task. Over
/// `max_connections`, a connection is still accepted but only answered 503 with `Retry-After`, so
/// clients learn to back off instead of hanging in the kernel backlog.
async fn accept_loop(
    listener: Listener,
    app: &Arc<App>,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    graceful: &GracefulShutdown,
    limits: &Limits,
    shutdown: &CancellationToken,
) {
    let Listener { tcp, tls } = listener;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tcp.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match limits.connections.clone().try_acquire_owned() {
            Ok(p) => conn::Permit::Serve(p),
            Err(_) => match limits.rejections.clone().try_acquire_owned() {
                Ok(p) => {
                    debug!(%peer, "over max_connections: answering 503");
                    conn::Permit::Reject(p)
                }
                Err(_) => {
                    debug!(%peer, "over max_connections: closing");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::debug_span!("conn", %peer, tls = tls.is_some());
        let conn = conn::Conn {
            stream,
            peer,
            tls: tls.clone(),
            app: app.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            shutdown: shutdown.clone(),
            kill: limits.force_close.child_token(),
            permit,
        };
        tokio::spawn(conn.run().instrument(span));
    }
    debug!("listener closed");
}
