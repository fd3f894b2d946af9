//! What one topic's source has been doing, for the status page and metrics: its kind, reads and
//! changes (how often the resource really changes), current interval, push connection state and
//! pokes. Plain atomics, written by the source and read by anyone.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

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

/// Counters of one topic's source.
#[derive(Debug, Default)]
pub struct TopicStats {
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
    pub fn set_kind(&self, kind: crate::config::source::SourceKind) {
        let i = KINDS.iter().position(|k| *k == kind.name()).unwrap_or(0);
        self.kind.store(i as u8, Ordering::Relaxed);
    }

    pub fn read(&self, changed: bool) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if changed {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn set_interval(&self, d: std::time::Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.interval_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_connection(&self, c: Connection) {
        if c == Connection::Connecting && self.connection.load(Ordering::Relaxed) != 0 {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.connection.store(c as u8, Ordering::Relaxed);
    }

    pub fn poked(&self) {
        self.pokes.fetch_add(1, Ordering::Relaxed);
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
