//! Bounds on a pass-through response body: `[proxy] timeout` for the whole exchange, and
//! `[proxy] send_timeout` for a client that takes nothing.
//!
//! A client that stops reading stops hyper from polling the body, so a timer inside the body
//! would never fire (that is how 20 unread 100 MB responses held their upstream connections far
//! past `timeout`). The bounds are kept by a small watchdog task instead. The body notes when the
//! client (through hyper) last took a frame, and whether hyper is waiting for the upstream. While
//! hyper waits, the watchdog looks at the upstream itself every `send_timeout`. Data waiting
//! there that hyper does not take means the client is stalled, not the upstream: hyper may have
//! been woken for that data and gone back to flushing to a client that does not read. If such
//! data sits for `send_timeout`, the exchange is aborted. The client is cut within one to two
//! `send_timeout`s of its last read. The deadline aborts the exchange in any case.
//!
//! Aborting drops the upstream body, which closes that upstream connection (a half-read
//! response is never pooled). It wakes the body so that it ends in an error, and on HTTP/1 it
//! closes the client's connection, which carries nothing else.
//!
//! "Took a frame" is measured where hyper takes frames. Hyper asks whenever its write buffer
//! (`server.max_header_bytes`, 64 KiB by default) or the HTTP/2 stream's window has room, so a
//! client that reads at all keeps asking well within any sensible `send_timeout`.

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

/// A frame the watchdog found waiting at the upstream, kept for hyper's next poll (`None`: the
/// body's end).
type Stashed = Option<Result<Frame<Bytes>, hyper::Error>>;

struct State {
    /// `None` once the body ended or the exchange was aborted.
    upstream: Option<Incoming>,
    stash: Option<Stashed>,
    aborted: Option<Aborted>,
    /// Start of the current wait: when the client last took a frame, when data was found waiting
    /// for it, or when the watchdog last found the upstream with nothing to give.
    since: Instant,
    /// Hyper's last poll found the upstream with nothing to give.
    waiting_upstream: bool,
    /// Hyper's waker from that poll: woken on abort, and when the watchdog finds data.
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
        stash: None,
        aborted: None,
        since: Instant::now(),
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
            if s.upstream.is_none() && s.stash.is_none() {
                return;
            }
            deadline.min(s.since + send_timeout)
        };
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let mut s = lock(&state);
        if s.upstream.is_none() && s.stash.is_none() {
            return;
        }
        let now = Instant::now();
        let why = if now >= deadline {
            Aborted::Timeout
        } else if now < s.since + send_timeout {
            continue;
        } else if s.waiting_upstream {
            look_upstream(&mut s, now);
            continue;
        } else {
            Aborted::Stalled
        };
        debug!(reason = %why, "pass-through aborted; closing the upstream connection");
        // Dropping a half-read body closes its upstream connection.
        s.upstream = None;
        s.stash = None;
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

/// Hyper last found the upstream with nothing to give: see whether that is still so. Data found
/// is kept for hyper (woken to take it), and from now on the wait is the client's.
fn look_upstream(s: &mut State, now: Instant) {
    s.since = now;
    let Some(waker) = s.waker.clone() else {
        return;
    };
    let Some(upstream) = s.upstream.as_mut() else {
        return;
    };
    // Hyper's own waker: if the upstream is still empty, hyper is woken when data comes, as
    // before this look.
    let mut cx = Context::from_waker(&waker);
    if let Poll::Ready(frame) = Pin::new(upstream).poll_frame(&mut cx) {
        s.stash = Some(frame);
        s.waiting_upstream = false;
        waker.wake();
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
        let polled = match s.stash.take() {
            Some(frame) => Poll::Ready(frame),
            None => match s.upstream.as_mut() {
                Some(upstream) => Pin::new(upstream).poll_frame(cx),
                None => {
                    return Poll::Ready(s.aborted.map(|why| Err(Box::new(why) as BoxError)));
                }
            },
        };
        match polled {
            Poll::Pending => {
                s.waiting_upstream = true;
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Poll::Ready(frame) => {
                s.waiting_upstream = false;
                s.since = Instant::now();
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
        match (&s.stash, &s.upstream) {
            (Some(_), _) => false,
            (None, Some(b)) => b.is_end_stream(),
            (None, None) => s.aborted.is_none(),
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
