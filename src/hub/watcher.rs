//! A watcher as its topics see it: a slot to wake it, the reason it must stop, its bookkeeping
//! for the slow-consumer sweep, and its cursor in a topic's events.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Position;

/// A watcher's registration in one or more topics: how to wake it, why it must stop, and what the
/// slow-consumer sweep needs to know about it.
#[derive(Debug, Default)]
pub struct WatchSlot {
    waker: AtomicWaker,
    /// 0 while healthy; otherwise a `StopReason` set by the hub.
    stop: AtomicU8,
    /// When (on `clock_ms`) a publish woke this watcher and it has not drained since; 0 when it
    /// has taken everything. The stream clears it each time it is polled, so a client that reads,
    /// however slowly, keeps clearing it; one whose socket stays full never does.
    pending_since: AtomicU64,
    /// Closes the client's connection. For HTTP/1 a stream whose socket is full is not polled at
    /// all, so it cannot end itself; the sweep uses this to drop the connection instead.
    kill: Option<CancellationToken>,
    /// When the stream's credential stops being valid, in Unix milliseconds (0: never). A
    /// refresh pushes it later; a deadline scheduled for an earlier value is then ignored.
    valid_until_ms: AtomicU64,
    /// An expiry the stream has yet to announce (`auth-expiring`), in Unix milliseconds.
    expiring_ms: AtomicU64,
}

/// Why the hub asks a watcher to end its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    SlowConsumer = 1,
    /// A config reload removed or changed the stream's route (`Hub::retire_route`).
    Reconfigured = 2,
    /// Access ended with a 401: the upstream refused the topic's credentials, a `reauth` check
    /// said 401 (`auth`). The stream ends with `event: error` naming the status.
    Unauthorized = 10,
    /// Access ended with a 403 (upstream poll or `reauth` check).
    Forbidden = 11,
    /// The client's token (JWT `exp`) expired.
    Expired = 12,
}

impl StopReason {
    fn from_u8(n: u8) -> Option<StopReason> {
        Some(match n {
            1 => StopReason::SlowConsumer,
            2 => StopReason::Reconfigured,
            10 => StopReason::Unauthorized,
            11 => StopReason::Forbidden,
            12 => StopReason::Expired,
            _ => return None,
        })
    }

    /// Why a stream ended, for its closing log line and metrics.
    pub fn label(self) -> &'static str {
        match self {
            StopReason::SlowConsumer => "slow-consumer",
            StopReason::Reconfigured => "route-reconfigured",
            StopReason::Unauthorized => "unauthorized",
            StopReason::Forbidden => "forbidden",
            StopReason::Expired => "token-expired",
        }
    }

    /// The stop a refusal with `status` means for every watcher of a per-credential topic.
    pub fn for_refusal(status: u16) -> StopReason {
        if status == 403 {
            StopReason::Forbidden
        } else {
            StopReason::Unauthorized
        }
    }
}

impl StopReason {
    /// For a stop that ends access: the `error` code and HTTP status of the final event.
    pub fn access_error(self) -> Option<(&'static str, u16)> {
        match self {
            StopReason::Unauthorized | StopReason::Expired => Some(("unauthorized", 401)),
            StopReason::Forbidden => Some(("forbidden", 403)),
            _ => None,
        }
    }
}

impl WatchSlot {
    /// A slot whose connection the hub may close (HTTP/1 streams: one stream per connection).
    pub fn with_kill(kill: CancellationToken) -> WatchSlot {
        WatchSlot {
            kill: Some(kill),
            ..WatchSlot::default()
        }
    }

    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Wake for new events, noting when the watcher first had something pending.
    pub(super) fn notify(&self, now_ms: u64) {
        let _ =
            self.pending_since
                .compare_exchange(0, now_ms, Ordering::Relaxed, Ordering::Relaxed);
        self.waker.wake();
    }

    /// Called by the stream each time it is polled, before it looks for events.
    pub fn polled(&self) {
        self.pending_since.store(0, Ordering::Relaxed);
    }

    pub fn stop(&self, reason: StopReason) {
        self.stop.store(reason as u8, Ordering::Release);
        self.wake();
    }

    /// The credential is valid until `unix_ms` (a later time extends it).
    pub fn set_valid_until(&self, unix_ms: u64) {
        self.valid_until_ms.store(unix_ms, Ordering::Release);
    }

    /// When the credential stops being valid (Unix ms, 0: never).
    pub fn valid_until(&self) -> u64 {
        self.valid_until_ms.load(Ordering::Acquire)
    }

    /// Ask the stream to announce that its credential expires at `unix_ms`.
    pub fn announce_expiry(&self, unix_ms: u64) {
        self.expiring_ms.store(unix_ms, Ordering::Release);
        self.wake();
    }

    /// The expiry to announce, once.
    pub fn take_expiry_notice(&self) -> Option<u64> {
        match self.expiring_ms.swap(0, Ordering::AcqRel) {
            0 => None,
            ms => Some(ms),
        }
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        StopReason::from_u8(self.stop.load(Ordering::Acquire))
    }

    /// Slow-consumer check, run by the hub's sweep: a watcher with events pending for longer than
    /// `timeout` is asked to stop (it sends a final `error` event if it can still write); one
    /// still stuck `grace` later has its connection closed. Returns true when first marked slow.
    pub(super) fn check_slow(&self, now_ms: u64, timeout: Duration, grace: Duration) -> bool {
        let since = self.pending_since.load(Ordering::Relaxed);
        if since == 0 {
            return false;
        }
        let waited = Duration::from_millis(now_ms.saturating_sub(since));
        if waited < timeout {
            return false;
        }
        let first = self.stop_reason().is_none();
        if first {
            self.stop(StopReason::SlowConsumer);
        }
        if waited >= timeout + grace {
            if let Some(kill) = &self.kill {
                kill.cancel();
            }
        }
        first
    }
}

/// Milliseconds since the first call, never 0: a cheap shared clock for slot bookkeeping.
pub fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Where a watcher stands in a topic's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Has nothing yet: the next delivery is a snapshot.
    Fresh,
    /// Has every event up to and including this position.
    At(Position),
}
