//! A topic's local side on this node: its recent events (the history ring every watcher reads at
//! its own cursor), the current document for new watchers, and the watchers to wake. Fed by the
//! broker, read under a short lock; a slow watcher is never waited on.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant as StdInstant, SystemTime};

use tokio::time::Instant;

use super::history::History;
use super::{
    envelope, Cursor, Delivery, Doc, Event, EventKind, Position, TopicInfo, TopicSettings,
    WatchSlot,
};
use crate::routes::TopicKey;

/// An event as the writer made it, before the broker gives it its position.
#[derive(Debug)]
pub struct Draft {
    pub kind: EventKind,
    /// The JSON envelope (`hub::envelope`).
    pub envelope: Vec<u8>,
    /// The document after this event (snapshots and patches), for the channel's new watchers.
    pub doc: Option<Arc<Doc>>,
    /// When the document last changed (what a snapshot's timestamp says).
    pub changed_at: SystemTime,
    pub made: StdInstant,
}

pub struct Channel {
    pub key: TopicKey,
    settings: Arc<TopicSettings>,
    state: Mutex<State>,
}

/// The document new watchers are shown, and where it stands.
struct Current {
    doc: Arc<Doc>,
    /// The seq of the event that made it current.
    seq: u64,
    changed_at: SystemTime,
    /// Its snapshot event, made on first request (or the event itself when it was a snapshot).
    snapshot: Option<Arc<Event>>,
}

struct State {
    /// The history's epoch (0 until the broker names it).
    epoch: u32,
    /// Seq of the newest event (0: none yet).
    head: u64,
    current: Option<Current>,
    /// The `upstream-error` event while the upstream is failing.
    failing: Option<Arc<Event>>,
    history: History,
    watchers: Vec<Arc<WatchSlot>>,
    /// When the last watcher left (None while watched).
    idle_since: Option<Instant>,
    /// Removed from the hub: no new watchers may join.
    closed: bool,
    /// The upstream refused the topic's credentials with this status: each watcher ends (a
    /// single stream) or drops this topic (a multiplexed one).
    refused: Option<u16>,
}

impl Channel {
    pub fn new(key: TopicKey, settings: Arc<TopicSettings>) -> Channel {
        let history = History::new(settings.history, settings.history_bytes);
        Channel {
            key,
            settings,
            state: Mutex::new(State {
                epoch: 0,
                head: 0,
                current: None,
                failing: None,
                history,
                watchers: Vec::new(),
                idle_since: Some(Instant::now()),
                closed: false,
                refused: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state is consistent
        // at every await-free step, so keep serving rather than poisoning every stream.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a history at `epoch` (the broker's choice), forgetting any earlier one.
    pub fn begin(&self, epoch: u32, head: u64) {
        let mut st = self.lock();
        if st.epoch != epoch {
            st.epoch = epoch;
            st.head = head;
            st.history = History::new(self.settings.history, self.settings.history_bytes);
            st.current = None;
            st.failing = None;
        }
    }

    pub fn settings(&self) -> &Arc<TopicSettings> {
        &self.settings
    }

    /// Append the writer's next event at head + 1 of the current epoch: the in-process broker's
    /// publish. Returns its position.
    pub fn append(&self, draft: Draft) -> Position {
        let mut st = self.lock();
        let position = Position::new(st.epoch, st.head + 1);
        let ev = Arc::new(Event::new(
            position,
            draft.kind,
            &draft.envelope,
            draft.made,
        ));
        self.apply(&mut st, ev, draft.doc, draft.changed_at);
        position
    }

    /// Deliver an event positioned elsewhere (a shared broker's reader), with the document after
    /// it. An event of another epoch starts the history anew; one not after head is ignored.
    pub fn push(&self, ev: Arc<Event>, doc: Option<Arc<Doc>>, changed_at: SystemTime) {
        let mut st = self.lock();
        if ev.position.epoch != st.epoch {
            st.epoch = ev.position.epoch;
            st.head = ev.position.seq.saturating_sub(1);
            st.history = History::new(self.settings.history, self.settings.history_bytes);
            st.current = None;
            st.failing = None;
        }
        if ev.position.seq <= st.head && st.head > 0 {
            return;
        }
        self.apply(&mut st, ev, doc, changed_at);
    }

    fn apply(&self, st: &mut State, ev: Arc<Event>, doc: Option<Arc<Doc>>, changed_at: SystemTime) {
        let seq = ev.position.seq;
        match ev.kind {
            EventKind::Refused(status) => {
                // Every watcher presented the refused credentials: each learns it at once (and
                // ends, or drops this topic), the state is dropped so nobody is shown it again,
                // and no one new may join (a new watcher starts a fresh topic whose first read
                // decides).
                st.closed = true;
                st.current = None;
                st.failing = None;
                st.history = History::new(0, 0);
                st.refused = Some(status);
                for w in &st.watchers {
                    w.wake();
                }
                return;
            }
            EventKind::Snapshot | EventKind::Patch => {
                if let Some(doc) = doc {
                    let snapshot = (ev.kind == EventKind::Snapshot).then(|| ev.clone());
                    st.current = Some(Current {
                        doc,
                        seq,
                        changed_at,
                        snapshot,
                    });
                }
                st.failing = None;
            }
            EventKind::UpstreamError => st.failing = Some(ev.clone()),
            EventKind::Pass | EventKind::Reset => st.failing = None,
        }
        st.head = seq;
        st.history.push(ev);
        let now = super::clock_ms();
        for w in &st.watchers {
            w.notify(now);
        }
    }

    /// Register a watcher. Returns false if the channel was closed meanwhile (subscribe again).
    pub(super) fn add_watcher(&self, slot: &Arc<WatchSlot>) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        st.watchers.push(slot.clone());
        st.idle_since = None;
        true
    }

    pub(super) fn remove_watcher(&self, slot: &Arc<WatchSlot>) {
        let mut st = self.lock();
        if let Some(i) = st.watchers.iter().position(|w| Arc::ptr_eq(w, slot)) {
            st.watchers.swap_remove(i);
        }
        if st.watchers.is_empty() && st.idle_since.is_none() {
            st.idle_since = Some(Instant::now());
        }
    }

    /// Close the channel if it has been unwatched for at least `grace` (or was closed by a
    /// refusal); true if closed.
    pub(super) fn close_if_idle(&self, now: Instant) -> bool {
        let mut st = self.lock();
        if st.closed {
            return true;
        }
        match st.idle_since {
            Some(t) if st.watchers.is_empty() && now.duration_since(t) >= self.settings.grace => {
                st.closed = true;
                true
            }
            _ => false,
        }
    }

    /// Close the channel now (its route was retired).
    pub(super) fn close(&self) {
        self.lock().closed = true;
    }

    pub fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }

    pub(super) fn for_each_watcher(&self, f: impl FnMut(&Arc<WatchSlot>)) {
        self.lock().watchers.iter().for_each(f);
    }

    /// Watchers, head, last change and upstream failure, read under one lock (status page).
    pub fn info(&self) -> TopicInfo {
        let st = self.lock();
        let changed_at = st
            .current
            .as_ref()
            .map_or(SystemTime::UNIX_EPOCH, |c| c.changed_at);
        TopicInfo {
            route: self.key.route.to_string(),
            resource: crate::telemetry::redact(&self.key.resource),
            watchers: st.watchers.len(),
            seq: st.head,
            last_change: humantime::format_rfc3339_millis(changed_at).to_string(),
            age_s: changed_at.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            failing: st.failing.is_some(),
            source: None,
            writer: None,
        }
    }

    /// The current document and the position of the event that made it, unless the upstream is
    /// failing or refused the topic (then the state is not the upstream's to vouch for).
    pub fn current(&self) -> Option<(Position, Arc<Doc>)> {
        let st = self.lock();
        if st.failing.is_some() || st.refused.is_some() || st.closed {
            return None;
        }
        let c = st.current.as_ref()?;
        Some((Position::new(st.epoch, c.seq), c.doc.clone()))
    }

    /// The status the upstream refused the topic's credentials with, if it did.
    pub fn refused(&self) -> Option<u16> {
        self.lock().refused
    }

    /// Whether the topic has answered yet: an event, or a refusal.
    pub fn settled(&self) -> bool {
        let st = self.lock();
        st.head > 0 || st.refused.is_some()
    }

    /// The newest position.
    pub fn head(&self) -> Position {
        let st = self.lock();
        Position::new(st.epoch, st.head)
    }

    /// The cursor for a client that says it last saw `last` (its `Last-Event-ID`): resume if it
    /// is of this epoch and still covered by history, else start fresh.
    pub fn resume_cursor(&self, last: Option<Position>) -> Cursor {
        let Some(last) = last else {
            let st = self.lock();
            // A pass-through topic has no state to snapshot: the watcher starts with the events
            // to come (and the current upstream error, if failing).
            if self.settings.pass_through && st.epoch != 0 && st.failing.is_none() {
                return Cursor::At(Position::new(st.epoch, st.head));
            }
            return Cursor::Fresh;
        };
        let st = self.lock();
        if last.epoch == st.epoch
            && st.epoch != 0
            && last.seq <= st.head
            && st.history.covers(last.seq, st.head)
        {
            Cursor::At(last)
        } else {
            Cursor::Fresh
        }
    }

    /// What a watcher at `cursor` should send now, advancing the cursor past it.
    pub fn next(&self, cursor: &mut Cursor) -> Delivery {
        let mut st = self.lock();
        let head = Position::new(st.epoch, st.head);
        match *cursor {
            Cursor::At(p) if p.epoch == head.epoch && p.seq >= head.seq => Delivery::Nothing,
            Cursor::At(p) if p.epoch == head.epoch => {
                let replay: Option<Vec<Arc<Event>>> =
                    st.history.after(p.seq).map(|it| it.cloned().collect());
                *cursor = Cursor::At(head);
                match replay {
                    Some(mut evs) if evs.len() == 1 => Delivery::One(evs.remove(0)),
                    Some(evs) => Delivery::Many(evs),
                    // Fell out of history: resync from the current state.
                    None => self.fresh(&mut st),
                }
            }
            // Fresh, or a cursor of an earlier epoch (the history was lost): a snapshot.
            _ => {
                if head.seq == 0 {
                    return Delivery::Nothing;
                }
                *cursor = Cursor::At(head);
                self.fresh(&mut st)
            }
        }
    }

    /// A snapshot of the current state (if any), then the current upstream error (if failing).
    fn fresh(&self, st: &mut State) -> Delivery {
        // While failing, the newest event is the `upstream-error`, which left the document as it
        // was: the snapshot takes the position of the event that made the document, so ids
        // strictly grow (snapshot, then error) and a client holding the snapshot's id is
        // replayed the error.
        let epoch = st.epoch;
        let snapshot = st.current.as_mut().map(|c| {
            if let Some(s) = &c.snapshot {
                return s.clone();
            }
            let env = envelope(
                EventKind::Snapshot,
                &self.key.resource,
                c.changed_at,
                None,
                &c.doc.data,
            );
            let ev = Arc::new(Event::new(
                Position::new(epoch, c.seq),
                EventKind::Snapshot,
                &env,
                StdInstant::now(),
            ));
            c.snapshot = Some(ev.clone());
            ev
        });
        match (snapshot, st.failing.clone()) {
            (Some(s), Some(f)) => Delivery::Many(vec![s, f]),
            (Some(s), None) => Delivery::One(s),
            (None, Some(f)) => Delivery::One(f),
            (None, None) => Delivery::Nothing,
        }
    }
}
