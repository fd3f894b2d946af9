//! The loop every push source shares: one long-lived upstream request per topic (credentials
//! forwarded as for polls), its body cut into updates by a [`Decode`]r, and when it ends or
//! fails a reconnect after the upstream's `retry` (else the route's `interval`) with jitter,
//! backing off exponentially while connections keep failing. A reconnect that cannot resume
//! tells the writer ([`Update::Reset`]), so watchers start over from a snapshot.

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::stats::Connection;
use super::{hints, Feed, Origin, SourceError, Target, Update};

/// Longest wait between reconnects while the upstream keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Turns an upstream body into updates.
pub(super) trait Decode: Send + 'static {
    /// The source's kind, for stats.
    fn kind(&self) -> crate::config::source::SourceKind;
    /// Headers of the next request (`Accept`, the upstream's `Last-Event-ID`).
    fn request_headers(&self) -> HeaderMap;
    /// A new connection answered: drop any partial input. True if it continues the last one
    /// (the upstream was asked to resume).
    fn connected(&mut self) -> bool;
    /// Take a chunk of the body; complete items become updates in `out`. An error ends the
    /// connection (the input cannot be followed any more).
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<Update>) -> Result<(), SourceError>;
    /// The reconnect delay the upstream asked for (`retry:`).
    fn retry(&self) -> Option<Duration>;
}

pub(super) async fn run<D: Decode>(
    origin: Origin,
    target: Target,
    feed: Feed,
    cancel: CancellationToken,
    mut decoder: D,
) {
    let span = tracing::info_span!("push", topic = %crate::telemetry::redact(&target.resource));
    async move {
        let route = &target.route.config;
        let path = match &route.source.path {
            Some(t) => crate::config::source::push_path(t, &route.template, &target.resource),
            None => target.resource.to_string(),
        };
        let Ok(url) = origin.url_for(&path) else {
            let _ = feed.send(Update::Failed(SourceError::Other)).await;
            return;
        };
        target.stats.set_kind(decoder.kind());
        let mut failures: u32 = 0;
        let mut connected_before = false;
        loop {
            target.stats.set_connection(Connection::Connecting);
            let outcome = tokio::select! {
                _ = cancel.cancelled() => break,
                o = connect(&origin, &url, &target, &feed, &mut decoder, &mut connected_before) => o,
            };
            let delivered = match outcome {
                Outcome::Closed => break,
                Outcome::Ended { delivered } => delivered,
                Outcome::Refused { error, retry_after } => {
                    let first = failures == 0;
                    if feed.send(Update::Failed(error.clone())).await.is_err() {
                        break;
                    }
                    if first {
                        warn!(error = %error, "upstream stream refused");
                    }
                    if let Some(ra) = retry_after {
                        failures = failures.saturating_add(1);
                        target.stats.set_connection(Connection::Waiting);
                        if sleep(ra, &cancel).await {
                            break;
                        }
                        continue;
                    }
                    false
                }
            };
            failures = if delivered { 0 } else { failures.saturating_add(1) };
            target.stats.set_connection(Connection::Waiting);
            let base = decoder.retry().unwrap_or(route.interval);
            let wait = reconnect_delay(base, failures);
            target.stats.set_interval(wait);
            debug!(?wait, failures, "upstream stream ended: reconnecting");
            if sleep(wait, &cancel).await {
                break;
            }
        }
        target.stats.set_connection(Connection::None);
        debug!("push source stopped");
    }
    .instrument(span)
    .await
}

/// How one connection ended.
enum Outcome {
    /// The topic is gone.
    Closed,
    /// The stream ended or broke; `delivered`: it brought at least one update.
    Ended { delivered: bool },
    /// No stream: an error status or no answer.
    Refused {
        error: SourceError,
        retry_after: Option<Duration>,
    },
}

async fn connect<D: Decode>(
    origin: &Origin,
    url: &reqwest::Url,
    target: &Target,
    feed: &Feed,
    decoder: &mut D,
    connected_before: &mut bool,
) -> Outcome {
    let route = &target.route.config;
    let req = origin
        .client()
        .get(url.clone())
        .headers(target.credentials.clone())
        .headers(decoder.request_headers());
    let sent = Instant::now();
    let result = tokio::time::timeout(route.timeout, req.send()).await;
    let resp = match result {
        Err(_) => {
            target.metrics.upstream(Err("timeout"), sent.elapsed());
            return Outcome::Refused {
                error: SourceError::Timeout(route.timeout),
                retry_after: None,
            };
        }
        Ok(Err(e)) => {
            let (label, error) = if e.is_connect() {
                ("unreachable", SourceError::Connect)
            } else {
                ("error", SourceError::Other)
            };
            target.metrics.upstream(Err(label), sent.elapsed());
            return Outcome::Refused {
                error,
                retry_after: None,
            };
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    target.metrics.upstream(Ok(status.as_u16()), sent.elapsed());
    if !status.is_success() {
        let retry_after = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        )
        .then(|| hints::retry_after(resp.headers()))
        .flatten();
        return Outcome::Refused {
            error: SourceError::Status(status.as_u16()),
            retry_after,
        };
    }
    let is_html = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.trim_start().to_ascii_lowercase().starts_with("text/html"));
    if is_html {
        return Outcome::Refused {
            error: SourceError::Html,
            retry_after: None,
        };
    }
    target.stats.set_connection(Connection::Open);
    let resumed = decoder.connected();
    if *connected_before && !resumed {
        info!("upstream stream cannot resume: watchers start over from a snapshot");
        if feed.send(Update::Reset).await.is_err() {
            return Outcome::Closed;
        }
    }
    *connected_before = true;
    let mut resp = resp;
    let mut delivered = false;
    let mut out = Vec::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                debug!(error = %e, "upstream stream broke");
                break;
            }
        };
        let fed = decoder.feed(&chunk, &mut out);
        for update in out.drain(..) {
            let changed = matches!(update, Update::Document(_) | Update::Pass(_));
            target.stats.read(changed);
            delivered = true;
            if feed.send(update).await.is_err() {
                return Outcome::Closed;
            }
        }
        if let Err(e) = fed {
            warn!(error = %e, "upstream stream unreadable: reconnecting");
            if feed.send(Update::Failed(e)).await.is_err() {
                return Outcome::Closed;
            }
            break;
        }
    }
    Outcome::Ended { delivered }
}

/// Sleep `d` unless cancelled first; true if cancelled.
async fn sleep(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// After a stream that delivered: `base` plus up to 25% jitter, so topics dropped together do not
/// come back together. After failures: exponential backoff with full jitter, capped.
fn reconnect_delay(base: Duration, failures: u32) -> Duration {
    let mut rng = rand::thread_rng();
    if failures <= 1 {
        return base.mul_f64(rng.gen_range(1.0..1.25));
    }
    let cap = MAX_BACKOFF.max(base);
    let ceiling = base.saturating_mul(1u32 << failures.min(16)).min(cap);
    if ceiling <= base {
        return base;
    }
    rng.gen_range(base..=ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_and_stay_capped() {
        let b = Duration::from_millis(100);
        let first = reconnect_delay(b, 0);
        assert!(first >= b && first < Duration::from_millis(125));
        for n in 2..40 {
            let d = reconnect_delay(b, n);
            assert!(d >= b && d <= MAX_BACKOFF, "{n}: {d:?}");
        }
    }
}
