//! Admission control for streams: a token bucket on new streams per second (a reconnect storm is
//! spread over time instead of landing at once) and a cap on open streams per client address. A
//! refused stream gets 503 + `Retry-After` or 429 with a JSON body; an admitted one holds a
//! `StreamPermit` (in its response body) that gives its place back when the stream ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use http::{HeaderValue, Response, StatusCode};
use tokio::time::Instant;

use super::{json_error, ResponseBody};
use crate::config::Server;

/// Why a stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("too many new streams per second; retry in {retry_after} s")]
    TooFast { retry_after: u64 },
    #[error("this address already has {max} open streams")]
    TooManyFromAddress { max: u32 },
    #[error("these credentials already have {max} open streams")]
    TooManyForCredential { max: u32 },
}

impl Rejection {
    pub fn response(&self) -> Response<ResponseBody> {
        match self {
            Rejection::TooFast { retry_after } => {
                let mut r = json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    &self.to_string(),
                );
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(*retry_after));
                r
            }
            Rejection::TooManyFromAddress { .. } | Rejection::TooManyForCredential { .. } => {
                json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-streams",
                    &self.to_string(),
                )
            }
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct Admission {
    /// New streams per second (0: unlimited); the bucket holds one second's worth.
    rate: u32,
    bucket: Mutex<Bucket>,
    per_ip_max: u32,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    per_credential_max: u32,
    /// Open streams by credential (`Grant::principal`, a keyed hash: never the credential).
    per_credential: Mutex<HashMap<u64, u32>>,
}

impl Admission {
    pub fn new(config: &Server) -> Arc<Admission> {
        Arc::new(Admission {
            rate: config.max_new_streams_per_sec,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(config.max_new_streams_per_sec),
                at: Instant::now(),
            }),
            per_ip_max: config.max_streams_per_ip,
            per_ip: Mutex::new(HashMap::new()),
            per_credential_max: config.max_streams_per_credential,
            per_credential: Mutex::new(HashMap::new()),
        })
    }

    /// Admit one new stream from `ip` presenting credentials `principal` (0: none), or say why
    /// not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, principal: u64) -> Result<StreamPermit, Rejection> {
        if self.per_ip_max > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= self.per_ip_max {
                return Err(Rejection::TooManyFromAddress {
                    max: self.per_ip_max,
                });
            }
            *n += 1;
        }
        // From here on, dropping `permit` gives back whatever it holds.
        let mut permit = StreamPermit {
            admission: self.clone(),
            ip,
            principal: 0,
        };
        if self.per_credential_max > 0 && principal != 0 {
            let mut per = self
                .per_credential
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = per.entry(principal).or_insert(0);
            if *n >= self.per_credential_max {
                return Err(Rejection::TooManyForCredential {
                    max: self.per_credential_max,
                });
            }
            *n += 1;
            permit.principal = principal;
        }
        if self.rate > 0 {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let rate = f64::from(self.rate);
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate);
            b.at = now;
            if b.tokens < 1.0 {
                // Dropping `permit` gives the per-address place back.
                return Err(Rejection::TooFast { retry_after: 1 });
            }
            b.tokens -= 1.0;
        }
        Ok(permit)
    }

    /// Open streams from `ip` (for tests and status).
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        let per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        per_ip.get(&ip).copied().unwrap_or(0)
    }
}

/// A stream's place in the admission counts, returned on drop.
#[derive(Debug)]
pub struct StreamPermit {
    admission: Arc<Admission>,
    ip: IpAddr,
    /// The credential counted for this stream (0: none counted).
    principal: u64,
}

/// Take one from `key`'s count, forgetting the key at zero so the map only holds open streams.
fn release<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, u32>>, key: &K) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if self.admission.per_ip_max > 0 {
            release(&self.admission.per_ip, &self.ip);
        }
        if self.principal != 0 {
            release(&self.admission.per_credential, &self.principal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn server(rate: u32, per_ip: u32) -> Server {
        Server {
            max_connections: 10,
            drain_timeout: Duration::from_secs(1),
            max_header_bytes: 8192,
            max_new_streams_per_sec: rate,
            max_streams_per_ip: per_ip,
            max_streams_per_credential: 2,
            max_connections_per_ip: 0,
            max_topics_per_ip: 0,
            max_topics_per_credential: 0,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn per_ip_cap_counts_open_streams() {
        let a = Admission::new(&server(0, 2));
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let p1 = a.admit(ip, 0).unwrap();
        let _p2 = a.admit(ip, 0).unwrap();
        assert_eq!(
            a.admit(ip, 0).unwrap_err(),
            Rejection::TooManyFromAddress { max: 2 }
        );
        assert!(a.admit("127.0.0.10".parse().unwrap(), 0).is_ok());
        drop(p1);
        assert_eq!(a.open_from(ip), 1);
        assert!(a.admit(ip, 0).is_ok());
    }

    #[tokio::test]
    async fn per_credential_cap_spans_addresses() {
        let a = Admission::new(&server(0, 0));
        let ips: [IpAddr; 3] = [
            "127.0.0.1".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
        ];
        let p1 = a.admit(ips[0], 42).unwrap();
        let _p2 = a.admit(ips[1], 42).unwrap();
        assert_eq!(
            a.admit(ips[2], 42).unwrap_err(),
            Rejection::TooManyForCredential { max: 2 }
        );
        // Other credentials and anonymous clients are not affected.
        assert!(a.admit(ips[2], 7).is_ok());
        assert!(a.admit(ips[2], 0).is_ok());
        drop(p1);
        assert!(a.admit(ips[2], 42).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_over_time() {
        let a = Admission::new(&server(10, 0));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..10).map(|_| a.admit(ip, 0).unwrap()).collect();
        assert_eq!(
            a.admit(ip, 0).unwrap_err(),
            Rejection::TooFast { retry_after: 1 }
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        // 2.5 tokens refilled.
        assert!(a.admit(ip, 0).is_ok());
        assert!(a.admit(ip, 0).is_ok());
        assert!(a.admit(ip, 0).is_err());
        drop(held);
    }
}
