//! `POST /_herald/publish`: a backend tells herald a resource changed. A **poke**
//! (`{"resource": "/api/builds/42"}`) re-reads every live topic of that resource now, whatever
//! credentials they vary by; a **state** (`{"resource": …, "data": …}`) is the new document,
//! diffed and fanned out without an upstream read (shared routes only: on a per-credential
//! route one body cannot be every user's view). Bearer token compared in constant time, never
//! logged; answered `202 {"topics": n}`.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tracing::{debug, info};

use crate::config::auth::Sharing;
use crate::config::source::Publish;
use crate::hub::Hub;
use crate::reply::{json_error, text, ResponseBody};
use crate::routes::LiveRoutes;
use crate::source::Document;

/// The path on the admin listener.
pub const ADMIN_PATH: &str = "/_herald/publish";
/// Largest publish body accepted.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// What a publish needs: the token, the routes to resolve resources with, the hub's topics.
pub struct Publisher {
    config: Publish,
    routes: Arc<LiveRoutes>,
    hub: Hub,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("path", &self.config.path)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    resource: String,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

impl Publisher {
    pub fn new(config: &Publish, routes: Arc<LiveRoutes>, hub: Hub) -> Arc<Publisher> {
        Arc::new(Publisher {
            config: config.clone(),
            routes,
            hub,
        })
    }

    /// Whether a main-listener request is a publish (`[publish] path`).
    pub fn owns(&self, path: &str) -> bool {
        self.config.path.as_deref() == Some(path)
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: http_body::Body + Send,
        B::Data: Send,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        if req.method() != Method::POST {
            let mut resp = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "publish with POST",
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        if let Some(refused) = self.refuse(req.headers()) {
            return refused;
        }
        let bytes: Bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too-large",
                    "the publish body is too large (8 MiB at most)",
                )
            }
        };
        let body: Body = match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    &format!(
                    "expected {{\"resource\": \"/path\"}} or {{\"resource\": …, \"data\": …}}: {e}"
                ),
                )
            }
        };
        self.publish(body).await
    }

    fn refuse(&self, headers: &http::HeaderMap) -> Option<Response<ResponseBody>> {
        let Some(token) = &self.config.token else {
            return Some(json_error(
                StatusCode::FORBIDDEN,
                "publish-disabled",
                "publishing needs [publish] token (or HERALD_PUBLISH_TOKEN)",
            ));
        };
        if crate::auth::bearer_matches(headers, &token.0) {
            return None;
        }
        debug!("publish refused: missing or wrong token");
        let mut resp = json_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "publish needs the publish token: Authorization: Bearer <token>",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(resp)
    }

    async fn publish(&self, body: Body) -> Response<ResponseBody> {
        let (path, query) = match body.resource.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (body.resource.as_str(), None),
        };
        let (route, key) = match self.routes.resolve(path, query) {
            Ok(Some(found)) => found,
            Ok(None) => {
                return json_error(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    "no stream route matches this resource",
                )
            }
            Err(e) => return json_error(StatusCode::BAD_REQUEST, "bad-request", &e.to_string()),
        };
        let topics: Vec<_> = self
            .hub
            .topics_snapshot()
            .into_iter()
            .filter(|t| t.key.route == key.route && t.key.resource == key.resource)
            .collect();
        let touched = match body.data {
            None => {
                for t in &topics {
                    t.poke();
                }
                topics.len()
            }
            Some(data) => {
                if route.config.auth.sharing != Sharing::All {
                    return json_error(
                        StatusCode::CONFLICT,
                        "per-credential-route",
                        "this route's topics are per credential: one state cannot be every \
                         user's view; send a poke ({\"resource\": …} without data) instead, \
                         or set share = \"all\" on the route",
                    );
                }
                // Numbers keep their text (`arbitrary_precision`), members their order.
                let doc = Document::json(&data);
                let mut n = 0;
                for t in &topics {
                    if t.publish_state(doc.clone()).await {
                        n += 1;
                    }
                }
                n
            }
        };
        info!(
            resource = %crate::telemetry::redact(&key.resource),
            topics = touched,
            "published"
        );
        text(
            StatusCode::ACCEPTED,
            "application/json",
            serde_json::json!({ "topics": touched }).to_string(),
        )
    }
}
