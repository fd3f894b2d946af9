//! A topic's replay buffer: the most recent events, bounded by count and by encoded bytes. It is
//! also the fan-out queue: every watcher reads from it at its own cursor, so a watcher that falls
//! out of it is exactly a watcher that must be resynced with a snapshot.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Event;

#[derive(Debug)]
pub struct History {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
}

impl History {
    pub fn new(max_events: usize, max_bytes: usize) -> History {
        History {
            events: VecDeque::new(),
            bytes: 0,
            max_events,
            max_bytes,
        }
    }

    /// Append an event (its seq must follow the last one), evicting the oldest beyond the limits.
    /// The newest event is always kept, even when alone it exceeds the byte limit, so that live
    /// watchers can still receive it; replay then falls back to a snapshot.
    pub fn push(&mut self, event: Arc<Event>) {
        debug_assert!(self
            .events
            .back()
            .is_none_or(|last| last.position.seq + 1 == event.position.seq));
        self.bytes += event.weight();
        self.events.push_back(event);
        while self.events.len() > self.max_events.max(1)
            || (self.bytes > self.max_bytes && self.events.len() > 1)
        {
            if let Some(old) = self.events.pop_front() {
                self.bytes -= old.weight();
            }
        }
    }

    /// Events after `seq`, oldest first, or `None` when some of them were already evicted.
    pub fn after(&self, seq: u64) -> Option<impl Iterator<Item = &Arc<Event>>> {
        let first = self.events.front()?.position.seq;
        if seq + 1 < first {
            return None;
        }
        let skip = usize::try_from(seq + 1 - first).ok()?;
        Some(self.events.iter().skip(skip))
    }

    /// Whether `after(seq)` can be answered from what is kept (including "nothing missed").
    pub fn covers(&self, seq: u64, head: u64) -> bool {
        seq == head
            || self
                .events
                .front()
                .is_some_and(|f| f.position.seq <= seq + 1)
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Event, EventKind, Position};

    fn ev(seq: u64, size: usize) -> Arc<Event> {
        Arc::new(Event::new(
            Position::new(1, seq),
            EventKind::Patch,
            &vec![b'x'; size],
            std::time::Instant::now(),
        ))
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let mut h = History::new(3, 1000);
        for s in 1..=5 {
            h.push(ev(s, 10));
        }
        assert_eq!(h.len(), 3);
        assert!(h.after(1).is_none());
        assert_eq!(
            h.after(2)
                .unwrap()
                .map(|e| e.position.seq)
                .collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(h.after(5).unwrap().count(), 0);

        let mut h = History::new(100, 250);
        for s in 1..=10 {
            h.push(ev(s, 100));
        }
        assert!(h.bytes() <= 250 + 2 * 150, "{}", h.bytes());
        assert!(h.len() <= 2);
        // A single event larger than the byte budget is still kept for live readers.
        h.push(ev(11, 10_000));
        assert_eq!(h.len(), 1);
        assert!(h.covers(10, 11));
        assert!(!h.covers(9, 11));
    }
}
