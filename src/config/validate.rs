//! Checks that need more than one value at a time (limits, duplicates, cross-key rules), turning the
//! parsed `model::File` into the `Config` the rest of herald uses. Every problem is collected, so a
//! user fixes them all in one pass; each carries the span of the offending value.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Duration;

use super::model::{self, File, HumanDuration};
use super::{Ca, Compression, Config, Cors, CorsOrigins, Problem, Proxy, Route, Server, Sse, Tls};
use toml::Spanned;

/// The shortest poll interval accepted: anything faster is a load test, not a proxy.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// The shortest pass-through timeouts accepted: below this, ordinary scheduling delays would
/// cut healthy exchanges.
const MIN_PROXY_TIMEOUT: Duration = Duration::from_millis(100);

pub(super) fn validate(file: File) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut push = |span: Range<usize>, key: &str, message: String| {
        problems.push(Problem {
            span,
            key: key.to_string(),
            message,
        })
    };

    let heartbeat = file.sse.heartbeat.get_ref().0;
    if heartbeat < MIN_HEARTBEAT {
        push(
            file.sse.heartbeat.span(),
            "sse.heartbeat",
            format!("must be at least {MIN_HEARTBEAT:?}, got {heartbeat:?}"),
        );
    }
    let slow_timeout = file.sse.slow_timeout.get_ref().0;
    if slow_timeout < Duration::from_secs(1) {
        push(
            file.sse.slow_timeout.span(),
            "sse.slow_timeout",
            format!("must be at least 1s, got {slow_timeout:?}"),
        );
    }
    let max_connections = *file.server.max_connections.get_ref();
    if max_connections == 0 {
        push(
            file.server.max_connections.span(),
            "server.max_connections",
            "must be at least 1".into(),
        );
    }

    let header_timeout = at_least(
        &file.server.header_timeout,
        "server.header_timeout",
        Duration::from_millis(100),
        &mut push,
    );
    let idle_timeout = at_least(
        &file.server.idle_timeout,
        "server.idle_timeout",
        Duration::from_millis(100),
        &mut push,
    );

    let tls = file.tls.map(|t| validate_tls(t, &mut push));

    let mut seen = HashSet::new();
    let mut routes = Vec::new();
    // Where each route's path is written, for problems found later about the route as a whole.
    let mut route_paths = Vec::new();
    for spanned in file.routes {
        let route_span = spanned.span();
        let r = spanned.into_inner();
        let path = r.path.get_ref().source.clone();
        let label = format!("route {path:?}");
        if !seen.insert(r.path.get_ref().segments.clone()) {
            push(
                r.path.span(),
                &format!("{label} path"),
                "the same path is listed twice".into(),
            );
        }
        let interval = r.interval.get_ref().0;
        if interval < MIN_INTERVAL {
            let span = if r.interval.span().is_empty() {
                route_span.clone()
            } else {
                r.interval.span()
            };
            push(
                span,
                &format!("{label} interval"),
                format!("must be at least {MIN_INTERVAL:?}, got {interval:?}"),
            );
        }
        let timeout = match &r.timeout {
            Some(t) if t.get_ref().0.is_zero() => {
                push(
                    t.span(),
                    &format!("{label} timeout"),
                    "must be above 0".into(),
                );
                interval
            }
            Some(t) => t.get_ref().0,
            // A poll may take as long as the interval, but no less than a second.
            None => interval
                .max(Duration::from_secs(1))
                .min(Duration::from_secs(30)),
        };
        if r.max_topics == 0 {
            push(
                route_span.clone(),
                &format!("{label} max_topics"),
                "must be at least 1".into(),
            );
        }
        if let Some(k) = &r.array_key {
            if k.is_empty() {
                push(
                    route_span.clone(),
                    &format!("{label} array_key"),
                    "must not be empty".into(),
                );
            }
        }
        let auth = super::auth::validate(
            super::auth::Written {
                route_span: route_span.clone(),
                label: &label,
                template: r.path.get_ref(),
                query: &r.query,
                share: r.share.as_ref(),
                vary: r.vary.as_ref(),
                access_token: r.access_token.as_ref(),
                auth: r.auth.as_ref(),
                reauth: r.reauth.as_ref(),
                jwt: r.jwt.as_ref(),
            },
            &mut push,
        );
        let source =
            super::source::validate_source(r.source.as_ref(), r.path.get_ref(), &label, &mut push);
        let max_interval = super::source::validate_max_interval(
            r.max_interval.as_ref(),
            interval,
            &label,
            &mut push,
        );
        route_paths.push(r.path.span());
        routes.push(Route {
            template: r.path.into_inner(),
            interval,
            source,
            max_interval,
            honor_cache_control: r.honor_cache_control,
            diff: r.diff,
            serve_get: r.serve_get,
            array_key: r.array_key,
            timeout,
            query: r.query,
            max_body: usize::try_from(r.max_body.0).unwrap_or(usize::MAX),
            min_interval: r.min_interval.map_or(Duration::ZERO, |d| d.0),
            unknown_query: r.unknown_query,
            max_topics: r.max_topics,
            refuse: r.refuse.map_or_else(super::Refusal::default, |list| {
                let mut refusal = super::Refusal {
                    statuses: Vec::new(),
                    classes: Vec::new(),
                    html: false,
                };
                for item in list.into_inner() {
                    match item.into_inner() {
                        model::RefuseItem::Status(s) => refusal.statuses.push(s),
                        model::RefuseItem::Class(c) => refusal.classes.push(c),
                        model::RefuseItem::Html => refusal.html = true,
                    }
                }
                refusal
            }),
            auth,
        });
    }

    let cors = file.cors.map(|c| validate_cors(c, &mut push));
    let admin = file.admin.map(|a| {
        // A defaulted `listen` is located at its `[admin]` header.
        let span = Some(a.get_ref().listen.span())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| a.span());
        let listen = *a.get_ref().listen.get_ref();
        if listen == file.listen && listen.port() != 0 {
            push(span, "admin.listen", format!("{listen} is already the public listen address; give the admin listener its own port"));
        }
        let token = match &a.get_ref().token {
            Some(t) if t.get_ref().len() < MIN_SECRET => {
                push(
                    t.span(),
                    "admin.token",
                    format!("must be at least {MIN_SECRET} characters"),
                );
                None
            }
            Some(t) => Some(super::Secret(t.get_ref().clone())),
            None => std::env::var(super::ADMIN_TOKEN_ENV)
                .ok()
                .filter(|t| t.len() >= MIN_SECRET)
                .map(super::Secret),
        };
        let hosts = a
            .get_ref()
            .hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        super::Admin {
            listen,
            token,
            hosts,
        }
    });
    let polling = super::source::validate_polling(&file.polling, &mut push);
    let publish = super::source::validate_publish(&file.publish, &mut push);
    let mux = validate_mux(&file.mux, &routes, &route_paths, &mut push);
    let compression = Compression {
        enabled: file.compression.enabled,
        min_size: file.compression.min_size.0,
    };

    let mut at_least = |v: &toml::Spanned<model::HumanDuration>, key: &str, min: Duration| {
        let d = v.get_ref().0;
        if d < min {
            push(
                v.span(),
                key,
                format!("must be at least {min:?}, got {d:?}"),
            );
        }
        d
    };
    let proxy_timeout = at_least(&file.proxy.timeout, "proxy.timeout", MIN_PROXY_TIMEOUT);
    let send_timeout = at_least(
        &file.proxy.send_timeout,
        "proxy.send_timeout",
        MIN_PROXY_TIMEOUT,
    );
    let tunnel_idle_timeout = at_least(
        &file.proxy.tunnel_idle_timeout,
        "proxy.tunnel_idle_timeout",
        Duration::from_secs(1),
    );

    let ca = file
        .proxy
        .ca
        .as_ref()
        .and_then(|c| validate_ca(c, &mut push));

    let secret = match &file.cluster.secret {
        Some(s) if s.get_ref().len() < MIN_SECRET => {
            push(
                s.span(),
                "cluster.secret",
                format!("must be at least {MIN_SECRET} characters"),
            );
            None
        }
        Some(s) => Some(super::Secret(s.get_ref().clone())),
        None => std::env::var(super::CLUSTER_SECRET_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .map(super::Secret),
    };

    let redis = validate_redis(&file.cluster, secret.is_some(), &mut push);

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Config {
        source: None,
        listen: file.listen,
        upstream: file.upstream.0,
        server: Server {
            max_connections,
            drain_timeout: file.server.drain_timeout.0,
            max_header_bytes: usize::try_from(file.server.max_header_bytes.0).unwrap_or(usize::MAX),
            max_new_streams_per_sec: file.server.max_new_streams_per_sec,
            max_streams_per_ip: file.server.max_streams_per_ip,
            max_streams_per_credential: file.server.max_streams_per_credential,
            max_connections_per_ip: file.server.max_connections_per_ip,
            max_topics_per_ip: file.server.max_topics_per_ip,
            max_topics_per_credential: file.server.max_topics_per_credential,
            header_timeout,
            idle_timeout,
        },
        sse: Sse {
            heartbeat,
            retry: file.sse.retry.0,
            retry_jitter: file.sse.retry_jitter.0,
            history: file.sse.history,
            history_bytes: usize::try_from(file.sse.history_bytes.0).unwrap_or(usize::MAX),
            grace: file.sse.grace.0,
            slow_timeout,
            expiry_notice: file.sse.expiry_notice.0,
        },
        proxy: Proxy {
            connect_timeout: file.proxy.connect_timeout.0,
            timeout: proxy_timeout,
            send_timeout,
            tunnel_idle_timeout,
            rewrite_redirects: file.proxy.rewrite_redirects,
            via: file.proxy.via,
            ca,
        },
        tls,
        compression,
        cors,
        mux,
        admin,
        cluster: super::Cluster { secret, redis },
        polling,
        publish,
        log: super::Log {
            access: file.log.access,
        },
        routes,
    })
}

/// Shortest credential secret accepted: a short one could be guessed from topic ids.
const MIN_SECRET: usize = 16;

/// Most watches one multiplexed stream may be configured to hold: each costs a cursor in every
/// event id of the stream, and ids travel in every reconnect header.
const MAX_MUX_WATCHES: usize = 256;

/// `[mux]`: each path is absolute, plain (no query, no parameters) and not a stream route's, so
/// it cannot shadow an upstream resource by accident; `""` turns a feature off. A clash with a
/// path left at its default is the route's problem, reported where the route's path is written.
fn validate_mux(
    m: &model::MuxSection,
    routes: &[Route],
    route_paths: &[Range<usize>],
    push: &mut impl FnMut(Range<usize>, &str, String),
) -> super::Mux {
    let mut check = |v: &toml::Spanned<String>, key: &str| -> Option<String> {
        let p = v.get_ref().trim();
        if p.is_empty() {
            return None;
        }
        let shadowed = routes.iter().zip(route_paths).find(|(r, _)| {
            r.template.segments.len() == p.split('/').count() - 1
                && r.template
                    .segments
                    .iter()
                    .zip(p.split('/').skip(1))
                    .all(|(seg, part)| match seg {
                        model::Segment::Literal(l) => l == part,
                        model::Segment::Param(_) => true,
                    })
        });
        if !p.starts_with('/') || p.contains(['?', '#', '{', '}', ' ']) || p.ends_with('/') {
            push(
                v.span(),
                key,
                format!("invalid path {p:?}: expected an absolute path like \"/_herald/stream\", without query or trailing '/' (or \"\" to turn it off)"),
            );
        } else if let Some((r, route_path)) = shadowed {
            if v.span().is_empty() {
                push(
                    route_path.clone(),
                    &format!("route {:?} path", r.template.source),
                    format!(
                        "also matches {p:?}, herald's own {key} (the default), which takes \
                         precedence; change the route's path, or set {key} to a path no route \
                         matches"
                    ),
                );
            } else {
                push(
                    v.span(),
                    key,
                    format!(
                        "{p:?} is also matched by route {:?}; pick a path no route matches",
                        r.template.source
                    ),
                );
            }
        }
        Some(p.to_string())
    };
    let path = check(&m.path, "mux.path");
    let client = check(&m.client, "mux.client");
    if path.is_some() && path == client {
        push(
            m.client.span(),
            "mux.client",
            "must differ from mux.path".into(),
        );
    }
    let max_watches = *m.max_watches.get_ref();
    if !(1..=MAX_MUX_WATCHES).contains(&max_watches) {
        push(
            m.max_watches.span(),
            "mux.max_watches",
            format!("must be between 1 and {MAX_MUX_WATCHES}, got {max_watches}"),
        );
    }
    super::Mux {
        path,
        max_watches,
        client,
    }
}

/// `[cors]`: each origin must be `*` or a bare origin, and `*` may not go with credentials
/// (browsers refuse that combination, so it would fail at runtime in every client).
fn validate_cors(c: model::CorsSection, push: &mut impl FnMut(Range<usize>, &str, String)) -> Cors {
    let origins_span = c.origins.span();
    let written = c.origins.into_inner();
    let wildcard = written.iter().any(|o| o.get_ref().trim() == "*");
    let mut list = Vec::new();
    for o in &written {
        let raw = o.get_ref().trim();
        if raw == "*" {
            if written.len() > 1 {
                push(
                    o.span(),
                    "cors.origins",
                    "\"*\" allows every origin; list it alone".into(),
                );
            }
            continue;
        }
        match serialized_origin(raw) {
            Ok(origin) => list.push(origin),
            Err(message) => push(o.span(), "cors.origins", message),
        }
    }
    if written.is_empty() {
        push(
            origins_span.clone(),
            "cors.origins",
            "list at least one origin (or \"*\"), or remove [cors]".into(),
        );
    }
    let credentials = *c.credentials.get_ref();
    if credentials && wildcard {
        let span = if c.credentials.span().is_empty() {
            origins_span
        } else {
            c.credentials.span()
        };
        push(
            span,
            "cors.credentials",
            "cannot be true with origins = [\"*\"]: browsers refuse a wildcard origin with \
             credentials; list the allowed origins instead"
                .into(),
        );
    }
    Cors {
        origins: if wildcard {
            CorsOrigins::Any
        } else {
            CorsOrigins::List(list)
        },
        credentials,
        max_age: c.max_age.0,
        pass_through: c.pass_through,
    }
}

/// `https://App.example.com:443/` → `https://app.example.com`, the form browsers send in `Origin`.
fn serialized_origin(raw: &str) -> Result<String, String> {
    let expected = "expected scheme://host[:port], like \"https://app.example.com\"";
    let url = reqwest::Url::parse(raw)
        .map_err(|e| format!("invalid origin {raw:?} ({e}): {expected}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("invalid origin {raw:?}: {expected}"));
    }
    if url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(format!(
            "invalid origin {raw:?}: an origin has no path, query or user; {expected}"
        ));
    }
    Ok(url.origin().ascii_serialization())
}

/// `[proxy] ca`: the file must be readable and hold at least one PEM certificate usable as a trust
/// anchor. Read here, at load time, so a bad file stops herald before it binds anything.
fn validate_ca(
    ca: &toml::Spanned<std::path::PathBuf>,
    push: &mut impl FnMut(Range<usize>, &str, String),
) -> Option<Ca> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let path = ca.get_ref();
    let mut fail = |message: String| {
        push(
            ca.span(),
            "proxy.ca",
            format!("{}: {message}", path.display()),
        )
    };
    let pem = match std::fs::read(path) {
        Ok(p) => p,
        Err(e) => {
            fail(format!("cannot read: {e}"));
            return None;
        }
    };
    let certs = match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(c) if c.is_empty() => {
            fail("no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)".into());
            return None;
        }
        Ok(c) => c,
        Err(e) => {
            fail(format!("invalid PEM: {e}"));
            return None;
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        if let Err(e) = roots.add(cert.clone()) {
            fail(format!("certificate {} is not usable as a CA: {e}", i + 1));
            return None;
        }
    }
    Some(Ca {
        path: path.clone(),
        certs: certs.into_iter().map(|c| c.to_vec()).collect(),
    })
}

/// Ticket keys rotate in whole seconds, and TLS 1.3 lets a ticket live at most 7 days.
fn validate_tls(t: model::TlsSection, push: &mut impl FnMut(Range<usize>, &str, String)) -> Tls {
    let lifetime = at_least(
        &t.ticket_lifetime,
        "tls.ticket_lifetime",
        Duration::from_secs(1),
        push,
    );
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
    if lifetime > WEEK {
        push(
            t.ticket_lifetime.span(),
            "tls.ticket_lifetime",
            format!("must be at most 7 days (TLS 1.3's limit), got {lifetime:?}"),
        );
    }
    Tls {
        cert: t.cert,
        key: t.key,
        resumption: super::Resumption {
            session_cache: *t.session_cache.get_ref(),
            ticket_lifetime: lifetime,
            ticket_key: t.ticket_key,
        },
    }
}

/// The shortest lease accepted: renewals go out every third of it.
const MIN_LEASE: Duration = Duration::from_millis(500);

/// `[cluster] redis` and its companions; None without `redis`.
fn validate_redis(
    c: &model::ClusterSection,
    has_secret: bool,
    push: &mut impl FnMut(Range<usize>, &str, String),
) -> Option<super::Redis> {
    let url = c.redis.as_ref()?;
    let scheme_ok = reqwest::Url::parse(url.get_ref())
        .map(|u| matches!(u.scheme(), "redis" | "rediss") && u.host_str().is_some())
        .unwrap_or(false);
    if !scheme_ok {
        push(
            url.span(),
            "cluster.redis",
            "expected a URL like \"redis://host:6379\" or \"rediss://user:password@host:6380/0\""
                .into(),
        );
    }
    if !has_secret {
        push(
            url.span(),
            "cluster.redis",
            format!(
                "needs cluster.secret (or {}): every node must key per-credential topics alike",
                super::CLUSTER_SECRET_ENV
            ),
        );
    }
    let node = match &c.node {
        Some(n) => {
            let ok = !n.get_ref().is_empty()
                && n.get_ref().len() <= 64
                && n.get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                push(
                    n.span(),
                    "cluster.node",
                    "expected 1 to 64 letters, digits, '.', '_' or '-'".into(),
                );
            }
            n.get_ref().clone()
        }
        None => default_node(),
    };
    let prefix = c.prefix.get_ref();
    if prefix.is_empty() || prefix.len() > 64 || prefix.contains(['{', '}', ' ']) {
        push(
            c.prefix.span(),
            "cluster.prefix",
            "expected 1 to 64 characters, without spaces or braces".into(),
        );
    }
    let lease = at_least(&c.lease, "cluster.lease", MIN_LEASE, push);
    let retention = *c.retention.get_ref();
    if retention == 0 {
        push(
            c.retention.span(),
            "cluster.retention",
            "must be at least 1 (events kept per topic)".into(),
        );
    }
    let retention_age = at_least(
        &c.retention_age,
        "cluster.retention_age",
        Duration::from_secs(1),
        push,
    );
    let local_fallback = match c.on_unavailable.get_ref().as_str() {
        "fail" => false,
        "local" => true,
        other => {
            push(
                c.on_unavailable.span(),
                "cluster.on_unavailable",
                format!("expected \"fail\" or \"local\", got {other:?}"),
            );
            false
        }
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Some(super::Redis {
        url: super::Secret(url.get_ref().clone()),
        username: env(super::REDIS_USERNAME_ENV),
        password: env(super::REDIS_PASSWORD_ENV).map(super::Secret),
        node,
        prefix: prefix.clone(),
        lease,
        retention,
        retention_age,
        local_fallback,
    })
}

/// `$HOSTNAME` (a pod's name), else a random name drawn once per process (so a reload does not
/// see a different node).
fn default_node() -> String {
    static RANDOM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .unwrap_or_else(|| {
            RANDOM
                .get_or_init(|| format!("node-{:08x}", rand::random::<u32>()))
                .clone()
        })
}

/// A duration that must be at least `min`: reported at its line if not.
fn at_least(
    value: &Spanned<HumanDuration>,
    key: &str,
    min: Duration,
    push: &mut impl FnMut(Range<usize>, &str, String),
) -> Duration {
    let d = value.get_ref().0;
    if d < min {
        push(
            value.span(),
            key,
            format!("must be at least {min:?}, got {d:?}"),
        );
    }
    d
}
