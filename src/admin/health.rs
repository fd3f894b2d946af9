//! Health endpoints for supervisors and load balancers: `/healthz` says the process answers
//! (liveness: restart it if not); `/readyz` says it serves (listeners bound, config loaded, not
//! draining), so a load balancer sends it clients only then.

use http::{Response, StatusCode};

use super::Admin;
use crate::reply::{text, ResponseBody};

/// 200 whenever the admin listener can answer at all.
pub fn healthz() -> Response<ResponseBody> {
    text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
}

/// 200 while serving; 503 before the listeners are bound and from the start of a drain on.
pub fn readyz(admin: &Admin) -> Response<ResponseBody> {
    let ready = admin.is_ready();
    let body = serde_json::json!({
        "ready": ready,
        "routes": admin.stats.routes.current().len(),
        "topics": admin.stats.hub.topic_count(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, "application/json", body.to_string())
}
