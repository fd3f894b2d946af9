//! Metric cells that many threads update at once: a counter and a histogram with one shard per
//! thread, so a fan-out's per-delivery updates never bounce a cache line between cores.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards of a per-delivery metric. Every worker thread bumps the delivery metrics for every
/// event it writes; on one shared atomic those adds bounce its cache line between cores (perf put
/// them at a few percent of a 5,000-watcher fan-out). A thread writes only its own shard; the
/// shards are summed when scraped.
const SHARDS: usize = 16;

/// This thread's shard: threads take indices in turn, so up to `SHARDS` threads never share one.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
    INDEX.with(|i| *i)
}

/// One cache line (two on CPUs that prefetch pairs) per shard.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Line<T>(T);

/// A counter with one shard per thread (see `SHARDS`), exported as a Prometheus counter.
#[derive(Clone, Debug, Default)]
pub struct ShardedCounter {
    shards: Arc<[Line<AtomicU64>; SHARDS]>,
}

impl ShardedCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.shards[shard_index()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|l| l.0.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Bounds a histogram can have: its buckets (+Inf included), count and sum fill one shard's line.
const MAX_BOUNDS: usize = 13;

/// A histogram whose `observe` is three relaxed atomic adds on this thread's own shard
/// (prometheus-client's own takes a mutex, which every watcher of a busy topic would contend
/// on). The sum is kept in nanoseconds.
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    inner: Arc<HistInner>,
}

#[derive(Debug)]
struct HistInner {
    bounds: &'static [f64],
    /// Per shard: one counter per bound, the +Inf bucket (not cumulative: the encoder
    /// accumulates), then the count and the sum.
    shards: [Line<[AtomicU64; MAX_BOUNDS + 3]>; SHARDS],
}

const COUNT: usize = MAX_BOUNDS + 1;
const SUM: usize = MAX_BOUNDS + 2;

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            inner: Arc::new(HistInner {
                bounds: &bounds[..bounds.len().min(MAX_BOUNDS)],
                shards: Default::default(),
            }),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let bounds = self.inner.bounds;
        let i = bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(bounds.len());
        let cells = &self.inner.shards[shard_index()].0;
        cells[i].fetch_add(1, Ordering::Relaxed);
        cells[COUNT].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        cells[SUM].fetch_add(nanos, Ordering::Relaxed);
    }

    /// Sum of cell `i` over the shards.
    fn total(&self, i: usize) -> u64 {
        self.inner
            .shards
            .iter()
            .map(|l| l.0[i].load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    pub fn count(&self) -> u64 {
        self.total(COUNT)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .enumerate()
            .map(|(i, bound)| (bound, self.total(i)))
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.total(SUM) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upper bounds used by the test histogram.
    const DELIVERY_BUCKETS: &[f64] = &[
        0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
    ];

    /// Adds from many threads land in different shards and all of them are counted.
    #[test]
    fn sharded_metrics_sum_every_thread() {
        let c = ShardedCounter::default();
        let h = AtomicHistogram::new(DELIVERY_BUCKETS);
        std::thread::scope(|s| {
            for t in 0..20u64 {
                let (c, h) = (c.clone(), h.clone());
                s.spawn(move || {
                    for _ in 0..1000 {
                        c.inc_by(t + 1);
                        h.observe(Duration::from_millis(t));
                    }
                });
            }
        });
        assert_eq!(c.get(), (1..=20).sum::<u64>() * 1000);
        assert_eq!(h.count(), 20_000);
        let sum_ms: u64 = (0..20).sum::<u64>() * 1000;
        assert_eq!(h.total(SUM), sum_ms * 1_000_000);
        // Every observation is in exactly one bucket.
        assert_eq!(
            (0..=DELIVERY_BUCKETS.len())
                .map(|i| h.total(i))
                .sum::<u64>(),
            20_000
        );
    }
}
