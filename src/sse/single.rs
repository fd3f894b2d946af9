//! The events of one topic for one stream: whatever the topic has past this watcher's cursor
//! (replay, snapshot, live events), counted in the route's metrics as they go out.

use crate::hub::{Cursor, Delivery, Event, StopReason, Subscription};

use super::lifecycle::{Events, Item};

pub struct TopicEvents {
    sub: Subscription,
    cursor: Cursor,
}

impl TopicEvents {
    /// The stream of `sub` from `cursor` (`Cursor::Fresh`: a snapshot first).
    pub fn new(sub: Subscription, cursor: Cursor) -> TopicEvents {
        TopicEvents { sub, cursor }
    }

    pub fn subscription(&self) -> &Subscription {
        &self.sub
    }
}

/// Count `events` in a route's metrics: each one's SSE size and, unless it is the stream's first
/// snapshot or replay (`fresh`), its age.
pub(super) fn count(metrics: &crate::telemetry::RouteMetrics, events: &Delivery, fresh: bool) {
    let one = |ev: &Event| {
        let age = (!fresh).then(|| ev.made.elapsed());
        metrics.event_sent(ev.text().len(), age);
    };
    match events {
        Delivery::Nothing => {}
        Delivery::One(ev) => one(ev),
        Delivery::Many(evs) => evs.iter().for_each(|ev| one(ev)),
    }
}

impl Events for TopicEvents {
    fn next(&mut self) -> Option<Item> {
        if let Some(status) = self.sub.topic.channel.refused() {
            // Access ended: the stream's stop (which wakes it) sends the error and ends it.
            self.sub.slot.stop(StopReason::for_refusal(status));
            return None;
        }
        let fresh = self.cursor == Cursor::Fresh;
        match self.sub.topic.channel.next(&mut self.cursor) {
            Delivery::Nothing => None,
            events => {
                count(self.sub.topic.metrics(), &events, fresh);
                Some(Item::Events(events))
            }
        }
    }

    fn topic(&self) -> Option<&str> {
        Some(&self.sub.topic.key.resource)
    }
}
