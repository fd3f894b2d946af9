//! herald's own endpoints for browsers: the multiplexed stream (`GET [mux] path?watch=…`, one
//! connection for many topics), its control API (`POST <path>/{token}/watch` and `/unwatch`, with
//! a JSON body `{"path": "/api/builds/3"}`), and the browser client (`GET [mux] client`). The body
//! of the stream is `sse::mux`; each watched path is resolved and subscribed exactly as a single
//! stream's would be (`watch_target`).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::debug;

use super::open::{self, Refused, StreamRequest, Target};
use super::{compress, cors, json_error, ConnInfo, ResponseBody, Service};
use crate::config;
use crate::hub::Position;
use crate::reply::full;
use crate::sse::mux::{Change, Control, ControlError, Registry, WatchInfo};
use crate::telemetry::redact;

/// The browser client, an ES module (`client/herald.js`).
pub const CLIENT_JS: &str = include_str!("../../client/herald.js");

/// Largest control request body: `{"path": …}` with a long query at most.
const MAX_CONTROL_BODY: usize = 8 * 1024;
/// Time allowed for a control request's body to arrive.
const CONTROL_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Which of herald's endpoints a path is.
enum Endpoint<'a> {
    Client,
    Stream,
    Control { token: &'a str, action: Action },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    Watch,
    Unwatch,
    Refresh,
}

/// herald's own endpoints on the public listener (`[mux]`): where they are, and the live
/// multiplexed streams their control requests reach.
pub struct Endpoints {
    /// None: no multiplexed stream.
    pub path: Option<String>,
    /// None: `client.js` is not served.
    pub client: Option<String>,
    pub max_watches: usize,
    pub registry: Arc<Registry>,
}

impl Endpoints {
    pub fn new(mux: &config::Mux) -> Endpoints {
        Endpoints {
            path: mux.path.clone(),
            client: mux.client.clone(),
            max_watches: mux.max_watches,
            registry: Arc::default(),
        }
    }

    fn endpoint<'a>(&self, path: &'a str) -> Option<Endpoint<'a>> {
        if self.client.as_deref() == Some(path) {
            return Some(Endpoint::Client);
        }
        let base = self.path.as_deref()?;
        let rest = path.strip_prefix(base)?;
        if rest.is_empty() {
            return Some(Endpoint::Stream);
        }
        let (token, action) = rest.strip_prefix('/')?.split_once('/')?;
        let action = match action {
            "watch" => Action::Watch,
            "unwatch" => Action::Unwatch,
            "refresh" => Action::Refresh,
            _ => return None,
        };
        Some(Endpoint::Control { token, action })
    }

    /// Whether `path` is one of herald's own endpoints (never passed through).
    pub fn owns(&self, path: &str) -> bool {
        self.endpoint(path).is_some()
    }
}

/// Answer a request for one of herald's endpoints (`owns` was true).
pub async fn handle(
    svc: &Arc<Service>,
    req: Request<Incoming>,
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    let path = req.uri().path().to_string();
    let Some(ep) = svc.mux.endpoint(&path) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such herald endpoint",
        );
    };
    let cors_cfg = svc.cors.as_ref();
    if let Some(c) = cors_cfg.filter(|_| cors::is_preflight(req.method(), req.headers())) {
        // The stream needs only GET and the stream headers; control requests are JSON POSTs.
        return cors::preflight(c, req.headers(), matches!(ep, Endpoint::Stream));
    }
    if !matches!(ep, Endpoint::Client) && !cors::origin_allowed(cors_cfg, &req, conn.tls) {
        svc.metrics.reject("cors-origin");
        return cors::refuse_origin();
    }
    let origin = cors_cfg.and_then(|_| req.headers().get(header::ORIGIN).cloned());
    let mut resp = match (ep, req.method()) {
        (Endpoint::Client, &Method::GET | &Method::HEAD) => client_js(req.headers()),
        (Endpoint::Stream, &Method::GET) => open(svc, &req, conn).await,
        (Endpoint::Control { token, action }, &Method::POST) => {
            let token = token.to_string();
            control(svc, req, conn, &token, action).await
        }
        (Endpoint::Client | Endpoint::Stream, _) => method_not_allowed("GET"),
        (Endpoint::Control { .. }, _) => method_not_allowed("POST"),
    };
    if let Some(c) = cors_cfg {
        cors::decorate(c, origin.as_ref(), resp.headers_mut());
    }
    resp
}

fn method_not_allowed(allow: &'static str) -> Response<ResponseBody> {
    let mut r = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        &format!("use {allow}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// A watched path resolved against the routes, exactly as a single stream's request is: the route,
/// the topic key, and what to tell the client. `raw` is a path with an optional query, as it would
/// appear in a URL (percent-encoded).
fn watch_target(svc: &Service, raw: &str, request_query: Option<&str>) -> Result<Target, Refused> {
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    match svc.routes.resolve(path, query) {
        Ok(Some((route, key))) => {
            let info = WatchInfo {
                path: raw.to_string(),
                topic: key.resource.to_string(),
            };
            Ok(Target {
                route,
                key,
                info,
                query: auth_query(raw, request_query),
            })
        }
        Ok(None) => Err(Refused::new(
            StatusCode::NOT_FOUND,
            "not-a-stream",
            format!("{path} is not a stream route"),
        )),
        Err(e) => Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("{path}: {e}"),
        )),
    }
}

/// The query string credentials may be read from: the watched path's own, then the request's.
fn auth_query(watched: &str, request: Option<&str>) -> Option<String> {
    let own = watched.split_once('?').map(|(_, q)| q);
    match (own, request) {
        (Some(a), Some(b)) => Some(format!("{a}&{b}")),
        (a, b) => a.or(b).map(str::to_string),
    }
}

/// `application/x-www-form-urlencoded` decoding of one query value (`+` is a space).
pub(super) fn form_decode(v: &str) -> Option<String> {
    let bytes = crate::routes::percent_decode(&v.replace('+', " "))?;
    String::from_utf8(bytes).ok()
}

/// `GET [mux] path?watch=/a&watch=/b[&last_event_id=…]`: one stream for every watched topic.
async fn open(
    svc: &Arc<Service>,
    req: &Request<Incoming>,
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    let max_watches = svc.mux.max_watches;
    let mut watched = Vec::new();
    let mut last_q = None;
    for pair in req.uri().query().unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "watch" => {}
            "last_event_id" => {
                last_q = form_decode(v);
                continue;
            }
            _ => continue,
        };
        if watched.len() >= max_watches {
            return json_error(
                StatusCode::BAD_REQUEST,
                "too-many-watches",
                &format!("a stream watches at most {max_watches} resources"),
            );
        }
        match form_decode(v) {
            Some(p) => watched.push(p),
            None => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "a watch parameter is not valid percent-encoded UTF-8",
                )
            }
        }
    }
    let mut targets: Vec<Target> = Vec::with_capacity(watched.len());
    for raw in &watched {
        match watch_target(svc, raw, req.uri().query()) {
            // Two paths for one topic (e.g. differing only in dropped query parameters): one watch.
            Ok(t) if targets.iter().any(|o| o.key == t.key) => {}
            Ok(t) => targets.push(t),
            Err(refused) => return refused.response(),
        }
    }
    let stream = StreamRequest {
        headers: req.headers(),
        version: req.version(),
        conn,
        query_last_event_id: last_q,
    };
    open::mux(svc, &stream, targets).await
}

/// A control request's body, read whole (bounded in size and time) and checked to be JSON.
async fn control_body(req: Request<Incoming>) -> Result<Bytes, Response<ResponseBody>> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        // A form or text/plain body is what a cross-site page can send without asking first.
        return Err(json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad-request",
            "control requests are JSON: Content-Type: application/json",
        ));
    }
    let body = Limited::new(req.into_body(), MAX_CONTROL_BODY).collect();
    match tokio::time::timeout(CONTROL_BODY_TIMEOUT, body).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "bad-request",
            &format!("the body must be JSON of at most {MAX_CONTROL_BODY} bytes"),
        )),
        Err(_) => Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            "bad-request",
            "the body did not arrive in time",
        )),
    }
}

/// The refusal of a control request whose credentials did not open the stream.
fn not_yours() -> Response<ResponseBody> {
    json_error(
        StatusCode::FORBIDDEN,
        "forbidden",
        "these credentials did not open this stream",
    )
}

fn json_ok(body: serde_json::Value) -> Response<ResponseBody> {
    let mut resp = Response::new(full(body.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `POST <path>/{token}/watch|unwatch` with `{"path": "/api/builds/3"}` (and, to watch from a
/// position the client already has, `"since"`), or `/refresh`. Every request must carry the
/// credentials that opened the stream: a token alone is not enough.
async fn control(
    svc: &Arc<Service>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    token: &str,
    action: Action,
) -> Response<ResponseBody> {
    let headers = req.headers().clone();
    let request_query = req.uri().query().map(str::to_string);
    let Some(control) = svc.mux.registry.get(token) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "no-such-stream",
            "no live stream has this token (it ended, or never existed)",
        );
    };
    let body = match control_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let watching = match action {
        Action::Watch => true,
        Action::Unwatch => false,
        Action::Refresh => {
            return refresh(
                svc,
                &control,
                headers,
                request_query.as_deref(),
                &body,
                conn,
            )
            .await
        }
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        path: String,
        #[serde(default)]
        since: Option<String>,
    }
    let Ok(Body { path, since }) = serde_json::from_slice::<Body>(&body) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            r#"expected a JSON body like {"path": "/api/builds/3"}"#,
        );
    };
    let since = since.and_then(|p| p.parse::<Position>().ok());
    let target = match watch_target(svc, &path, request_query.as_deref()) {
        Ok(t) => t,
        Err(refused) => return refused.response(),
    };
    // Whoever asks must be who opened the stream (the grant's principal is the credential's).
    let grant = match open::authorize(svc, &target, &headers).await {
        Ok(g) => g,
        Err(refused) => return refused.response(),
    };
    if !control.belongs_to(grant.principal) {
        return not_yours();
    }
    let info = target.info.clone();
    let result = if !watching {
        control.unwatch(&target.key.resource)
    } else if control.watches(&target.key.resource) {
        Ok(Change::Unchanged)
    } else {
        let sub = open::subscribe(svc, &target.route, &grant, control.slot(), conn.peer.ip());
        match sub {
            Ok(sub) => control.watch(sub, info.clone(), since),
            Err(refused) => return refused.response(),
        }
    };
    match result {
        Ok(change) => {
            debug!(?action, topic = %redact(&info.topic), ?change, "watch changed");
            json_ok(serde_json::json!({
                "path": info.path,
                "topic": info.topic,
                "watching": watching,
                "changed": change == Change::Done,
                "watches": control.len(),
            }))
        }
        Err(e) => control_error(e),
    }
}

fn control_error(e: ControlError) -> Response<ResponseBody> {
    match e {
        ControlError::Gone => json_error(StatusCode::NOT_FOUND, "no-such-stream", &e.to_string()),
        ControlError::TooManyWatches { .. } => json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-watches",
            &e.to_string(),
        ),
    }
}

/// `POST <control>/refresh` with the new credential (`{"access_token": …}`, or in
/// `Authorization`/cookies): every watch is authorized again with it, and it must name the same
/// user. The stream goes on: its expiry moves to the new credential's, and a watch whose topic
/// is keyed by the token itself moves to the new token's topic (with a snapshot).
async fn refresh(
    svc: &Arc<Service>,
    control: &Arc<Control>,
    mut headers: HeaderMap,
    query: Option<&str>,
    body: &[u8],
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        access_token: Option<String>,
    }
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(Body::default())
    } else {
        serde_json::from_slice::<Body>(body)
    };
    let Ok(Body { access_token }) = parsed else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            r#"expected a JSON body like {"access_token": "…"} (or {} with the credential in Authorization)"#,
        );
    };
    if let Some(token) = access_token {
        match HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(mut v) => {
                v.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, v);
            }
            Err(_) => return json_error(StatusCode::BAD_REQUEST, "bad-request", "malformed token"),
        }
    }
    // Every watch, authorized with the new credential, before anything changes.
    let mut grants = Vec::new();
    for (key, path) in control.watched() {
        let target = match watch_target(svc, &path, query) {
            Ok(t) => t,
            Err(refused) => return refused.response(),
        };
        let grant = match open::authorize(svc, &target, &headers).await {
            Ok(g) => g,
            Err(refused) => return refused.response(),
        };
        grants.push((key, target, grant));
    }
    let principal = grants.first().map_or(0, |(_, _, g)| g.principal);
    if grants.iter().any(|(_, _, g)| g.principal != principal) || !control.belongs_to(principal) {
        return not_yours();
    }
    let slot = control.slot();
    let mut valid_until = None;
    for (old, target, grant) in grants {
        valid_until = valid_until.max(grant.valid_until);
        if grant.key == old {
            // The same topic: only the credential's deadline moves.
            svc.auth.watch(&grant, &slot);
            continue;
        }
        let info = target.info.clone();
        match open::subscribe(svc, &target.route, &grant, slot.clone(), conn.peer.ip()) {
            Ok(sub) => {
                if let Err(e) = control.replace(&old, sub, info) {
                    return control_error(e);
                }
            }
            Err(refused) => return refused.response(),
        }
    }
    control.rebind(principal);
    debug!(watches = control.len(), "stream refreshed");
    json_ok(serde_json::json!({
        "refreshed": true,
        "expires_at": valid_until.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        "watches": control.len(),
    }))
}

/// `"c-<crc32>"`: changes whenever the embedded client does.
static CLIENT_ETAG: LazyLock<HeaderValue> = LazyLock::new(|| {
    let tag = format!("\"c-{:08x}\"", crc32fast::hash(CLIENT_JS.as_bytes()));
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"c\""))
});

/// The client gzipped once per process, for clients that accept it.
static CLIENT_GZ: LazyLock<Bytes> = LazyLock::new(|| {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail; on the impossible error the plain client is served.
    match enc
        .write_all(CLIENT_JS.as_bytes())
        .and_then(|()| enc.finish())
    {
        Ok(gz) => Bytes::from(gz),
        Err(_) => Bytes::new(),
    }
});

/// `GET [mux] client`: the embedded ES module, cacheable and revalidated by ETag.
fn client_js(headers: &HeaderMap) -> Response<ResponseBody> {
    let etag = &*CLIENT_ETAG;
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/").as_bytes() == etag.as_bytes()
        });
    let gzip = compress::accepts_gzip(headers) && !CLIENT_GZ.is_empty();
    let (status, body) = if fresh {
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else if gzip {
        (StatusCode::OK, CLIENT_GZ.clone())
    } else {
        (StatusCode::OK, Bytes::from_static(CLIENT_JS.as_bytes()))
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    // Five minutes without asking, then a cheap revalidation (304) by ETag: a herald upgrade
    // reaches browsers within minutes.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    h.insert(header::ETAG, etag.clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    compress::add_vary(h, "accept-encoding");
    if gzip && !fresh {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}
