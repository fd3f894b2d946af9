//! The node's one reader: a blocking `XREAD` over the streams of every topic with a channel here,
//! on its own connection, fanning each entry out to its channel (framed once, as on one node).
//! A topic new to the reader is first primed from its stream's tail (so a client resuming with a
//! `Last-Event-ID` gets its gap here too). Redis lost: each channel gets one `upstream-error`
//! naming the cluster, the reader retries with backoff, and on return primes every topic again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, RedisResult};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::entry::{self, Entry};
use super::{now_ms, Backoff, Shared, COMMAND_TIMEOUT};
use crate::hub::{envelope, Channel, Event, EventKind, Position};
use crate::routes::TopicId;

/// How long one `XREAD` blocks: the longest a topic that arrives while it blocks waits to be
/// read (usually less: `CLIENT UNBLOCK` cuts it short).
const BLOCK: Duration = Duration::from_secs(1);
/// Entries per stream per read.
const BATCH: usize = 512;

pub(super) async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut backoff = Backoff::new();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut down = false;
    while !cancel.is_cancelled() {
        let result = match conn.as_mut() {
            Some(c) => round(&shared, c, &cancel).await,
            None => match connect(&shared).await {
                Ok(c) => {
                    conn = Some(c);
                    if down {
                        // Whatever was missed is read again from each stream's tail.
                        for local in shared.lock().values_mut() {
                            local.cursor = None;
                        }
                    }
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                if down {
                    info!("cluster: Redis reachable again; topics resynchronised");
                    down = false;
                }
                backoff.reset();
            }
            Err(e) => {
                conn = None;
                shared
                    .reader_id
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                if !down {
                    warn!(error = %e, "cluster: Redis unreachable; streams keep their last state");
                    down = true;
                }
                tell_outage(&shared);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.delay()) => {}
                }
            }
        }
    }
}

async fn connect(shared: &Shared) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(COMMAND_TIMEOUT)
        .set_response_timeout(BLOCK + COMMAND_TIMEOUT);
    let mut conn = shared
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .unwrap_or(0);
    shared
        .reader_id
        .store(id, std::sync::atomic::Ordering::Relaxed);
    Ok(conn)
}

/// Prime the topics new to the reader, then one blocking read over all of them.
async fn round(
    shared: &Arc<Shared>,
    conn: &mut MultiplexedConnection,
    cancel: &CancellationToken,
) -> RedisResult<()> {
    let fresh: Vec<TopicId> = shared
        .lock()
        .iter()
        .filter(|(_, l)| l.cursor.is_none())
        .map(|(id, _)| *id)
        .collect();
    for id in fresh {
        prime(shared, conn, id).await?;
    }
    let mut keys = Vec::new();
    let mut cursors = Vec::new();
    let mut by_key = HashMap::new();
    for (id, local) in shared.lock().iter() {
        if let (Some(cursor), true) = (&local.cursor, local.channel.strong_count() > 0) {
            let key = shared.key(*id, "events");
            keys.push(key.clone());
            cursors.push(cursor.clone());
            by_key.insert(key, (*id, cursor.clone()));
        }
    }
    if keys.is_empty() {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(BLOCK) => {}
        }
        return Ok(());
    }
    let block_ms = u64::try_from(BLOCK.as_millis()).unwrap_or(1000);
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT")
        .arg(BATCH)
        .arg("BLOCK")
        .arg(block_ms)
        .arg("STREAMS")
        .arg(&keys)
        .arg(&cursors);
    let read = cmd.query_async::<Option<StreamReadReply>>(conn);
    let reply = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = read => r?,
    };
    for stream in reply.map(|r| r.keys).unwrap_or_default() {
        let Some((id, sent)) = by_key.get(&stream.key) else {
            continue;
        };
        let Some(channel) = shared.channel(*id) else {
            continue;
        };
        let now = now_ms();
        for raw in &stream.ids {
            if let Some(e) = entry::decode(raw) {
                shared.metrics.events_read.inc();
                shared
                    .metrics
                    .stream_lag_ms
                    .set(i64::try_from(now.saturating_sub(e.appended_ms)).unwrap_or(i64::MAX));
                put(&channel, e);
            }
        }
        if let Some(last) = stream.ids.last() {
            advance(shared, *id, sent, last.id.clone());
        }
    }
    Ok(())
}

/// Read the tail of topic `id`'s stream into its channel and start reading after it.
async fn prime(
    shared: &Arc<Shared>,
    conn: &mut MultiplexedConnection,
    id: TopicId,
) -> RedisResult<()> {
    let Some(channel) = shared.channel(id) else {
        return Ok(());
    };
    let count = channel.settings().history.clamp(1, shared.retention.max(1));
    let reply: StreamRangeReply = shared
        .timed(
            redis::cmd("XREVRANGE")
                .arg(shared.key(id, "events"))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(count)
                .query_async(conn),
        )
        .await?;
    let newest = reply
        .ids
        .first()
        .map_or_else(|| "0-0".to_string(), |e| e.id.clone());
    let entries: Vec<Entry> = reply.ids.iter().rev().filter_map(entry::decode).collect();
    // A refusal ends what came before it: a new channel shows neither that state nor the
    // refusal itself (its own first read decides).
    let start = entries
        .iter()
        .rposition(|e| matches!(e.kind, EventKind::Refused(_)))
        .map_or(0, |i| i + 1);
    for e in entries.into_iter().skip(start) {
        put(&channel, e);
    }
    let mut topics = shared.lock();
    if let Some(local) = topics.get_mut(&id) {
        if std::ptr::eq(local.channel.as_ptr(), Arc::as_ptr(&channel)) {
            local.cursor = Some(newest);
            local.told = false;
        }
    }
    Ok(())
}

/// Move the reader's place in topic `id`'s stream, unless it was reset meanwhile.
fn advance(shared: &Shared, id: TopicId, sent: &str, to: String) {
    if let Some(local) = shared.lock().get_mut(&id) {
        if local.cursor.as_deref() == Some(sent) {
            local.cursor = Some(to);
        }
    }
}

/// Deliver one entry to its channel. An entry past a gap (the channel missed entries that the
/// stream no longer has) first empties the channel's history, so no watcher is replayed across
/// the gap: they get a snapshot instead.
fn put(channel: &Channel, e: Entry) {
    let head = channel.head();
    if e.position.epoch == head.epoch {
        if e.position.seq <= head.seq {
            return; // already here (this node wrote it, or primed it)
        }
        if head.seq > 0 && e.position.seq > head.seq + 1 {
            channel.begin(0, 0);
        }
    }
    let ev = Event::new(e.position, e.kind, &e.envelope, Instant::now());
    channel.push(Arc::new(ev), e.doc, e.changed_at);
}

/// Redis cannot be reached: every channel not yet told gets one `upstream-error` naming the
/// cluster, in an epoch of its own, so that when Redis returns every watcher is resynchronised
/// with a snapshot and no id of it can be confused with the stream's.
fn tell_outage(shared: &Shared) {
    let channels: Vec<Arc<Channel>> = shared
        .lock()
        .values_mut()
        .filter(|l| !l.told)
        .filter_map(|l| {
            l.told = true;
            l.channel.upgrade()
        })
        .collect();
    let data = serde_json::json!({
        "error": "cluster-unavailable",
        "message": format!(
            "herald node {} cannot reach the cluster's Redis; showing the last state until it returns",
            shared.node
        ),
    })
    .to_string();
    for channel in channels {
        let env = envelope(
            EventKind::UpstreamError,
            &channel.key.resource,
            SystemTime::now(),
            None,
            data.as_bytes(),
        );
        let position = Position::new(rand::random::<u32>().max(1), 1);
        let ev = Event::new(position, EventKind::UpstreamError, &env, Instant::now());
        channel.push(Arc::new(ev), None, SystemTime::now());
    }
}
