//! One accepted connection, in its own task: the TLS handshake when the listener has TLS (bounded
//! by a timeout, never in the accept loop), then HTTP/1.1 or HTTP/2 through the auto builder. Any
//! error ends this connection only and is logged here.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use super::tls::{self, Acceptor};
use http::{header, HeaderValue, Response, StatusCode};

use super::idle::{Activity, BusyBody, Idle};
use super::observe::Tracked;
use super::{fast, fast_tls, handover, json_error, router, ConnInfo, Service};

/// What a connection task needs from its listener.
pub(super) struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub tls: Option<Acceptor>,
    pub app: Arc<Service>,
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    /// Registered in the accept loop, before shutdown can begin, so a connection still in its
    /// handshake when shutdown starts is drained like the others.
    pub watcher: Watcher,
    /// Fires when shutdown begins: a handshake in progress is abandoned.
    pub shutdown: CancellationToken,
    /// Closes the connection at once: at the drain deadline, or when its stream is a slow
    /// consumer that cannot even be polled.
    pub kill: CancellationToken,
    /// Held until the connection closes.
    pub permit: Permit,
    /// Its place in the per-address count, held until it closes.
    pub address: super::AddressSlot,
}

/// A connection's place in the connection budget.
pub(super) enum Permit {
    /// Counts against `max_connections`; served normally.
    Serve(#[allow(dead_code)] OwnedSemaphorePermit),
    /// Over the limit: every request is answered 503 and the connection closes.
    Reject(#[allow(dead_code)] OwnedSemaphorePermit),
}

impl Conn {
    /// Run the connection (the caller spawns this with the connection's span). This task lasts
    /// until the first request is seen: a stream, or hyper's connection, then runs in a task of
    /// its own, sized by what it holds, not by the handshake's or the first read's states.
    pub(super) async fn run(self) {
        let Conn {
            stream,
            peer,
            tls,
            app,
            builder,
            watcher,
            shutdown,
            kill,
            permit,
            address,
        } = self;
        let reject = matches!(permit, Permit::Reject(_));
        app.metrics.count_if(reject, "max-connections");
        let held = (watcher, permit, address);
        let (stream, info, activity): (Box<dyn Io>, _, _) = match tls {
            None => {
                // The clock of `header_timeout` starts at accept (after the TLS handshake, which
                // has its own).
                let activity = Activity::new();
                let info = ConnInfo {
                    peer,
                    tls: false,
                    kill,
                    upstream: Default::default(),
                };
                // An HTTP/1.1 stream is served on the socket directly (`fast.rs`); `watcher`
                // stays alive meanwhile, so the drain waits for it like for any connection.
                let stream = if reject {
                    stream
                } else {
                    match fast::try_serve(stream, &app, &info, &activity).await {
                        fast::Outcome::Served => return,
                        // The stream gets its own small task and this one ends: its states
                        // (the hyper path, the request) would size the stream's memory.
                        fast::Outcome::Stream(s) => return spawn_stream(s, held),
                        fast::Outcome::Hyper(stream) => stream,
                    }
                };
                (Box::new(stream), info, activity)
            }
            Some(acceptor) => {
                match accept_tls(stream, acceptor, peer, kill, &app, shutdown, reject).await {
                    Accepted::Done => return,
                    // An HTTP/1.1 stream over TLS on the fast path: its own small task, like a
                    // plaintext one.
                    Accepted::Stream(s) => return spawn_stream(s, held),
                    Accepted::Hyper(stream, info, activity) => (stream, info, activity),
                }
            }
        };
        let (watcher, permit, address) = held;
        // hyper's connection gets a task of its own and this one ends, as a fast-path stream
        // does: one task per connection, sized by hyper's state alone.
        let serving = serve_http(
            TokioIo::new(Tracked::new(stream, &app.metrics, info.tls)),
            info,
            app,
            &builder,
            watcher,
            reject,
            activity,
            (permit, address),
        );
        tokio::spawn(serving.instrument(tracing::Span::current()));
    }
}

/// A connection's byte stream, plain or TLS, as hyper serves it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A fast-path stream runs in its own small task, holding what its connection held (the drain
/// watcher, the connection permit, its place in the per-address count) until it ends.
fn spawn_stream(s: fast::StreamConn, held: (Watcher, Permit, super::AddressSlot)) {
    tokio::spawn(s.holding(held).instrument(tracing::Span::current()));
}

/// What became of a TLS connection after its handshake.
enum Accepted {
    /// Closed, answered on the fast path, or the handshake failed.
    Done,
    /// An HTTP/1.1 stream on the fast path, to be spawned.
    Stream(fast::StreamConn),
    /// For hyper, with the bytes the fast path read put back.
    Hyper(
        Box<fast_tls::Rewind<super::tls_stream::TlsStream>>,
        ConnInfo,
        Arc<Activity>,
    ),
}

/// The TLS handshake (bounded by a timeout, abandoned when shutdown begins), then the fast
/// path's look at the first request.
async fn accept_tls(
    stream: TcpStream,
    acceptor: Acceptor,
    peer: SocketAddr,
    kill: CancellationToken,
    app: &Service,
    shutdown: CancellationToken,
    reject: bool,
) -> Accepted {
    let handshake = tokio::time::timeout(
        tls::HANDSHAKE_TIMEOUT,
        handover::handshake(acceptor.config(), stream),
    );
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return Accepted::Done,
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(error = %e, "TLS handshake failed");
                app.metrics.reject("tls-handshake");
                return Accepted::Done;
            }
            Err(_) => {
                debug!(timeout = ?tls::HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                app.metrics.reject("tls-handshake-timeout");
                return Accepted::Done;
            }
        },
    };
    let alpn = stream.alpn.as_deref().map(String::from_utf8_lossy);
    debug!(alpn = alpn.as_deref().unwrap_or("none"), "TLS established");
    let info = ConnInfo {
        peer,
        tls: true,
        kill,
        upstream: Default::default(),
    };
    let activity = Activity::new();
    if reject {
        return Accepted::Hyper(
            Box::new(fast_tls::Rewind::plain(stream.stream)),
            info,
            activity,
        );
    }
    match fast_tls::try_serve(stream, app, &info, &activity).await {
        fast_tls::Outcome::Served => Accepted::Done,
        fast_tls::Outcome::Stream(s) => Accepted::Stream(s),
        fast_tls::Outcome::Hyper(stream) => Accepted::Hyper(stream, info, activity),
    }
}

/// Serve HTTP on an established (plain or TLS) byte stream. The auto builder tells HTTP/2 from
/// HTTP/1.1 by the connection preface, so h2 over TLS (ALPN) and h2c prior knowledge both work.
#[allow(clippy::too_many_arguments)]
fn serve_http<I>(
    io: TokioIo<I>,
    info: ConnInfo,
    app: Arc<Service>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    reject: bool,
    activity: Arc<Activity>,
    held: (Permit, super::AddressSlot),
) -> impl Future<Output = ()> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let killed = info.kill.clone().cancelled_owned();
    let limits = app.connections.clone();
    let metrics = app.metrics.clone();
    let busy = activity.clone();
    let service = service_fn(move |req| {
        let app = app.clone();
        let info = info.clone();
        // Busy from the request's head to its response's last byte.
        let busy = busy.begin();
        // Boxed: hyper keeps each HTTP/2 stream's task (and HTTP/1's dispatcher keeps a slot)
        // the size of this future for as long as the response lasts, idle streams included;
        // boxed, the request and the routing state are freed once the response head is out.
        Box::pin(async move {
            let resp = if reject {
                over_capacity()
            } else {
                router::handle(app, req, info).await
            };
            let resp = resp.map(|body| BusyBody::new(body, busy).boxed_unsync());
            Ok::<_, std::convert::Infallible>(resp)
        })
    });
    // With upgrades: a pass-through `Upgrade` (WebSocket) becomes a tunnel (`proxy::tunnel`).
    let conn = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    Serving {
        conn: watcher.watch(conn),
        killed,
        expiry: async move {
            activity
                .expired(limits.header_timeout, limits.idle_timeout)
                .await
        },
        metrics,
        _held: held,
    }
}

pin_project_lite::pin_project! {
    /// hyper's connection raced against herald's kill switch and the connection's idle deadline.
    /// A struct rather than an async block: a block would hold hyper's connection twice (as what
    /// it captured and as what it polls), ~1 KB more for every connection for its whole life.
    struct Serving<C, K, E> {
        #[pin]
        conn: C,
        #[pin]
        killed: K,
        #[pin]
        expiry: E,
        metrics: Arc<crate::telemetry::Metrics>,
        // The connection's permit and its place in the per-address count, let go with it.
        _held: (Permit, super::AddressSlot),
    }
}

impl<C, R, K, E> Future for Serving<C, K, E>
where
    C: Future<Output = Result<(), R>>,
    R: std::fmt::Display,
    K: Future<Output = ()>,
    E: Future<Output = Idle>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = self.project();
        if let Poll::Ready(r) = me.conn.poll(cx) {
            if let Err(e) = r {
                debug!(error = %e, "connection ended with an error");
            }
            return Poll::Ready(());
        }
        if me.killed.poll(cx).is_ready() {
            debug!("connection closed by herald");
            return Poll::Ready(());
        }
        if let Poll::Ready(why) = me.expiry.poll(cx) {
            debug!(
                reason = why.reason(),
                "closing a connection that does nothing"
            );
            me.metrics.reject(why.reason());
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// The answer on a connection over `max_connections`.
fn over_capacity() -> Response<super::ResponseBody> {
    let mut resp = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "herald is at its connection limit; retry shortly",
    );
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
