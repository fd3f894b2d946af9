//! One SSE response body: `retry:` first, then whatever the topic has for this watcher's cursor
//! (replay, snapshot, live events), a heartbeat comment when idle, and a last event when herald
//! shuts down. It is polled by hyper only when the socket can take more, so a slow client simply
//! stops reading from the shared history and is resynced with a snapshot if it falls out of it.
//! As a `Body` it sends plain SSE text; `poll_item` exposes the same steps, tagged shared or
//! per-client, to content codings (`sse::gzip`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::encode;
use crate::hub::{Cursor, Delivery, Encoded, Encoding, Event, StopReason, Subscription};

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
    /// Events of the topic in order: replay, snapshot or live (never `Delivery::Nothing`).
    Events(Delivery),
    /// The `retry:` prelude, or the last event of the stream.
    Own(Bytes),
    /// `HEARTBEAT`.
    Heartbeat,
    /// One hub event without its `id:` line: a multiplexed stream (`sse::mux`) writes its own
    /// id (a cursor per topic) as `Own` bytes just before. Shared and cached like `Events`.
    Bare(Arc<Event>),
}

/// Something that yields `Item`s: what a content coding (`sse::gzip`) wraps.
pub trait ItemSource {
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>>;
    /// True once the last item has been yielded.
    fn is_done(&self) -> bool;
}

impl ItemSource for SseStream {
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        SseStream::poll_item(self, cx)
    }
    fn is_done(&self) -> bool {
        self.done
    }
}

pub struct SseStream {
    sub: Subscription,
    cursor: Cursor,
    /// `retry:` (and anything else that goes first), sent on the first poll.
    prelude: Option<Bytes>,
    heartbeat: Duration,
    last_write: Instant,
    /// Fires when herald shuts down: the stream sends `shutdown` and ends.
    shutdown: crate::shutdown::Flag,
    /// The `retry:` sent with the shutdown event (jittered per client).
    shutdown_retry: Duration,
    done: bool,
}

impl SseStream {
    pub fn new(
        sub: Subscription,
        cursor: Cursor,
        retry: Duration,
        heartbeat: Duration,
        shutdown: crate::shutdown::Flag,
        shutdown_retry: Duration,
    ) -> SseStream {
        SseStream {
            sub,
            cursor,
            prelude: Some(encode::retry(retry.as_millis() as u64)),
            heartbeat,
            last_write: Instant::now(),
            shutdown,
            shutdown_retry,
            done: false,
        }
    }

    fn closing_event(&self, kind: &str, reason: &str, retry: Option<Duration>) -> Bytes {
        self.closing_event_with(kind, serde_json::json!({ "reason": reason }), retry)
    }

    fn closing_event_with(
        &self,
        kind: &str,
        data: serde_json::Value,
        retry: Option<Duration>,
    ) -> Bytes {
        let envelope = serde_json::json!({
            "type": kind,
            "topic": &*self.sub.topic.key.resource,
            "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "data": data,
        });
        let mut buf = BytesMut::new();
        if let Some(r) = retry {
            buf.extend_from_slice(&encode::retry(r.as_millis() as u64));
        }
        buf.extend_from_slice(&encode::event(
            None,
            Some(kind),
            envelope.to_string().as_bytes(),
        ));
        buf.freeze()
    }

    /// The next thing to send, before any content coding (see `Item`). A coding layer such as
    /// `sse::gzip` calls this instead of polling the stream as a `Body`.
    pub fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Registering before looking closes the race with a publish between look and register.
        self.sub.slot.register(cx.waker());
        // Being polled at all means the client is taking bytes: it is not stuck.
        self.sub.slot.polled();
        if let Some(p) = self.prelude.take() {
            self.last_write = Instant::now();
            return Poll::Ready(Some(Item::Own(p)));
        }
        // Access ended (upstream 401/403, revoked, token expired): nothing more of the topic goes
        // out, not even events already published, only the error naming the status.
        if let Some((error, status)) = self
            .sub
            .slot
            .stop_reason()
            .and_then(StopReason::access_error)
        {
            self.done = true;
            let data = serde_json::json!({ "error": error, "status": status });
            return Poll::Ready(Some(Item::Own(
                self.closing_event_with("error", data, None),
            )));
        }
        let fresh = self.cursor == Cursor::Fresh;
        match self.sub.topic.next(&mut self.cursor) {
            Delivery::Nothing => {}
            events => {
                self.last_write = Instant::now();
                self.sub.topic.metrics().delivered(&events, fresh);
                return Poll::Ready(Some(Item::Events(events)));
            }
        }
        if self.shutdown.is_cancelled() {
            self.done = true;
            let retry = Some(self.shutdown_retry);
            return Poll::Ready(Some(Item::Own(self.closing_event(
                "shutdown",
                "herald is restarting",
                retry,
            ))));
        }
        if let Some(StopReason::Reconfigured) = self.sub.slot.stop_reason() {
            self.done = true;
            let retry = Some(self.shutdown_retry);
            return Poll::Ready(Some(Item::Own(self.closing_event(
                "shutdown",
                "route reconfigured",
                retry,
            ))));
        }
        if let Some(StopReason::SlowConsumer) = self.sub.slot.stop_reason() {
            self.done = true;
            return Poll::Ready(Some(Item::Own(self.closing_event(
                "error",
                "slow-consumer: the client did not read its events in time",
                None,
            ))));
        }
        let now = Instant::now();
        if now.duration_since(self.last_write) >= self.heartbeat {
            self.last_write = now;
            return Poll::Ready(Some(Item::Heartbeat));
        }
        Poll::Pending
    }
}

/// The SSE text of a hub event, cached on the event so it is made once per topic.
pub fn identity(ev: &Event) -> Bytes {
    identity_encoded(ev).bytes.clone()
}

/// The length of `identity(ev)`, without taking a reference to the shared bytes.
pub fn identity_len(ev: &Event) -> usize {
    identity_encoded(ev).bytes.len()
}

fn identity_encoded(ev: &Event) -> &Encoded {
    ev.encoded_ref(Encoding::Identity, |ev| {
        Encoded::identity(encode::hub_event(ev))
    })
}

/// The SSE text of a hub event without its leading `id:` line: a view into the cached text, so
/// no copy and no allocation.
pub fn bare(ev: &Event) -> Bytes {
    let text = identity(ev);
    let line = 4 + ev.id.len() + 1;
    let has_id = text.starts_with(b"id: ")
        && text.get(4..line - 1) == Some(ev.id.as_bytes())
        && text.get(line - 1) == Some(&b'\n');
    if has_id {
        text.slice(line..)
    } else {
        text
    }
}

impl Item {
    /// The item as plain SSE text: shared bytes as cached, so a live event costs no allocation.
    pub(crate) fn into_identity(self) -> Bytes {
        match self {
            Item::Own(b) => b,
            Item::Heartbeat => Bytes::from_static(HEARTBEAT),
            Item::Events(Delivery::One(ev)) => identity(&ev),
            Item::Events(Delivery::Many(evs)) => {
                let mut buf = BytesMut::new();
                for ev in &evs {
                    buf.extend_from_slice(&identity(ev));
                }
                buf.freeze()
            }
            Item::Events(Delivery::Nothing) => Bytes::new(),
            Item::Bare(ev) => bare(&ev),
        }
    }
}

impl Body for SseStream {
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
