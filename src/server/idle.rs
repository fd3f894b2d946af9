//! Connections that do nothing are closed: one that sends no complete request within
//! `header_timeout` of being accepted (a silent socket, a half-sent head, a TLS client that never
//! speaks), and one with no request or response in progress for `idle_timeout` (HTTP/1.1
//! keep-alive and HTTP/2 alike). A connection carrying a stream is never idle.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::BoxError;

/// What a connection is doing, as its watchdog sees it.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Requests being answered plus response bodies still being sent.
    active: AtomicUsize,
    /// Requests seen so far (0: still waiting for the first).
    requests: AtomicUsize,
    /// When `active` last fell to zero, in milliseconds since `start`.
    idle_since_ms: AtomicU64,
}

/// Why a connection was closed for doing nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// No complete request head within `header_timeout`.
    NoRequest,
    /// Nothing in progress for `idle_timeout`.
    Idle,
}

impl Idle {
    pub fn reason(self) -> &'static str {
        match self {
            Idle::NoRequest => "header-timeout",
            Idle::Idle => "idle-timeout",
        }
    }
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            active: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// When the first request must have arrived.
    pub fn first_request_due(&self, header_timeout: Duration) -> Instant {
        self.start + header_timeout
    }

    /// A request arrived: the connection is busy until the guard (and every clone of it) drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Resolves when the connection has done nothing for too long, and says which limit it hit.
    /// One timer, re-armed only when its deadline passes and activity pushed it further.
    pub async fn expired(&self, header_timeout: Duration, idle_timeout: Duration) -> Idle {
        loop {
            let deadline = if self.requests.load(Ordering::Relaxed) == 0 {
                Some((self.start + header_timeout, Idle::NoRequest))
            } else if self.active.load(Ordering::Acquire) == 0 {
                let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
                Some((self.start + since + idle_timeout, Idle::Idle))
            } else {
                None
            };
            match deadline {
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => tokio::time::sleep_until(at).await,
                // Busy: look again after a while (a stream may be open for hours; this wakes
                // once per idle_timeout, not per event).
                None => tokio::time::sleep(idle_timeout.max(Duration::from_millis(100))).await,
            }
        }
    }
}

/// The connection is busy while this lives.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.now_ms(), Ordering::Relaxed);
        a.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection busy until it is sent or dropped.
pub struct BusyBody<B> {
    body: B,
    _busy: Busy,
}

impl<B> BusyBody<B> {
    pub fn new(body: B, busy: Busy) -> BusyBody<B> {
        BusyBody { body, _busy: busy }
    }
}

impl<B> Body for BusyBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silent_then_idle_then_busy() {
        let a = Activity::new();
        let hs = Duration::from_secs(2);
        let idle = Duration::from_secs(5);
        // No request at all: the header timeout.
        let t0 = Instant::now();
        assert_eq!(a.expired(hs, idle).await, Idle::NoRequest);
        assert_eq!(t0.elapsed(), hs);

        // A request, answered: idle from when it ended.
        let a = Activity::new();
        let busy = a.begin();
        tokio::time::advance(Duration::from_secs(30)).await;
        drop(busy);
        let t1 = Instant::now();
        assert_eq!(a.expired(hs, idle).await, Idle::Idle);
        assert_eq!(t1.elapsed(), idle);

        // Busy for as long as the guard lives (a stream): never idle meanwhile.
        let a = Activity::new();
        let busy = a.begin();
        let watch = tokio::spawn({
            let a = a.clone();
            async move { a.expired(hs, idle).await }
        });
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!watch.is_finished());
        drop(busy);
        tokio::time::advance(idle + Duration::from_secs(1)).await;
        assert_eq!(watch.await.unwrap(), Idle::Idle);
    }
}
