//! `Upgrade` over HTTP/1.1 (WebSocket, and any protocol but `h2c`): the request goes to the
//! upstream on a connection of its own with `Connection: upgrade` and its `Upgrade` header; on
//! the upstream's `101` both connections are handed over (`hyper::upgrade::on`; the downstream
//! connection is served `with_upgrades`) and bytes are copied both ways until either side closes,
//! nothing moves for `[proxy] tunnel_idle_timeout`, or herald closes the connection (drain
//! deadline). Any other answer is passed back as an ordinary response.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

use super::pass::{classify, PassStats};
use super::{rewrite, ConnInfo, ResponseBody};
use crate::server::Service;

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` and `Upgrade`), if
/// herald tunnels it. `h2c` is a hop-by-hop upgrade of herald's own connection, never tunneled.
pub(super) fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = req.headers().get(header::UPGRADE)?;
    let h2c = protocol.to_str().map_or(true, |p| {
        p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c"))
    });
    (wants && !h2c).then(|| protocol.clone())
}

/// Send the upgrade request `req` (absolute URI, hop-by-hop headers already removed) and, on
/// `101`, start the tunnel.
pub(super) async fn open(
    app: &Service,
    mut req: Request<Incoming>,
    protocol: HeaderValue,
    client: OnUpgrade,
    public: &rewrite::Public,
    conn: &ConnInfo,
    deadline: Instant,
) -> Response<ResponseBody> {
    let pass = &app.pass;
    super::for_raw_connection(pass, &mut req);
    let h = req.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, protocol);
    let exchange = async {
        let mut sender = pass.connect_h1(true).await?;
        sender.ready().await.map_err(|e| classify(&e))?;
        sender.send_request(req).await.map_err(|e| classify(&e))
    };
    let mut resp = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return super::upstream_error(e),
        Err(_) => return super::timed_out(),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return super::respond(app, resp, public, conn, deadline, Version::HTTP_11);
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let accepted = parts.headers.get(header::UPGRADE).cloned();
    super::strip_hop_by_hop(&mut parts.headers);
    super::finish_headers(app, &mut parts.headers, parts.version, public);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = accepted {
        parts.headers.insert(header::UPGRADE, p);
    }
    let stats = pass.stats().clone();
    let idle = app.proxy.tunnel_idle_timeout;
    let kill = conn.kill.clone();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let _open = OpenTunnel::new(stats);
        tokio::select! {
            r = run(TokioIo::new(client), TokioIo::new(upstream), idle) => match r {
                Ok(why) => debug!(%why, "tunnel closed"),
                Err(e) => debug!(error = %e, "tunnel failed"),
            },
            _ = kill.cancelled() => debug!("tunnel closed by herald"),
        }
    });
    let body = Empty::new()
        .map_err(|e| -> crate::server::BoxError { match e {} })
        .boxed_unsync();
    let mut out = Response::from_parts(parts, body);
    *out.version_mut() = Version::HTTP_11;
    out
}

/// The tunnel counters, bumped for as long as one tunnel lives.
struct OpenTunnel(Arc<PassStats>);

impl OpenTunnel {
    fn new(stats: Arc<PassStats>) -> OpenTunnel {
        stats.tunnels_opened.inc();
        stats.tunnels_open.inc();
        OpenTunnel(stats)
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.tunnels_open.dec();
    }
}

/// Copy both ways until a side closes (`"closed"`) or nothing moves for `idle` (`"idle"`).
async fn run<A, B>(mut a: A, mut b: B, idle: Duration) -> io::Result<&'static str>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Active {
        inner: &mut a,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let quiet_since = start + Duration::from_millis(last.load(Ordering::Relaxed));
        tokio::select! {
            r = &mut copy => return r.map(|_| "closed"),
            _ = tokio::time::sleep_until(quiet_since + idle) => {
                let now_quiet = start + Duration::from_millis(last.load(Ordering::Relaxed));
                if now_quiet == quiet_since {
                    return Ok("idle");
                }
            }
        }
    }
}

/// The client's side of a tunnel, noting when bytes last moved either way (every byte of the
/// tunnel is read or written on this side).
struct Active<'a, T> {
    inner: &'a mut T,
    start: Instant,
    /// Milliseconds after `start` of the last byte moved.
    last: Arc<AtomicU64>,
}

impl<T> Active<'_, T> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests() {
        let req = |version: Version, conn: &str, upgrade: Option<&str>| {
            let mut b = Request::builder()
                .version(version)
                .header("connection", conn);
            if let Some(u) = upgrade {
                b = b.header("upgrade", u);
            }
            b.body(()).unwrap()
        };
        assert!(requested(&req(Version::HTTP_11, "Upgrade", Some("websocket"))).is_some());
        assert!(requested(&req(Version::HTTP_11, "keep-alive, upgrade", Some("x"))).is_some());
        assert!(requested(&req(Version::HTTP_11, "keep-alive", Some("websocket"))).is_none());
        assert!(requested(&req(Version::HTTP_11, "upgrade", None)).is_none());
        assert!(requested(&req(Version::HTTP_11, "upgrade", Some("h2c"))).is_none());
        assert!(requested(&req(Version::HTTP_2, "upgrade", Some("websocket"))).is_none());
    }

    #[test]
    fn tunnel_counters() {
        let metrics = crate::telemetry::Metrics::new();
        let stats = Arc::new(PassStats::of(&metrics));
        let open = OpenTunnel::new(stats.clone());
        let _second = OpenTunnel::new(stats.clone());
        assert_eq!(
            (stats.tunnels_opened.get(), stats.tunnels_open.get()),
            (2, 2)
        );
        drop(open);
        assert_eq!(
            (stats.tunnels_opened.get(), stats.tunnels_open.get()),
            (2, 1)
        );
        let text = metrics.encode();
        assert!(
            text.contains("herald_proxy_tunnels_opened_total 2"),
            "{text}"
        );
        assert!(text.contains("herald_proxy_tunnels_open 1"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnels_close() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let r = run(a, b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r, "idle");
    }
}
