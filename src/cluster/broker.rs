//! The hub's side of the cluster: attach and detach channels (the reader follows them), lead
//! through a lease, append through the fencing script (and deliver to this node's channel at
//! once), and read a topic's history back from its stream.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tracing::debug;

use super::{entry, lease, presence, Local, RedisBroker, COMMAND_TIMEOUT};
use crate::hub::{Broker, BrokerError, Channel, Draft, Event, Lease, Position, Replay};
use crate::routes::TopicId;

impl Broker for RedisBroker {
    fn attach(&self, id: TopicId, channel: &Arc<Channel>) {
        let old = self.shared.lock().insert(
            id,
            Local {
                channel: Arc::downgrade(channel),
                cursor: None,
                told: false,
                held: None,
                writer: None,
                elsewhere: false,
            },
        );
        // A channel of the same topic that closed but was not detached yet: its writer is over.
        if let Some(held) = old.and_then(|l| l.held) {
            held.lost.cancel();
            self.shared.release(id, held);
        }
        self.shared.wake_reader();
    }

    fn detach(&self, id: TopicId, channel: &Arc<Channel>) {
        let removed = {
            let mut topics = self.shared.lock();
            let same = topics
                .get(&id)
                .is_some_and(|l| std::ptr::eq(l.channel.as_ptr(), Arc::as_ptr(channel)));
            if same {
                topics.remove(&id)
            } else {
                None
            }
        };
        if removed.is_some() {
            presence::leave(&self.shared, id);
        }
        if let Some(held) = removed.and_then(|l| l.held) {
            debug!(topic = %id, "cluster: lease given back");
            self.shared.release(id, held);
        }
    }

    fn lead(&self, id: TopicId) -> BoxFuture<'static, Result<Lease, BrokerError>> {
        Box::pin(lease::acquire(self.shared.clone(), id))
    }

    fn publish<'a>(
        &'a self,
        id: TopicId,
        lease: &'a Lease,
        draft: Draft,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        Box::pin(self.append(id, lease, draft))
    }

    fn history(&self, id: TopicId, since: Position) -> BoxFuture<'_, Result<Replay, BrokerError>> {
        Box::pin(self.read_history(id, since))
    }

    fn shared_history(&self) -> bool {
        true
    }

    fn watched_elsewhere(&self, id: TopicId) -> bool {
        self.shared
            .lock()
            .get(&id)
            .is_some_and(|l| l.held.is_some() && l.elsewhere)
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let chores = &self.shared.chores;
            chores.close();
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, chores.wait()).await;
            chores.reopen();
        })
    }

    fn writer(&self, id: TopicId) -> Option<String> {
        let topics = self.shared.lock();
        let local = topics.get(&id)?;
        if local.held.is_some() {
            return Some(self.shared.node.clone());
        }
        local.writer.clone()
    }
}

impl RedisBroker {
    async fn append(
        &self,
        id: TopicId,
        lease: &Lease,
        draft: Draft,
    ) -> Result<Position, BrokerError> {
        let s = &self.shared;
        if lease.is_lost() {
            return Err(BrokerError::Fenced);
        }
        let (doc, json): (&[u8], &str) = match &draft.doc {
            Some(d) => (&d.data, if d.json { "1" } else { "0" }),
            None => (b"", ""),
        };
        let age_ms = u64::try_from(s.retention_age.as_millis()).unwrap_or(u64::MAX);
        let mut inv = s.scripts.publish.prepare_invoke();
        inv.key(s.key(id, "lease"))
            .key(s.key(id, "events"))
            .arg(s.lease_value(lease.token))
            .arg(rand::random::<u32>().max(1))
            .arg(s.retention)
            .arg(age_ms)
            .arg(entry::kind_code(draft.kind))
            .arg(&draft.envelope)
            .arg(doc)
            .arg(json)
            .arg(entry::unix_ms(draft.changed_at))
            .arg(s.stream_ttl_ms());
        let mut conn = s.conn.clone();
        let reply: Option<(String, u64, String)> = s
            .timed(inv.invoke_async(&mut conn))
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let Some((epoch, seq, _)) = reply else {
            s.fence(id, lease.token);
            return Err(BrokerError::Fenced);
        };
        let epoch: u32 = epoch
            .parse()
            .map_err(|_| BrokerError::Unavailable(format!("bad epoch {epoch:?} in the stream")))?;
        s.metrics.events_written.inc();
        let position = Position::new(epoch, seq);
        // This node's watchers get it now; the reader skips it when it reads it back.
        if let Some(channel) = s.channel(id) {
            let ev = Event::new(position, draft.kind, &draft.envelope, draft.made);
            channel.push(Arc::new(ev), draft.doc, draft.changed_at);
        }
        Ok(position)
    }

    async fn read_history(&self, id: TopicId, since: Position) -> Result<Replay, BrokerError> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let reply: redis::streams::StreamRangeReply = s
            .timed(
                redis::cmd("XREVRANGE")
                    .arg(s.key(id, "events"))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(s.retention)
                    .query_async(&mut conn),
            )
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let entries: Vec<entry::Entry> = reply.ids.iter().rev().filter_map(entry::decode).collect();
        let Some(first) = entries.first() else {
            return Ok(Replay::Gap);
        };
        if first.position.epoch != since.epoch || first.position.seq > since.seq + 1 {
            return Ok(Replay::Gap);
        }
        Ok(Replay::Events(
            entries
                .into_iter()
                .filter(|e| e.position.seq > since.seq)
                .map(|e| {
                    Arc::new(Event::new(
                        e.position,
                        e.kind,
                        &e.envelope,
                        std::time::Instant::now(),
                    ))
                })
                .collect(),
        ))
    }
}
