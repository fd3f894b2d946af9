//! Bounds on a pass-through response body: `[proxy] timeout` for the whole exchange, and
//! `[proxy] send_timeout` for a client that takes nothing.
//!
//! A client that stops reading stops hyper from polling the body, so a timer inside the body
//! would never fire (that is how 20 unread 100 MB responses held their upstream connections far
//! past `timeout`). The bounds are kept by a small watchdog task instead. The body records when
//! it was last asked for a frame and whether it is waiting on the upstream; the watchdog aborts
//! the exchange when the deadline passes, or when the client has not asked for more for
//! `send_timeout` while the upstream had data to give. Aborting drops the upstream body, which
//! closes that upstream connection (a half-read response is never pooled), wakes the body so it
//! ends in an error, and on HTTP/1 closes the client's connection, which carries nothing else.
//!
//! "Asked for more" is measured where hyper takes frames: it asks once its write buffer (at most
//! `server.max_header_bytes`, 64 KiB by default, or the HTTP/2 stream's window) has room, so
//! a client that reads at all keeps asking well within any sensible `send_timeout`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::server::BoxError;

/// Why a body was cut short.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Aborted {
    #[error("pass-through exceeded [proxy] timeout")]
    Timeout,
    #[error("the client took no bytes for [proxy] send_timeout")]
    Stalled,
}

struct State {
    /// `None` once the body ended or the exchange was aborted.
    upstream: Option<Incoming>,
    aborted: Option<Aborted>,
    /// When the client (through hyper) last got a frame.
    last_taken: Instant,
    /// The last poll found the upstream with nothing to give: the wait is the upstream's.
    waiting_upstream: bool,
    waker: Option<Waker>,
}

/// A response body under the exchange's bounds.
pub struct Guarded {
    state: Arc<Mutex<State>>,
    /// Stops the watchdog when the body ends or is dropped.
    done: CancellationToken,
}

/// Wrap `upstream` so that it ends by `deadline` and after `send_timeout` without a taker;
/// `kill` closes the client's (HTTP/1) connection on abort.
pub fn guard(
    upstream: Incoming,
    deadline: Instant,
    send_timeout: Duration,
    kill: Option<CancellationToken>,
) -> Guarded {
    let state = Arc::new(Mutex::new(State {
        upstream: Some(upstream),
        aborted: None,
        last_taken: Instant::now(),
        waiting_upstream: false,
        waker: None,
    }));
    let done = CancellationToken::new();
    tokio::spawn(watch(
        state.clone(),
        done.clone(),
        deadline,
        send_timeout,
        kill,
    ));
    Guarded { state, done }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn watch(
    state: Arc<Mutex<State>>,
    done: CancellationToken,
    deadline: Instant,
    send_timeout: Duration,
    kill: Option<CancellationToken>,
) {
    loop {
        let next = {
            let s = lock(&state);
            if s.upstream.is_none() {
                return;
            }
            if s.waiting_upstream {
                deadline
            } else {
                deadline.min(s.last_taken + send_timeout)
            }
        };
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let mut s = lock(&state);
        if s.upstream.is_none() {
            return;
        }
        let now = Instant::now();
        let why = if now >= deadline {
            Aborted::Timeout
        } else if !s.waiting_upstream && now >= s.last_taken + send_timeout {
            Aborted::Stalled
        } else {
            continue;
        };
        debug!(reason = %why, "pass-through aborted; closing the upstream connection");
        // Dropping a half-read body closes its upstream connection.
        s.upstream = None;
        s.aborted = Some(why);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        drop(s);
        if let Some(kill) = kill {
            kill.cancel();
        }
        return;
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = lock(&self.state);
        let Some(upstream) = s.upstream.as_mut() else {
            return Poll::Ready(s.aborted.map(|why| Err(Box::new(why) as BoxError)));
        };
        match Pin::new(upstream).poll_frame(cx) {
            Poll::Pending => {
                s.waiting_upstream = true;
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Poll::Ready(frame) => {
                s.waiting_upstream = false;
                s.last_taken = Instant::now();
                if !matches!(frame, Some(Ok(_))) {
                    s.upstream = None;
                    drop(s);
                    self.done.cancel();
                }
                Poll::Ready(frame.map(|f| f.map_err(|e| Box::new(e) as BoxError)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.state);
        match &s.upstream {
            Some(b) => b.is_end_stream(),
            None => s.aborted.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &lock(&self.state).upstream {
            Some(b) => b.size_hint(),
            None => SizeHint::default(),
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.done.cancel();
    }
}
