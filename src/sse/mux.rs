//! A multiplexed SSE body: one stream carrying the events of several topics, with watches added
//! and removed while it runs (through its `Control`, found by the stream's token in a `Registry`),
//! and event ids that hold a cursor per topic so one `Last-Event-ID` resumes every topic.
//! Depends on `hub` and `sse::{encode, stream}`; the HTTP side is `server::mux`.
//!
//! ## Event ids
//!
//! Each event of a multiplexed stream carries the position of the stream in *every* topic it
//! watches, in watch order, `~`-separated; one position is the topic's own id,
//! `<incarnation>-<seq>` in base 36 (see `hub::topic`):
//!
//! ```text
//! id: 1k3f9a-2~8zz1p-5~q0c3b1-11
//! ```
//!
//! A topic that has sent nothing yet on the stream is left out. On reconnect each watched topic
//! takes the position whose incarnation is its own: same incarnation and still in history →
//! replay; anything else (unknown, too old, another incarnation, or two positions with that
//! incarnation) → a fresh snapshot of that topic alone. Positions match by incarnation rather than
//! by index, so a client may reconnect with its watches in another order, or with more or fewer
//! of them, and a one-topic id (`1k3f9a-2`) is a valid multiplexed id. Each position costs about
//! 10 bytes; `[mux] max_watches` bounds the whole.
//!
//! The id goes on a line of its own (`Item::Own`, made per client) just before the event's shared
//! text without its own id line (`Item::Bare`, cached once per event), so the topic's encoding is
//! still shared by every watcher, plain or gzip.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use super::encode;
use super::stream::{Item, ItemSource, StreamClosed};
use crate::hub::{parse_event_id, Cursor, Delivery, Event, StopReason, Subscription, WatchSlot};

/// Positions parsed from one `Last-Event-ID`, at most this many (more than any stream may watch).
const MAX_POSITIONS: usize = 256;

/// A watch as announced to the client: the path it asked for and the topic that serves it
/// (the resource with its canonical query), which every event's envelope names.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WatchInfo {
    pub path: String,
    pub topic: String,
}

/// What a control request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The watch was added or removed.
    Done,
    /// Nothing to do: already watched / not watched.
    Unchanged,
}

/// Why a control request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("the stream has ended")]
    Gone,
    #[error("a stream watches at most {max} resources")]
    TooManyWatches { max: usize },
}

/// A change queued for the stream, applied in order the next time it is polled.
enum Op {
    Watch(Subscription),
    Unwatch(Arc<str>),
}

/// The part of a multiplexed stream that control requests reach: the authoritative set of watched
/// topics (so a request is answered at once) and the changes the stream has yet to apply.
pub struct Control {
    slot: Arc<WatchSlot>,
    max_watches: usize,
    state: Mutex<ControlState>,
}

struct ControlState {
    /// Topics (resources) watched once the queued ops are applied, in watch order.
    topics: Vec<Arc<str>>,
    ops: Vec<Op>,
    /// The stream ended: no more changes.
    closed: bool,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // Every step under this lock leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot a new subscription for this stream must register (it wakes the stream).
    pub fn slot(&self) -> Arc<WatchSlot> {
        self.slot.clone()
    }

    /// Whether `topic` is watched (or about to be).
    pub fn watches(&self, topic: &str) -> bool {
        self.lock().topics.iter().any(|t| &**t == topic)
    }

    /// Add a subscription (made with `slot()`); its snapshot then arrives on the stream.
    pub fn watch(&self, sub: Subscription) -> Result<Change, ControlError> {
        let mut st = self.lock();
        if st.closed {
            return Err(ControlError::Gone);
        }
        let resource = sub.topic.key.resource.clone();
        if st.topics.contains(&resource) {
            return Ok(Change::Unchanged);
        }
        if st.topics.len() >= self.max_watches {
            return Err(ControlError::TooManyWatches {
                max: self.max_watches,
            });
        }
        st.topics.push(resource);
        st.ops.push(Op::Watch(sub));
        drop(st);
        self.slot.wake();
        Ok(Change::Done)
    }

    /// Stop watching `topic` (a resource as named in envelopes).
    pub fn unwatch(&self, topic: &str) -> Result<Change, ControlError> {
        let mut st = self.lock();
        if st.closed {
            return Err(ControlError::Gone);
        }
        let Some(i) = st.topics.iter().position(|t| &**t == topic) else {
            return Ok(Change::Unchanged);
        };
        let resource = st.topics.remove(i);
        st.ops.push(Op::Unwatch(resource));
        drop(st);
        self.slot.wake();
        Ok(Change::Done)
    }

    /// Number of topics watched once queued changes apply.
    pub fn len(&self) -> usize {
        self.lock().topics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Live multiplexed streams by token. A token is 128 random bits: knowing one is the only way to
/// change a stream's watches, and it dies with its stream.
#[derive(Default)]
pub struct Registry {
    streams: Mutex<HashMap<Box<str>, Weak<Control>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Weak<Control>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The control of the live stream with this token.
    pub fn get(&self, token: &str) -> Option<Arc<Control>> {
        self.lock().get(token)?.upgrade()
    }

    /// Number of live multiplexed streams.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn register(&self, control: &Arc<Control>) -> Box<str> {
        let mut streams = self.lock();
        loop {
            let bytes: [u8; 16] = rand::thread_rng().gen();
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            // A collision of 128 random bits does not happen; the loop only makes it impossible.
            if !streams.contains_key(token.as_str()) {
                let token: Box<str> = token.into();
                streams.insert(token.clone(), Arc::downgrade(control));
                return token;
            }
        }
    }
}

/// How a new multiplexed stream starts.
pub struct MuxOptions {
    pub retry: Duration,
    pub heartbeat: Duration,
    pub shutdown: crate::shutdown::Flag,
    pub shutdown_retry: Duration,
    pub max_watches: usize,
    /// The `Last-Event-ID` (or its query-string stand-in), unparsed.
    pub last_event_id: Option<String>,
    /// Added to the `hello` event so a client can build its control URLs.
    pub control_path: String,
}

struct Watch {
    sub: Subscription,
    cursor: Cursor,
    /// Seq of the newest event of this topic written to the stream (or resumed from): this
    /// topic's position in the stream's ids. None: nothing yet.
    sent: Option<u64>,
}

/// The multiplexed body. Like `SseStream`, it is polled by hyper only when the socket can take
/// more, so a slow client simply stops reading from the topics' histories.
pub struct MuxStream {
    watches: Vec<Watch>,
    slot: Arc<WatchSlot>,
    control: Arc<Control>,
    registry: Arc<Registry>,
    token: Box<str>,
    /// Where the round-robin scan of watches starts: a busy topic cannot starve the others.
    next: usize,
    /// The rest of a multi-event delivery (replay, or snapshot + error): watch index and events.
    backlog: VecDeque<(usize, Arc<Event>)>,
    /// The event whose id line was just yielded: its text goes next.
    bare: Option<Arc<Event>>,
    /// `retry:` and `hello`, sent on the first poll.
    prelude: Option<Bytes>,
    heartbeat: Duration,
    last_write: Instant,
    shutdown: crate::shutdown::Flag,
    shutdown_retry: Duration,
    done: bool,
}

impl MuxStream {
    /// A stream over `subs` (each made with `slot`, duplicates already removed), registered in
    /// `registry` under a fresh token. `infos` describe the watches in the same order.
    pub fn new(
        registry: Arc<Registry>,
        slot: Arc<WatchSlot>,
        subs: Vec<(Subscription, WatchInfo)>,
        opts: MuxOptions,
    ) -> MuxStream {
        let positions = opts
            .last_event_id
            .as_deref()
            .map(parse_positions)
            .unwrap_or_default();
        let mut infos = Vec::with_capacity(subs.len());
        let mut watches = Vec::with_capacity(subs.len());
        for (sub, info) in subs {
            let inc = sub.topic.incarnation;
            let mut mine = positions.iter().filter(|(i, _)| *i == inc);
            // Two positions with this incarnation (another topic's collided): trust neither.
            let last = match (mine.next(), mine.next()) {
                (Some(&p), None) => Some(p),
                _ => None,
            };
            let cursor = sub.topic.resume_cursor(last);
            let sent = match cursor {
                Cursor::At(seq) => Some(seq),
                Cursor::Fresh => None,
            };
            infos.push(info);
            watches.push(Watch { sub, cursor, sent });
        }
        let control = Arc::new(Control {
            slot: slot.clone(),
            max_watches: opts.max_watches,
            state: Mutex::new(ControlState {
                topics: watches
                    .iter()
                    .map(|w| w.sub.topic.key.resource.clone())
                    .collect(),
                ops: Vec::new(),
                closed: false,
            }),
        });
        let token = registry.register(&control);
        let hello = serde_json::json!({
            "type": "hello",
            "token": &*token,
            "control": format!("{}/{}", opts.control_path, token),
            "watches": infos,
            "max_watches": opts.max_watches,
            "retry": u64::try_from(opts.retry.as_millis()).unwrap_or(u64::MAX),
        });
        let mut prelude = BytesMut::new();
        prelude.extend_from_slice(&encode::retry(
            u64::try_from(opts.retry.as_millis()).unwrap_or(u64::MAX),
        ));
        prelude.extend_from_slice(&encode::event(
            None,
            Some("hello"),
            hello.to_string().as_bytes(),
        ));
        MuxStream {
            watches,
            slot,
            control,
            registry,
            token,
            next: 0,
            backlog: VecDeque::new(),
            bare: None,
            prelude: Some(prelude.freeze()),
            heartbeat: opts.heartbeat,
            last_write: Instant::now(),
            shutdown: opts.shutdown,
            shutdown_retry: opts.shutdown_retry,
            done: false,
        }
    }

    /// The token control requests name this stream by.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The control shared with the registry.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Apply queued watch changes. A new watch starts fresh: its snapshot comes next.
    fn apply_ops(&mut self) {
        let ops = std::mem::take(&mut self.control.lock().ops);
        for op in ops {
            match op {
                Op::Watch(sub) => self.watches.push(Watch {
                    sub,
                    cursor: Cursor::Fresh,
                    sent: None,
                }),
                Op::Unwatch(resource) => {
                    if let Some(i) = self
                        .watches
                        .iter()
                        .position(|w| w.sub.topic.key.resource == resource)
                    {
                        // Dropping the subscription leaves the topic.
                        self.watches.remove(i);
                        self.backlog.retain(|(w, _)| *w != i);
                        for (w, _) in self.backlog.iter_mut() {
                            if *w > i {
                                *w -= 1;
                            }
                        }
                    }
                }
            }
        }
    }

    /// `id: <position>~<position>…\n` after `ev` (of watch `w`) is sent.
    fn id_line(&mut self, w: usize, ev: &Event) -> Bytes {
        if let Some(watch) = self.watches.get_mut(w) {
            watch.sent = Some(ev.seq);
        }
        let mut buf = BytesMut::with_capacity(8 + self.watches.len() * 12);
        buf.put_slice(b"id: ");
        let mut first = true;
        for watch in &self.watches {
            let Some(seq) = watch.sent else { continue };
            if !first {
                buf.put_u8(b'~');
            }
            first = false;
            put_base36(&mut buf, u64::from(watch.sub.topic.incarnation));
            buf.put_u8(b'-');
            put_base36(&mut buf, seq);
        }
        buf.put_u8(b'\n');
        buf.freeze()
    }

    /// Yield `ev`'s id line now and its text on the next poll.
    fn emit(&mut self, w: usize, ev: Arc<Event>) -> Poll<Option<Item>> {
        let id = self.id_line(w, &ev);
        self.bare = Some(ev);
        self.last_write = Instant::now();
        Poll::Ready(Some(Item::Own(id)))
    }

    /// The next event of any watched topic, scanning from `self.next` round-robin.
    fn next_event(&mut self) -> Option<(usize, Arc<Event>)> {
        if let Some(e) = self.backlog.pop_front() {
            return Some(e);
        }
        let n = self.watches.len();
        for k in 0..n {
            let w = (self.next + k) % n;
            let watch = &mut self.watches[w];
            match watch.sub.topic.next(&mut watch.cursor) {
                Delivery::Nothing => continue,
                Delivery::One(ev) => {
                    self.next = (w + 1) % n;
                    return Some((w, ev));
                }
                Delivery::Many(evs) => {
                    self.next = (w + 1) % n;
                    self.backlog.extend(evs.into_iter().map(|ev| (w, ev)));
                    return self.backlog.pop_front();
                }
            }
        }
        None
    }

    fn closing_event(
        &self,
        kind: &str,
        mut data: serde_json::Value,
        retry: Option<Duration>,
    ) -> Bytes {
        if let Some(r) = retry {
            data["retry"] = serde_json::json!(u64::try_from(r.as_millis()).unwrap_or(u64::MAX));
        }
        let envelope = serde_json::json!({
            "type": kind,
            "topic": null,
            "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "data": data,
        });
        let mut buf = BytesMut::new();
        if let Some(r) = retry {
            buf.extend_from_slice(&encode::retry(
                u64::try_from(r.as_millis()).unwrap_or(u64::MAX),
            ));
        }
        buf.extend_from_slice(&encode::event(
            None,
            Some(kind),
            envelope.to_string().as_bytes(),
        ));
        buf.freeze()
    }

    /// The next thing to send, before any content coding (see `stream::Item`).
    pub fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Registering before looking closes the race with a publish between look and register.
        self.slot.register(cx.waker());
        self.slot.polled();
        if let Some(p) = self.prelude.take() {
            self.last_write = Instant::now();
            return Poll::Ready(Some(Item::Own(p)));
        }
        if let Some(ev) = self.bare.take() {
            self.last_write = Instant::now();
            return Poll::Ready(Some(Item::Bare(ev)));
        }
        // Access to one of the topics ended (401/403, revoked, token expired): the slot is the
        // stream's, so the whole stream ends, with nothing more of any topic, only the error.
        if let Some((error, status)) = self.slot.stop_reason().and_then(StopReason::access_error) {
            self.done = true;
            let data = serde_json::json!({ "error": error, "status": status });
            return Poll::Ready(Some(Item::Own(self.closing_event("error", data, None))));
        }
        self.apply_ops();
        if let Some((w, ev)) = self.next_event() {
            return self.emit(w, ev);
        }
        if self.shutdown.is_cancelled() {
            self.done = true;
            let retry = Some(self.shutdown_retry);
            return Poll::Ready(Some(Item::Own(self.closing_event(
                "shutdown",
                reason("herald is restarting"),
                retry,
            ))));
        }
        match self.slot.stop_reason() {
            Some(StopReason::Reconfigured) => {
                self.done = true;
                let retry = Some(self.shutdown_retry);
                let data = reason("route reconfigured");
                return Poll::Ready(Some(Item::Own(self.closing_event("shutdown", data, retry))));
            }
            Some(StopReason::SlowConsumer) => {
                self.done = true;
                let data = reason("slow-consumer: the client did not read its events in time");
                return Poll::Ready(Some(Item::Own(self.closing_event("error", data, None))));
            }
            _ => {}
        }
        let now = Instant::now();
        if now.duration_since(self.last_write) >= self.heartbeat {
            self.last_write = now;
            return Poll::Ready(Some(Item::Heartbeat));
        }
        Poll::Pending
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut st = self.control.lock();
        st.closed = true;
        // Queued subscriptions leave their topics now rather than when the last request holding
        // the control lets go.
        st.ops.clear();
        drop(st);
        self.registry.lock().remove(&self.token);
    }
}

impl ItemSource for MuxStream {
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        MuxStream::poll_item(self, cx)
    }
    fn is_done(&self) -> bool {
        self.done
    }
}

impl Body for MuxStream {
    type Data = Bytes;
    type Error = StreamClosed;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamClosed>>> {
        self.get_mut()
            .poll_item(cx)
            .map(|o| o.map(|item| Ok(Frame::data(item.into_identity()))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn reason(text: &str) -> serde_json::Value {
    serde_json::json!({ "reason": text })
}

fn put_base36(buf: &mut BytesMut, mut n: u64) {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut tmp = [0u8; 13];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = DIGITS[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    buf.put_slice(&tmp[i..]);
}

/// The positions of a multiplexed id (`<inc>-<seq>~<inc>-<seq>…`); malformed ones are skipped,
/// so a damaged id costs a snapshot of the topics it names, never a wrong replay.
pub fn parse_positions(id: &str) -> Vec<(u32, u64)> {
    id.trim()
        .split('~')
        .take(MAX_POSITIONS)
        .filter_map(parse_event_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_skip_garbage() {
        let mut buf = BytesMut::new();
        put_base36(&mut buf, 1_234_567);
        buf.put_u8(b'-');
        put_base36(&mut buf, 0);
        assert_eq!(&buf[..], b"qglj-0");
        assert_eq!(
            parse_positions("qglj-0~1-z~bad~~2-10"),
            vec![(1_234_567, 0), (1, 35), (2, 36)]
        );
        assert_eq!(parse_positions(""), vec![]);
        assert_eq!(parse_positions(&"1-1~".repeat(1000)).len(), MAX_POSITIONS);
    }
}
