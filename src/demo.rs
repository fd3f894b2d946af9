//! The built-in legacy API behind `herald demo`: a few CI builds whose status moves every second,
//! served as plain polled JSON (with ETags), plus a page that watches them through herald. It lets
//! anyone see herald work with nothing else installed; tests use it as a realistic upstream too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The demo page (served at `/` by the demo API): live builds through `client.js`.
pub const PAGE: &str = include_str!("demo.html");
const NAMES: [&str; 5] = ["api", "web", "worker", "docs", "mobile"];
const STEPS: [&str; 4] = ["checkout", "build", "test", "deploy"];

#[derive(Debug, Clone, Serialize)]
struct Step {
    name: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct Build {
    id: u32,
    name: &'static str,
    run: u32,
    status: &'static str,
    progress: u32,
    steps: Vec<Step>,
    updated_at: String,
}

/// The builds and a version counter (the ETag), shared by the simulation and the HTTP handlers.
#[derive(Debug)]
pub struct DemoState {
    builds: Vec<Build>,
    version: u64,
    tick: u64,
}

impl DemoState {
    fn new() -> DemoState {
        let builds = NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| Build {
                id: i as u32 + 1,
                name,
                run: 1,
                status: "queued",
                progress: 0,
                steps: STEPS
                    .iter()
                    .map(|s| Step {
                        name: s,
                        status: "pending",
                    })
                    .collect(),
                updated_at: now(),
            })
            .collect();
        DemoState {
            builds,
            version: 1,
            tick: 0,
        }
    }

    /// One second of simulated CI: builds start, progress through their steps, pass or fail, and
    /// after a pause run again. Deterministic, so the demo (and tests) behave the same each time.
    fn advance(&mut self) {
        self.tick += 1;
        let tick = self.tick;
        for b in &mut self.builds {
            // Builds move at different speeds so that not every build changes every second.
            if (tick + u64::from(b.id)) % u64::from(b.id % 3 + 1) != 0 {
                continue;
            }
            match b.status {
                "queued" => {
                    b.status = "running";
                    b.steps[0].status = "running";
                }
                "running" => {
                    b.progress = (b.progress + 10 + b.id * 3).min(100);
                    let done = (b.progress as usize * STEPS.len()) / 100;
                    for (i, s) in b.steps.iter_mut().enumerate() {
                        s.status = if i < done {
                            "passed"
                        } else if i == done {
                            "running"
                        } else {
                            "pending"
                        };
                    }
                    if b.progress >= 100 {
                        let failed = (b.run + b.id) % 4 == 0;
                        b.status = if failed { "failed" } else { "passed" };
                        if failed {
                            if let Some(s) = b.steps.last_mut() {
                                s.status = "failed";
                            }
                        }
                    }
                }
                _ => {
                    b.run += 1;
                    b.status = "queued";
                    b.progress = 0;
                    b.steps.iter_mut().for_each(|s| s.status = "pending");
                }
            }
            b.updated_at = now();
        }
        self.version += 1;
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Serve the demo API on `listener` until `shutdown`; the builds change every `tick`.
pub async fn serve_upstream(listener: TcpListener, tick: Duration, shutdown: CancellationToken) {
    let state = Arc::new(Mutex::new(DemoState::new()));
    let sim = state.clone();
    let sim_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(tick);
        t.tick().await;
        loop {
            tokio::select! {
                _ = sim_stop.cancelled() => break,
                _ = t.tick() => sim.lock().unwrap_or_else(|p| p.into_inner()).advance(),
            }
        }
    });
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
        };
        let state = state.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

fn handle(state: &Mutex<DemoState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let st = state.lock().unwrap_or_else(|p| p.into_inner());
    let etag = format!("\"v{}\"", st.version);
    let path = req.uri().path();
    let json = |value: serde_json::Value| {
        if req
            .headers()
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            == Some(etag.as_str())
        {
            return respond(
                StatusCode::NOT_MODIFIED,
                "application/json",
                Bytes::new(),
                Some(&etag),
            );
        }
        respond(
            StatusCode::OK,
            "application/json",
            Bytes::from(value.to_string()),
            Some(&etag),
        )
    };
    match (req.method(), path) {
        (&Method::GET, "/") => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(PAGE.as_bytes()),
            None,
        ),
        (&Method::GET, "/api/builds") => json(serde_json::json!({ "builds": st.builds })),
        (&Method::GET, p) if p.starts_with("/api/builds/") => {
            let id = p.trim_start_matches("/api/builds/");
            match st.builds.iter().find(|b| b.id.to_string() == id) {
                Some(b) => json(serde_json::json!(b)),
                None => respond(
                    StatusCode::NOT_FOUND,
                    "application/json",
                    Bytes::from_static(b"{\"error\":\"no such build\"}"),
                    None,
                ),
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(b"{\"error\":\"not found\"}"),
            None,
        ),
    }
}

fn respond(
    status: StatusCode,
    ctype: &'static str,
    body: Bytes,
    etag: Option<&str>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Some(e) = etag.and_then(|e| HeaderValue::from_str(e).ok()) {
        r.headers_mut().insert(header::ETAG, e);
    }
    r
}

/// A self-signed certificate for `localhost`, `127.0.0.1` and `::1`, made afresh at each start, so
/// `herald demo` serves HTTPS with nothing to set up (a browser warns once: nobody vouches for it).
pub fn self_signed_tls() -> crate::Result<crate::server::tls::Acceptor> {
    let fail = |e: rcgen::Error| crate::Error::Tls {
        path: "<demo certificate>".into(),
        message: e.to_string(),
    };
    let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let mut params = rcgen::CertificateParams::new(names).map_err(fail)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "herald demo (self-signed)");
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    crate::server::tls::Acceptor::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
}

/// The config `herald demo` runs with: the demo API as upstream, its build routes streamable.
pub fn config_text(listen: SocketAddr, upstream: SocketAddr, admin: Option<SocketAddr>) -> String {
    let admin = admin.map_or(String::new(), |a| format!("\n[admin]\nlisten = \"{a}\"\n"));
    format!(
        r#"listen = "{listen}"
upstream = "http://{upstream}"
{admin}
[sse]
heartbeat = "15s"
retry = "2s"
retry_jitter = "1s"

[[route]]
path = "/api/builds"
interval = "1s"
array_key = "id"

[[route]]
path = "/api/builds/{{id}}"
interval = "1s"
"#
    )
}
