//! Presence: every third of a lease, each node refreshes its heartbeat key and its entry in each
//! watched topic's watcher set (a ZSET of node names scored by expiry), and learns who writes
//! each of its topics (for the status page). One pipeline per round, whatever the topic count.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{now_ms, Shared};
use crate::routes::TopicId;

pub(super) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = shared.lease / 3;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        round(&shared).await;
    }
}

async fn round(shared: &Arc<Shared>) {
    let ttl = shared.lease_ms().saturating_mul(3);
    let now = now_ms();
    let watched: Vec<TopicId> = {
        let topics = shared.lock();
        topics
            .iter()
            .filter(|(_, l)| l.channel.upgrade().is_some_and(|c| c.watcher_count() > 0))
            .map(|(id, _)| *id)
            .collect()
    };
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(format!("{}:node:{}", shared.prefix, shared.node))
        .arg(now)
        .arg("PX")
        .arg(ttl)
        .ignore();
    for id in &watched {
        let set = shared.key(*id, "watchers");
        pipe.cmd("ZADD")
            .arg(&set)
            .arg(now + ttl)
            .arg(&shared.node)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&set)
            .arg("-inf")
            .arg(now)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&set)
            .arg(ttl)
            .ignore()
            .cmd("GET")
            .arg(shared.key(*id, "lease"));
    }
    let mut conn = shared.conn.clone();
    let Ok(writers) = shared
        .timed(pipe.query_async::<Vec<Option<String>>>(&mut conn))
        .await
    else {
        return;
    };
    let mut topics = shared.lock();
    for (id, writer) in watched.iter().zip(writers) {
        if let Some(local) = topics.get_mut(id) {
            // The lease value is `<node>:<token>`: the node is what the status page shows.
            local.writer = writer.and_then(|w| w.rsplit_once(':').map(|(n, _)| n.to_string()));
        }
    }
}
