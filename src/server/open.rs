//! Opening a stream, single or multiplexed, in named phases: resolve (the caller: one route, or
//! each watched path) → authorize every target → admit the client → subscribe → respond. Each
//! phase can refuse with an HTTP answer; the response body is one statically typed stack
//! (`Watched<Coded<SseStream<_>>>`) boxed once.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use rand::Rng;
use tracing::debug;

use super::admission::{Rejection, StreamPermit};
use super::observe::{Start, StreamLog, Watched};
use super::{compress, json_error, ConnInfo, ResponseBody, Service};
use crate::auth::{Denied, Grant};
use crate::hub::{Client, Position, SubscribeError, Subscription, WatchSlot};
use crate::routes::{Route, TopicKey};
use crate::sse::mux::{MuxEvents, MuxOptions, WatchInfo};
use crate::sse::{Events, GzipStream, Lifecycle, SseStream, StreamClosed, TopicEvents};

/// The head of a stream request: all the open path reads.
pub struct StreamRequest<'a> {
    pub headers: &'a HeaderMap,
    pub version: Version,
    pub conn: &'a ConnInfo,
    /// The `last_event_id` query parameter: where a client that cannot set the header (a first
    /// `EventSource` open, from a page's `Herald-Event-Id`) starts. The header wins.
    pub query_last_event_id: Option<String>,
}

impl StreamRequest<'_> {
    /// Where the client says it is: the `Last-Event-ID` header, else its query stand-in.
    fn last_event_id(&self) -> Option<&str> {
        self.headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .or(self.query_last_event_id.as_deref())
    }

    /// The stream's slot. An HTTP/1 connection carries this one stream, so a stuck reader can be
    /// cut by closing it; an HTTP/2 connection carries others that must not suffer for it.
    fn slot(&self) -> Arc<WatchSlot> {
        Arc::new(if self.version < Version::HTTP_2 {
            WatchSlot::with_kill(self.conn.kill.clone())
        } else {
            WatchSlot::default()
        })
    }
}

/// One resolved thing to watch: its route and topic key, what to tell the client about it, and
/// the query string its credentials may be read from (the route's access-token parameter).
pub struct Target {
    pub route: Arc<Route>,
    pub key: TopicKey,
    pub info: WatchInfo,
    pub query: Option<String>,
}

/// Why a phase refused the stream: the HTTP answer, made only when it is sent.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refused {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refused {
        Refused {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn response(&self) -> Response<ResponseBody> {
        json_error(self.status, self.code, &self.message)
    }
}

impl From<Denied> for Refused {
    fn from(denied: Denied) -> Refused {
        Refused::new(denied.status(), denied.code(), denied.to_string())
    }
}

/// Phase 2: may this client watch `target`? The grant names the topic (with its vary key).
pub(super) async fn authorize(
    svc: &Service,
    target: &Target,
    headers: &HeaderMap,
) -> Result<Grant, Refused> {
    svc.auth
        .authorize(
            &target.route,
            target.key.clone(),
            headers,
            target.query.as_deref(),
        )
        .await
        .map_err(|denied| {
            debug!(route = %target.route.template, error = %denied, "stream refused");
            denied.into()
        })
}

/// Phase 3: admission (new streams per second, open streams per address and credential).
fn admit(
    svc: &Service,
    req: &StreamRequest<'_>,
    principal: u64,
) -> Result<StreamPermit, Rejection> {
    svc.admission
        .admit(req.conn.peer.ip(), principal)
        .inspect_err(|rejection| {
            debug!(peer = %req.conn.peer, %rejection, "stream refused");
            svc.metrics.reject("stream-admission");
        })
}

/// Phase 4: join the granted topic with `slot`, under revocation watch.
pub(super) fn subscribe(
    svc: &Service,
    route: &Arc<Route>,
    grant: &Grant,
    slot: Arc<WatchSlot>,
    ip: IpAddr,
) -> Result<Subscription, Refused> {
    let client = Client {
        ip,
        principal: grant.principal,
    };
    match svc.hub.subscribe(
        route,
        grant.key.clone(),
        grant.headers.clone(),
        slot,
        client,
    ) {
        Ok(sub) => {
            svc.auth.watch(grant, &sub.slot);
            Ok(sub)
        }
        Err(e @ (SubscribeError::TooManyTopics { .. } | SubscribeError::ClientBudget { .. })) => {
            debug!(error = %e, "stream refused");
            svc.metrics.reject("too-many-topics");
            Err(Refused::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-topics",
                e.to_string(),
            ))
        }
        Err(e @ SubscribeError::Retired) => Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "reconfigured",
            e.to_string(),
        )),
    }
}

/// Longest a stream request waits for a new per-credential topic's first answer, so that a
/// refusal is an HTTP refusal (which `EventSource` does not retry) rather than a `200` stream
/// that ends at once.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Wait (bounded) until a per-credential topic has answered: its first event, or a refusal.
/// Shared topics are never refused, so nothing is waited for, unless `resuming` (a stream with a
/// `Last-Event-ID` in a cluster, whose new channel learns its past from the shared history).
async fn first_answer(sub: &Subscription, resuming: bool) {
    let channel = &sub.topic.channel;
    if (!channel.settings().per_credential && !resuming) || channel.settled() {
        return;
    }
    let limit = sub.topic.route.config.timeout.min(FIRST_ANSWER_WAIT);
    let settled = std::future::poll_fn(|cx| {
        // The stream's own slot is woken by the topic's events and its refusal.
        sub.slot.register(cx.waker());
        if channel.settled() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    let _ = tokio::time::timeout(limit + Duration::from_millis(200), settled).await;
}

/// The answer to a stream whose topic the upstream refused.
fn refusal(status: u16) -> Refused {
    if status == 403 {
        Refused::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the upstream refused these credentials for this resource",
        )
    } else {
        Refused::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the upstream refused these credentials",
        )
    }
}

/// A single stream: one route, one topic.
pub async fn single(
    svc: &Service,
    req: &StreamRequest<'_>,
    target: Target,
) -> Response<ResponseBody> {
    let grant = match authorize(svc, &target, req.headers).await {
        Ok(g) => g,
        Err(refused) => return refused.response(),
    };
    let permit = match admit(svc, req, grant.principal) {
        Ok(p) => p,
        Err(rejection) => return rejection.response(),
    };
    let slot = req.slot();
    let sub = match subscribe(svc, &target.route, &grant, slot.clone(), req.conn.peer.ip()) {
        Ok(s) => s,
        Err(refused) => return refused.response(),
    };
    let last = req.last_event_id();
    first_answer(&sub, last.is_some() && svc.hub.clustered()).await;
    if let Some(status) = sub.topic.channel.refused() {
        debug!(route = %target.route.template, status, "stream refused by the upstream");
        return refusal(status).response();
    }
    let cursor = sub
        .topic
        .channel
        .resume_cursor(last.and_then(|l| l.parse::<Position>().ok()));
    let log = StreamLog::opened(
        sub.topic.metrics().clone(),
        sub.topic.key.resource.clone(),
        slot.clone(),
        Start::of(last.is_some(), cursor),
        &svc.streams.shutdown,
    );
    debug!(topic = %sub.topic.id, ?cursor, "stream opened");
    let body = SseStream::new(TopicEvents::new(sub, cursor), slot, lifecycle(svc), None);
    respond(svc, req.headers, body, log, permit)
}

/// A multiplexed stream: every target on one connection, each authorized as a single stream
/// would be.
pub async fn mux(
    svc: &Service,
    req: &StreamRequest<'_>,
    targets: Vec<Target>,
) -> Response<ResponseBody> {
    let mut grants = Vec::with_capacity(targets.len());
    for target in targets {
        match authorize(svc, &target, req.headers).await {
            Ok(grant) => grants.push((target, grant)),
            Err(refused) => return refused.response(),
        }
    }
    // Every grant of one request hashes the same credentials.
    let principal = grants
        .first()
        .map_or_else(|| svc.auth.principal(req.headers), |(_, g)| g.principal);
    let permit = match admit(svc, req, principal) {
        Ok(p) => p,
        Err(rejection) => return rejection.response(),
    };
    let slot = req.slot();
    let mut subs = Vec::with_capacity(grants.len());
    for (target, grant) in grants {
        match subscribe(svc, &target.route, &grant, slot.clone(), req.conn.peer.ip()) {
            Ok(sub) => subs.push((sub, target.info)),
            Err(refused) => return refused.response(),
        }
    }
    // Each watch's first answer, together: if the upstream refuses every one, the request is
    // refused; a stream with some left goes on and tells the client which were refused.
    let resuming = req.last_event_id().is_some() && svc.hub.clustered();
    futures_util::future::join_all(subs.iter().map(|(sub, _)| first_answer(sub, resuming))).await;
    let refused: Vec<u16> = subs
        .iter()
        .filter_map(|(sub, _)| sub.topic.channel.refused())
        .collect();
    if !subs.is_empty() && refused.len() == subs.len() {
        return refusal(refused[0]).response();
    }
    let endpoints = &svc.mux;
    let life = lifecycle(svc);
    let (events, hello) = MuxEvents::new(
        endpoints.registry.clone(),
        slot.clone(),
        subs,
        MuxOptions {
            retry: life.retry,
            max_watches: endpoints.max_watches,
            last_event_id: req.last_event_id().map(str::to_string),
            control_path: endpoints.path.clone().unwrap_or_default(),
            principal,
        },
    );
    let path: Arc<str> = endpoints.path.as_deref().unwrap_or_default().into();
    let log = StreamLog::opened(
        svc.metrics.route(&path),
        path,
        slot.clone(),
        Start::New,
        &svc.streams.shutdown,
    );
    debug!(
        watches = events.control().len(),
        "multiplexed stream opened"
    );
    let body = SseStream::new(events, slot, life, Some(hello));
    respond(svc, req.headers, body, log, permit)
}

/// The per-client lifecycle settings: `retry:` with its jitter, so reconnects spread out.
fn lifecycle(svc: &Service) -> Lifecycle {
    let s = &svc.streams;
    let jitter = |max: Duration| {
        if max.is_zero() {
            max
        } else {
            rand::thread_rng().gen_range(Duration::ZERO..=max)
        }
    };
    Lifecycle {
        retry: s.retry + jitter(s.retry_jitter),
        heartbeat: s.heartbeat,
        shutdown: s.shutdown.clone(),
        shutdown_retry: s.retry + jitter(s.retry_jitter.max(s.retry)),
    }
}

/// Phase 5: the response for an opened stream: gzip when the client accepts it and compression
/// is on, the SSE headers, and the body with its books and admission permit.
fn respond<E: Events>(
    svc: &Service,
    headers: &HeaderMap,
    stream: SseStream<E>,
    log: StreamLog,
    permit: StreamPermit,
) -> Response<ResponseBody> {
    let compression = svc.compression.enabled;
    let gzip = compression && compress::accepts_gzip(headers);
    let body = if gzip {
        Coded::Gzip(GzipStream::new(stream))
    } else {
        Coded::Plain(stream)
    };
    let mut resp = Response::new(Watched::new(body, log, permit).boxed_unsync());
    let h = resp.headers_mut();
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if compression {
        compress::add_vary(h, "accept-encoding");
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// A stream body as plain SSE text or gzip, without a box.
enum Coded<S> {
    Plain(S),
    Gzip(GzipStream<S>),
}

impl<E: Events> Body for Coded<SseStream<E>> {
    type Data = Bytes;
    type Error = StreamClosed;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamClosed>>> {
        match self.get_mut() {
            Coded::Plain(s) => Pin::new(s).poll_frame(cx),
            Coded::Gzip(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Coded::Plain(s) => s.is_end_stream(),
            Coded::Gzip(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
