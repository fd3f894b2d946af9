//! Who may watch what. Before a stream opens, [`Auth::authorize`] reads the client's credentials
//! (cookies, `Authorization`, the route's `access_token` parameter), verifies a JWT if the route
//! has one, runs the route's `auth` check (cached per credential), and returns the topic key to
//! join: `vary` is a keyed hash of exactly the credentials forwarded upstream (0 for a shared
//! topic, or a client without credentials), so clients share a poller and history only when they present the same credentials.
//! After joining, [`Auth::watch`] schedules the stream's re-checks (`reauth`) and its JWT
//! deadline; one task ([`Auth::run`]) serves them all and ends revoked streams through their
//! `WatchSlot` (a final `event: error`). Upstream 401/403 on a per-credential topic end its
//! watchers in the hub (`Topic`), since every watcher there holds the refused credential.
//!
//! Depends on config, routes, source (the shared client) and hub (`WatchSlot`); the server
//! calls it, never the reverse.

mod check;
mod credentials;
mod jwt;
mod revoke;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::auth::{default_vary, AccessCheck, RouteAuth, Sharing, UrlPart, VarySource};
use crate::config::Segment;
use crate::hub::{StopReason, WatchSlot};
use crate::routes::{Route, TopicKey};
use crate::source::Origin;

use check::{Cache, Verdict};
pub use credentials::VaryKey;

/// What a request's credentials say, before any upstream check (`Auth::identify`).
struct Identity {
    vary: u64,
    poll_headers: HeaderMap,
    check_headers: HeaderMap,
    valid_until: Option<SystemTime>,
    principal: u64,
}

/// Whether the request's `Authorization: Bearer` token is `want` (see [`token_matches`]).
pub fn bearer_matches(headers: &HeaderMap, want: &str) -> bool {
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    token_matches(given, want)
}

/// Whether a presented bearer token is the configured one, compared in constant time (HMACs of
/// both under a per-call random key, so neither length nor prefix shows in the timing).
pub fn token_matches(given: &str, want: &str) -> bool {
    let rng = ring::rand::SystemRandom::new();
    ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).is_ok_and(|k| {
        let tag = ring::hmac::sign(&k, want.as_bytes());
        ring::hmac::verify(&k, given.as_bytes(), tag.as_ref()).is_ok()
    })
}
use revoke::{Recheck, Registry, Watch};

/// `query` without the route's access-token parameter, for anything that logs or records a
/// request target.
pub use crate::routes::without_param as redact_query;

/// Re-checks run at once at most; the rest wait for a permit (they are cheap and cached).
const MAX_CONCURRENT_RECHECKS: usize = 32;

/// Permission to open a stream: the topic to join, the credentials its polls carry, and what
/// must be re-checked while it is open.
#[derive(Debug)]
pub struct Grant {
    /// The route's topic key with `vary` set from the credentials (0: shared, or anonymous).
    pub key: TopicKey,
    /// Headers every poll of a new topic carries (empty for a shared topic). Pass them to
    /// `Hub::subscribe`.
    pub headers: HeaderMap,
    /// When a verified JWT stops being valid.
    pub valid_until: Option<SystemTime>,
    /// A keyed hash of the credentials the client presented (0: none), whatever the route's
    /// sharing: admission caps open streams per credential with it.
    pub principal: u64,
    recheck: Option<RecheckPlan>,
}

#[derive(Debug)]
struct RecheckPlan {
    url: reqwest::Url,
    cred: u64,
    headers: HeaderMap,
    every: Duration,
    cache: Duration,
    timeout: Duration,
}

/// Why a stream may not open. `status()`/`code()` give the HTTP answer; the message is safe to
/// show (it never contains a credential).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// The authorization check could not be answered: refused rather than guessed.
    #[error("{0}")]
    Unavailable(String),
}

impl Denied {
    pub fn status(&self) -> StatusCode {
        match self {
            Denied::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Denied::Forbidden(_) => StatusCode::FORBIDDEN,
            Denied::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Denied::Unauthorized(_) => "unauthorized",
            Denied::Forbidden(_) => "forbidden",
            Denied::Unavailable(_) => "auth-unavailable",
        }
    }
}

/// The access state of one herald: the credential-hash key, the check cache, the revocation
/// schedule. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    key: VaryKey,
    /// How long before a token expires its stream is told (`auth-expiring`).
    notice: Duration,
    upstream: Origin,
    cache: Cache,
    registry: Registry,
    rechecks: Semaphore,
}

impl Auth {
    /// Credentials are hashed with `key`: the same secret on every node gives the same topics.
    /// Streams are told `notice` before their token expires.
    pub fn new(upstream: Origin, key: VaryKey, notice: Duration) -> Auth {
        Auth {
            inner: Arc::new(Inner {
                key,
                notice,
                upstream,
                cache: Cache::default(),
                registry: Registry::default(),
                rechecks: Semaphore::new(MAX_CONCURRENT_RECHECKS),
            }),
        }
    }

    /// May the client with `headers` (and `query`, for the access-token parameter) watch `key`
    /// on `route`? On success, the key to join (with its `vary`) and the headers to poll with.
    /// Runs on every connect, `Last-Event-ID` or not, so a replay can never skip it. The
    /// multiplexed stream calls this once per watched path, like a single stream does.
    /// A keyed hash of the credentials in `headers` (cookies and `Authorization`; 0 when there
    /// are none): who the client is for per-credential limits, whatever a route shares.
    pub fn principal(&self, headers: &HeaderMap) -> u64 {
        self.principal_with(headers, None)
    }

    /// Who the client is, for per-credential limits: its `Authorization` (or bearer token) when
    /// it has one, else its session cookies. Other cookies are left out, so adding junk to a
    /// request does not make a new "credential".
    fn principal_with(&self, headers: &HeaderMap, bearer: Option<&str>) -> u64 {
        let sources = if credentials::authorization(headers, bearer).is_some() {
            [VarySource::Authorization]
        } else {
            [VarySource::SessionCookies]
        };
        let creds = credentials::extract(&sources, headers, bearer);
        if creds.is_empty() {
            0
        } else {
            self.inner.key.hash_headers(&creds)
        }
    }

    /// Who the request's credentials say the client is, with no upstream request: the topic's
    /// vary key, what its polls and checks carry, a token's end, and the principal.
    fn identify(
        &self,
        route: &Route,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Identity, Denied> {
        let ra: &RouteAuth = &route.config.auth;
        let inner = &self.inner;
        let bearer = ra
            .access_token
            .as_deref()
            .and_then(|p| credentials::query_param(query, p));
        let bearer = bearer.as_deref();

        // What identifies the client (`vary`), what its polls carry, what its check carries.
        let (vary, poll_headers, check_headers, valid_until, user) = match &ra.jwt {
            Some(cfg) => {
                let token = match &cfg.cookie {
                    Some(name) => credentials::cookie(headers, name).map(str::to_string),
                    None => credentials::bearer_token(headers, bearer),
                };
                let Some(token) = token else {
                    return Err(Denied::Unauthorized("a token is required".into()));
                };
                let verified = jwt::verify(cfg, &token).map_err(|e| {
                    debug!(route = %route.config.template.source, error = %e, "token refused");
                    Denied::Unauthorized(e.to_string())
                })?;
                let carrier = carrier(cfg.cookie.as_deref(), &token);
                // Keyed by what the upstream decides on: the token itself, unless the route
                // names the claims that make tokens equivalent.
                let vary = match (&ra.sharing, &cfg.topic_claims) {
                    (Sharing::All, _) => 0,
                    (Sharing::Vary(_), None) => inner.key.hash("jwt-token", [token.as_bytes()]),
                    (Sharing::Vary(_), Some(_)) => inner
                        .key
                        .hash("jwt-claims", [verified.topic_key.as_slice()]),
                };
                let poll = if vary == 0 {
                    HeaderMap::new()
                } else {
                    carrier.clone()
                };
                // The user, whatever token they present: what per-credential limits count.
                let user = inner.key.hash("jwt-sub", [verified.subject.as_bytes()]);
                (vary, poll, carrier, Some(verified.valid_until), Some(user))
            }
            None => match &ra.sharing {
                Sharing::All => {
                    let creds = credentials::extract(&default_vary(), headers, bearer);
                    (0, HeaderMap::new(), creds, None, None)
                }
                Sharing::Vary(sources) => {
                    let creds = credentials::extract(sources, headers, bearer);
                    // No credentials at all: the anonymous topic, keyed 0 like a public one
                    // (its polls carry nothing either); still ended by an upstream 401/403.
                    let vary = if creds.is_empty() {
                        0
                    } else {
                        inner.key.hash_headers(&creds)
                    };
                    (vary, creds.clone(), creds, None, None)
                }
            },
        };
        let principal = user.unwrap_or_else(|| self.principal_with(headers, bearer));
        Ok(Identity {
            vary,
            poll_headers,
            check_headers,
            valid_until,
            principal,
        })
    }

    /// The topic `key` is for these credentials, without the route's upstream check: for a
    /// request that only looks for the client's live topic (a passed-through GET), never for
    /// one that herald lets in.
    pub fn topic_key(
        &self,
        route: &Route,
        mut key: TopicKey,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<TopicKey, Denied> {
        key.vary = self.identify(route, headers, query)?.vary;
        Ok(key)
    }

    pub async fn authorize(
        &self,
        route: &Route,
        mut key: TopicKey,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Grant, Denied> {
        let ra: &RouteAuth = &route.config.auth;
        let inner = &self.inner;
        let Identity {
            vary,
            poll_headers,
            check_headers,
            valid_until,
            principal,
        } = self.identify(route, headers, query)?;
        key.vary = vary;

        let recheck = match &ra.check {
            None => None,
            Some(check) => {
                let url = self.check_url(check, route, &key)?;
                let cred = inner.key.hash_headers(&check_headers);
                let timeout = route.config.timeout;
                let verdict = inner
                    .cache
                    .verdict(
                        inner.upstream.client(),
                        url.clone(),
                        cred,
                        &check_headers,
                        check.cache,
                        timeout,
                    )
                    .await;
                match verdict {
                    Verdict::Allowed => {}
                    Verdict::Unauthorized => {
                        return Err(Denied::Unauthorized(
                            "the upstream refused the credentials".into(),
                        ))
                    }
                    Verdict::Forbidden => {
                        return Err(Denied::Forbidden("no access to this resource".into()))
                    }
                    Verdict::Unavailable(why) => return Err(Denied::Unavailable(why)),
                }
                ra.reauth.map(|every| RecheckPlan {
                    url,
                    cred,
                    headers: check_headers,
                    every,
                    cache: check.cache,
                    timeout,
                })
            }
        };
        Ok(Grant {
            key,
            headers: poll_headers,
            valid_until,
            principal,
            recheck,
        })
    }

    /// Watch an opened stream for revocation: its `reauth` re-checks and its token's expiry.
    /// Nothing is scheduled for a stream that needs neither.
    pub fn watch(&self, grant: &Grant, slot: &Arc<WatchSlot>) {
        let now = Instant::now();
        let expires = grant.valid_until.map(|t| {
            now + t
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        let valid_until_ms = grant.valid_until.map_or(0, unix_ms);
        if valid_until_ms != 0 {
            slot.set_valid_until(valid_until_ms);
        }
        let notice = expires.map(|e| e.checked_sub(self.inner.notice).unwrap_or(now).max(now));
        let watch = Watch {
            slot: Arc::downgrade(slot),
            expires,
            notice,
            noticed: Default::default(),
            valid_until_ms,
            recheck: grant.recheck.as_ref().map(|p| Recheck {
                url: p.url.clone(),
                cred: p.cred,
                headers: p.headers.clone(),
                every: p.every,
                cache: p.cache,
                timeout: p.timeout,
            }),
        };
        if let Some(at) = watch.next_due(now) {
            self.inner.registry.schedule(Arc::new(watch), at);
        }
    }

    /// Streams under revocation watch (for tests and status).
    pub fn watched(&self) -> usize {
        self.inner.registry.len()
    }

    /// Cached check answers (for tests and status).
    pub fn cached_checks(&self) -> usize {
        self.inner.cache.len()
    }

    /// Serve the revocation schedule until `cancel`: cut streams whose token expired, re-check
    /// those due (concurrently, bounded), and cut those refused.
    pub async fn run(self, cancel: CancellationToken) {
        let mut checks: JoinSet<()> = JoinSet::new();
        loop {
            let next = self.inner.registry.next_at();
            let sleep = tokio::time::sleep_until(
                next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.inner.registry.changed.notified() => continue,
                Some(_) = checks.join_next(), if !checks.is_empty() => continue,
                _ = sleep => {}
            }
            let now = Instant::now();
            for watch in self.inner.registry.take_due(now) {
                let Some(slot) = watch.slot.upgrade() else {
                    continue; // the stream ended
                };
                if slot.stop_reason().is_some() {
                    continue; // already ending
                }
                // A refresh since this was scheduled moved the expiry later: a newer entry
                // watches the stream now.
                if watch.valid_until_ms != 0 && slot.valid_until() > watch.valid_until_ms {
                    continue;
                }
                if watch.expires.is_some_and(|e| e <= now) {
                    debug!("token expired: stream stopped");
                    slot.stop(StopReason::Expired);
                    continue;
                }
                if watch.notice.is_some_and(|n| n <= now)
                    && !watch
                        .noticed
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    slot.announce_expiry(slot.valid_until());
                    if let Some(at) = watch.next_due(now) {
                        self.inner.registry.schedule(watch.clone(), at);
                    }
                    continue;
                }
                if watch.recheck.is_none() {
                    continue;
                }
                let this = self.clone();
                checks.spawn(async move { this.recheck(watch, slot).await });
            }
        }
        checks.shutdown().await;
    }

    async fn recheck(&self, watch: Arc<Watch>, slot: Arc<WatchSlot>) {
        let Some(r) = watch.recheck.as_ref() else {
            return;
        };
        let verdict = {
            let Ok(_permit) = self.inner.rechecks.acquire().await else {
                return;
            };
            self.inner
                .cache
                .verdict(
                    self.inner.upstream.client(),
                    r.url.clone(),
                    r.cred,
                    &r.headers,
                    r.cache,
                    r.timeout,
                )
                .await
        };
        match verdict {
            Verdict::Unauthorized => {
                info!(check = %r.url.path(), "access revoked (401): stream stopped");
                slot.stop(StopReason::Unauthorized);
            }
            Verdict::Forbidden => {
                info!(check = %r.url.path(), "access revoked (403): stream stopped");
                slot.stop(StopReason::Forbidden);
            }
            // An unanswered re-check keeps the stream (it was allowed, and cutting every stream
            // when the auth service blips would be an outage of its own); the next one decides.
            Verdict::Allowed | Verdict::Unavailable(_) => {
                drop(slot);
                if let Some(at) = watch.next_due(Instant::now()) {
                    self.inner.registry.schedule(watch, at);
                }
            }
        }
    }

    /// The check's upstream URL for this topic: its template with the route's parameters filled
    /// in from the request path (already validated as safe single segments).
    fn check_url(
        &self,
        check: &AccessCheck,
        route: &Route,
        key: &TopicKey,
    ) -> Result<reqwest::Url, Denied> {
        let path = key.resource.split('?').next().unwrap_or("");
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let mut out = String::new();
        for part in &check.parts {
            match part {
                UrlPart::Text(t) => out.push_str(t),
                UrlPart::Param(i) => {
                    debug_assert!(matches!(
                        route.config.template.segments.get(*i),
                        Some(Segment::Param(_))
                    ));
                    out.push_str(segments.get(*i).copied().unwrap_or(""));
                }
            }
        }
        self.inner
            .upstream
            .url_for(&out)
            .map_err(|_| Denied::Unavailable("the check URL is invalid".into()))
    }
}

/// `t` in Unix milliseconds.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The header that carries a JWT: `Cookie: name=token` or `Authorization: Bearer token`.
fn carrier(cookie: Option<&str>, token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let (name, value) = match cookie {
        Some(c) => (COOKIE, format!("{c}={token}")),
        None => (AUTHORIZATION, format!("Bearer {token}")),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(name, credentials::sensitive(v));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_token_parameter_only() {
        assert_eq!(
            redact_query("a=1&access_token=s3cr3t&b=2", "access_token"),
            "a=1&b=2"
        );
        assert_eq!(redact_query("access%5Ftoken=s3cr3t", "access_token"), "");
        assert_eq!(redact_query("a=1", "access_token"), "a=1");
    }
}
