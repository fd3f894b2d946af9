//! The authorization check: one upstream `GET` with the client's credentials, 2xx = allowed.
//! Answers are cached per (check URL, credential hash) for the route's `cache` period, and
//! concurrent asks for the same pair share one request, so a reconnect storm or a thousand streams
//! of one user re-checking together cost one call. Failures to get an answer are not cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Entries kept before expired ones are swept out on insert.
const PRUNE_AT: usize = 4096;
/// Above this (after pruning) answers are not cached: memory stays bounded under any load.
const MAX_ENTRIES: usize = 65_536;
/// The body of a check answer is read (so the connection can be reused) up to this much.
const MAX_BODY: usize = 64 * 1024;

/// What the upstream said about one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// 401 (or a 3xx, a legacy app's redirect to its login page): the credential is not (or no
    /// longer) valid.
    Unauthorized,
    /// 403, 404 or another 4xx: valid, but not for this resource.
    Forbidden,
    /// No answer (timeout, unreachable, 5xx): not cached; the caller decides.
    Unavailable(String),
}

type Key = (Arc<str>, u64);

struct Entry {
    born: Instant,
    verdict: OnceCell<Verdict>,
}

#[derive(Default)]
pub(crate) struct Cache {
    entries: Mutex<HashMap<Key, Arc<Entry>>>,
}

impl Cache {
    /// The verdict for `url` with credentials `headers` (hashed as `cred`): cached if younger than
    /// `ttl`, else asked once for every concurrent caller.
    pub(crate) async fn verdict(
        &self,
        client: &reqwest::Client,
        url: reqwest::Url,
        cred: u64,
        headers: &HeaderMap,
        ttl: Duration,
        timeout: Duration,
    ) -> Verdict {
        let key: Key = (Arc::from(url.as_str()), cred);
        let entry = self.entry(&key, ttl);
        let verdict = match &entry {
            Some(e) => e
                .verdict
                .get_or_init(|| ask(client, url, headers, timeout))
                .await
                .clone(),
            None => ask(client, url, headers, timeout).await,
        };
        if let (Verdict::Unavailable(_), Some(e)) = (&verdict, &entry) {
            let mut map = self.lock();
            if map.get(&key).is_some_and(|cur| Arc::ptr_eq(cur, e)) {
                map.remove(&key);
            }
        }
        verdict
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live entry for `key`, or a new one; None when the cache is full.
    fn entry(&self, key: &Key, ttl: Duration) -> Option<Arc<Entry>> {
        let now = Instant::now();
        let mut map = self.lock();
        if let Some(e) = map.get(key).filter(|e| now.duration_since(e.born) < ttl) {
            return Some(e.clone());
        }
        if map.len() >= PRUNE_AT {
            // Every entry older than the longest ttl in use is dead; `ttl` is a fair proxy, and
            // an entry dropped early only costs one more check.
            map.retain(|_, e| now.duration_since(e.born) < ttl);
        }
        if map.len() >= MAX_ENTRIES {
            return None;
        }
        let e = Arc::new(Entry {
            born: now,
            verdict: OnceCell::new(),
        });
        map.insert(key.clone(), e.clone());
        Some(e)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

async fn ask(
    client: &reqwest::Client,
    url: reqwest::Url,
    headers: &HeaderMap,
    timeout: Duration,
) -> Verdict {
    let resp = client
        .get(url)
        .timeout(timeout)
        .headers(headers.clone())
        .header(http::header::ACCEPT, "application/json, */*;q=0.5")
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Verdict::Unavailable("the check timed out".into()),
        Err(_) => return Verdict::Unavailable("the check could not reach the upstream".into()),
    };
    let status = resp.status();
    // Drain a little so the pooled connection can be reused; the content is not looked at.
    let mut read = 0;
    while let Ok(Some(chunk)) = resp.chunk().await {
        read += chunk.len();
        if read > MAX_BODY {
            break;
        }
    }
    match status.as_u16() {
        200..=299 => Verdict::Allowed,
        // Legacy apps answer an expired session with a redirect to their login page.
        300..=399 | 401 => Verdict::Unauthorized,
        400..=499 => Verdict::Forbidden,
        s => Verdict::Unavailable(format!("the check answered {s}")),
    }
}
