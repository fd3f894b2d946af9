//! The polling source: one request per interval (jittered so topics do not poll in step),
//! conditional requests with the last `ETag`/`Last-Modified`, a timeout on every request,
//! exponential backoff with full jitter while the upstream fails, and a poll at once when poked.
//! Every request waits for the upstream's [`Budget`]; the next poll's time follows `hints`
//! (adaptive interval, `Cache-Control: max-age`, `Retry-After`).

use std::hash::{Hash, Hasher};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::header::{ACCEPT, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use http::{HeaderMap, HeaderValue, StatusCode};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::budget::Budget;
use super::hints::{self, Adaptive};
use super::{parse_body, Feed, Origin, Source, SourceError, Target, Update};
use crate::config::source::SourceKind;

/// Longest wait between polls while the upstream keeps failing (or the interval, if longer).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Validators and fingerprint of the last good response, and what it said about the next poll.
#[derive(Default)]
struct Last {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
    fingerprint: Option<(usize, u64)>,
    /// `Cache-Control: max-age` of the last answer.
    max_age: Option<std::time::Duration>,
    /// `Retry-After` of the last 429 or 503.
    retry_after: Option<std::time::Duration>,
}

/// Polls the origin: the source of every route without another one.
#[derive(Debug, Clone)]
pub struct Poller {
    origin: Origin,
    budget: std::sync::Arc<Budget>,
}

impl Poller {
    pub fn new(origin: Origin, budget: std::sync::Arc<Budget>) -> Poller {
        Poller { origin, budget }
    }
}

impl Source for Poller {
    fn run(&self, target: Target, feed: Feed, cancel: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(run(
            self.origin.clone(),
            self.budget.clone(),
            target,
            feed,
            cancel,
        ))
    }
}

/// What one poll needs, resolved once per topic.
struct Spec {
    url: reqwest::Url,
    interval: Duration,
    timeout: Duration,
    max_body: usize,
    honor_cache_control: bool,
}

async fn run(
    origin: Origin,
    budget: std::sync::Arc<Budget>,
    target: Target,
    feed: Feed,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("poller", topic = %crate::telemetry::redact(&target.resource));
    async move {
        debug!("poller started");
        let route = &target.route.config;
        let Ok(url) = origin.url_for(&target.resource) else {
            // The resource was built from a matched route; it always forms a URL.
            let _ = feed.send(Update::Failed(SourceError::Other)).await;
            return;
        };
        let spec = Spec {
            url,
            interval: route.interval,
            timeout: route.timeout,
            max_body: route.max_body,
            honor_cache_control: route.honor_cache_control,
        };
        let client = origin.client();
        let mut last = Last::default();
        let mut failures: u32 = 0;
        let mut next = Instant::now();
        // No poll before this, poke or not (the upstream's `Retry-After`).
        let mut not_before = Instant::now();
        let mut adaptive = Adaptive::new(spec.interval, route.max_interval);
        target.stats.set_kind(SourceKind::Poll);
        target.stats.set_interval(adaptive.current());
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
                _ = target.poke.notified() => {
                    debug!("poked: polling now");
                    adaptive.changed();
                    if not_before > Instant::now() {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep_until(not_before) => {}
                        }
                    }
                }
            }
            // Anchored on the start of the request (after any wait for the budget), so a slow
            // answer does not stretch the period.
            let mut started = Instant::now();
            let update = tokio::select! {
                _ = cancel.cancelled() => break,
                u = async {
                    let _permit = budget.acquire().await;
                    started = Instant::now();
                    poll_once(client, &spec, &target, &mut last).await
                } => u,
            };
            let wait = match &update {
                Update::Failed(e) => {
                    failures = failures.saturating_add(1);
                    let mut wait = backoff(spec.interval, failures);
                    if let Some(ra) = last.retry_after.take() {
                        wait = wait.max(ra);
                        not_before = Instant::now() + ra;
                        debug!(retry_after = ?ra, "upstream asked to wait");
                    }
                    if failures == 1 {
                        warn!(error = %e, retry_in = ?wait, "upstream poll failed");
                    } else {
                        debug!(error = %e, failures, retry_in = ?wait, "upstream still failing");
                    }
                    wait
                }
                _ => {
                    if failures > 0 {
                        info!(failures, "upstream recovered");
                    }
                    failures = 0;
                    let changed = matches!(update, Update::Document(_));
                    target.stats.read(changed);
                    if changed {
                        adaptive.changed();
                    } else {
                        adaptive.unchanged();
                    }
                    let mut wait = jitter(adaptive.current());
                    if spec.honor_cache_control {
                        if let Some(age) = last.max_age {
                            wait = wait.max(age);
                        }
                    }
                    wait
                }
            };
            target.stats.set_interval(wait);
            if feed.send(update).await.is_err() {
                break;
            }
            // Never schedule in the past (a poll that took longer than the interval runs again
            // at once).
            next = (started + wait).max(Instant::now());
        }
        debug!("poller stopped");
    }
    .instrument(span)
    .await
}

async fn poll_once(
    client: &reqwest::Client,
    spec: &Spec,
    target: &Target,
    last: &mut Last,
) -> Update {
    let mut req = client
        .get(spec.url.clone())
        .timeout(spec.timeout)
        .headers(target.credentials.clone())
        .header(ACCEPT, "application/json, */*;q=0.5");
    if let Some(etag) = &last.etag {
        req = req.header(IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = &last.last_modified {
        req = req.header(IF_MODIFIED_SINCE, lm.clone());
    }
    let sent = Instant::now();
    let result = req.send().await;
    let status = match &result {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) if e.is_timeout() => Err("timeout"),
        Err(e) if e.is_connect() => Err("unreachable"),
        Err(_) => Err("error"),
    };
    target.metrics.upstream(status, sent.elapsed());
    let resp = match result {
        Ok(r) => r,
        Err(e) => return Update::Failed(classify(&e, spec.timeout)),
    };
    let status = resp.status();
    last.max_age = hints::max_age(resp.headers());
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        last.retry_after = hints::retry_after(resp.headers());
    }
    if status == StatusCode::NOT_MODIFIED && last.fingerprint.is_some() {
        return Update::Unchanged;
    }
    if !status.is_success() {
        return Update::Failed(SourceError::Status(status.as_u16()));
    }
    let headers = resp.headers().clone();
    let body = match read_capped(resp, spec.max_body, spec.timeout).await {
        Ok(b) => b,
        Err(e) => return Update::Failed(e),
    };
    let fingerprint = Some((body.len(), hash(&body)));
    if fingerprint == last.fingerprint {
        remember_validators(last, &headers);
        return Update::Unchanged;
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    match parse_body(&body, content_type) {
        Ok(doc) => {
            remember_validators(last, &headers);
            last.fingerprint = fingerprint;
            Update::Document(doc)
        }
        Err(e) => Update::Failed(e),
    }
}

fn remember_validators(last: &mut Last, headers: &HeaderMap) {
    last.etag = headers.get(ETAG).cloned();
    last.last_modified = headers.get(LAST_MODIFIED).cloned();
}

/// Read the body, refusing more than `max` bytes (checked as it arrives, not after).
async fn read_capped(
    mut resp: reqwest::Response,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, SourceError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(SourceError::TooLarge(max));
    }
    let mut buf = BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > max {
                    return Err(SourceError::TooLarge(max));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => return Err(classify(&e, timeout)),
        }
    }
}

fn classify(e: &reqwest::Error, timeout: Duration) -> SourceError {
    if e.is_timeout() {
        SourceError::Timeout(timeout)
    } else if e.is_connect() {
        SourceError::Connect
    } else {
        SourceError::Other
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The interval ±5%, so that topics started together drift apart.
fn jitter(interval: Duration) -> Duration {
    interval.mul_f64(rand::thread_rng().gen_range(0.95..1.05))
}

/// Exponential backoff with full jitter: uniformly in [interval, min(cap, interval·2^n)].
fn backoff(interval: Duration, failures: u32) -> Duration {
    let cap = MAX_BACKOFF.max(interval);
    let ceiling = interval.saturating_mul(1u32 << failures.min(16)).min(cap);
    if ceiling <= interval {
        return interval;
    }
    rand::thread_rng().gen_range(interval..=ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_millis(100);
        for n in 1..40 {
            let b = backoff(i, n);
            assert!(b >= i && b <= MAX_BACKOFF, "{n}: {b:?}");
        }
        let long = Duration::from_secs(60);
        assert_eq!(backoff(long, 5), long);
    }

    #[test]
    fn jitter_stays_near_interval() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_millis(1900) && j <= Duration::from_millis(2100));
        }
    }
}
