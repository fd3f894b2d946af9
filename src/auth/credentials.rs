//! A client's credentials: read from its cookies, `Authorization` header, other named headers or
//! the route's `access_token` query parameter, reduced to exactly the headers herald forwards, and
//! hashed with an HMAC key (the configured secret, or a random one per process) so topic keys,
//! logs and metrics never hold them.

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue};
use ring::hmac;

use crate::config::auth::{is_session_cookie, VarySource};
use crate::routes::percent_decode;

/// Longest credential value herald forwards (a header value; cookies and JWTs fit well within).
const MAX_VALUE: usize = 16 * 1024;

/// Hashes credentials with a secret key: equal credentials give equal hashes wherever the key is
/// the same (every node of a cluster given one secret), and nobody without the key can tell
/// anything about a credential from its hash.
pub struct VaryKey(hmac::Key);

impl std::fmt::Debug for VaryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaryKey(…)")
    }
}

impl VaryKey {
    /// A key derived from a configured secret (`[cluster] secret`, `HERALD_CLUSTER_SECRET`).
    pub fn from_secret(secret: &[u8]) -> VaryKey {
        VaryKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// A key drawn at startup: hashes agree within this process only.
    pub fn random() -> VaryKey {
        let rng = ring::rand::SystemRandom::new();
        // Generating an HMAC key only fails when the OS has no randomness source; fall back to
        // the (randomly seeded) std hasher's keys so herald still never uses a fixed key.
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            use std::hash::BuildHasher;
            let seed = std::collections::hash_map::RandomState::new().hash_one(0u8);
            hmac::Key::new(hmac::HMAC_SHA256, &seed.to_le_bytes())
        });
        VaryKey(key)
    }

    /// A non-zero 64-bit tag of `parts` (0 is reserved for shared topics). Each part is
    /// length-prefixed, so `("ab","c")` and `("a","bc")` differ.
    pub(crate) fn hash<'a>(&self, domain: &str, parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(domain.as_bytes());
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let tag = ctx.sign();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_be_bytes(first).max(1)
    }

    /// The hash of a set of forwarded headers (name and value of each, in order).
    pub(crate) fn hash_headers(&self, headers: &HeaderMap) -> u64 {
        let parts = headers
            .iter()
            .flat_map(|(n, v)| [n.as_str().as_bytes(), v.as_bytes()]);
        self.hash("headers", parts)
    }
}

/// The value of the `param` query parameter, percent-decoded (`+` is a space), if present.
pub(crate) fn query_param(query: Option<&str>, param: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(name, _)| {
            percent_decode(&name.replace('+', " ")).as_deref() == Some(param.as_bytes())
        })
        .and_then(|(_, v)| percent_decode(&v.replace('+', " ")))
        .and_then(|v| String::from_utf8(v).ok())
        .filter(|v| !v.is_empty())
}

/// The client's `Authorization` header, or `Bearer <token>` from the access-token parameter.
pub(crate) fn authorization(headers: &HeaderMap, bearer: Option<&str>) -> Option<HeaderValue> {
    if let Some(v) = headers.get(AUTHORIZATION) {
        return Some(v.clone());
    }
    let token = bearer?;
    HeaderValue::from_str(&format!("Bearer {token}"))
        .ok()
        .map(sensitive)
}

/// The bearer token of `Authorization: Bearer …` (header or access-token parameter).
pub(crate) fn bearer_token(headers: &HeaderMap, bearer: Option<&str>) -> Option<String> {
    let v = authorization(headers, bearer)?;
    let s = v.to_str().ok()?.trim();
    let (scheme, token) = s.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Every `name=value` pair of the request's `Cookie` headers, in order.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|p| p.trim().split_once('='))
        .map(|(n, v)| (n.trim(), v.trim()))
}

/// The value of cookie `name` (the first one, as servers commonly read it).
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    cookie_pairs(headers)
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// The headers that carry `sources` for this request: what the topic's polls and checks send,
/// and what its hash is made of. Anything not listed is not forwarded, so two clients that share a
/// topic send the upstream exactly the same credentials.
pub(crate) fn extract(
    sources: &[VarySource],
    headers: &HeaderMap,
    bearer: Option<&str>,
) -> HeaderMap {
    let mut out = HeaderMap::new();
    let mut cookies: Vec<String> = Vec::new();
    for src in sources {
        match src {
            VarySource::Cookies => {
                cookies.extend(cookie_pairs(headers).map(|(n, v)| format!("{n}={v}")));
            }
            VarySource::SessionCookies => {
                cookies.extend(
                    cookie_pairs(headers)
                        .filter(|(n, _)| is_session_cookie(n))
                        .map(|(n, v)| format!("{n}={v}")),
                );
            }
            VarySource::Cookie(name) => {
                if let Some(v) = cookie(headers, name) {
                    cookies.push(format!("{name}={v}"));
                }
            }
            VarySource::Authorization => {
                if let Some(v) = authorization(headers, bearer) {
                    out.insert(AUTHORIZATION, sensitive(v));
                }
            }
            VarySource::Header(name) => {
                if let Some(v) = headers.get(name) {
                    out.insert(name.clone(), sensitive(v.clone()));
                }
            }
        }
    }
    cookies.dedup();
    if !cookies.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&cookies.join("; ")) {
            out.insert(COOKIE, sensitive(v));
        }
    }
    out.retain_values_fit();
    out
}

/// Marked sensitive: HTTP/2 never indexes it (HPACK), and `Debug` prints `Sensitive`.
pub(crate) fn sensitive(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

trait RetainFit {
    fn retain_values_fit(&mut self);
}

impl RetainFit for HeaderMap {
    /// Drop oversized values: such a "credential" is abuse, not a session, and would be sent on
    /// every poll.
    fn retain_values_fit(&mut self) {
        let too_big: Vec<_> = self
            .iter()
            .filter(|(_, v)| v.len() > MAX_VALUE)
            .map(|(n, _)| n.clone())
            .collect();
        for n in too_big {
            self.remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn extracts_only_the_listed_sources() {
        let h = headers(&[
            ("cookie", "theme=dark; session=abc"),
            ("cookie", "tracking=1"),
            ("authorization", "Bearer t0k"),
            ("x-api-key", "k1"),
        ]);
        let only_session = extract(&[VarySource::Cookie("session".into())], &h, None);
        assert_eq!(only_session.len(), 1);
        assert_eq!(only_session["cookie"], "session=abc");
        let all = extract(&crate::config::auth::default_vary(), &h, None);
        // By default only the cookies named like sessions are credentials.
        assert_eq!(all["cookie"], "session=abc");
        let every = extract(&[VarySource::Cookies], &h, None);
        assert_eq!(every["cookie"], "theme=dark; session=abc; tracking=1");
        assert_eq!(all["authorization"], "Bearer t0k");
        assert!(all["authorization"].is_sensitive());
        let key = extract(
            &[VarySource::Header(http::HeaderName::from_static(
                "x-api-key",
            ))],
            &h,
            None,
        );
        assert_eq!(key["x-api-key"], "k1");
    }

    #[test]
    fn session_cookie_names() {
        for name in [
            "session",
            "SESSION",
            "sid",
            "PHPSESSID",
            "JSESSIONID",
            "connect.sid",
            "ASP.NET_SessionId",
            "laravel_session",
            "__Host-session",
            "__Secure-auth",
            "access_token",
            "jwt",
            "remember_web_59ba",
        ] {
            assert!(is_session_cookie(name), "{name}");
        }
        for name in [
            "_ga", "_gid", "theme", "junk", "lang", "consent", "tracking",
        ] {
            assert!(!is_session_cookie(name), "{name}");
        }
    }

    #[test]
    fn access_token_becomes_a_bearer_header_only_without_one() {
        let q = Some("page=2&access_token=a%2Bb+c&x=1");
        let tok = query_param(q, "access_token");
        assert_eq!(tok.as_deref(), Some("a+b c"));
        let none = HeaderMap::new();
        let got = extract(&[VarySource::Authorization], &none, Some("xyz"));
        assert_eq!(got["authorization"], "Bearer xyz");
        assert_eq!(bearer_token(&none, Some("xyz")).as_deref(), Some("xyz"));
        let h = headers(&[("authorization", "Bearer real")]);
        assert_eq!(bearer_token(&h, Some("xyz")).as_deref(), Some("real"));
        assert_eq!(query_param(Some("access_token="), "access_token"), None);
        assert_eq!(query_param(None, "access_token"), None);
    }

    #[test]
    fn hashes_are_keyed_nonzero_and_length_prefixed() {
        let k = VaryKey::random();
        let other = VaryKey::random();
        let a = k.hash("d", [&b"ab"[..], b"c"]);
        assert_ne!(a, k.hash("d", [&b"a"[..], b"bc"]));
        assert_eq!(a, k.hash("d", [&b"ab"[..], b"c"]));
        assert_ne!(
            a,
            other.hash("d", [&b"ab"[..], b"c"]),
            "the key is per process"
        );
        assert_ne!(k.hash("d", []), 0);
    }
}
