//! When to poll next: the adaptive interval (a topic that does not change backs off towards the
//! route's `max_interval`; a change or a poke brings it back to `interval` at once), and what the
//! upstream asks for (`Cache-Control: max-age` as a floor where configured, `Retry-After` on 429
//! and 503: no poll before it).
//!
//! The trade-off of backing off: a change after a long quiet spell is seen up to `max_interval`
//! late. A backend that pokes herald (`POST /_herald/publish`) removes that delay.

use std::time::{Duration, SystemTime};

use http::header::{CACHE_CONTROL, RETRY_AFTER};
use http::HeaderMap;

/// Each quiet poll stretches the interval by this factor.
const GROWTH: f64 = 1.5;
/// Longest `Retry-After` honoured: an upstream cannot silence a topic for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A topic's current poll interval, between the route's `interval` and `max_interval`.
#[derive(Debug, Clone)]
pub struct Adaptive {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Adaptive {
    pub fn new(base: Duration, max: Duration) -> Adaptive {
        Adaptive {
            base,
            max: max.max(base),
            current: base,
        }
    }

    /// The resource changed (or someone poked it): back to the base interval.
    pub fn changed(&mut self) {
        self.current = self.base;
    }

    /// A poll found nothing new: wait a little longer next time, up to the maximum.
    pub fn unchanged(&mut self) {
        self.current = self.current.mul_f64(GROWTH).min(self.max);
    }

    pub fn current(&self) -> Duration {
        self.current
    }
}

/// `Cache-Control: max-age=N` of a response, if any (`no-cache`/`no-store` mean none).
pub fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut age = None;
    for v in headers.get_all(CACHE_CONTROL) {
        for d in v.to_str().ok()?.split(',') {
            let d = d.trim().to_ascii_lowercase();
            if d == "no-cache" || d == "no-store" {
                return None;
            }
            if let Some(n) = d.strip_prefix("max-age=") {
                age = n
                    .trim_matches('"')
                    .parse::<u64>()
                    .ok()
                    .map(Duration::from_secs);
            }
        }
    }
    age
}

/// `Retry-After` (seconds, or an HTTP date), capped.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(v).ok()?;
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_to_the_maximum_and_returns_on_change() {
        let mut a = Adaptive::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut seen = vec![a.current()];
        for _ in 0..20 {
            a.unchanged();
            seen.push(a.current());
        }
        assert!(seen.windows(2).all(|w| w[1] >= w[0]), "{seen:?}");
        assert_eq!(a.current(), Duration::from_secs(60));
        assert!(seen[1] < Duration::from_secs(2), "gradual: {seen:?}");
        a.changed();
        assert_eq!(a.current(), Duration::from_secs(1));
        // No max_interval: no backoff.
        let mut fixed = Adaptive::new(Duration::from_secs(2), Duration::from_secs(2));
        fixed.unchanged();
        assert_eq!(fixed.current(), Duration::from_secs(2));
    }

    #[test]
    fn reads_upstream_hints() {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, "public, max-age=30".parse().unwrap());
        assert_eq!(max_age(&h), Some(Duration::from_secs(30)));
        h.insert(CACHE_CONTROL, "no-cache, max-age=30".parse().unwrap());
        assert_eq!(max_age(&h), None);
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, "99999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }
}
