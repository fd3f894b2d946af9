//! The route table: validated config → an immutable list of streamable routes, and the function
//! that maps a request's path and query to the topic it would watch. The upstream URL of a topic is
//! built from the matched route alone: a parameter is exactly one safe path segment, and only
//! allow-listed query parameters survive, so a client can neither traverse paths nor multiply polls.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::config::{self, Segment};

/// Longest query string kept in a topic, after the allow-list is applied.
const MAX_TOPIC_QUERY: usize = 2048;

/// A streamable route and its id: its position in the config at startup; a route added or changed
/// by a reload gets a new id, one never used before in this run (`LiveRoutes`). The id tells
/// route versions apart within a process; topics are named by the route's template instead, which
/// every node and every reload agree on.
#[derive(Debug)]
pub struct Route {
    pub index: usize,
    /// The path template as written (`/api/builds/{id}`): the route's name in topic keys, metrics
    /// and logs.
    pub template: Arc<str>,
    pub config: config::Route,
    /// Set when a reload removed or changed this route: a stream that resolved it just before the
    /// swap is ended at once instead of living on with the old settings (`Hub::subscribe`).
    pub retired: AtomicBool,
}

impl Route {
    pub fn new(index: usize, config: config::Route) -> Route {
        Route {
            index,
            template: config.template.source.as_str().into(),
            config,
            retired: AtomicBool::new(false),
        }
    }

    /// A reload removed or changed this route.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Mark the route removed or changed by a reload (see `retired`).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

/// The identity of one upstream resource as watched: same key, same poller and history. Made
/// only of what every herald node derives alike from the same request and config, so nodes agree
/// on a topic (`TopicKey::id`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicKey {
    /// The template of the route that matched.
    pub route: Arc<str>,
    /// The upstream path and canonical query, e.g. `/api/builds/42?page=2`.
    pub resource: Arc<str>,
    /// Keyed hash of the credentials the topic is polled with, set by `auth` (0: a public topic,
    /// or a client without credentials). Keyed with the configured secret when there is one, so
    /// it is the same on every node.
    pub vary: u64,
}

impl TopicKey {
    /// The topic's stable name: a digest of route template, resource and vary key, the same on
    /// every node and across restarts (given the same credential secret). Shared brokers key
    /// their streams by it; it reveals neither the resource nor the credentials.
    pub fn id(&self) -> TopicId {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [self.route.as_bytes(), self.resource.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.update(&self.vary.to_be_bytes());
        let digest = ctx.finish();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest.as_ref()[..16]);
        TopicId(id)
    }
}

/// A topic's stable name (see [`TopicKey::id`]), shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicId(pub [u8; 16]);

impl std::fmt::Display for TopicId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for TopicId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TopicId({self})")
    }
}

/// Why a request on a stream route cannot be a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("path parameter {{{name}}} must be one plain path segment")]
    BadParam { name: String },
    #[error("query string too long for a stream (at most {MAX_TOPIC_QUERY} bytes of allowed parameters)")]
    QueryTooLong,
    #[error("query parameter {name:?} is not accepted on this stream")]
    UnknownQuery { name: String },
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(routes: &[config::Route]) -> RouteTable {
        RouteTable {
            routes: routes
                .iter()
                .enumerate()
                .map(|(index, r)| Arc::new(Route::new(index, r.clone())))
                .collect(),
        }
    }

    /// The route with this id.
    pub fn get(&self, index: usize) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.index == index)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route whose template matches `path` (raw, percent-encoded), and the topic key for it.
    /// `Ok(None)`: no stream route has this shape (the request is passed through).
    pub fn resolve(
        &self,
        path: &str,
        query: Option<&str>,
    ) -> Result<Option<(Arc<Route>, TopicKey)>, RouteError> {
        for route in &self.routes {
            if let Some(result) = match_template(&route.config.template, path) {
                result?;
                let reject = route.config.unknown_query == config::UnknownQuery::Reject;
                // The route's access-token parameter is a credential (read by `auth`), never
                // part of a topic, and never an "unknown" parameter.
                let stripped = match (&route.config.auth.access_token, query) {
                    (Some(param), Some(q)) => Some(without_param(q, param)),
                    _ => None,
                };
                let query = stripped.as_deref().or(query);
                let resource = build_resource(path, query, &route.config.query, reject)?;
                let key = TopicKey {
                    route: route.template.clone(),
                    resource: resource.into(),
                    vary: 0,
                };
                return Ok(Some((route.clone(), key)));
            }
        }
        Ok(None)
    }
}

impl RouteTable {
    /// A table of routes already made (a reload keeps the `Arc`s, and so the ids, of unchanged
    /// routes), in match order.
    pub fn from_routes(routes: Vec<Arc<Route>>) -> RouteTable {
        RouteTable { routes }
    }

    /// The routes in match order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

/// The route table in force: swapped whole by a config reload, read as one snapshot per request,
/// so a request sees either the old table or the new one, never a mix.
#[derive(Debug)]
pub struct LiveRoutes {
    current: RwLock<Arc<RouteTable>>,
    /// The next unused route id.
    next_id: AtomicUsize,
}

impl LiveRoutes {
    pub fn new(table: RouteTable) -> LiveRoutes {
        let next = table.routes.iter().map(|r| r.index + 1).max().unwrap_or(0);
        LiveRoutes {
            current: RwLock::new(Arc::new(table)),
            next_id: AtomicUsize::new(next),
        }
    }

    /// The table in force now.
    pub fn current(&self) -> Arc<RouteTable> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// [`RouteTable::resolve`] on the table in force.
    pub fn resolve(
        &self,
        path: &str,
        query: Option<&str>,
    ) -> Result<Option<(Arc<Route>, TopicKey)>, RouteError> {
        self.current().resolve(path, query)
    }

    /// A route id never used before in this run.
    pub fn next_id(&self) -> usize {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Put `table` in force; returns the one it replaces.
    pub fn replace(&self, table: RouteTable) -> Arc<RouteTable> {
        std::mem::replace(
            &mut *self.current.write().unwrap_or_else(PoisonError::into_inner),
            Arc::new(table),
        )
    }
}

/// `None`: the shape does not match. `Some(Err)`: it matches but a parameter is unsafe.
fn match_template(t: &config::PathTemplate, path: &str) -> Option<Result<(), RouteError>> {
    let rest = path.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let mut bad = None;
    for seg in &t.segments {
        let part = parts.next()?;
        match seg {
            Segment::Literal(lit) => {
                if part != lit {
                    return None;
                }
            }
            Segment::Param(name) => {
                if bad.is_none() && !safe_segment(part) {
                    bad = Some(RouteError::BadParam { name: name.clone() });
                }
            }
        }
    }
    if parts.next().is_some() {
        return None;
    }
    Some(bad.map_or(Ok(()), Err))
}

/// A parameter value is one real segment: not empty, valid percent-encoding of UTF-8 text, and,
/// in every form a backend might decode it to (see [`decodings`]), no `.`/`..` (nor `..;x`,
/// `%252e%252e`, overlong `%c0%ae`), no slash or backslash, no control characters.
fn safe_segment(raw: &str) -> bool {
    let Some(decoded) = percent_decode(raw) else {
        return false;
    };
    !decoded.is_empty()
        && std::str::from_utf8(&decoded).is_ok()
        && decodings(raw.as_bytes()).all(|form| {
            !dot_like(&form)
                && !form
                    .iter()
                    .any(|&b| b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f)
        })
}

/// Whether a request path has a dot segment in any form a backend might resolve: `.` or `..`
/// (or only dots), literal or percent-encoded in any case, double-encoded (`%252e`), `%u002e`,
/// overlong UTF-8 (`%c0%ae`) or full-width (`%ef%bc%8e`), with `;params` (`..;x`) or a NUL or
/// trailing spaces after it, between `/` or `\` (a separator on Windows backends) in any of those
/// encodings. Such a path is refused, never normalized: what a backend makes of it is its own.
pub fn has_dot_segment(path: &str) -> bool {
    decodings(path.as_bytes()).any(|form| form.split(|&b| b == b'/' || b == b'\\').any(dot_like))
}

/// How many rounds of percent-decoding are looked through: a backend that decodes twice is
/// common, three times is not, and a bound keeps `%25252525…` linear.
const DECODE_ROUNDS: usize = 3;

/// `raw` as sent, then as decoded once, twice and three times (stopping when nothing changes),
/// each with look-alike encodings of `.`, `/` and `\` folded to those characters. Invalid
/// percent sequences stay as they are.
fn decodings(raw: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut current: Option<Vec<u8>> = None;
    let mut rounds = 0;
    std::iter::from_fn(move || {
        let next = match &current {
            None => raw.to_vec(),
            Some(prev) if rounds < DECODE_ROUNDS && prev.contains(&b'%') => {
                rounds += 1;
                let decoded = decode_lossy(prev);
                if decoded == *prev {
                    return None;
                }
                decoded
            }
            Some(_) => return None,
        };
        current = Some(next.clone());
        Some(fold_lookalikes(&next))
    })
}

/// A segment that a backend may treat as `.` or `..`: only dots, once `;params`, anything after
/// a NUL and trailing spaces or tabs are cut (Windows drops trailing spaces and dots).
fn dot_like(segment: &[u8]) -> bool {
    let end = segment
        .iter()
        .position(|&b| b == b';' || b == 0)
        .unwrap_or(segment.len());
    let mut seg = &segment[..end];
    while let [rest @ .., b' ' | b'\t'] = seg {
        seg = rest;
    }
    !seg.is_empty() && seg.iter().all(|&b| b == b'.')
}

/// Percent-decode `%XX` and IIS-style `%uXXXX`; anything invalid is kept literally.
fn decode_lossy(raw: &[u8]) -> Vec<u8> {
    fn hex(bytes: &[u8]) -> Option<u32> {
        let s = std::str::from_utf8(bytes).ok()?;
        u32::from_str_radix(s, 16).ok()
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            if let Some(v) = raw.get(i + 1..i + 3).and_then(hex) {
                out.push(v as u8);
                i += 3;
                continue;
            }
            if matches!(raw.get(i + 1), Some(b'u' | b'U')) {
                if let Some(c) = raw.get(i + 2..i + 6).and_then(hex).and_then(char::from_u32) {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    i += 6;
                    continue;
                }
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

/// Byte sequences that lenient decoders turn into `.`, `/` or `\`: overlong UTF-8 (never valid,
/// but accepted by old decoders) and the full-width forms and dot leaders that Unicode
/// normalization (NFKC) maps to them.
const LOOKALIKES: &[(&[u8], &[u8])] = &[
    (&[0xc0, 0xae], b"."),
    (&[0xe0, 0x80, 0xae], b"."),
    (&[0xf0, 0x80, 0x80, 0xae], b"."),
    (&[0xc0, 0xaf], b"/"),
    (&[0xe0, 0x80, 0xaf], b"/"),
    (&[0xf0, 0x80, 0x80, 0xaf], b"/"),
    (&[0xc1, 0x9c], b"\\"),
    (&[0xe0, 0x81, 0x9c], b"\\"),
    (&[0xef, 0xbc, 0x8e], b"."),
    (&[0xef, 0xbc, 0x8f], b"/"),
    (&[0xef, 0xbc, 0xbc], b"\\"),
    (&[0xe2, 0x80, 0xa4], b"."),
    (&[0xe2, 0x80, 0xa5], b".."),
];

fn fold_lookalikes(bytes: &[u8]) -> Vec<u8> {
    if bytes.is_ascii() {
        return bytes.to_vec();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    'outer: while i < bytes.len() {
        if bytes[i] >= 0x80 {
            for (from, to) in LOOKALIKES {
                if bytes[i..].starts_with(from) {
                    out.extend_from_slice(to);
                    i += from.len();
                    continue 'outer;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

pub(crate) fn percent_decode(raw: &str) -> Option<Vec<u8>> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// `query` without any `param=…` pair (matched by decoded name): for the access-token parameter,
/// which must not reach topics, upstream URLs or logs.
pub fn without_param(query: &str, param: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or(pair);
            percent_decode(&name.replace('+', " ")).as_deref() != Some(param.as_bytes())
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The upstream path plus the allowed query parameters, sorted by name so that
/// `?a=1&b=2` and `?b=2&a=1` are one topic.
fn build_resource(
    path: &str,
    query: Option<&str>,
    allowed: &[String],
    reject_unknown: bool,
) -> Result<String, RouteError> {
    let mut kept: Vec<(&str, &str)> = Vec::new();
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let name = pair.split('=').next().unwrap_or(pair);
            let decoded = percent_decode(&name.replace('+', " "));
            if decoded
                .as_ref()
                .is_some_and(|d| allowed.iter().any(|a| a.as_bytes() == d.as_slice()))
            {
                kept.push((name, pair));
            } else if reject_unknown {
                let name = String::from_utf8_lossy(&decoded.unwrap_or_default())
                    .chars()
                    .take(64)
                    .collect();
                return Err(RouteError::UnknownQuery { name });
            }
        }
    }
    kept.sort_by(|a, b| a.0.cmp(b.0));
    let mut resource = path.to_string();
    for (i, (_, pair)) in kept.iter().enumerate() {
        resource.push(if i == 0 { '?' } else { '&' });
        resource.push_str(pair);
    }
    if resource.len() - path.len() > MAX_TOPIC_QUERY {
        return Err(RouteError::QueryTooLong);
    }
    Ok(resource)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn table(paths: &[&str], query: &[&str]) -> RouteTable {
        let routes: Vec<config::Route> = paths
            .iter()
            .map(|p| config::Route {
                template: p.parse().expect("valid template"),
                interval: Duration::from_secs(1),
                source: Default::default(),
                max_interval: Duration::from_secs(1),
                honor_cache_control: false,
                diff: config::DiffMode::JsonPatch,
                array_key: None,
                timeout: Duration::from_secs(1),
                query: query.iter().map(|s| s.to_string()).collect(),
                max_body: 1024,
                min_interval: Duration::ZERO,
                unknown_query: config::UnknownQuery::Drop,
                max_topics: 10,
                refuse: Default::default(),
                auth: Default::default(),
                serve_get: Default::default(),
            })
            .collect();
        RouteTable::new(&routes)
    }

    #[test]
    fn matches_params_and_literals() {
        let t = table(&["/api/builds/{id}", "/api/builds"], &[]);
        let (r, k) = t.resolve("/api/builds/42", None).unwrap().unwrap();
        assert_eq!(r.index, 0);
        assert_eq!(&*k.resource, "/api/builds/42");
        let (r, _) = t.resolve("/api/builds", None).unwrap().unwrap();
        assert_eq!(r.index, 1);
        assert!(t.resolve("/api/builds/42/logs", None).unwrap().is_none());
        assert!(t.resolve("/api/builds/42/", None).unwrap().is_none());
        assert!(t.resolve("/api/other", None).unwrap().is_none());
    }

    #[test]
    fn rejects_unsafe_params() {
        let t = table(&["/api/builds/{id}"], &[]);
        for bad in [
            "/api/builds/..",
            "/api/builds/.",
            "/api/builds/%2e%2E",
            "/api/builds/a%2Fb",
            "/api/builds/a%5cb",
            "/api/builds/a%zz",
            "/api/builds/%00",
            "/api/builds/a\\b",
            // Forms a lenient or double-decoding backend resolves to `..` or `.`.
            "/api/builds/..;",
            "/api/builds/..;jsessionid=1",
            "/api/builds/%2e%2e;x",
            "/api/builds/%252e%252e",
            "/api/builds/%25252E%25252e",
            "/api/builds/%c0%ae%c0%ae",
            "/api/builds/%C0%AE",
            "/api/builds/%e0%80%ae%e0%80%ae",
            "/api/builds/%ef%bc%8e%ef%bc%8e",
            "/api/builds/%u002e%u002e",
            "/api/builds/..%00",
            "/api/builds/..%20",
            "/api/builds/...",
            // Separators a double-decoding or lenient backend would see.
            "/api/builds/a%252fb",
            "/api/builds/a%255cb",
            "/api/builds/a%c0%afb",
            "/api/builds/%ff",
        ] {
            assert!(
                matches!(t.resolve(bad, None), Err(RouteError::BadParam { .. })),
                "{bad}"
            );
        }
        assert!(t.resolve("/api/builds/", None).is_err());
        assert!(t.resolve("/api/builds/caf%C3%A9", None).unwrap().is_some());
        // Dots inside a name, a literal percent and `;` after a name are ordinary values.
        for ok in [
            "/api/builds/v1.2",
            "/api/builds/.hidden",
            "/api/builds/a..b",
            "/api/builds/50%25",
            "/api/builds/a;b",
        ] {
            assert!(t.resolve(ok, None).unwrap().is_some(), "{ok}");
        }
    }

    #[test]
    fn dot_segments_in_paths() {
        for bad in [
            "/..",
            "/../secret",
            "/./x",
            "/a/.",
            "/%2e%2e/secret",
            "/.%2e/secret",
            "/%2E./secret",
            "/echo/%2e%2e/%2e%2e/secret",
            "/a/..;/secret",
            "/a/%252e%252e/secret",
            "/a/%c0%ae%c0%ae/secret",
            "/a\\..\\secret",
            "/a%5c..%5csecret",
            "/a/%u002e%u002e/x",
            "/a/.. /x",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in [
            "/",
            "/a/b",
            "//a//b",
            "/a.b/c",
            "/a/..b",
            "/a/b..",
            "/.well-known/x",
            "/a/%2e%2ex",
            "/a/%25",
            "/a;b/c",
        ] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }

    #[test]
    fn query_allow_list_is_canonical() {
        let t = table(&["/api/builds"], &["page", "state"]);
        let (_, a) = t
            .resolve("/api/builds", Some("state=ok&page=2&junk=1&cb=123"))
            .unwrap()
            .unwrap();
        let (_, b) = t
            .resolve("/api/builds", Some("page=2&cb=999&state=ok"))
            .unwrap()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(&*a.resource, "/api/builds?page=2&state=ok");
        let (_, c) = t.resolve("/api/builds", Some("x=1")).unwrap().unwrap();
        assert_eq!(&*c.resource, "/api/builds");
        let mut strict = table(&["/api/builds"], &["page"]);
        Arc::get_mut(&mut strict.routes[0])
            .unwrap()
            .config
            .unknown_query = config::UnknownQuery::Reject;
        assert!(strict.resolve("/api/builds", Some("page=1")).is_ok());
        assert!(matches!(
            strict.resolve("/api/builds", Some("page=1&cb=2")),
            Err(RouteError::UnknownQuery { name }) if name == "cb"
        ));
        let long = format!("page={}", "a".repeat(5000));
        assert!(matches!(
            t.resolve("/api/builds", Some(&long)),
            Err(RouteError::QueryTooLong)
        ));
    }
}
