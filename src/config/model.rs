//! The configuration as written in `proxy.toml`: serde types only. Values that can be checked on
//! their own (durations, sizes, addresses, URLs, path templates) are parsed here so that the TOML
//! parser reports them with their line; checks that span several keys live in `validate.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Address the public listener binds (`"127.0.0.1:8080"`, `"[::]:443"`).
    pub listen: SocketAddr,
    /// The legacy API every request is forwarded to.
    pub upstream: UpstreamUrl,
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub sse: SseSection,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub compression: CompressionSection,
    #[serde(default)]
    pub cors: Option<CorsSection>,
    #[serde(default)]
    pub mux: MuxSection,
    #[serde(default)]
    pub admin: Option<Spanned<AdminSection>>,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub polling: super::source::PollingSection,
    #[serde(default)]
    pub publish: super::source::PublishSection,
    #[serde(default, rename = "route")]
    pub routes: Vec<Spanned<RouteSection>>,
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`, the status page and `POST /reload`.
/// Without this section there is no admin listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Its own address, apart from the public one; keep it private (loopback or a pod port).
    #[serde(default = "default_admin_listen")]
    pub listen: Spanned<SocketAddr>,
    /// Bearer token `POST /reload` must carry (also `HERALD_ADMIN_TOKEN`). Without one, reload
    /// over HTTP is off and SIGHUP is the way.
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    /// Host names the admin listener answers to besides IP addresses and `localhost` (a DNS name
    /// pointing at it), so a page on another site cannot reach it by DNS rebinding.
    #[serde(default)]
    pub hosts: Vec<String>,
}

fn default_admin_listen() -> Spanned<SocketAddr> {
    Spanned::new(0..0, SocketAddr::from(([127, 0, 0, 1], 9090)))
}

/// What several herald nodes share.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// The key credentials are hashed with into topic keys: the same on every node, so nodes
    /// agree on per-credential topics. Without it (and without `HERALD_CLUSTER_SECRET`) each
    /// process draws a random one.
    pub secret: Option<Spanned<String>>,
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS): nodes share topics through
    /// this Redis. Without it, the node is alone (the in-memory broker).
    pub redis: Option<Spanned<String>>,
    /// This node's name in Redis (leases, presence, the status page); default: `$HOSTNAME`, else
    /// random.
    pub node: Option<Spanned<String>>,
    /// Prefix of every Redis key herald writes.
    pub prefix: Spanned<String>,
    /// How long a writer's lease lasts unrenewed: the longest a dead writer's topic goes
    /// without a poller.
    pub lease: Spanned<HumanDuration>,
    /// Events each topic's stream keeps (approximately), for replay on any node.
    pub retention: Spanned<usize>,
    /// The oldest event a topic's stream keeps.
    pub retention_age: Spanned<HumanDuration>,
    /// Redis unreachable at startup: `"fail"` (exit with an error) or `"local"` (serve alone).
    pub on_unavailable: Spanned<String>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            secret: None,
            redis: None,
            node: None,
            prefix: Spanned::new(0..0, "herald".into()),
            lease: Spanned::new(0..0, HumanDuration(Duration::from_secs(10))),
            retention: Spanned::new(0..0, 1000),
            retention_age: Spanned::new(0..0, HumanDuration(Duration::from_secs(3600))),
            on_unavailable: Spanned::new(0..0, "fail".into()),
        }
    }
}

/// What herald logs besides its own events (the format is `--log-format`, the level
/// `RUST_LOG`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// One line per pass-through request on target `herald::access` (INFO).
    pub access: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { access: true }
    }
}

/// The multiplexed stream (one connection watching many resources) and the browser client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MuxSection {
    /// Where the multiplexed stream is served (`GET <path>?watch=/a&watch=/b`); its watch
    /// control API lives under it (`POST <path>/{token}/watch`). `""` turns it off.
    pub path: Spanned<String>,
    /// Watches one multiplexed stream may hold at once.
    pub max_watches: Spanned<usize>,
    /// Where herald serves its browser client (`client.js`). `""` turns it off.
    pub client: Spanned<String>,
}

impl Default for MuxSection {
    fn default() -> Self {
        MuxSection {
            path: Spanned::new(0..0, "/_herald/stream".into()),
            max_watches: Spanned::new(0..0, 64),
            client: Spanned::new(0..0, "/_herald/client.js".into()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Open client connections at most; further connections wait in the kernel backlog.
    pub max_connections: Spanned<usize>,
    /// How long shutdown waits for in-flight requests before closing what is left.
    pub drain_timeout: HumanDuration,
    /// Largest request head (request line + headers) accepted, in bytes.
    pub max_header_bytes: ByteSize,
    /// New streams accepted per second (all clients together); beyond it, 503 + Retry-After.
    /// Spreads a reconnect storm instead of letting it land at once. 0: no limit.
    pub max_new_streams_per_sec: u32,
    /// Open streams per client IP address; beyond it, 429. 0: no limit.
    pub max_streams_per_ip: u32,
    /// Open streams per credential (same cookie / Authorization / token); beyond it, 429.
    /// 0: no limit.
    pub max_streams_per_credential: u32,
    /// Open connections from one client address; beyond it, new ones are closed at once.
    /// 0: no limit.
    pub max_connections_per_ip: u32,
    /// Live topics (distinct resources and credentials) one client address may have opened;
    /// beyond it, a stream that would open another gets 429. 0: no limit.
    pub max_topics_per_ip: usize,
    /// The same per credential (cookie session, `Authorization`, token user). 0: no limit.
    pub max_topics_per_credential: usize,
    /// A connection must send its first complete request head within this of being accepted
    /// (after the TLS handshake), or it is closed.
    pub header_timeout: Spanned<HumanDuration>,
    /// A connection with no request or response in progress for this long is closed (HTTP/1.1
    /// keep-alive and HTTP/2 alike; a stream keeps its connection busy).
    pub idle_timeout: Spanned<HumanDuration>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            max_connections: Spanned::new(0..0, 20_000),
            drain_timeout: HumanDuration(Duration::from_secs(10)),
            max_header_bytes: ByteSize(64 * 1024),
            max_new_streams_per_sec: 2_000,
            max_streams_per_ip: 1_000,
            max_streams_per_credential: 100,
            max_connections_per_ip: 1_000,
            max_topics_per_ip: 500,
            max_topics_per_credential: 64,
            header_timeout: Spanned::new(0..0, HumanDuration(Duration::from_secs(10))),
            idle_timeout: Spanned::new(0..0, HumanDuration(Duration::from_secs(60))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseSection {
    /// A `: heartbeat` comment goes out on a stream idle this long.
    pub heartbeat: Spanned<HumanDuration>,
    /// The `retry:` the client is told to wait before reconnecting.
    pub retry: HumanDuration,
    /// Up to this much random delay is added to `retry` per client, so reconnects spread out.
    pub retry_jitter: HumanDuration,
    /// Events kept per topic for `Last-Event-ID` replay.
    pub history: usize,
    /// Bytes of encoded events kept per topic for replay, whichever limit is hit first.
    pub history_bytes: ByteSize,
    /// How long a topic's poller keeps running after its last watcher left.
    pub grace: HumanDuration,
    /// A client that has had events waiting this long without reading is disconnected with a
    /// final `error` event (`slow-consumer`). Slower readers are conflated, not cut.
    pub slow_timeout: Spanned<HumanDuration>,
    /// A stream whose token (JWT `exp`) expires is told this long before, with an
    /// `auth-expiring` event, so its client can refresh it without reconnecting.
    pub expiry_notice: HumanDuration,
}

impl Default for SseSection {
    fn default() -> Self {
        SseSection {
            heartbeat: Spanned::new(0..0, HumanDuration(Duration::from_secs(15))),
            retry: HumanDuration(Duration::from_secs(10)),
            retry_jitter: HumanDuration(Duration::from_secs(5)),
            history: 1000,
            history_bytes: ByteSize(1024 * 1024),
            grace: HumanDuration(Duration::from_secs(5)),
            slow_timeout: Spanned::new(0..0, HumanDuration(Duration::from_secs(30))),
            expiry_notice: HumanDuration(Duration::from_secs(60)),
        }
    }
}

/// How herald talks to the upstream for pass-through requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// Time allowed to connect to the upstream.
    pub connect_timeout: HumanDuration,
    /// Time allowed for a whole pass-through exchange: the upstream's head and all of the body.
    pub timeout: Spanned<HumanDuration>,
    /// A client that takes no bytes of a pass-through body for this long is cut off, and the
    /// upstream connection with it.
    pub send_timeout: Spanned<HumanDuration>,
    /// A tunnel (WebSocket or other `Upgrade`) with no bytes either way for this long is closed.
    pub tunnel_idle_timeout: Spanned<HumanDuration>,
    /// Rewrite `Location`, `Content-Location` and `Refresh` URLs that point at the upstream to the
    /// client-facing origin.
    pub rewrite_redirects: bool,
    /// Add `Via: 1.1 herald` to pass-through requests and responses.
    pub via: bool,
    /// PEM file of extra CA certificates to trust for an `https` upstream (a private CA), on top
    /// of the system's roots and the built-in Mozilla roots.
    pub ca: Option<Spanned<PathBuf>>,
}

impl Default for ProxySection {
    fn default() -> Self {
        let d = |secs| Spanned::new(0..0, HumanDuration(Duration::from_secs(secs)));
        ProxySection {
            connect_timeout: HumanDuration(Duration::from_secs(3)),
            timeout: d(30),
            send_timeout: d(30),
            tunnel_idle_timeout: d(600),
            rewrite_redirects: true,
            via: true,
            ca: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// TLS 1.2 sessions remembered for resumption by session ID (clients without tickets).
    #[serde(default = "default_session_cache")]
    pub session_cache: Spanned<usize>,
    /// How long one session-ticket key seals new tickets; a ticket is accepted until the end of
    /// the period after the one it was sealed in.
    #[serde(default = "default_ticket_lifetime")]
    pub ticket_lifetime: Spanned<HumanDuration>,
    /// A secret shared by every herald that should accept each other's tickets (and by a
    /// restarted herald): ticket keys are derived from it instead of made at random.
    pub ticket_key: Option<PathBuf>,
}

fn default_session_cache() -> Spanned<usize> {
    Spanned::new(0..0, 20_000)
}

fn default_ticket_lifetime() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(3600)))
}

/// gzip for clients that accept it: SSE streams (compressed once per event for all watchers) and
/// pass-through responses the upstream sent uncompressed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionSection {
    pub enabled: bool,
    /// Pass-through responses with a smaller `Content-Length` are sent as they are.
    pub min_size: ByteSize,
}

impl Default for CompressionSection {
    fn default() -> Self {
        CompressionSection {
            enabled: true,
            min_size: ByteSize(256),
        }
    }
}

/// Cross-origin access from browsers. Without this section herald adds no CORS headers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSection {
    /// Exact origins (`"https://app.example.com"`), or `["*"]` for any origin.
    pub origins: Spanned<Vec<Spanned<String>>>,
    /// Allow cookies and `Authorization` (the origin is echoed; never with `"*"`).
    #[serde(default = "default_credentials")]
    pub credentials: Spanned<bool>,
    /// How long a browser may cache a preflight answer.
    #[serde(default = "default_cors_max_age")]
    pub max_age: HumanDuration,
    /// Pass-through routes: keep the upstream's CORS headers, or replace them with herald's.
    #[serde(default)]
    pub pass_through: CorsPassThrough,
}

fn default_credentials() -> Spanned<bool> {
    Spanned::new(0..0, false)
}

fn default_cors_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CorsPassThrough {
    /// The upstream's own CORS headers (and its answers to preflights) reach the client as is.
    #[default]
    Upstream,
    /// herald answers preflights and sets CORS headers on every route, dropping the upstream's.
    Override,
}

/// One `[[route]]`: a path template whose GETs may become streams.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub path: Spanned<PathTemplate>,
    /// How often the upstream resource is polled while someone watches it.
    #[serde(default = "default_interval")]
    pub interval: Spanned<HumanDuration>,
    /// Where changes come from: `{ kind = "poll" | "sse" | "ndjson", path, mode }`.
    #[serde(default)]
    pub source: Option<Spanned<super::source::SourceSection>>,
    /// A topic that does not change polls less and less often, up to this (default: `interval`,
    /// no backoff); a change or a poke brings it back to `interval`.
    #[serde(default)]
    pub max_interval: Option<Spanned<HumanDuration>>,
    /// Take the upstream's `Cache-Control: max-age` as the least wait before the next poll.
    #[serde(default)]
    pub honor_cache_control: bool,
    /// How changes are sent.
    #[serde(default)]
    pub diff: DiffMode,
    /// Member that identifies the objects of an array (`"id"`), so list edits diff by identity.
    #[serde(default)]
    pub array_key: Option<String>,
    /// Time allowed for one poll.
    #[serde(default)]
    pub timeout: Option<Spanned<HumanDuration>>,
    /// Query parameters that select a different resource; all others are dropped from the topic
    /// and from the upstream request, so clients cannot multiply upstream polls.
    #[serde(default)]
    pub query: Vec<String>,
    /// Largest upstream body accepted for this route.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Changes closer together than this are coalesced into one event per window (the newest
    /// state wins). Default: no coalescing beyond the poll interval.
    #[serde(default)]
    pub min_interval: Option<HumanDuration>,
    /// What to do with query parameters not listed in `query`: drop them (the default) or refuse
    /// the stream with 400.
    #[serde(default)]
    pub unknown_query: UnknownQuery,
    /// Distinct resources (topics) of this route streamed at once; a stream that would add one
    /// more gets 429.
    #[serde(default = "default_max_topics")]
    pub max_topics: usize,
    /// Upstream answers that mean "these credentials are refused" on a per-credential topic:
    /// statuses (`401`), classes (`"3xx"`), and `"html"` (a 2xx HTML page: a login form). Such an
    /// answer ends every watcher's stream and drops the topic's state. Default
    /// `[401, 403, "3xx", "html"]`.
    #[serde(default)]
    pub refuse: Option<Spanned<Vec<Spanned<RefuseItem>>>>,
    /// Who shares a topic: `"credential"` (default: one topic per credential) or `"all"`.
    #[serde(default)]
    pub share: Option<Spanned<super::auth::Share>>,
    /// Credential sources a topic varies by (and that are forwarded); default cookie + authorization.
    #[serde(default)]
    pub vary: Option<Spanned<Vec<Spanned<String>>>>,
    /// Query parameter accepted as a bearer token; stripped from topics and logs.
    #[serde(default)]
    pub access_token: Option<Spanned<String>>,
    /// Upstream authorization check on connect: `{ url = "/api/x/{id}/access", cache = "10s" }`.
    #[serde(default)]
    pub auth: Option<Spanned<super::auth::AuthSection>>,
    /// How often an open stream's `auth` check runs again (default 60s with `auth`).
    #[serde(default)]
    pub reauth: Option<Spanned<HumanDuration>>,
    /// Local JWT verification: `{ alg = "RS256", key = "pub.pem", claim = "sub" }`.
    #[serde(default)]
    pub jwt: Option<Spanned<super::auth::JwtSection>>,
    /// Plain GETs: `"pass"` (default: always to the upstream) or `"topic"` (answered from the
    /// state of a live topic of the same resource and credential, when herald can vouch for it).
    #[serde(default)]
    pub serve_get: ServeGet,
}

/// Who answers a plain GET on a streamable route (`serve_get`).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServeGet {
    #[default]
    Pass,
    Topic,
}

/// One entry of a route's `refuse` list: a status, a status class, or `"html"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefuseItem {
    Status(u16),
    /// `"3xx"`: every status of that class.
    Class(u16),
    /// A 2xx answer whose `Content-Type` is HTML.
    Html,
}

impl<'de> Deserialize<'de> for RefuseItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = RefuseItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status (401), a class (\"3xx\") or \"html\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RefuseItem, E> {
                match u16::try_from(v) {
                    Ok(s @ 300..=599) => Ok(RefuseItem::Status(s)),
                    _ => Err(E::custom(format!(
                        "{v} is not a status that can refuse credentials (300 to 599)"
                    ))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RefuseItem, E> {
                let t = v.trim().to_ascii_lowercase();
                match t.as_str() {
                    "html" => Ok(RefuseItem::Html),
                    "3xx" | "4xx" | "5xx" => Ok(RefuseItem::Class(
                        u16::from(t.as_bytes()[0] - b'0') * 100,
                    )),
                    _ => t.parse::<i64>().map_or_else(
                        |_| {
                            Err(E::custom(format!(
                                "unknown refusal {v:?}: expected a status (401), a class (\"3xx\") or \"html\""
                            )))
                        },
                        |n| self.visit_i64(n),
                    ),
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn default_max_topics() -> usize {
    10_000
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownQuery {
    #[default]
    Drop,
    Reject,
}

fn default_interval() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(2)))
}

fn default_max_body() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DiffMode {
    #[default]
    JsonPatch,
    MergePatch,
    Snapshot,
}

/// A duration written for humans: `"500ms"`, `"2s"`, `"1m30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration {s:?} ({e}): expected a number and a unit, like \"500ms\", \"2s\" or \"1m\""
                ))
            })
    }
}

/// A size in bytes: an integer, or a string like `"64KiB"`, `"8MiB"`, `"1GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(digits);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number of bytes like 65536 or \"64KiB\"")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "KB" | "K" | "k" => 1024,
            "MiB" | "MB" | "M" => 1024 * 1024,
            "GiB" | "GB" | "G" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, like 65536 or \"64KiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The upstream base URL: `http` or `https`, a host, no query or fragment.
#[derive(Debug, Clone)]
pub struct UpstreamUrl(pub reqwest::Url);

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let url = reqwest::Url::parse(&s)
            .map_err(|e| de::Error::custom(format!("invalid URL {s:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(de::Error::custom(format!(
                "invalid upstream {s:?}: the scheme must be http or https"
            )));
        }
        if url.host().is_none() {
            return Err(de::Error::custom(format!(
                "invalid upstream {s:?}: no host"
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(de::Error::custom(format!(
                "invalid upstream {s:?}: a base URL takes no query or fragment"
            )));
        }
        Ok(UpstreamUrl(url))
    }
}

/// A route path as written (`/api/builds/{id}`): literal segments and `{name}` parameters, each
/// parameter standing for exactly one non-empty path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    pub source: String,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    Literal(String),
    Param(String),
}

impl FromStr for PathTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!("invalid path {s:?}: it must start with '/'"));
        };
        if s.contains(['?', '#']) {
            return Err(format!(
                "invalid path {s:?}: no query or fragment (list allowed query parameters in `query`)"
            ));
        }
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for seg in rest.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|n| n.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "invalid path {s:?}: parameter {seg:?} must be a name of letters, digits or '_'"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!(
                        "invalid path {s:?}: parameter {{{name}}} appears twice"
                    ));
                }
                names.push(name);
                segments.push(Segment::Param(name.to_string()));
            } else if seg.contains(['{', '}']) {
                return Err(format!(
                    "invalid path {s:?}: a parameter must be a whole segment, like /builds/{{id}}"
                ));
            } else if seg == "." || seg == ".." {
                return Err(format!("invalid path {s:?}: no '.' or '..' segments"));
            } else {
                segments.push(Segment::Literal(seg.to_string()));
            }
        }
        Ok(PathTemplate {
            source: s.to_string(),
            segments,
        })
    }
}

impl<'de> Deserialize<'de> for PathTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}
