//! Configuration: `proxy.toml` is read, parsed (`model`) and checked (`validate`) before any port
//! is bound. Errors name the file, line and key of every problem and say what was expected.

pub mod auth;
pub mod model;
mod read;
pub mod source;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use model::{
    CorsPassThrough, DiffMode, PathTemplate, RefuseItem, Segment, ServeGet, UnknownQuery,
};

/// A validated configuration. Everything in it has been checked; nothing here can fail later.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages (None when built from a string).
    pub source: Option<PathBuf>,
    pub listen: SocketAddr,
    pub upstream: reqwest::Url,
    pub server: Server,
    pub sse: Sse,
    pub proxy: Proxy,
    pub tls: Option<Tls>,
    pub compression: Compression,
    /// None: no `[cors]` section, no CORS headers from herald.
    pub cors: Option<Cors>,
    pub mux: Mux,
    /// None: no `[admin]` section, no admin listener.
    pub admin: Option<Admin>,
    pub cluster: Cluster,
    pub log: Log,
    /// `[polling]`: the upstream budget every poll shares.
    pub polling: source::Polling,
    /// `[publish]`: webhooks and pokes.
    pub publish: source::Publish,
    pub routes: Vec<Route>,
}

/// `[cluster]`: what several nodes share.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// The credential-hash key (`secret`, else `HERALD_CLUSTER_SECRET`); None: random per process.
    pub secret: Option<Secret>,
    /// Shared topics through Redis (`redis`); None: this node is alone.
    pub redis: Option<Redis>,
}

/// `[cluster] redis` and what goes with it (see `cluster`). Its `Debug` shows the URL with any
/// password masked (a reload compares configs by it).
#[derive(Clone)]
pub struct Redis {
    /// The URL (it may hold a password: never printed).
    pub url: Secret,
    /// `HERALD_REDIS_USERNAME` / `HERALD_REDIS_PASSWORD`, when set: they override the URL's.
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub node: String,
    pub prefix: String,
    pub lease: Duration,
    pub retention: usize,
    pub retention_age: Duration,
    /// Serve alone (in memory) when Redis cannot be reached at startup, rather than fail.
    pub local_fallback: bool,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = reqwest::Url::parse(&self.url.0)
            .map(|mut u| {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            })
            .unwrap_or_else(|_| "(invalid)".into());
        f.debug_struct("Redis")
            .field("url", &url)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("node", &self.node)
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .field("retention_age", &self.retention_age)
            .field("local_fallback", &self.local_fallback)
            .finish()
    }
}

/// The environment variables that supply Redis credentials besides the URL.
pub const REDIS_USERNAME_ENV: &str = "HERALD_REDIS_USERNAME";
pub const REDIS_PASSWORD_ENV: &str = "HERALD_REDIS_PASSWORD";

/// A secret from the config or the environment: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// The environment variable that supplies `[cluster] secret` when the file does not.
pub const CLUSTER_SECRET_ENV: &str = "HERALD_CLUSTER_SECRET";

/// `[log]`: what herald logs besides its own events.
#[derive(Debug, Clone)]
pub struct Log {
    /// An access line per pass-through request (`logging::AccessRecord`).
    pub access: bool,
}

/// `[admin]`: metrics, health, status page and reload, on their own listener (`admin`).
#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// What `POST /reload` must present (`token`, else `HERALD_ADMIN_TOKEN`); None: HTTP reload
    /// is off.
    pub token: Option<Secret>,
    /// Host names accepted besides IP literals and `localhost` (lowercase).
    pub hosts: Vec<String>,
}

/// The environment variable that supplies `[admin] token` when the file does not.
pub const ADMIN_TOKEN_ENV: &str = "HERALD_ADMIN_TOKEN";

/// `[mux]`: the multiplexed stream and the browser client (see `server::mux`).
#[derive(Debug, Clone)]
pub struct Mux {
    /// None: no multiplexed stream.
    pub path: Option<String>,
    pub max_watches: usize,
    /// None: `client.js` is not served.
    pub client: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub max_connections: usize,
    pub drain_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_new_streams_per_sec: u32,
    pub max_streams_per_ip: u32,
    pub max_streams_per_credential: u32,
    pub max_connections_per_ip: u32,
    pub max_topics_per_ip: usize,
    pub max_topics_per_credential: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Sse {
    pub heartbeat: Duration,
    pub retry: Duration,
    pub retry_jitter: Duration,
    pub history: usize,
    pub history_bytes: usize,
    pub grace: Duration,
    pub slow_timeout: Duration,
    pub expiry_notice: Duration,
}

#[derive(Debug, Clone)]
pub struct Proxy {
    pub connect_timeout: Duration,
    /// The whole exchange: upstream head and body.
    pub timeout: Duration,
    /// How long a client may take no bytes of a pass-through body.
    pub send_timeout: Duration,
    /// How long a tunnel may carry nothing either way.
    pub tunnel_idle_timeout: Duration,
    pub rewrite_redirects: bool,
    pub via: bool,
    /// Extra trusted roots for an `https` upstream, read and parsed at load time.
    pub ca: Option<Ca>,
}

/// The certificates of `[proxy] ca`, checked to parse as trust anchors.
#[derive(Debug, Clone)]
pub struct Ca {
    pub path: PathBuf,
    /// DER, in file order.
    pub certs: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub resumption: Resumption,
}

/// How returning TLS clients skip the full handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumption {
    /// TLS 1.2 sessions kept by ID (0: none).
    pub session_cache: usize,
    /// Rotation period of the session-ticket key (whole seconds, at least one).
    pub ticket_lifetime: Duration,
    /// File with the secret ticket keys are derived from (`None`: random keys in memory).
    pub ticket_key: Option<PathBuf>,
}

impl Default for Resumption {
    fn default() -> Self {
        Resumption {
            session_cache: 20_000,
            ticket_lifetime: Duration::from_secs(3600),
            ticket_key: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Compression {
    pub enabled: bool,
    pub min_size: u64,
}

#[derive(Debug, Clone)]
pub struct Cors {
    pub origins: CorsOrigins,
    /// Never true with `CorsOrigins::Any` (refused by validation).
    pub credentials: bool,
    pub max_age: Duration,
    pub pass_through: CorsPassThrough,
}

/// Which `Origin`s may read responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    /// Serialized origins (`https://app.example.com`, lowercase, no trailing slash).
    List(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub template: PathTemplate,
    pub interval: Duration,
    /// Where changes come from (poll by default).
    pub source: source::Source,
    /// Adaptive polling backs off up to this (equal to `interval`: no backoff).
    pub max_interval: Duration,
    /// `Cache-Control: max-age` is a floor on the next poll.
    pub honor_cache_control: bool,
    pub diff: DiffMode,
    pub array_key: Option<String>,
    pub timeout: Duration,
    pub query: Vec<String>,
    pub max_body: usize,
    pub min_interval: Duration,
    pub unknown_query: UnknownQuery,
    pub max_topics: usize,
    /// What counts as the upstream refusing a topic's credentials.
    pub refuse: Refusal,
    /// Who shares its topics, which credentials follow the client, checks, JWT.
    pub auth: auth::RouteAuth,
    /// Who answers plain GETs: the upstream, or a live topic's state.
    pub serve_get: ServeGet,
}

/// The answers that mean "these credentials are refused" (a route's `refuse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub statuses: Vec<u16>,
    /// Status classes, as their hundreds (300 for `"3xx"`).
    pub classes: Vec<u16>,
    /// A 2xx HTML page (a login form served instead of the data).
    pub html: bool,
}

impl Default for Refusal {
    /// 401, 403, any redirect (to a login page), and a login page served as 200.
    fn default() -> Self {
        Refusal {
            statuses: vec![401, 403],
            classes: vec![300],
            html: true,
        }
    }
}

impl Refusal {
    /// Whether an upstream answer with `status` refuses the credentials.
    pub fn status(&self, status: u16) -> bool {
        self.statuses.contains(&status) || self.classes.contains(&(status / 100 * 100))
    }
}

/// One thing wrong in the file, located by byte span (rendered as line and column).
#[derive(Debug, Clone)]
pub struct Problem {
    pub span: Range<usize>,
    pub key: String,
    pub message: String,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Located),
}

/// Problems rendered against the source text: `proxy.toml:12:12: interval: ...`, one per line.
#[derive(Debug)]
pub struct Located {
    pub name: String,
    pub lines: Vec<LocatedProblem>,
}

#[derive(Debug, Clone)]
pub struct LocatedProblem {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.lines.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: ", self.name, p.line, p.column)?;
            if !p.key.is_empty() {
                write!(f, "{}: ", p.key)?;
            }
            write!(f, "{}", p.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The problems found, each with its line (empty for a read error).
    pub fn problems(&self) -> &[LocatedProblem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid(l) => &l.lines,
        }
    }
}

/// Read and validate the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config = parse(&text, &path.display().to_string())?;
    config.source = Some(path.to_path_buf());
    Ok(config)
}

/// Parse and validate configuration text; `name` is used in messages (normally the file name).
/// Every problem is reported, in file order: those serde finds while reading (unknown keys, bad
/// values, missing keys) and those validation finds in what could be read.
pub fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
    let (file, mut problems) = read::read(text);
    match file.map(validate::validate) {
        Some(Ok(config)) if problems.is_empty() => return Ok(config),
        Some(Err(more)) => problems.extend(more),
        _ => {}
    }
    Err(locate(text, name, problems))
}

fn locate(text: &str, name: &str, mut problems: Vec<Problem>) -> ConfigError {
    // In file order, so a user can fix them top to bottom (stable: same place, found order).
    problems.sort_by_key(|p| p.span.start);
    let lines = problems
        .into_iter()
        .map(|p| {
            let (line, column) = line_col(text, p.span.start);
            let table = table_at(text, p.span.start);
            let key = match (table.as_deref(), p.key.as_str()) {
                (_, k) if k.contains('.') || k.starts_with("route ") => k.to_string(),
                (Some(t), "") => t.to_string(),
                (Some(t), k) => format!("{t} {k}"),
                (None, k) => k.to_string(),
            };
            LocatedProblem {
                line,
                column,
                key,
                // One problem per line: parser messages may span several.
                message: p.message.trim().replace('\n', "; "),
            }
        })
        .collect();
    ConfigError::Invalid(Located {
        name: name.to_string(),
        lines,
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The key written on the line that holds `offset` (`interval = "2x"` → `interval`).
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let start = text
        .get(..offset)
        .and_then(|b| b.rfind('\n'))
        .map_or(0, |i| i + 1);
    let line = text.get(start..).unwrap_or("").lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((k, _)) if !line.trim_start().starts_with('[') => {
            k.trim().trim_matches('"').to_string()
        }
        _ => String::new(),
    }
}

/// The nearest `[table]` or `[[array]]` header at or above the line of `offset`, as written.
fn table_at(text: &str, offset: usize) -> Option<String> {
    let end = text
        .get(offset.min(text.len())..)?
        .find('\n')
        .map_or(text.len(), |i| offset + i);
    let before = text.get(..end)?;
    before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.split('#').next().unwrap_or(l).trim().to_string())
}
