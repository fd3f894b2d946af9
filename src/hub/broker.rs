//! The seam between a topic's writer and its channels: a [`Broker`] decides who writes a topic,
//! gives each event its position, carries it to every channel of the topic, and keeps history for
//! watchers a channel cannot serve. [`MemoryBroker`] is the single-process broker, the default:
//! its publish is an append to the one local channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::future::{self, BoxFuture};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{Channel, Draft, Event, Position};
use crate::routes::TopicId;

/// Why a broker could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The shared store cannot be reached (or answered with an error).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The lease was lost: another writer took the topic over, this one must stop.
    #[error("this node no longer writes the topic")]
    Fenced,
    /// The topic is not attached here (it was closed).
    #[error("the topic is closed")]
    Gone,
}

/// Events after a position, when the local channel no longer has them.
#[derive(Debug)]
pub enum Replay {
    Events(Vec<Arc<Event>>),
    /// Not kept (or another epoch): the watcher needs a snapshot.
    Gap,
}

/// The right to write a topic, as granted by [`Broker::lead`]; a publish under a lease that was
/// lost is refused ([`BrokerError::Fenced`]).
#[derive(Debug)]
pub struct Lease {
    /// Opaque to the writer; the broker checks it on every publish.
    pub token: u64,
    lost: CancellationToken,
}

impl Lease {
    pub fn new(token: u64, lost: CancellationToken) -> Lease {
        Lease { token, lost }
    }

    /// Resolves when the lease is lost (never, in one process).
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        self.lost.clone().cancelled_owned()
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }
}

pub trait Broker: Send + Sync + 'static {
    /// A channel for topic `id` opens on this node: from now on the topic's events reach it (the
    /// broker names its epoch).
    fn attach(&self, id: TopicId, channel: &Arc<Channel>);

    /// The channel closed: no more events for it.
    fn detach(&self, id: TopicId, channel: &Arc<Channel>);

    /// Resolves once this node may run topic `id`'s writer (at once in one process; when the
    /// lease is free in a cluster).
    fn lead(&self, id: TopicId) -> BoxFuture<'static, Result<Lease, BrokerError>>;

    /// Append the writer's next event: it gets the next position of the topic and reaches every
    /// channel of it.
    fn publish<'a>(
        &'a self,
        id: TopicId,
        lease: &'a Lease,
        draft: Draft,
    ) -> BoxFuture<'a, Result<Position, BrokerError>>;

    /// Events of topic `id` after `since`, for a watcher its channel cannot serve.
    fn history(&self, id: TopicId, since: Position) -> BoxFuture<'_, Result<Replay, BrokerError>>;

    /// Whether history outlives this process (a shared store): a stream resuming from a
    /// `Last-Event-ID` on a channel that just opened waits for its past to arrive.
    fn shared_history(&self) -> bool {
        false
    }

    /// Whether other nodes still have watchers of topic `id`: its writer here keeps it open
    /// (and keeps polling) after its own watchers left.
    fn watched_elsewhere(&self, _id: TopicId) -> bool {
        false
    }

    /// Resolves once what `detach` started is done (leases given back), bounded: awaited at a
    /// clean shutdown, after every topic closed.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(future::ready(()))
    }

    /// The node that writes topic `id`, if another process may (for the status page).
    fn writer(&self, _id: TopicId) -> Option<String> {
        None
    }
}

/// The single-process broker: one channel per topic, which is also its history; every node is
/// its own writer.
#[derive(Debug, Default)]
pub struct MemoryBroker {
    channels: Mutex<HashMap<TopicId, Attached>>,
    next_token: AtomicU64,
}

#[derive(Debug)]
struct Attached {
    /// Fences writers of an earlier channel of the same topic (closed and opened again).
    token: u64,
    channel: Weak<Channel>,
}

impl MemoryBroker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TopicId, Attached>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lease for topic `id`'s current channel.
    pub fn lease_now(&self, id: TopicId) -> Lease {
        let token = self.lock().get(&id).map_or(0, |a| a.token);
        Lease::new(token, CancellationToken::new())
    }
}

impl Broker for MemoryBroker {
    fn attach(&self, id: TopicId, channel: &Arc<Channel>) {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed) + 1;
        // A random epoch per channel: a client holding an id from before this channel existed
        // (an earlier topic, another process) is never replayed the wrong events.
        channel.begin(rand::random::<u32>() | 1, 0);
        self.lock().insert(
            id,
            Attached {
                token,
                channel: Arc::downgrade(channel),
            },
        );
    }

    fn detach(&self, id: TopicId, channel: &Arc<Channel>) {
        let mut channels = self.lock();
        if channels
            .get(&id)
            .is_some_and(|a| std::ptr::eq(a.channel.as_ptr(), Arc::as_ptr(channel)))
        {
            channels.remove(&id);
        }
    }

    fn lead(&self, id: TopicId) -> BoxFuture<'static, Result<Lease, BrokerError>> {
        Box::pin(future::ready(Ok(self.lease_now(id))))
    }

    fn publish<'a>(
        &'a self,
        id: TopicId,
        lease: &'a Lease,
        draft: Draft,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        let result = {
            let channels = self.lock();
            match channels.get(&id) {
                Some(a) if a.token != lease.token => Err(BrokerError::Fenced),
                Some(a) => a.channel.upgrade().ok_or(BrokerError::Gone),
                None => Err(BrokerError::Gone),
            }
        };
        Box::pin(future::ready(result.map(|channel| channel.append(draft))))
    }

    fn history(&self, _: TopicId, _: Position) -> BoxFuture<'_, Result<Replay, BrokerError>> {
        // The channel is the whole history: what it does not have, nobody has.
        Box::pin(future::ready(Ok(Replay::Gap)))
    }
}
