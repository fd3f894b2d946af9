//! One upstream resource as watched: its current state, the events that led there (sequenced),
//! and the set of watchers to wake. The source task is the only writer; watchers read under a short
//! lock and are never waited on, so a slow watcher cannot slow the topic.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::history::History;
use super::{Event, EventKind, TopicSettings};
use crate::diff::{self, Change};
use crate::routes::TopicKey;
use crate::upstream::{Document, FetchError, Outcome, Sink};

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
    fn notify(&self, now_ms: u64) {
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

    pub fn stop_reason(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::Acquire) {
            1 => Some(StopReason::SlowConsumer),
            2 => Some(StopReason::Reconfigured),
            10 => Some(StopReason::Unauthorized),
            11 => Some(StopReason::Forbidden),
            12 => Some(StopReason::Expired),
            _ => None,
        }
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

/// Where a watcher stands in a topic's sequence of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Has nothing yet: the next delivery is a snapshot.
    Fresh,
    /// Has every event up to and including this seq.
    At(u64),
}

pub struct Topic {
    pub key: TopicKey,
    /// Changes whenever this topic's history is lost (new topic, restart); part of every event id.
    pub incarnation: u32,
    pub(super) settings: Arc<TopicSettings>,
    /// Stops the source (poller) of this topic.
    pub(super) cancel: CancellationToken,
    state: Mutex<State>,
}

struct State {
    /// Seq of the newest event (0: none yet).
    head: u64,
    doc: Option<Arc<Document>>,
    changed_at: SystemTime,
    /// Snapshot event of the current state at `head`, built on first request.
    snapshot: Option<Arc<Event>>,
    /// The `upstream-error` event while the upstream is failing.
    failing: Option<Arc<Event>>,
    history: History,
    watchers: Vec<Arc<WatchSlot>>,
    /// When the last watcher left (None while watched).
    pub(super) idle_since: Option<Instant>,
    /// Removed from the hub: no new watchers may join.
    closed: bool,
}

/// What a watcher should send next.
pub enum Delivery {
    Nothing,
    One(Arc<Event>),
    Many(Vec<Arc<Event>>),
}

impl Topic {
    pub(super) fn new(
        key: TopicKey,
        settings: Arc<TopicSettings>,
        cancel: CancellationToken,
    ) -> Topic {
        let history = History::new(settings.history, settings.history_bytes);
        Topic {
            key,
            incarnation: rand::random::<u32>() | 1,
            settings,
            cancel,
            state: Mutex::new(State {
                head: 0,
                doc: None,
                changed_at: SystemTime::now(),
                snapshot: None,
                failing: None,
                history,
                watchers: Vec::new(),
                idle_since: Some(Instant::now()),
                closed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state is still
        // consistent at every await-free step, so keep serving rather than poisoning every stream.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a watcher. Returns false if the topic was closed meanwhile (subscribe again).
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

    /// Close the topic if it has been unwatched for at least `grace`; true if closed.
    pub(super) fn close_if_idle(&self, now: Instant) -> bool {
        let mut st = self.lock();
        match st.idle_since {
            Some(t) if st.watchers.is_empty() && now.duration_since(t) >= self.settings.grace => {
                st.closed = true;
                true
            }
            _ => false,
        }
    }

    pub fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }

    /// The route's metric handles (for the stream's one-line hook).
    pub fn metrics(&self) -> &Arc<crate::admin::metrics::RouteMetrics> {
        &self.settings.metrics
    }

    /// Watchers, newest seq, last change and upstream failure, read under one lock (status page).
    pub fn info(&self) -> crate::admin::status::TopicInfo {
        let st = self.lock();
        crate::admin::status::TopicInfo::new(
            self,
            st.watchers.len(),
            st.head,
            st.changed_at,
            st.failing.is_some(),
        )
    }

    pub(super) fn for_each_watcher(&self, f: impl FnMut(&Arc<WatchSlot>)) {
        self.lock().watchers.iter().for_each(f);
    }

    /// The id a client holds after receiving event `seq` of this topic.
    pub fn event_id(&self, seq: u64) -> String {
        format!("{}-{}", base36(u64::from(self.incarnation)), base36(seq))
    }

    /// The cursor for a client that says it last saw `last` (from `Last-Event-ID`): resume if
    /// it belongs to this incarnation and is still covered by history, else start fresh.
    pub fn resume_cursor(&self, last: Option<(u32, u64)>) -> Cursor {
        let Some((inc, seq)) = last else {
            return Cursor::Fresh;
        };
        if inc != self.incarnation {
            return Cursor::Fresh;
        }
        let st = self.lock();
        if seq <= st.head && st.history.covers(seq, st.head) {
            Cursor::At(seq)
        } else {
            Cursor::Fresh
        }
    }

    /// Newest sequence number.
    pub fn head(&self) -> u64 {
        self.lock().head
    }

    /// What a watcher at `cursor` should send now, advancing the cursor past it.
    pub fn next(&self, cursor: &mut Cursor) -> Delivery {
        let mut st = self.lock();
        let head = st.head;
        match *cursor {
            Cursor::At(seq) if seq >= head => Delivery::Nothing,
            Cursor::At(seq) => {
                let replay: Option<Vec<Arc<Event>>> =
                    st.history.after(seq).map(|it| it.cloned().collect());
                *cursor = Cursor::At(head);
                match replay {
                    Some(mut evs) if evs.len() == 1 => Delivery::One(evs.remove(0)),
                    Some(evs) => Delivery::Many(evs),
                    // Fell out of history: resync from the current state.
                    None => self.fresh(&mut st),
                }
            }
            Cursor::Fresh => {
                if head == 0 {
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
        // was one seq earlier: the snapshot takes that seq, so ids strictly grow (snapshot, then
        // error) and a client holding only the snapshot's id is replayed the error.
        debug_assert!(st.failing.as_ref().is_none_or(|f| f.seq == st.head));
        let at = st
            .failing
            .as_ref()
            .map_or(st.head, |f| f.seq.saturating_sub(1));
        let snapshot = st.doc.clone().map(|doc| {
            if let Some(s) = st.snapshot.as_ref().filter(|s| s.seq == at) {
                return s.clone();
            }
            let ev =
                Arc::new(self.make_event(at, EventKind::Snapshot, st.changed_at, &DocData(&doc)));
            st.snapshot = Some(ev.clone());
            ev
        });
        match (snapshot, st.failing.clone()) {
            (Some(s), Some(f)) => Delivery::Many(vec![s, f]),
            (Some(s), None) => Delivery::One(s),
            (None, Some(f)) => Delivery::One(f),
            (None, None) => Delivery::Nothing,
        }
    }

    fn make_event<T: Serialize>(
        &self,
        seq: u64,
        kind: EventKind,
        at: SystemTime,
        data: &T,
    ) -> Event {
        #[derive(Serialize)]
        struct Envelope<'a, T> {
            #[serde(rename = "type")]
            kind: &'a str,
            topic: &'a str,
            timestamp: String,
            data: &'a T,
        }
        let envelope = Envelope {
            kind: kind.name(),
            topic: &self.key.resource,
            timestamp: humantime::format_rfc3339_millis(at).to_string(),
            data,
        };
        // Serializing plain JSON values into a Vec cannot fail.
        let bytes = serde_json::to_vec(&envelope).unwrap_or_default();
        Event::new(seq, self.event_id(seq), kind, Bytes::from(bytes))
    }

    /// Append an event at head+1 and wake every watcher.
    fn publish(
        &self,
        st: &mut State,
        kind: EventKind,
        at: SystemTime,
        data: &impl Serialize,
    ) -> Arc<Event> {
        let seq = st.head + 1;
        let ev = Arc::new(self.make_event(seq, kind, at, data));
        st.head = seq;
        st.history.push(ev.clone());
        let now = clock_ms();
        for w in &st.watchers {
            w.notify(now);
        }
        ev
    }

    fn apply(&self, outcome: Outcome) {
        match outcome {
            Outcome::Changed(doc) => self.changed(doc),
            Outcome::Unchanged => {
                let mut st = self.lock();
                if st.failing.is_some() {
                    self.recovered(&mut st);
                }
            }
            // A per-credential topic's credentials were refused: see `refused`.
            Outcome::Failed(FetchError::Status(s @ (401 | 403)))
                if self.settings.per_credential =>
            {
                self.refused(s)
            }
            Outcome::Failed(e) => self.failed(e),
        }
    }

    /// The upstream refused this topic's credentials, which every watcher presented: each one
    /// ends with an `error` event, the cached state is dropped so nobody is shown it again, and
    /// the topic closes (a new watcher starts a fresh topic whose first poll decides).
    fn refused(&self, status: u16) {
        let reason = if status == 401 {
            StopReason::Unauthorized
        } else {
            StopReason::Forbidden
        };
        let mut st = self.lock();
        st.closed = true;
        st.doc = None;
        st.snapshot = None;
        for w in &st.watchers {
            w.stop(reason);
        }
        drop(st);
        self.cancel.cancel();
        debug!(topic = %self.key.resource, status, "upstream refused the credentials");
    }

    fn changed(&self, new: Document) {
        let old = self.lock().doc.clone();
        let now = SystemTime::now();
        // Diff outside the lock: the source task is the only writer, so `old` stays current.
        let change = match (old.as_deref(), &new) {
            (Some(Document::Json(a)), Document::Json(b)) => {
                diff::diff(a, b, self.settings.diff_mode, &self.settings.diff_options)
            }
            (Some(a), b) if a == b => Change::None,
            _ => Change::Snapshot,
        };
        let mut st = self.lock();
        let was_failing = st.failing.take().is_some();
        let new = Arc::new(new);
        match change {
            Change::None if was_failing => {
                st.doc = Some(new);
                self.recovered(&mut st);
            }
            Change::None => {}
            Change::Patch(patch) if !was_failing => {
                st.doc = Some(new);
                st.changed_at = now;
                self.publish(&mut st, EventKind::Patch, now, &patch);
            }
            Change::Patch(_) | Change::Snapshot => {
                st.doc = Some(new.clone());
                st.changed_at = now;
                let ev = self.publish(&mut st, EventKind::Snapshot, now, &DocData(&new));
                st.snapshot = Some(ev);
            }
        }
    }

    /// The upstream answers again: every watcher gets the current state as a fresh snapshot.
    fn recovered(&self, st: &mut State) {
        st.failing = None;
        debug!(topic = %self.key.resource, "upstream recovered");
        if let Some(doc) = st.doc.clone() {
            let at = st.changed_at;
            let ev = self.publish(st, EventKind::Snapshot, at, &DocData(&doc));
            st.snapshot = Some(ev);
        }
    }

    fn failed(&self, e: FetchError) {
        #[derive(Serialize)]
        struct ErrorData<'a> {
            error: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<u16>,
            message: String,
        }
        let mut st = self.lock();
        if st.failing.is_some() {
            return; // told once per outage
        }
        let data = ErrorData {
            error: e.code(),
            status: e.status(),
            message: e.to_string(),
        };
        let ev = self.publish(&mut st, EventKind::UpstreamError, SystemTime::now(), &data);
        st.failing = Some(ev);
    }
}

impl Sink for Topic {
    fn deliver(&self, outcome: Outcome) {
        self.apply(outcome)
    }
}

/// Serializes a document as the envelope's `data`: JSON as is, text as a JSON string.
struct DocData<'a>(&'a Document);

impl Serialize for DocData<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Document::Json(v) => v.serialize(s),
            Document::Text(t) => t.serialize(s),
        }
    }
}

pub fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut buf = [0u8; 13];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    String::from_utf8_lossy(&buf[i..]).into_owned()
}

/// Parse an id made by `Topic::event_id`: `<incarnation>-<seq>`, both base 36.
pub fn parse_event_id(id: &str) -> Option<(u32, u64)> {
    let (inc, seq) = id.trim().split_once('-')?;
    let digits = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    if !digits(inc, 7) || !digits(seq, 12) {
        return None;
    }
    let inc = u64::from_str_radix(inc, 36)
        .ok()
        .and_then(|n| u32::try_from(n).ok())?;
    let seq = u64::from_str_radix(seq, 36).ok()?;
    Some((inc, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for (inc, seq) in [
            (1u32, 0u64),
            (u32::MAX, 1),
            (12345, 36),
            (7, 4_000_000_000_000),
        ] {
            let t = format!("{}-{}", base36(u64::from(inc)), base36(seq));
            assert_eq!(parse_event_id(&t), Some((inc, seq)), "{t}");
        }
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "zzzzzzzz-1",
            "1-zzzzzzzzzzzzz",
            "1_2",
            "ü-1",
            "1-2-3",
            "+1-2",
            "1-+2",
            "A-1",
        ] {
            assert_eq!(parse_event_id(bad), None, "{bad}");
        }
    }
}
