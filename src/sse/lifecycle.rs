//! The life of every SSE response, written once for single and multiplexed streams alike:
//! `retry:` first, then the stream's events as its [`Events`] yield them, a heartbeat comment when
//! idle, and one last event when herald shuts down, the route is reconfigured, access ends or the
//! client is too slow. It is polled only when the socket can take more, so a slow client simply
//! stops reading from the shared history and is resynced with a snapshot if it falls out of it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::hub::{Delivery, Event, StopReason, WatchSlot};
use crate::shutdown::Flag;
use crate::wire;

/// Why a stream ended abnormally (the connection is then reset rather than closed cleanly).
#[derive(Debug, thiserror::Error)]
#[error("stream closed by herald")]
pub struct StreamClosed;

/// `: heartbeat`, the comment an idle stream sends; the same bytes for every client.
pub const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// One step of a stream before any content coding. Hub events are the same `Arc<Event>`s for every
/// watcher of a topic, so a coding layer caches their wire bytes on the event; `Own` bytes exist
/// for this client alone (per-client `retry:` jitter, timestamps) and are coded on the fly.
pub enum Item {
    /// Events of a topic in order: replay, snapshot or live (never `Delivery::Nothing`).
    Events(Delivery),
    /// The `retry:` prelude, or the last event of the stream.
    Own(Bytes),
    /// `HEARTBEAT`.
    Heartbeat,
    /// One hub event under this client's own `id:` line (a multiplexed stream's cursor per
    /// topic): the id is per client, the rest of the text shared and cached like `Events`.
    Framed { id: Bytes, event: Arc<Event> },
}

impl Item {
    /// The item as plain SSE text: shared bytes as cached, so a live event costs no allocation.
    pub fn into_identity(self) -> Bytes {
        match self {
            Item::Own(b) => b,
            Item::Heartbeat => Bytes::from_static(HEARTBEAT),
            Item::Events(Delivery::One(ev)) => ev.text().clone(),
            Item::Events(Delivery::Many(evs)) => {
                let mut buf = BytesMut::new();
                for ev in &evs {
                    buf.extend_from_slice(ev.text());
                }
                buf.freeze()
            }
            Item::Events(Delivery::Nothing) => Bytes::new(),
            Item::Framed { id, event } => {
                let bare = event.bare();
                let mut buf = BytesMut::with_capacity(id.len() + bare.len());
                buf.extend_from_slice(&id);
                buf.extend_from_slice(&bare);
                buf.freeze()
            }
        }
    }
}

/// What a stream carries: the events of its topics, from its own cursors. Called only after the
/// stream registered its waker on its slot, so a publish in between is never missed.
pub trait Events: Send + Unpin + 'static {
    /// The next item ready to send, if any (never waits).
    fn next(&mut self) -> Option<Item>;
    /// The topic its closing events name (None: a multiplexed stream names none).
    fn topic(&self) -> Option<&str>;
}

/// Something that yields `Item`s: what a content coding (`sse::gzip`) wraps.
pub trait ItemSource {
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>>;
    /// True once the last item has been yielded.
    fn is_done(&self) -> bool;
}

/// How every stream runs (`[sse]`), and the shutdown it watches.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// The `retry:` sent first (jittered per client by the caller).
    pub retry: Duration,
    pub heartbeat: Duration,
    /// Set when herald shuts down: the stream sends `shutdown` and ends.
    pub shutdown: Flag,
    /// The `retry:` sent with the shutdown event (jittered per client), so reconnects spread.
    pub shutdown_retry: Duration,
}

/// An SSE response body over any `Events`.
pub struct SseStream<E> {
    events: E,
    slot: Arc<WatchSlot>,
    /// `retry:` and anything else that goes first, sent on the first poll.
    prelude: Option<Bytes>,
    heartbeat: Duration,
    last_write: Instant,
    shutdown: Flag,
    shutdown_retry: Duration,
    done: bool,
}

impl<E: Events> SseStream<E> {
    /// A stream whose first bytes are `retry:` followed by `hello` (multiplexed streams).
    pub fn new(events: E, slot: Arc<WatchSlot>, life: Lifecycle, hello: Option<Bytes>) -> Self {
        let mut prelude = BytesMut::from(&wire::retry(millis(life.retry))[..]);
        if let Some(h) = hello {
            prelude.extend_from_slice(&h);
        }
        SseStream {
            events,
            slot,
            prelude: Some(prelude.freeze()),
            heartbeat: life.heartbeat,
            last_write: Instant::now(),
            shutdown: life.shutdown,
            shutdown_retry: life.shutdown_retry,
            done: false,
        }
    }

    pub fn events(&self) -> &E {
        &self.events
    }

    /// A last event (`error`, `shutdown`): an envelope naming the stream's topic, after a `retry:`
    /// line (also given in `data`) when the client should come back later.
    fn closing(&self, kind: &str, mut data: serde_json::Value, retry: Option<Duration>) -> Bytes {
        if let Some(r) = retry {
            data["retry"] = serde_json::json!(millis(r));
        }
        let envelope = serde_json::json!({
            "type": kind,
            "topic": self.events.topic(),
            "timestamp": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "data": data,
        });
        let mut buf = BytesMut::new();
        if let Some(r) = retry {
            buf.extend_from_slice(&wire::retry(millis(r)));
        }
        buf.extend_from_slice(&wire::event(
            None,
            Some(kind),
            envelope.to_string().as_bytes(),
        ));
        buf.freeze()
    }

    /// `auth-expiring`: the credential expires at `unix_ms`; refresh it before then.
    fn expiring(&self, unix_ms: u64) -> Bytes {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let envelope = serde_json::json!({
            "type": "auth-expiring",
            "topic": self.events.topic(),
            "timestamp": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "data": {
                "expires_at": rfc3339_ms(unix_ms),
                "expires_in_ms": unix_ms.saturating_sub(now),
            },
        });
        wire::event(None, Some("auth-expiring"), envelope.to_string().as_bytes())
    }

    fn end(&mut self, kind: &str, data: serde_json::Value, retry: bool) -> Poll<Option<Item>> {
        self.done = true;
        let retry = retry.then_some(self.shutdown_retry);
        Poll::Ready(Some(Item::Own(self.closing(kind, data, retry))))
    }

    /// The next thing to send, before any content coding (see `Item`).
    pub fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Registering before looking closes the race with a publish between look and register.
        self.slot.register(cx.waker());
        // Being polled at all means the client is taking bytes: it is not stuck.
        self.slot.polled();
        if let Some(p) = self.prelude.take() {
            self.last_write = Instant::now();
            return Poll::Ready(Some(Item::Own(p)));
        }
        let stop = self.slot.stop_reason();
        if stop == Some(StopReason::Expired) {
            // The credential expired and was not refreshed: a distinct last event, so a client
            // asks for a new one rather than reconnecting as nobody.
            let data = serde_json::json!({
                "error": "unauthorized",
                "status": 401,
                "expired_at": rfc3339_ms(self.slot.valid_until()),
            });
            return self.end("auth-expired", data, false);
        }
        // Access ended (upstream refusal, revoked): nothing more goes out, not even events
        // already published, only the error naming the status.
        if let Some((error, status)) = stop.and_then(StopReason::access_error) {
            let data = serde_json::json!({ "error": error, "status": status });
            return self.end("error", data, false);
        }
        if let Some(at) = self.slot.take_expiry_notice() {
            self.last_write = Instant::now();
            return Poll::Ready(Some(Item::Own(self.expiring(at))));
        }
        if let Some(item) = self.events.next() {
            self.last_write = Instant::now();
            return Poll::Ready(Some(item));
        }
        if self.shutdown.is_cancelled() {
            return self.end("shutdown", reason("herald is restarting"), true);
        }
        match stop {
            Some(StopReason::Reconfigured) => {
                return self.end("shutdown", reason("route reconfigured"), true);
            }
            Some(StopReason::SlowConsumer) => {
                let data = reason("slow-consumer: the client did not read its events in time");
                return self.end("error", data, false);
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

/// A Unix time in milliseconds as RFC 3339.
fn rfc3339_ms(unix_ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn reason(text: &str) -> serde_json::Value {
    serde_json::json!({ "reason": text })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<E: Events> ItemSource for SseStream<E> {
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        SseStream::poll_item(self, cx)
    }

    fn is_done(&self) -> bool {
        self.done
    }
}

impl<E: Events> Body for SseStream<E> {
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
