//! Presence: every third of a lease, each node refreshes its heartbeat key and its entry in each
//! watched topic's watcher set (a ZSET of node names scored by expiry), learns who writes each of
//! its topics (status page) and, for the topics it writes, whether other nodes still watch them:
//! a writer keeps polling while any node has watchers, and stops `grace` after none has.
//! One pipeline per round, whatever the topic count.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{now_ms, Shared};
use crate::routes::TopicId;

pub(super) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = shared.lease / 3;
    loop {
        round(&shared).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// This node's channel of topic `id` closed: it no longer counts as a watcher of it.
pub(super) fn leave(shared: &Arc<Shared>, id: TopicId) {
    let shared = shared.clone();
    shared.clone().chores.spawn(async move {
        let mut conn = shared.conn.clone();
        let _ = shared
            .timed(
                redis::cmd("ZREM")
                    .arg(shared.key(id, "watchers"))
                    .arg(&shared.node)
                    .query_async::<i64>(&mut conn),
            )
            .await;
    });
}

async fn round(shared: &Arc<Shared>) {
    let ttl = shared.lease_ms().saturating_mul(3);
    let now = now_ms();
    // (topic, watched here)
    let topics: Vec<(TopicId, bool)> = {
        let topics = shared.lock();
        topics
            .iter()
            .map(|(id, l)| {
                let watched = l.channel.upgrade().is_some_and(|c| c.watcher_count() > 0);
                (*id, watched)
            })
            .collect()
    };
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(format!("{}:node:{}", shared.prefix, shared.node))
        .arg(now)
        .arg("PX")
        .arg(ttl)
        .ignore();
    for (id, watched) in &topics {
        let set = shared.key(*id, "watchers");
        if *watched {
            pipe.cmd("ZADD")
                .arg(&set)
                .arg(now + ttl)
                .arg(&shared.node)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&set)
                .arg(ttl)
                .ignore();
        } else {
            pipe.cmd("ZREM").arg(&set).arg(&shared.node).ignore();
        }
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&set)
            .arg(now)
            .arg("+inf")
            .cmd("GET")
            .arg(shared.key(*id, "lease"));
    }
    let mut conn = shared.conn.clone();
    let Ok(replies) = shared
        .timed(pipe.query_async::<Vec<redis::Value>>(&mut conn))
        .await
    else {
        return;
    };
    let mut replies = replies.into_iter();
    let mut map = shared.lock();
    for (id, _) in &topics {
        let (Some(watchers), Some(writer)) = (replies.next(), replies.next()) else {
            break;
        };
        let watchers: Vec<String> = redis::from_redis_value(&watchers).unwrap_or_default();
        let writer: Option<String> = redis::from_redis_value(&writer).unwrap_or_default();
        if let Some(local) = map.get_mut(id) {
            local.elsewhere = watchers.iter().any(|n| *n != shared.node);
            // The lease value is `<node>:<token>`: the node is what the status page shows.
            local.writer = writer.and_then(|w| w.rsplit_once(':').map(|(n, _)| n.to_string()));
        }
    }
}
