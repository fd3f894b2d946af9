//! One accepted connection, in its own task: the TLS handshake when the listener has TLS (bounded
//! by a timeout, never in the accept loop), then HTTP/1.1 or HTTP/2 through the auto builder. Any
//! error ends this connection only and is logged here.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::tls::{self, Acceptor};
use super::{router, App, ConnInfo};

/// What a connection task needs from its listener.
pub(super) struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub tls: Option<Acceptor>,
    pub app: Arc<App>,
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    /// Registered in the accept loop, before shutdown can begin, so a connection still in its
    /// handshake when shutdown starts is drained like the others.
    pub watcher: Watcher,
    /// Fires when shutdown begins: a handshake in progress is abandoned.
    pub shutdown: CancellationToken,
    /// Held until the connection closes: counts against `max_connections`.
    pub permit: OwnedSemaphorePermit,
}

impl Conn {
    /// Run the connection to its end (the caller spawns this with the connection's span).
    pub(super) async fn run(self) {
        let Conn {
            stream,
            peer,
            tls,
            app,
            builder,
            watcher,
            shutdown,
            permit,
        } = self;
        match tls {
            None => {
                let info = ConnInfo { peer, tls: false };
                serve_http(TokioIo::new(stream), info, app, &builder, watcher).await;
            }
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                let stream = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(timeout = ?tls::HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                            return;
                        }
                    },
                };
                let alpn = stream
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                debug!(alpn = alpn.as_deref().unwrap_or("none"), "TLS established");
                let info = ConnInfo { peer, tls: true };
                serve_http(TokioIo::new(stream), info, app, &builder, watcher).await;
            }
        }
        drop(permit);
    }
}

/// Serve HTTP on an established (plain or TLS) byte stream. The auto builder tells HTTP/2 from
/// HTTP/1.1 by the connection preface, so h2 over TLS (ALPN) and h2c prior knowledge both work.
async fn serve_http<I>(
    io: TokioIo<I>,
    info: ConnInfo,
    app: Arc<App>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(router::handle(app, req, info).await) }
    });
    let conn = builder.serve_connection(io, service);
    if let Err(e) = watcher.watch(conn).await {
        debug!(error = %e, "connection ended with an error");
    }
}
