//! What one topic's source has been doing, for the status page and metrics: its kind, reads and
//! changes (how often the resource really changes), current interval, push connection state and
//! pokes. Plain atomics, written by the source and read by anyone.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::telemetry::RouteMetrics;

use serde::Serialize;

/// The state of a push source's upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Connection {
    /// Not a push source.
    None,
    Connecting,
    Open,
    /// Dropped or refused: waiting to reconnect.
    Waiting,
}

/// Counters of one topic's source; reads, changes, pokes and open push connections also count
/// in its route's metrics.
#[derive(Debug)]
pub struct TopicStats {
    metrics: Arc<RouteMetrics>,
    kind: AtomicU8,
    reads: AtomicU64,
    changes: AtomicU64,
    interval_ms: AtomicU64,
    connection: AtomicU8,
    pokes: AtomicU64,
    reconnects: AtomicU64,
}

/// A copy of [`TopicStats`], as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StatsView {
    pub kind: &'static str,
    /// Polls made (or events received, for push sources).
    pub reads: u64,
    /// Reads that brought a different document.
    pub changes: u64,
    /// `changes / reads`: how often a read finds a change.
    pub changes_per_read: f64,
    /// The wait before the next poll, in ms (adaptive polling stretches it).
    pub interval_ms: u64,
    pub connection: Connection,
    pub reconnects: u64,
    pub pokes: u64,
}

const KINDS: [&str; 3] = ["poll", "sse", "ndjson"];

impl TopicStats {
    pub fn new(metrics: Arc<RouteMetrics>) -> TopicStats {
        TopicStats {
            metrics,
            kind: AtomicU8::new(0),
            reads: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            interval_ms: AtomicU64::new(0),
            connection: AtomicU8::new(0),
            pokes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    pub fn set_kind(&self, kind: crate::config::source::SourceKind) {
        let i = KINDS.iter().position(|k| *k == kind.name()).unwrap_or(0);
        self.kind.store(i as u8, Ordering::Relaxed);
    }

    pub fn read(&self, changed: bool) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.metrics.source_reads.inc();
        if changed {
            self.changes.fetch_add(1, Ordering::Relaxed);
            self.metrics.source_changes.inc();
        }
    }

    pub fn set_interval(&self, d: std::time::Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.interval_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_connection(&self, c: Connection) {
        let was = self.connection.swap(c as u8, Ordering::Relaxed);
        if c == Connection::Connecting && was != Connection::None as u8 {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let open = Connection::Open as u8;
        if was != open && c == Connection::Open {
            self.metrics.push_connections_open.inc();
        } else if was == open && c != Connection::Open {
            self.metrics.push_connections_open.dec();
        }
    }

    pub fn poked(&self) {
        self.pokes.fetch_add(1, Ordering::Relaxed);
        self.metrics.source_pokes.inc();
    }

    pub fn view(&self) -> StatsView {
        let reads = self.reads.load(Ordering::Relaxed);
        let changes = self.changes.load(Ordering::Relaxed);
        StatsView {
            kind: KINDS
                .get(usize::from(self.kind.load(Ordering::Relaxed)))
                .copied()
                .unwrap_or("poll"),
            reads,
            changes,
            changes_per_read: if reads == 0 {
                0.0
            } else {
                changes as f64 / reads as f64
            },
            interval_ms: self.interval_ms.load(Ordering::Relaxed),
            connection: match self.connection.load(Ordering::Relaxed) {
                1 => Connection::Connecting,
                2 => Connection::Open,
                3 => Connection::Waiting,
                _ => Connection::None,
            },
            reconnects: self.reconnects.load(Ordering::Relaxed),
            pokes: self.pokes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for TopicStats {
    fn drop(&mut self) {
        // A push source stopped without saying so still leaves the gauge right.
        self.set_connection(Connection::None);
    }
}
