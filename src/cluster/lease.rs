//! Topic leases: `SET NX PX` through a script, renewed every third of the lease while held;
//! a lease that cannot be renewed for a whole lease time counts as lost (another node may hold
//! it by then), and the publish script refuses any append under a lease that is not ours.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{jitter, Backoff, Held, Shared};
use crate::hub::{BrokerError, Lease};
use crate::routes::TopicId;

/// Resolves once this node holds topic `id`'s lease; until then retries every third of a lease
/// and when the holder's lease would run out, so a dead writer's topic is taken over within
/// about a lease time.
pub(super) async fn acquire(shared: Arc<Shared>, id: TopicId) -> Result<Lease, BrokerError> {
    let mut backoff = Backoff::new();
    loop {
        let token: u64 = rand::random();
        let mut inv = shared.scripts.acquire.prepare_invoke();
        inv.key(shared.key(id, "lease"))
            .key(shared.key(id, "events"))
            .arg(shared.lease_value(token))
            .arg(shared.lease_ms());
        let mut conn = shared.conn.clone();
        let wait = match shared
            .timed(inv.invoke_async::<(i64, i64)>(&mut conn))
            .await
        {
            Ok((taken, _)) if taken >= 0 => {
                let lost = CancellationToken::new();
                let stop = shared.cancel.child_token();
                let registered = {
                    let mut topics = shared.lock();
                    match topics.get_mut(&id) {
                        Some(local) => {
                            local.held = Some(Held {
                                token,
                                lost: lost.clone(),
                                stop: stop.clone(),
                            });
                            local.writer = Some(shared.node.clone());
                            true
                        }
                        None => false,
                    }
                };
                if !registered {
                    // The topic closed here meanwhile: give the lease straight back.
                    shared.release(
                        id,
                        Held {
                            token,
                            lost: lost.clone(),
                            stop,
                        },
                    );
                    return Err(BrokerError::Gone);
                }
                if taken == 1 {
                    shared.metrics.takeovers.inc();
                    info!(topic = %id, node = %shared.node, "cluster: took the topic over");
                } else {
                    debug!(topic = %id, "cluster: leading the topic");
                }
                shared.metrics.leases_held.inc();
                tokio::spawn(renew(shared.clone(), id, token, lost.clone(), stop));
                return Ok(Lease::new(token, lost));
            }
            // Held: try again every third of a lease (a lease given back by a node that shut
            // down is taken within that), and just after it would expire unrenewed (a live
            // holder renews it before), so a dead holder's topic is taken over about a lease
            // after its last renewal.
            Ok((_, ttl)) => {
                backoff.reset();
                let ttl = Duration::from_millis(u64::try_from(ttl).unwrap_or(0));
                ttl.min(shared.lease / 3) + jitter(Duration::from_millis(40))
            }
            Err(e) => {
                debug!(topic = %id, error = %e, "cluster: lease not taken (Redis)");
                backoff.delay()
            }
        };
        tokio::select! {
            _ = shared.cancel.cancelled() => return Err(BrokerError::Gone),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Keep the lease while `stop` is not cancelled; cancel `lost` when it is not ours any more.
async fn renew(
    shared: Arc<Shared>,
    id: TopicId,
    token: u64,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let every = shared.lease / 3;
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = lost.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        let mut inv = shared.scripts.renew.prepare_invoke();
        inv.key(shared.key(id, "lease"))
            .key(shared.key(id, "events"))
            .arg(shared.lease_value(token))
            .arg(shared.lease_ms())
            .arg(shared.stream_ttl_ms());
        let mut conn = shared.conn.clone();
        match shared.timed(inv.invoke_async::<i64>(&mut conn)).await {
            Ok(1) => renewed = Instant::now(),
            Ok(_) => {
                info!(topic = %id, "cluster: lease lost (another node writes the topic)");
                break;
            }
            // Unsure for a whole lease: another node may have taken it since.
            Err(_) if renewed.elapsed() >= shared.lease => {
                info!(topic = %id, "cluster: lease not renewed in time (Redis unreachable)");
                break;
            }
            Err(_) => {}
        }
    }
    lost.cancel();
    shared.fence(id, token);
    shared.metrics.leases_held.dec();
}
