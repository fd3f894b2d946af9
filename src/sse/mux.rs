//! A multiplexed SSE body: one stream carrying the events of several topics, with watches added
//! and removed while it runs (through its `Control`, found by the stream's token in a `Registry`),
//! and event ids that hold a cursor per topic so one `Last-Event-ID` resumes every topic.
//! The HTTP side is `server::mux`.
//!
//! ## Event ids
//!
//! Each event of a multiplexed stream carries the position of the stream in *every* topic it
//! watches, in watch order, `~`-separated; one position is the topic's own id,
//! `<epoch>-<seq>` in base 36 (`hub::Position`):
//!
//! ```text
//! id: 1k3f9a-2~8zz1p-5~q0c3b1-11
//! ```
//!
//! A topic that has sent nothing yet on the stream is left out. On reconnect each watched topic
//! takes the position whose epoch is its own: same epoch and still in history → replay; anything
//! else (unknown, too old, another epoch, or two positions with that epoch) → a fresh snapshot of
//! that topic alone. Positions match by epoch rather than by index, so a client may reconnect
//! with its watches in another order, or with more or fewer of them, and a one-topic id
//! (`1k3f9a-2`) is a valid multiplexed id. Each position costs about 10 bytes;
//! `[mux] max_watches` bounds the whole.
//!
//! The id line is made per client (`Item::Framed`) and goes just before the event's shared text
//! without its own id line (cached once per event), so the topic's encoding is still shared by
//! every watcher, plain or gzip.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rand::Rng;
use serde::Serialize;

use super::lifecycle::{Events, Item};
use super::single::count;
use crate::hub::{Cursor, Delivery, Event, Position, Subscription, WatchSlot};
use crate::routes::TopicKey;
use crate::wire;

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
    /// A new watch, from the start (`None`: a snapshot first) or from a position the client
    /// already has (`since`).
    Watch {
        sub: Subscription,
        info: WatchInfo,
        since: Option<Position>,
    },
    Unwatch(Arc<str>),
}

/// The part of a multiplexed stream that control requests reach: the authoritative set of watched
/// topics (so a request is answered at once), the changes the stream has yet to apply, and the
/// credential the stream was opened with (every control request must present the same).
pub struct Control {
    slot: Arc<WatchSlot>,
    max_watches: usize,
    state: Mutex<ControlState>,
}

struct ControlState {
    /// Topics watched once the queued ops are applied, in watch order, each with the path the
    /// client asked for.
    topics: Vec<(TopicKey, String)>,
    ops: Vec<Op>,
    /// The stream ended: no more changes.
    closed: bool,
    /// Whose stream this is: the keyed hash of the credentials that opened it (or refreshed
    /// it last); 0 for a stream opened without any.
    principal: u64,
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
        self.lock()
            .topics
            .iter()
            .any(|(t, _)| &*t.resource == topic)
    }

    /// Whether `principal` is the one the stream belongs to.
    pub fn belongs_to(&self, principal: u64) -> bool {
        self.lock().principal == principal
    }

    /// The stream now belongs to `principal` (after a refresh with a new credential).
    pub fn rebind(&self, principal: u64) {
        self.lock().principal = principal;
    }

    /// Add a subscription (made with `slot()`): its snapshot then arrives on the stream, or,
    /// with `since`, the events after that position (a snapshot if they are gone).
    pub fn watch(
        &self,
        sub: Subscription,
        info: WatchInfo,
        since: Option<Position>,
    ) -> Result<Change, ControlError> {
        let mut st = self.lock();
        if st.closed {
            return Err(ControlError::Gone);
        }
        let key = sub.topic.key.clone();
        if st.topics.iter().any(|(t, _)| t.resource == key.resource) {
            return Ok(Change::Unchanged);
        }
        if st.topics.len() >= self.max_watches {
            return Err(ControlError::TooManyWatches {
                max: self.max_watches,
            });
        }
        st.topics.push((key, info.path.clone()));
        st.ops.push(Op::Watch { sub, info, since });
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
        let Some(i) = st.topics.iter().position(|(t, _)| &*t.resource == topic) else {
            return Ok(Change::Unchanged);
        };
        let resource = st.topics.remove(i).0.resource;
        st.ops.push(Op::Unwatch(resource));
        drop(st);
        self.slot.wake();
        Ok(Change::Done)
    }

    /// The topics watched once queued changes apply, with the paths the client asked for.
    pub fn watched(&self) -> Vec<(TopicKey, String)> {
        self.lock().topics.clone()
    }

    /// Replace the subscription of topic `old` with `sub`: after a refresh whose new credential
    /// names another topic for the same resource (a token-keyed topic). The new one starts with
    /// a snapshot.
    pub fn replace(
        &self,
        old: &TopicKey,
        sub: Subscription,
        info: WatchInfo,
    ) -> Result<(), ControlError> {
        let mut st = self.lock();
        if st.closed {
            return Err(ControlError::Gone);
        }
        if let Some(i) = st.topics.iter().position(|(t, _)| t == old) {
            let resource = st.topics.remove(i).0.resource;
            st.ops.push(Op::Unwatch(resource));
        }
        st.topics.push((sub.topic.key.clone(), info.path.clone()));
        st.ops.push(Op::Watch {
            sub,
            info,
            since: None,
        });
        drop(st);
        self.slot.wake();
        Ok(())
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
    /// The `retry:` the stream starts with, also told in `hello`.
    pub retry: Duration,
    pub max_watches: usize,
    /// The `Last-Event-ID` (or its query-string stand-in), unparsed.
    pub last_event_id: Option<String>,
    /// Whose stream it is (see `Control::belongs_to`).
    pub principal: u64,
    /// Added to the `hello` event so a client can build its control URLs.
    pub control_path: String,
}

struct Watch {
    sub: Subscription,
    /// The path the client asked for (its refusal names it).
    path: String,
    cursor: Cursor,
    /// The newest position of this topic written to the stream (or resumed from): this topic's
    /// part of the stream's ids. None: nothing yet.
    sent: Option<Position>,
}

/// The events of every watched topic, round robin, each under an id that holds the stream's
/// position in all of them.
pub struct MuxEvents {
    watches: Vec<Watch>,
    control: Arc<Control>,
    registry: Arc<Registry>,
    token: Box<str>,
    /// Where the round-robin scan of watches starts: a busy topic cannot starve the others.
    next: usize,
    /// The rest of a multi-event delivery (replay, or snapshot + error): watch index and events.
    backlog: VecDeque<(usize, Arc<Event>)>,
}

impl MuxEvents {
    /// The events of `subs` (each made with `slot`, duplicates already removed), registered in
    /// `registry` under a fresh token, and the `hello` event that starts the stream. `infos`
    /// describe the watches in the same order.
    pub fn new(
        registry: Arc<Registry>,
        slot: Arc<WatchSlot>,
        subs: Vec<(Subscription, WatchInfo)>,
        opts: MuxOptions,
    ) -> (MuxEvents, Bytes) {
        let positions = opts
            .last_event_id
            .as_deref()
            .map(parse_positions)
            .unwrap_or_default();
        let mut infos = Vec::with_capacity(subs.len());
        let mut watches = Vec::with_capacity(subs.len());
        for (sub, info) in subs {
            let epoch = sub.topic.channel.head().epoch;
            let mut mine = positions.iter().filter(|p| p.epoch == epoch);
            // Two positions with this epoch (another topic's collided): trust neither.
            let last = match (mine.next(), mine.next()) {
                (Some(&p), None) => Some(p),
                _ => None,
            };
            let cursor = sub.topic.channel.resume_cursor(last);
            let sent = match cursor {
                Cursor::At(p) => Some(p),
                Cursor::Fresh => None,
            };
            let path = info.path.clone();
            infos.push(info);
            watches.push(Watch {
                sub,
                path,
                cursor,
                sent,
            });
        }
        let control = Arc::new(Control {
            slot,
            max_watches: opts.max_watches,
            state: Mutex::new(ControlState {
                topics: watches
                    .iter()
                    .map(|w| (w.sub.topic.key.clone(), w.path.clone()))
                    .collect(),
                ops: Vec::new(),
                closed: false,
                principal: opts.principal,
            }),
        });
        let token = registry.register(&control);
        let retry = u64::try_from(opts.retry.as_millis()).unwrap_or(u64::MAX);
        let hello = serde_json::json!({
            "type": "hello",
            "token": &*token,
            "control": format!("{}/{}", opts.control_path, token),
            "watches": infos,
            "max_watches": opts.max_watches,
            "retry": retry,
        });
        let hello = wire::event(None, Some("hello"), hello.to_string().as_bytes());
        let events = MuxEvents {
            watches,
            control,
            registry,
            token,
            next: 0,
            backlog: VecDeque::new(),
        };
        (events, hello)
    }

    /// The token control requests name this stream by.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The control shared with the registry.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The subscriptions the stream holds now.
    pub fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        self.watches.iter().map(|w| &w.sub)
    }

    /// Apply queued watch changes. A new watch starts fresh: its snapshot comes next.
    fn apply_ops(&mut self) {
        let ops = std::mem::take(&mut self.control.lock().ops);
        for op in ops {
            match op {
                Op::Watch { sub, info, since } => {
                    let cursor = sub.topic.channel.resume_cursor(since);
                    let sent = match cursor {
                        Cursor::At(p) => Some(p),
                        Cursor::Fresh => None,
                    };
                    self.watches.push(Watch {
                        sub,
                        path: info.path,
                        cursor,
                        sent,
                    });
                }
                Op::Unwatch(resource) => {
                    if let Some(i) = self
                        .watches
                        .iter()
                        .position(|w| w.sub.topic.key.resource == resource)
                    {
                        // Dropping the subscription leaves the topic.
                        drop(self.remove_watch(i));
                    }
                }
            }
        }
    }

    /// Take watch `i` out, with whatever of it was still queued to send.
    fn remove_watch(&mut self, i: usize) -> Watch {
        let watch = self.watches.remove(i);
        self.backlog.retain(|(w, _)| *w != i);
        for (w, _) in self.backlog.iter_mut() {
            if *w > i {
                *w -= 1;
            }
        }
        watch
    }

    /// `id: <position>~<position>…\n` after `ev` (of watch `w`) is sent.
    fn id_line(&mut self, w: usize, ev: &Event) -> Bytes {
        if let Some(watch) = self.watches.get_mut(w) {
            watch.sent = Some(ev.position);
        }
        let mut buf = BytesMut::with_capacity(8 + self.watches.len() * 12);
        buf.put_slice(b"id: ");
        let mut first = true;
        for p in self.watches.iter().filter_map(|w| w.sent) {
            if !first {
                buf.put_u8(b'~');
            }
            first = false;
            p.put(&mut buf);
        }
        buf.put_u8(b'\n');
        buf.freeze()
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
            let fresh = watch.cursor == Cursor::Fresh;
            let delivery = watch.sub.topic.channel.next(&mut watch.cursor);
            count(watch.sub.topic.metrics(), &delivery, fresh);
            match delivery {
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
}

impl MuxEvents {
    /// A watch whose topic the upstream refused leaves the stream, which goes on with the others:
    /// its `refused` event, or None when no watch was refused.
    fn refusal(&mut self) -> Option<Item> {
        let (i, status) = self
            .watches
            .iter()
            .enumerate()
            .find_map(|(i, w)| w.sub.topic.channel.refused().map(|s| (i, s)))?;
        let watch = self.remove_watch(i);
        let topic = watch.sub.topic.key.resource.clone();
        self.control
            .lock()
            .topics
            .retain(|(t, _)| t.resource != topic);
        Some(Item::Own(refused_event(&watch.path, &topic, status)))
    }
}

/// The `refused` event of one watch: the stream goes on without it.
pub fn refused_event(path: &str, topic: &str, status: u16) -> Bytes {
    let error = if status == 403 {
        "forbidden"
    } else {
        "unauthorized"
    };
    let envelope = serde_json::json!({
        "type": "refused",
        "topic": topic,
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "data": {
            "path": path,
            "status": status,
            "error": error,
            "message": "the upstream refused these credentials for this resource",
        },
    });
    wire::event(None, Some("refused"), envelope.to_string().as_bytes())
}

impl Events for MuxEvents {
    fn next(&mut self) -> Option<Item> {
        self.apply_ops();
        if let Some(refused) = self.refusal() {
            return Some(refused);
        }
        let (w, event) = self.next_event()?;
        let id = self.id_line(w, &event);
        Some(Item::Framed { id, event })
    }

    fn topic(&self) -> Option<&str> {
        None
    }
}

impl Drop for MuxEvents {
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

/// The positions of a multiplexed id (`<inc>-<seq>~<inc>-<seq>…`); malformed ones are skipped,
/// so a damaged id costs a snapshot of the topics it names, never a wrong replay.
pub fn parse_positions(id: &str) -> Vec<Position> {
    id.trim()
        .split('~')
        .take(MAX_POSITIONS)
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_skip_garbage() {
        assert_eq!(
            parse_positions("qglj-0~1-z~bad~~2-10"),
            vec![
                Position::new(1_234_567, 0),
                Position::new(1, 35),
                Position::new(2, 36)
            ]
        );
        assert_eq!(parse_positions(""), vec![]);
        assert_eq!(parse_positions(&"1-1~".repeat(1000)).len(), MAX_POSITIONS);
    }
}
