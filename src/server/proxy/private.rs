//! Connection-bound authentication (NTLM, Negotiate: what IIS does): the upstream authenticates
//! the TCP connection, not the request, and answers every later request on it as that user. A
//! pooled connection that carried such a handshake would answer the next client's anonymous
//! request as the previous user. So, as HAProxy and nginx (`ntlm`) do, such a connection is
//! private to one downstream connection:
//!
//! - a request carrying `Authorization: NTLM|Negotiate …` goes over an upstream connection owned
//!   by its downstream connection (made on first use, dropped with the downstream connection),
//!   and every later request of that downstream connection follows it there, credentials or not;
//! - a shared-pool connection whose response carries `WWW-Authenticate: NTLM|Negotiate` is
//!   poisoned: it serves that response and is never reused (see `proxy::send`).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::sync::Mutex;

use super::pass::{classify, PassClient, PassError};

/// Whether a header value names a connection-bound scheme.
fn connection_bound(value: &[u8]) -> bool {
    let scheme = value
        .split(|&b| b == b' ' || b == b',')
        .find(|s| !s.is_empty())
        .unwrap_or(b"");
    scheme.eq_ignore_ascii_case(b"ntlm") || scheme.eq_ignore_ascii_case(b"negotiate")
}

/// The request carries credentials the upstream may bind to its connection.
pub(super) fn binds_connection(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| connection_bound(v.as_bytes()))
}

/// The response asks for a connection-bound scheme (any of its challenges).
pub(super) fn challenges_connection(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(connection_bound)
}

/// One downstream connection's private upstream connection, if it ever needed one. Cloned into
/// every request of the downstream connection; the upstream connection closes when the last
/// clone (the connection's service) is dropped.
#[derive(Clone, Default)]
pub struct ConnUpstream(Arc<Private>);

#[derive(Default)]
struct Private {
    /// Set by the first request with connection-bound credentials: from then on every request
    /// of this downstream connection uses `conn`, as the upstream expects of an authenticated
    /// connection.
    engaged: AtomicBool,
    /// HTTP/1.1 (one exchange at a time): the lock is held until a request is handed over, and
    /// `ready` waits for the previous response to finish.
    conn: Mutex<Option<SendRequest<Incoming>>>,
}

impl fmt::Debug for ConnUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnUpstream")
            .field("engaged", &self.engaged())
            .finish()
    }
}

impl ConnUpstream {
    /// Requests of this downstream connection go over its private upstream connection.
    pub(super) fn engaged(&self) -> bool {
        self.0.engaged.load(Ordering::Acquire)
    }

    /// Send `req` (absolute URI, as for the pool) over the private connection, opening it (again,
    /// if the upstream closed it) as needed.
    pub(super) async fn send(
        &self,
        pass: &PassClient,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, PassError> {
        self.0.engaged.store(true, Ordering::Release);
        super::for_raw_connection(pass, &mut req);
        let mut slot = self.0.conn.lock().await;
        let reusable = match slot.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            // A fresh connection starts unauthenticated: the client's handshake starts over,
            // which is what it does when its connection to herald is new as well.
            let mut sender = pass.connect_h1(false).await?;
            sender.ready().await.map_err(|e| classify(&e))?;
            *slot = Some(sender);
        }
        let sender = slot
            .as_mut()
            .ok_or_else(|| PassError::Other("no connection".into()))?;
        let response = sender.send_request(req);
        drop(slot);
        response.await.map_err(|e| classify(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn recognises_connection_bound_schemes() {
        let h = |name: header::HeaderName, v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(name, HeaderValue::from_static(v));
            m
        };
        assert!(binds_connection(&h(
            header::AUTHORIZATION,
            "NTLM TlRMTVNTUAAB"
        )));
        assert!(binds_connection(&h(
            header::AUTHORIZATION,
            "negotiate YII="
        )));
        assert!(!binds_connection(&h(header::AUTHORIZATION, "Bearer x")));
        assert!(!binds_connection(&h(
            header::AUTHORIZATION,
            "Basic bnRsbTp4"
        )));
        assert!(challenges_connection(&h(
            header::WWW_AUTHENTICATE,
            "Negotiate"
        )));
        assert!(challenges_connection(&h(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"x\", NTLM"
        )));
        assert!(!challenges_connection(&h(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"ntlm\""
        )));
    }
}
