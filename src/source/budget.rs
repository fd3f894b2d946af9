//! The upstream's budget (`[polling] max_concurrent`, `max_rate`), shared by every topic: a cap
//! on requests in flight and a rate limit. Both queues are first come, first served (tokio's
//! semaphore is fair; rate slots are handed out in order), so no topic starves, and a poll that
//! has to wait is counted rather than piling more load on the upstream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::source::Polling;

/// Requests herald may start against the upstream, all topics together.
#[derive(Debug)]
pub struct Budget {
    /// None: no cap on requests in flight.
    concurrent: Option<Arc<Semaphore>>,
    /// Time between two request starts (None: no rate limit), and the next free slot.
    period: Option<Duration>,
    next_slot: Mutex<Option<Instant>>,
    /// Requests that had to wait for a permit or a slot (exported as a metric).
    waits: prometheus_client::metrics::counter::Counter,
    /// Requests started.
    granted: AtomicU64,
}

/// The right to one upstream request in flight; dropping it frees the place.
#[derive(Debug)]
pub struct Permit {
    _place: Option<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(polling: &Polling, waits: prometheus_client::metrics::counter::Counter) -> Budget {
        Budget {
            concurrent: (polling.max_concurrent > 0)
                .then(|| Arc::new(Semaphore::new(polling.max_concurrent))),
            period: (polling.max_rate > 0.0)
                .then(|| Duration::from_secs_f64(1.0 / polling.max_rate)),
            next_slot: Mutex::new(None),
            waits,
            granted: AtomicU64::new(0),
        }
    }

    /// No cap and no rate limit.
    pub fn unlimited() -> Budget {
        Budget::new(
            &Polling {
                max_concurrent: 0,
                max_rate: 0.0,
            },
            Default::default(),
        )
    }

    /// Wait for a place in flight, then for a rate slot (in that order: a request that holds a
    /// slot never waits again, so starts stay spaced).
    pub async fn acquire(&self) -> Permit {
        let mut waited = false;
        let place = match &self.concurrent {
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    waited = true;
                    // The semaphore is never closed.
                    sem.clone().acquire_owned().await.ok()
                }
            },
            None => None,
        };
        if let Some(period) = self.period {
            let now = Instant::now();
            let slot = {
                let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
                let slot = next.map_or(now, |n| n.max(now));
                *next = Some(slot + period);
                slot
            };
            if slot > now {
                waited = true;
                tokio::time::sleep_until(slot).await;
            }
        }
        if waited {
            self.waits.inc();
        }
        self.granted.fetch_add(1, Ordering::Relaxed);
        Permit { _place: place }
    }

    /// Requests that waited for the budget, and requests granted, since start.
    pub fn counts(&self) -> (u64, u64) {
        (self.waits.get(), self.granted.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_slots_are_spaced_and_in_order() {
        let b = Arc::new(Budget::new(
            &Polling {
                max_concurrent: 2,
                max_rate: 10.0,
            },
            Default::default(),
        ));
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..5 {
            let _p = b.acquire().await;
            starts.push(Instant::now() - t0);
        }
        for w in starts.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(99), "{starts:?}");
        }
        let (waits, granted) = b.counts();
        assert_eq!(granted, 5);
        assert_eq!(waits, 4);
    }
}
