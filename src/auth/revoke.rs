//! Revocation: the open streams that must be re-checked (`reauth`) or cut at a deadline (JWT
//! `exp`), in one min-heap of due times served by one task (`Auth::run`), not a timer per stream.
//! Entries hold their watcher weakly: a stream that ends simply drops out at its next due time.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::hub::WatchSlot;

/// One stream under watch.
pub(crate) struct Watch {
    pub slot: Weak<WatchSlot>,
    /// When its token stops being valid.
    pub expires: Option<Instant>,
    /// When to tell the stream its token expires soon (`auth-expiring`); once.
    pub notice: Option<Instant>,
    pub noticed: std::sync::atomic::AtomicBool,
    /// The expiry this entry was made for (Unix ms, 0: none): a later one on the slot means a
    /// refresh replaced this entry.
    pub valid_until_ms: u64,
    pub recheck: Option<Recheck>,
}

/// How to ask again whether the stream's credentials may still see its topic.
pub(crate) struct Recheck {
    pub url: reqwest::Url,
    pub cred: u64,
    pub headers: HeaderMap,
    pub every: Duration,
    pub cache: Duration,
    pub timeout: Duration,
}

impl Watch {
    /// The next time something must happen to this stream after `now`.
    pub(crate) fn next_due(&self, now: Instant) -> Option<Instant> {
        let recheck = self.recheck.as_ref().map(|r| now + r.every);
        let notice = self
            .notice
            .filter(|_| !self.noticed.load(Ordering::Relaxed));
        [recheck, notice, self.expires].into_iter().flatten().min()
    }
}

struct Due {
    at: Instant,
    /// Ties broken by insertion order.
    seq: u64,
    watch: Arc<Watch>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest due time must come out first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    heap: Mutex<BinaryHeap<Due>>,
    /// Wakes the sweep when an entry is due earlier than what it sleeps for.
    pub(crate) changed: Notify,
    seq: AtomicU64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Due>> {
        self.heap.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn schedule(&self, watch: Arc<Watch>, at: Instant) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut heap = self.lock();
        let earlier = heap.peek().is_none_or(|d| at < d.at);
        heap.push(Due { at, seq, watch });
        drop(heap);
        if earlier {
            self.changed.notify_one();
        }
    }

    /// When the earliest entry is due.
    pub(crate) fn next_at(&self) -> Option<Instant> {
        self.lock().peek().map(|d| d.at)
    }

    /// Every entry due at or before `now`.
    pub(crate) fn take_due(&self, now: Instant) -> Vec<Arc<Watch>> {
        let mut heap = self.lock();
        let mut out = Vec::new();
        while heap.peek().is_some_and(|d| d.at <= now) {
            if let Some(d) = heap.pop() {
                out.push(d.watch);
            }
        }
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
