//! One topic's polling loop: a request per interval (jittered so topics do not poll in step),
//! conditional requests with the last `ETag`/`Last-Modified`, a timeout on every request, and
//! exponential backoff with full jitter while the upstream fails.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use http::{HeaderMap, HeaderValue, StatusCode};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::{parse_body, FetchError, Outcome, Sink};

/// Longest wait between polls while the upstream keeps failing (or the interval, if longer).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What to poll and how.
#[derive(Debug, Clone)]
pub struct PollSpec {
    pub url: reqwest::Url,
    /// For logs: the topic's resource (never the access-token parameter; redacted when logged).
    pub label: Arc<str>,
    pub interval: Duration,
    pub timeout: Duration,
    pub max_body: usize,
    /// Extra request headers (credentials of the topic, when it varies by them).
    pub headers: HeaderMap,
    /// Changes closer together than this are coalesced: one delivery per window, newest wins.
    pub min_interval: Duration,
    /// The route's metric handles: every poll is counted by status and timed.
    pub metrics: Arc<crate::admin::metrics::RouteMetrics>,
}

/// Holds back changes that come faster than `window`, so watchers get at most one event per
/// window per topic (the newest state: intermediate ones are superseded, never needed).
struct Coalescer {
    window: Duration,
    last: Option<Instant>,
    pending: Option<Outcome>,
}

impl Coalescer {
    /// Deliver `outcome` now, or hold it if it is a change inside the current window.
    fn offer(&mut self, outcome: Outcome, sink: &dyn Sink, now: Instant) {
        match outcome {
            Outcome::Changed(_) => {
                if self.last.is_some_and(|t| now < t + self.window) {
                    self.pending = Some(outcome);
                } else {
                    self.pending = None;
                    self.last = Some(now);
                    sink.deliver(outcome);
                }
            }
            // The held change is newer news than "unchanged"; it goes out when the window ends.
            Outcome::Unchanged if self.pending.is_some() => {}
            other => {
                // A failure follows whatever change was held, in order.
                if let Some(p) = self.pending.take() {
                    sink.deliver(p);
                }
                sink.deliver(other);
            }
        }
    }

    /// When the held change is due, if any.
    fn due(&self) -> Option<Instant> {
        self.pending.as_ref()?;
        Some(self.last? + self.window)
    }

    fn flush(&mut self, sink: &dyn Sink, now: Instant) {
        if let Some(p) = self.pending.take() {
            self.last = Some(now);
            sink.deliver(p);
        }
    }
}

/// Validators and fingerprint of the last good response.
#[derive(Default)]
struct Last {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
    fingerprint: Option<(usize, u64)>,
}

pub(super) async fn run(
    client: reqwest::Client,
    spec: PollSpec,
    sink: Arc<dyn Sink>,
    cancel: CancellationToken,
) {
    // Redacted like every logged resource: a route may make a credential part of its topics.
    let span = tracing::info_span!("poller", topic = %crate::admin::observe::redact(&spec.label));
    async move {
        debug!("poller started");
        let mut last = Last::default();
        let mut failures: u32 = 0;
        let mut next = Instant::now();
        let mut coalesce = Coalescer {
            window: spec.min_interval,
            last: None,
            pending: None,
        };
        loop {
            let wake = coalesce.due().map_or(next, |d| d.min(next));
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if coalesce.due().is_some_and(|d| d <= Instant::now()) {
                coalesce.flush(&*sink, Instant::now());
            }
            if Instant::now() < next {
                continue;
            }
            let started = Instant::now();
            let outcome = tokio::select! {
                _ = cancel.cancelled() => break,
                o = poll_once(&client, &spec, &mut last) => o,
            };
            let wait = match &outcome {
                Outcome::Failed(e) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(spec.interval, failures);
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
                    jitter(spec.interval)
                }
            };
            coalesce.offer(outcome, &*sink, Instant::now());
            // Anchor on the start of the poll, so a slow answer does not stretch the period; never
            // schedule in the past (a poll that took longer than the interval runs again at once).
            next = (started + wait).max(Instant::now());
        }
        debug!("poller stopped");
    }
    .instrument(span)
    .await
}

async fn poll_once(client: &reqwest::Client, spec: &PollSpec, last: &mut Last) -> Outcome {
    let mut req = client
        .get(spec.url.clone())
        .timeout(spec.timeout)
        .headers(spec.headers.clone())
        .header(ACCEPT, "application/json, */*;q=0.5");
    if let Some(etag) = &last.etag {
        req = req.header(IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = &last.last_modified {
        req = req.header(IF_MODIFIED_SINCE, lm.clone());
    }
    let resp = match spec.metrics.time_upstream(req.send()).await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(classify(&e, spec.timeout)),
    };
    let status = resp.status();
    if status == StatusCode::NOT_MODIFIED && last.fingerprint.is_some() {
        return Outcome::Unchanged;
    }
    if !status.is_success() {
        return Outcome::Failed(FetchError::Status(status.as_u16()));
    }
    let headers = resp.headers().clone();
    let body = match read_capped(resp, spec.max_body, spec.timeout).await {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(e),
    };
    let fingerprint = Some((body.len(), hash(&body)));
    if fingerprint == last.fingerprint {
        remember_validators(last, &headers);
        return Outcome::Unchanged;
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    match parse_body(&body, content_type) {
        Ok(doc) => {
            remember_validators(last, &headers);
            last.fingerprint = fingerprint;
            Outcome::Changed(doc)
        }
        Err(e) => Outcome::Failed(e),
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
) -> Result<Bytes, FetchError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(FetchError::TooLarge(max));
    }
    let mut buf = BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > max {
                    return Err(FetchError::TooLarge(max));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => return Err(classify(&e, timeout)),
        }
    }
}

fn classify(e: &reqwest::Error, timeout: Duration) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout(timeout)
    } else if e.is_connect() {
        FetchError::Connect
    } else {
        FetchError::Other
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

    /// Records what reaches the sink, for the coalescing tests.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<String>>);

    impl Sink for Recorder {
        fn deliver(&self, outcome: Outcome) {
            let s = match outcome {
                Outcome::Changed(super::super::Document::Json(v)) => v.to_string(),
                Outcome::Changed(_) => "text".into(),
                Outcome::Unchanged => "unchanged".into(),
                Outcome::Failed(e) => format!("failed:{}", e.code()),
            };
            self.0.lock().unwrap().push(s);
        }
    }

    fn changed(n: u64) -> Outcome {
        Outcome::Changed(super::super::Document::Json(serde_json::json!(n)))
    }

    #[test]
    fn coalescer_holds_changes_inside_the_window_and_keeps_the_newest() {
        let sink = Recorder::default();
        let mut c = Coalescer {
            window: Duration::from_millis(100),
            last: None,
            pending: None,
        };
        let t0 = Instant::now();
        c.offer(changed(1), &sink, t0);
        c.offer(changed(2), &sink, t0 + Duration::from_millis(10));
        c.offer(Outcome::Unchanged, &sink, t0 + Duration::from_millis(20));
        c.offer(changed(3), &sink, t0 + Duration::from_millis(30));
        assert_eq!(c.due(), Some(t0 + Duration::from_millis(100)));
        c.flush(&sink, t0 + Duration::from_millis(100));
        assert_eq!(c.due(), None);
        // A failure flushes a held change first, so order is kept.
        c.offer(changed(4), &sink, t0 + Duration::from_millis(120));
        c.offer(
            Outcome::Failed(FetchError::Connect),
            &sink,
            t0 + Duration::from_millis(130),
        );
        assert_eq!(
            *sink.0.lock().unwrap(),
            ["1", "3", "4", "failed:unreachable"]
        );
        // Zero window: everything passes straight through.
        let sink = Recorder::default();
        let mut c = Coalescer {
            window: Duration::ZERO,
            last: None,
            pending: None,
        };
        for n in 0..5 {
            c.offer(changed(n), &sink, t0);
        }
        assert_eq!(sink.0.lock().unwrap().len(), 5);
    }

    #[test]
    fn jitter_stays_near_interval() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_millis(1900) && j <= Duration::from_millis(2100));
        }
    }
}
