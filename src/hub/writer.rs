//! A topic's single writer: what its source reads goes through here once, whatever the number of
//! watchers or nodes. Changes closer together than the route's `min_interval` are coalesced
//! (newest wins), then diffed against the last document and published through the broker.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::broker::{Broker, Lease};
use super::{envelope, Doc, Draft, EventKind, Freshness, PatchFormat, TopicSettings};
use crate::diff::{self, Change};
use crate::routes::TopicId;
use crate::source::{Document, Feed, Source, SourceError, Target, Update};

/// Run a topic: its source feeds its writer until `cancel` fires, the upstream refuses the
/// topic's credentials (which ends the topic) or the lease is lost (true: the source stops too,
/// another node writes the topic now).
pub(super) async fn run(
    source: Arc<dyn Source>,
    target: Target,
    writer: Writer,
    feed: Feed,
    updates: &mut mpsc::Receiver<Update>,
    cancel: CancellationToken,
) -> bool {
    let stop = cancel.child_token();
    let reading = source.run(target, feed, stop.clone());
    let writing = async {
        let lost = writer.run(updates, cancel).await;
        stop.cancel();
        lost
    };
    tokio::join!(reading, writing).1
}

pub(super) struct Writer {
    pub id: TopicId,
    pub resource: Arc<str>,
    pub settings: Arc<TopicSettings>,
    pub broker: Arc<dyn Broker>,
    pub lease: Lease,
    doc: Option<Arc<Doc>>,
    changed_at: SystemTime,
    failing: bool,
    /// The broker could not take the last event (its store was unreachable): the next read
    /// republishes the whole state, so nobody keeps a state that missed a change.
    unsent: bool,
    /// The newest change held back by coalescing, and when the last one went out.
    held: Option<Document>,
    last_sent: Option<Instant>,
    /// When the upstream last agreed with what was published (for GETs served from the topic).
    fresh: Freshness,
}

/// Why the writer stopped publishing.
enum Flow {
    Continue,
    /// The credentials were refused: the topic is over.
    End,
}

impl Writer {
    pub fn new(
        id: TopicId,
        resource: Arc<str>,
        settings: Arc<TopicSettings>,
        broker: Arc<dyn Broker>,
        lease: Lease,
        fresh: Freshness,
    ) -> Writer {
        Writer {
            id,
            resource,
            settings,
            broker,
            lease,
            doc: None,
            changed_at: SystemTime::now(),
            failing: false,
            unsent: false,
            held: None,
            last_sent: None,
            fresh,
        }
    }

    /// Returns true when it stopped because the lease was lost.
    async fn run(
        mut self,
        updates: &mut mpsc::Receiver<Update>,
        cancel: CancellationToken,
    ) -> bool {
        loop {
            let due = self.due();
            let flow = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.lease.lost() => {
                    debug!(topic = %self.id, "lease lost: another node writes this topic");
                    return true;
                }
                u = updates.recv() => match u {
                    Some(u) => self.offer(u, Instant::now()).await,
                    None => break,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(far_future)), if due.is_some() => {
                    self.flush(Instant::now()).await
                }
            };
            if let Flow::End = flow {
                cancel.cancel();
                break;
            }
        }
        false
    }

    /// When the held change is due, if any.
    fn due(&self) -> Option<Instant> {
        self.held.as_ref()?;
        Some(self.last_sent? + self.settings.min_interval)
    }

    /// Take an update: publish it now, or hold it if it is a change inside the current window.
    async fn offer(&mut self, update: Update, now: Instant) -> Flow {
        match update {
            Update::Document(doc) => {
                let window = self.settings.min_interval;
                if self.last_sent.is_some_and(|t| now < t + window) {
                    // What was published is behind the upstream until the window ends.
                    self.held = Some(doc);
                    self.fresh.clear();
                    Flow::Continue
                } else {
                    self.held = None;
                    self.last_sent = Some(now);
                    self.document(doc).await
                }
            }
            // The held change is newer news than "unchanged"; it goes out when the window ends.
            Update::Unchanged if self.held.is_some() => Flow::Continue,
            Update::Unchanged => {
                if self.failing || self.unsent {
                    self.recovered().await;
                }
                self.fresh.mark();
                Flow::Continue
            }
            Update::Failed(e) => {
                self.fresh.clear();
                // A failure follows whatever change was held, in order.
                if let Flow::End = self.flush_held(now).await {
                    return Flow::End;
                }
                self.failed(e).await
            }
            // Passed events are not states: none is coalesced or dropped.
            Update::Pass(data) => {
                self.flush_held(now).await;
                self.failing = false;
                self.publish(EventKind::Pass, None, &data, None).await;
                Flow::Continue
            }
            Update::Reset => {
                self.flush_held(now).await;
                if self.doc.take().is_none() {
                    // Nothing to send a snapshot of (a pass route): say that events were missed.
                    self.publish(EventKind::Reset, None, b"null", None).await;
                }
                // Otherwise the next document goes out as a snapshot.
                Flow::Continue
            }
        }
    }

    async fn flush_held(&mut self, now: Instant) -> Flow {
        match self.held.take() {
            Some(held) => {
                self.last_sent = Some(now);
                self.document(held).await
            }
            None => Flow::Continue,
        }
    }

    async fn flush(&mut self, now: Instant) -> Flow {
        match self.held.take() {
            Some(doc) => {
                self.last_sent = Some(now);
                self.document(doc).await
            }
            None => Flow::Continue,
        }
    }

    /// A document read by the source: diffed against the last one and published as a patch, a
    /// snapshot, or nothing.
    async fn document(&mut self, doc: Document) -> Flow {
        let new = match Doc::from_document(&doc) {
            Some(d) => Arc::new(d),
            None => return Flow::Continue,
        };
        // After a failure, or an event the broker did not take, watchers get the whole state.
        let unsent = std::mem::take(&mut self.unsent);
        let was_failing = std::mem::take(&mut self.failing) || unsent;
        let old = self.doc.clone();
        if old.as_deref() == Some(&*new) {
            if was_failing {
                self.recovered().await;
            }
            self.fresh.mark();
            return Flow::Continue;
        }
        let change = match (old.as_deref(), &doc) {
            (Some(old), Document::Json(_)) if old.json && !was_failing => self.diff(old, &new),
            _ => Change::Snapshot,
        };
        let now = SystemTime::now();
        match change {
            // Different text, equal values: nothing a client could see changed.
            Change::None if was_failing => self.recovered().await,
            Change::None => {}
            Change::Patch(patch) => {
                self.doc = Some(new.clone());
                self.changed_at = now;
                let format = match self.settings.diff_mode {
                    diff::Mode::MergePatch => PatchFormat::MergePatch,
                    _ => PatchFormat::JsonPatch,
                };
                let data = serde_json::to_vec(&patch).unwrap_or_default();
                self.publish(EventKind::Patch, Some(format), &data, Some(new))
                    .await;
            }
            Change::Snapshot => {
                self.doc = Some(new.clone());
                self.changed_at = now;
                let data = new.data.clone();
                self.publish(EventKind::Snapshot, None, &data, Some(new))
                    .await;
            }
        }
        self.fresh.mark();
        Flow::Continue
    }

    fn diff(&self, old: &Doc, new: &Doc) -> Change {
        // Documents are kept as text (a fraction of a parsed tree's memory): both are parsed
        // here, once per change, and the trees are gone when the patch is made.
        match (
            serde_json::from_slice::<serde_json::Value>(&old.data),
            serde_json::from_slice::<serde_json::Value>(&new.data),
        ) {
            (Ok(a), Ok(b)) => {
                diff::diff(&a, &b, self.settings.diff_mode, &self.settings.diff_options)
            }
            _ => Change::Snapshot,
        }
    }

    /// The upstream answers again: every watcher gets the current state as a fresh snapshot.
    async fn recovered(&mut self) {
        self.failing = false;
        debug!(topic = %self.id, "upstream recovered");
        if let Some(doc) = self.doc.clone() {
            let data = doc.data.clone();
            self.publish(EventKind::Snapshot, None, &data, Some(doc))
                .await;
        }
    }

    async fn failed(&mut self, e: SourceError) -> Flow {
        if let Some(status) = self.settings.refusal(&e) {
            // Every watcher of a per-credential topic presented the refused credentials.
            self.doc = None;
            self.publish(EventKind::Refused(status), None, b"null", None)
                .await;
            debug!(topic = %self.id, status, "upstream refused the credentials");
            return Flow::End;
        }
        if self.failing {
            return Flow::Continue; // told once per outage
        }
        self.failing = true;
        #[derive(Serialize)]
        struct ErrorData<'a> {
            error: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<u16>,
            message: String,
        }
        let data = serde_json::to_vec(&ErrorData {
            error: e.code(),
            status: e.status(),
            message: e.to_string(),
        })
        .unwrap_or_default();
        self.publish(EventKind::UpstreamError, None, &data, None)
            .await;
        Flow::Continue
    }

    async fn publish(
        &mut self,
        kind: EventKind,
        format: Option<PatchFormat>,
        data: &[u8],
        doc: Option<Arc<Doc>>,
    ) {
        let at = match kind {
            EventKind::Snapshot | EventKind::Patch => self.changed_at,
            _ => SystemTime::now(),
        };
        let draft = Draft {
            kind,
            envelope: envelope(kind, &self.resource, at, format, data),
            doc,
            changed_at: self.changed_at,
            made: StdInstant::now(),
        };
        match self.broker.publish(self.id, &self.lease, draft).await {
            Ok(_) => self.unsent = false,
            Err(e) => {
                self.unsent = matches!(e, super::BrokerError::Unavailable(_));
                warn!(topic = %self.id, error = %e, "event not published");
            }
        }
    }
}

impl Doc {
    /// The text a document is kept and sent as: compact JSON, or a text body as a JSON string.
    pub fn from_document(doc: &Document) -> Option<Doc> {
        let (data, json) = match doc {
            Document::Json(text) => (text.clone(), true),
            Document::Text(t) => (Bytes::from(serde_json::to_vec(t).ok()?), false),
        };
        Some(Doc { data, json })
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::broker::MemoryBroker;
    use crate::hub::{Channel, Cursor, Delivery};
    use crate::routes::TopicKey;

    fn settings(min_interval: Duration) -> Arc<TopicSettings> {
        Arc::new(TopicSettings {
            diff_mode: diff::Mode::JsonPatch,
            diff_options: diff::Options::default(),
            history: 100,
            history_bytes: 1 << 20,
            grace: Duration::from_secs(1),
            min_interval,
            metrics: Arc::new(crate::telemetry::Metrics::new()).route("/t"),
            per_credential: false,
            refuse: Default::default(),
            pass_through: false,
        })
    }

    /// A writer over an in-process broker, and the channel its events land in.
    fn writer(min_interval: Duration) -> (Writer, Arc<Channel>) {
        let settings = settings(min_interval);
        let key = TopicKey {
            route: "/t".into(),
            resource: "/t".into(),
            vary: 0,
        };
        let channel = Arc::new(Channel::new(key.clone(), settings.clone()));
        let broker = Arc::new(MemoryBroker::default());
        broker.attach(key.id(), &channel);
        let lease = broker.lease_now(key.id());
        let w = Writer::new(
            key.id(),
            key.resource.clone(),
            settings,
            broker,
            lease,
            Freshness::default(),
        );
        (w, channel)
    }

    /// A document large enough that a one-field change is sent as a patch.
    fn doc(n: u64) -> Update {
        Update::Document(Document::json(
            &serde_json::json!({ "n": n, "pad": "x".repeat(100) }),
        ))
    }

    /// Every event the channel has, as (kind, data).
    fn events(channel: &Channel) -> Vec<(String, serde_json::Value)> {
        let mut cursor = Cursor::At(crate::hub::Position::new(channel.head().epoch, 0));
        let evs = match channel.next(&mut cursor) {
            Delivery::Nothing => vec![],
            Delivery::One(e) => vec![e],
            Delivery::Many(v) => v,
        };
        evs.iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_slice(e.envelope()).unwrap();
                (e.kind.name().to_string(), v["data"].clone())
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn coalesces_changes_inside_the_window_and_keeps_the_newest() {
        let (mut w, channel) = writer(Duration::from_millis(100));
        let t0 = Instant::now();
        w.offer(doc(1), t0).await;
        w.offer(doc(2), t0 + Duration::from_millis(10)).await;
        w.offer(Update::Unchanged, t0 + Duration::from_millis(20))
            .await;
        w.offer(doc(3), t0 + Duration::from_millis(30)).await;
        assert_eq!(w.due(), Some(t0 + Duration::from_millis(100)));
        w.flush(t0 + Duration::from_millis(100)).await;
        assert_eq!(w.due(), None);
        // A failure flushes a held change first, so order is kept.
        w.offer(doc(4), t0 + Duration::from_millis(120)).await;
        w.offer(
            Update::Failed(SourceError::Connect),
            t0 + Duration::from_millis(130),
        )
        .await;
        let kinds: Vec<_> = events(&channel)
            .into_iter()
            .map(|(k, d)| format!("{k}:{d}"))
            .collect();
        assert!(
            kinds[0].starts_with("snapshot:{\"n\":1,"),
            "the first change goes out at once: {kinds:?}"
        );
        assert!(kinds[1].starts_with("patch:"), "{kinds:?}");
        assert!(kinds[1].contains("\"value\":3"), "newest wins: {kinds:?}");
        assert!(kinds[2].contains("\"value\":4"), "{kinds:?}");
        assert!(kinds[3].starts_with("upstream-error:"), "{kinds:?}");
        assert_eq!(kinds.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_window_passes_everything_through() {
        let (mut w, channel) = writer(Duration::ZERO);
        let t0 = Instant::now();
        for n in 0..5 {
            w.offer(doc(n), t0).await;
        }
        assert_eq!(events(&channel).len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn patches_name_their_format() {
        let (mut w, channel) = writer(Duration::ZERO);
        w.offer(doc(1), Instant::now()).await;
        w.offer(doc(2), Instant::now()).await;
        let mut cursor = Cursor::At(crate::hub::Position::new(channel.head().epoch, 1));
        let Delivery::One(ev) = channel.next(&mut cursor) else {
            panic!("one patch")
        };
        let v: serde_json::Value = serde_json::from_slice(ev.envelope()).unwrap();
        assert_eq!(v["format"], "json-patch");
        assert!(v["data"].is_array());
    }
}
