//! The public listeners: accept connections (capped), serve HTTP/1.1 and HTTP/2 on each through
//! hyper-util's auto builder, over TLS where the listener has it, and drain them on shutdown. An
//! error on one connection is logged in that connection's task and goes no further.

pub mod admission;
pub mod compress;
mod conn;
pub mod cors;
mod fast;
mod fast_tls;
mod handover;
mod get;
mod idle;
pub mod mux;
mod observe;
mod open;
pub mod proxy;
pub mod publish;
pub mod router;
mod record;
mod tickets;
mod tls_stream;
pub mod tls;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::auth::Auth;
use crate::config;
use crate::hub::Hub;
use crate::routes::LiveRoutes;
use crate::shutdown::Flag;
use crate::telemetry::Metrics;

pub use crate::reply::{json_error, BoxError, ResponseBody};
pub use router::ConnInfo;

/// What the public listeners serve with, each part built once at startup (`lib.rs`) from the
/// validated config; nothing here reads the config file's model at request time.
pub struct Service {
    /// The stream routes in force, swapped whole by a reload.
    pub routes: Arc<LiveRoutes>,
    pub hub: Hub,
    /// Credentials, sharing, access checks and revocation of streams.
    pub auth: Auth,
    /// The pass-through client (its own pool, targets forwarded byte for byte).
    pub pass: proxy::pass::PassClient,
    pub streams: Streams,
    /// The multiplexed stream and the browser client, when enabled.
    pub mux: mux::Endpoints,
    /// None: herald adds no CORS headers.
    pub cors: Option<config::Cors>,
    pub proxy: config::Proxy,
    pub compression: config::Compression,
    /// Stream admission: new streams per second, open streams per address and credential.
    pub admission: Arc<admission::Admission>,
    pub metrics: Arc<Metrics>,
    pub connections: Connections,
    /// `[log] access`: one line per pass-through request.
    pub access_log: bool,
    /// `POST /_herald/publish` (on the main listener only at `[publish] path`).
    pub publish: Arc<publish::Publisher>,
}

/// How streams run (`[sse]`), and the flag that ends them all at shutdown.
#[derive(Debug, Clone)]
pub struct Streams {
    pub retry: Duration,
    /// Up to this much is added to `retry` per client, so reconnects spread out.
    pub retry_jitter: Duration,
    pub heartbeat: Duration,
    /// Set when the drain begins: every open stream sends its last event and ends.
    pub shutdown: Flag,
}

impl Streams {
    pub fn new(sse: &config::Sse, shutdown: Flag) -> Streams {
        Streams {
            retry: sse.retry,
            retry_jitter: sse.retry_jitter,
            heartbeat: sse.heartbeat,
            shutdown,
        }
    }
}

/// Connection limits (`[server]`).
#[derive(Debug, Clone)]
pub struct Connections {
    pub max_connections: usize,
    /// Open connections from one client address at most (0: no limit).
    pub max_connections_per_ip: u32,
    pub drain_timeout: Duration,
    pub max_header_bytes: usize,
    /// A connection must deliver its first complete request head within this of being accepted.
    pub header_timeout: Duration,
    /// A connection with nothing in progress for this long is closed.
    pub idle_timeout: Duration,
}

impl From<&config::Server> for Connections {
    fn from(s: &config::Server) -> Connections {
        Connections {
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
            drain_timeout: s.drain_timeout,
            max_header_bytes: s.max_header_bytes,
            header_timeout: s.header_timeout,
            idle_timeout: s.idle_timeout,
        }
    }
}

/// Connection settings shared by every listener. HTTP/2 flow control is per stream, so a client
/// that stops reading one stream stalls only that stream: its data waits in at most
/// `H2_SEND_BUFFER` here, after which its SSE body is no longer polled: its cursor stays behind in
/// the topic's history (a snapshot resyncs it if it falls out) while the connection's other
/// streams flow on. `tests/http2.rs` checks this with an unread stream next to four readers.
fn builder(config: &Connections) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Between keep-alive requests too; the first request's deadline is `idle.rs`'s.
        .header_read_timeout(config.idle_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        // No HTTP/2 PINGs: the kernel finds dead peers (`keepalive`) on every connection, without
        // the timer and the ~350 bytes hyper's pinger keeps per connection.
        .max_send_buf_size(H2_SEND_BUFFER)
        // Receive windows bound request bodies held per stream and per connection; a request
        // whose upstream reads slowly can hold a quarter of the connection window at most.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW);
    b
}

/// Quiet time before the kernel probes a connection's peer, the time between probes, and the
/// probes unanswered before it gives up (`SO_KEEPALIVE`).
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(30), Duration::from_secs(10), 3);
/// How long sent data (an event, a heartbeat, a keepalive probe) may stay unacknowledged before
/// the kernel closes the connection (`TCP_USER_TIMEOUT`, Linux).
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Let the kernel find dead peers: a quiet connection is probed after `KEEPALIVE`'s idle time,
/// and one whose sent data goes unacknowledged for `USER_TIMEOUT` is closed, so a client that
/// vanished (a laptop closed, a network gone) stops holding its streams within about a minute,
/// HTTP/1.1 and HTTP/2 alike, at no cost to herald until it happens.
fn keepalive(stream: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let (idle, interval, retries) = KEEPALIVE;
    let probes = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(retries);
    if let Err(e) = sock.set_tcp_keepalive(&probes) {
        debug!(error = %e, "TCP keepalive not set");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        debug!(error = %e, "TCP_USER_TIMEOUT not set");
    }
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
pub async fn serve(listeners: Vec<Listener>, app: Arc<Service>, shutdown: CancellationToken) {
    let builder = Arc::new(builder(&app.connections));
    let graceful = GracefulShutdown::new();
    let limits = Limits {
        connections: Arc::new(Semaphore::new(app.connections.max_connections)),
        rejections: Arc::new(Semaphore::new(MAX_REJECTING)),
        addresses: Arc::default(),
        force_close: CancellationToken::new(),
    };
    let loops = listeners
        .into_iter()
        .map(|l| accept_loop(l, &app, &builder, &graceful, &limits, &shutdown));
    futures_util::future::join_all(loops).await;
    info!("stopped accepting; draining");
    // Streams first: each sends its last event and ends, so their connections can close.
    app.streams.shutdown.cancel();
    app.hub.wake_all();
    let deadline = app.connections.drain_timeout;
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
    /// Open connections by client address (`max_connections_per_ip`).
    addresses: Addresses,
    /// Parent of every connection's kill token: cancelled when the drain deadline passes.
    force_close: CancellationToken,
}

/// Open connections by client address.
type Addresses = Arc<Mutex<HashMap<IpAddr, u32>>>;

/// A connection's place in its address's count, given back when it closes.
pub(crate) struct AddressSlot {
    addresses: Option<(Addresses, IpAddr)>,
}

impl AddressSlot {
    /// Take a place for `ip` unless it already has `max` connections (0: no limit).
    fn take(addresses: &Addresses, ip: IpAddr, max: u32) -> Option<AddressSlot> {
        if max == 0 {
            return Some(AddressSlot { addresses: None });
        }
        let mut map = addresses.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            addresses: Some((addresses.clone(), ip)),
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let Some((addresses, ip)) = &self.addresses else {
            return;
        };
        let mut map = addresses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(ip);
            }
        }
    }
}

/// Accept until `shutdown`; each connection (TLS handshake included) runs in its own task. Over
/// `max_connections`, a connection is still accepted but only answered 503 with `Retry-After`, so
/// clients learn to back off instead of hanging in the kernel backlog.
async fn accept_loop(
    listener: Listener,
    app: &Arc<Service>,
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
        // One address cannot take every connection: past its share, closed at once (nothing is
        // read from it, so nothing can be done with it).
        let max_per_ip = app.connections.max_connections_per_ip;
        let Some(address) = AddressSlot::take(&limits.addresses, peer.ip(), max_per_ip) else {
            debug!(%peer, "over max_connections_per_ip: closing");
            app.metrics.reject("max-connections-per-ip");
            continue;
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
        keepalive(&stream);
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
            address,
        };
        tokio::spawn(conn.run().instrument(span));
    }
    debug!("listener closed");
}
