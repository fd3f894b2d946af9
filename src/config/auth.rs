//! Per-route access control as written in `proxy.toml` (`share`, `vary`, `access_token`, `auth`,
//! `reauth`, `jwt`) and its validation into [`RouteAuth`]. JWT key files are read and parsed here,
//! at load time, so a missing or unusable key stops herald before it binds. The runtime side
//! (credential extraction, checks, revocation) is `crate::auth`.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;
use toml::Spanned;

use super::model::HumanDuration;
use super::{PathTemplate, Segment};

/// Who may share a topic (and so its poller and history).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Share {
    /// One topic per distinct credential (the `vary` sources): the safe default.
    #[default]
    Credential,
    /// One topic for everyone: public data, polled without any client's credentials.
    All,
}

/// `auth = { url = "/api/projects/{id}/access", cache = "10s" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Upstream path asked with the client's credentials; 2xx = allowed. `{name}` takes the value
    /// of the route's parameter of that name.
    pub url: Spanned<String>,
    /// How long one credential's answer is reused.
    #[serde(default = "default_check_cache")]
    pub cache: HumanDuration,
}

fn default_check_cache() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// The signature algorithms herald verifies (asymmetric ones with `ring`, through `jsonwebtoken`).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    HS256,
    RS256,
    ES256,
}

/// `jwt = { alg = "RS256", jwks = "/etc/herald/jwks.json", claim = "sub" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    pub alg: JwtAlg,
    /// HS256: a file holding the shared secret (trailing newline ignored); RS256/ES256: a PEM
    /// public key (`BEGIN PUBLIC KEY`, or `BEGIN RSA PUBLIC KEY`).
    pub key: Option<Spanned<PathBuf>>,
    /// A JWKS file (`{"keys":[…]}`); the token's `kid` picks the key.
    pub jwks: Option<Spanned<PathBuf>>,
    /// The claim that identifies the user (a refreshed token must name the same one).
    #[serde(default = "default_claim")]
    pub claim: String,
    /// What makes two tokens share a topic (and its polls). Absent: the token itself, so every
    /// token is polled with its own credentials, as the upstream decides on them. A list of
    /// claims (`["sub", "scope"]`): tokens agreeing on every one of them share a topic, polled
    /// with the newest of their tokens; list every claim the upstream's answer depends on.
    #[serde(default)]
    pub topic_claims: Option<Vec<String>>,
    /// Read the token from this cookie instead of `Authorization: Bearer`.
    pub cookie: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default)]
    pub leeway: Option<HumanDuration>,
    /// Accepted `aud` values (when set, a token must carry one of them).
    #[serde(default)]
    pub audience: Vec<String>,
    /// Accepted `iss` values (when set, a token must carry one of them).
    #[serde(default)]
    pub issuer: Vec<String>,
}

fn default_claim() -> String {
    "sub".into()
}

/// The access rules of one route, validated.
#[derive(Debug, Clone)]
pub struct RouteAuth {
    pub sharing: Sharing,
    /// Query parameter read as a bearer token (for clients that cannot set headers); it is never
    /// part of a topic, and never logged.
    pub access_token: Option<String>,
    pub check: Option<AccessCheck>,
    /// How often an open stream's access is checked again (only with `check`).
    pub reauth: Option<Duration>,
    pub jwt: Option<Jwt>,
}

impl Default for RouteAuth {
    /// Per credential (cookies and `Authorization`), no check, no JWT: what a route without any
    /// access keys gets.
    fn default() -> Self {
        RouteAuth {
            sharing: Sharing::Vary(default_vary()),
            access_token: None,
            check: None,
            reauth: None,
            jwt: None,
        }
    }
}

/// The default credential sources: the cookies named like sessions (`is_session_cookie`) and the
/// `Authorization` header. Other cookies (analytics, preferences, junk a client makes up) are
/// neither forwarded nor part of the topic key, so they cannot multiply topics.
pub fn default_vary() -> Vec<VarySource> {
    vec![VarySource::SessionCookies, VarySource::Authorization]
}

/// Whether a cookie's name looks like a session's: `session`, `sid`, `PHPSESSID`, `JSESSIONID`,
/// `connect.sid`, `ASP.NET_SessionId`, `laravel_session`, `auth`, `token`, `jwt`, `remember_*`
/// and the like (after a `__Host-`/`__Secure-` prefix, any case). A session cookie named
/// otherwise must be listed in the route's `vary` (`"cookie:NAME"`).
pub fn is_session_cookie(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let n = lower
        .strip_prefix("__host-")
        .or_else(|| lower.strip_prefix("__secure-"))
        .unwrap_or(&lower);
    const WORDS: [&str; 8] = [
        "sess",
        "auth",
        "token",
        "jwt",
        "login",
        "credential",
        "remember",
        "identity",
    ];
    WORDS.iter().any(|w| n.contains(w)) || n.ends_with("sid") || n.starts_with("sid")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharing {
    All,
    /// One topic per distinct value of these sources; they are also exactly what is forwarded.
    Vary(Vec<VarySource>),
}

/// One part of a client's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VarySource {
    /// `cookie`: every cookie.
    Cookies,
    /// `session-cookies`: the cookies named like sessions (`is_session_cookie`); the default.
    SessionCookies,
    /// `cookie:NAME`: one cookie.
    Cookie(String),
    /// `authorization` (or the `access_token` query parameter, as a bearer token).
    Authorization,
    /// `header:NAME`: any other request header (an API key header, say).
    Header(HeaderName),
}

impl std::str::FromStr for VarySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = "expected \"cookie\", \"cookie:NAME\", \"session-cookies\", \"authorization\" or \"header:NAME\"";
        let (kind, name) = match s.split_once(':') {
            Some((k, n)) => (k.trim().to_ascii_lowercase(), Some(n.trim())),
            None => (s.trim().to_ascii_lowercase(), None),
        };
        match (kind.as_str(), name) {
            ("cookie", None) => Ok(VarySource::Cookies),
            ("session-cookies", None) => Ok(VarySource::SessionCookies),
            ("cookie", Some(n)) if is_token(n) => Ok(VarySource::Cookie(n.to_string())),
            ("authorization", None) => Ok(VarySource::Authorization),
            ("header", Some(n)) => match HeaderName::from_bytes(n.as_bytes()) {
                Ok(h) if h == http::header::AUTHORIZATION => Ok(VarySource::Authorization),
                Ok(h) if h == http::header::COOKIE => Ok(VarySource::Cookies),
                Ok(h) => Ok(VarySource::Header(h)),
                Err(_) => Err(format!("invalid header name {n:?} in {s:?}")),
            },
            _ => Err(format!("unknown credential source {s:?}: {expected}")),
        }
    }
}

/// An RFC 7230 token (cookie names, parameter names).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The authorization check: an upstream path template and how long answers are cached.
#[derive(Debug, Clone)]
pub struct AccessCheck {
    /// As written, e.g. `/api/projects/{id}/access`.
    pub url: String,
    /// Literal text and route parameters, in order.
    pub parts: Vec<UrlPart>,
    pub cache: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlPart {
    Text(String),
    /// Index of the parameter's segment in the route's path.
    Param(usize),
}

/// Verified-locally JWT settings, with the keys loaded.
#[derive(Clone)]
pub struct Jwt {
    pub alg: JwtAlg,
    /// `(kid, key)`; a single `key` file has no kid.
    pub keys: Arc<Vec<(Option<String>, jsonwebtoken::DecodingKey)>>,
    pub claim: String,
    /// None: a topic per token; Some: per value of these claims (type-tagged).
    pub topic_claims: Option<Vec<String>>,
    pub cookie: Option<String>,
    pub leeway: Duration,
    pub audience: Vec<String>,
    pub issuer: Vec<String>,
    /// A hash of the key file's bytes as loaded: lets a reload tell a rotated key from the
    /// same one without the key itself ever appearing in debug output or logs.
    pub key_fingerprint: u64,
}

impl fmt::Debug for Jwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys stay out of debug output (an HS256 key is a secret).
        f.debug_struct("Jwt")
            .field("alg", &self.alg)
            .field("keys", &self.keys.len())
            .field("claim", &self.claim)
            .field("topic_claims", &self.topic_claims)
            .field("cookie", &self.cookie)
            .field("leeway", &self.leeway)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field(
                "key_fingerprint",
                &format_args!("{:016x}", self.key_fingerprint),
            )
            .finish_non_exhaustive()
    }
}

/// The access keys of one `[[route]]` as written.
pub struct Written<'a> {
    pub route_span: Range<usize>,
    pub label: &'a str,
    pub template: &'a PathTemplate,
    pub query: &'a [String],
    pub share: Option<&'a Spanned<Share>>,
    pub vary: Option<&'a Spanned<Vec<Spanned<String>>>>,
    pub access_token: Option<&'a Spanned<String>>,
    pub auth: Option<&'a Spanned<AuthSection>>,
    pub reauth: Option<&'a Spanned<HumanDuration>>,
    pub jwt: Option<&'a Spanned<JwtSection>>,
}

/// Default re-check period of a route with an `auth` check.
const DEFAULT_REAUTH: Duration = Duration::from_secs(60);
const MIN_REAUTH: Duration = Duration::from_millis(10);

/// Check a route's access keys; every problem goes to `push`.
pub(super) fn validate(
    w: Written<'_>,
    push: &mut impl FnMut(Range<usize>, &str, String),
) -> RouteAuth {
    let at = |s: Range<usize>| {
        if s.is_empty() {
            w.route_span.clone()
        } else {
            s
        }
    };
    let key = |k: &str| format!("{} {k}", w.label);
    let share = w.share.map_or(Share::Credential, |s| *s.get_ref());

    let mut sources = default_vary();
    if let Some(v) = w.vary {
        if share == Share::All {
            push(
                at(v.span()),
                &key("vary"),
                "share = \"all\" polls without credentials; remove vary, or share".into(),
            );
        }
        if w.jwt.is_some() {
            push(
                at(v.span()),
                &key("vary"),
                "with jwt, topics vary by the token's claim; remove vary".into(),
            );
        }
        if v.get_ref().is_empty() {
            push(
                at(v.span()),
                &key("vary"),
                "an empty list would give every user one topic; write share = \"all\" for \
                 public data"
                    .into(),
            );
        }
        sources.clear();
        for s in v.get_ref() {
            match s.get_ref().parse::<VarySource>() {
                Ok(src) if !sources.contains(&src) => sources.push(src),
                Ok(_) => push(at(s.span()), &key("vary"), "listed twice".into()),
                Err(e) => push(at(s.span()), &key("vary"), e),
            }
        }
    }

    let access_token = w.access_token.map(|t| {
        let name = t.get_ref().trim();
        if !is_token(name) {
            push(
                at(t.span()),
                &key("access_token"),
                format!("{name:?} is not a valid query parameter name"),
            );
        }
        if w.query.iter().any(|q| q == name) {
            push(
                at(t.span()),
                &key("access_token"),
                format!("{name:?} is also in `query`: a token must never be part of a topic"),
            );
        }
        let reads_authorization = share == Share::All
            || w.jwt.as_ref().is_some_and(|j| j.get_ref().cookie.is_none())
            || (w.jwt.is_none() && sources.contains(&VarySource::Authorization));
        if !reads_authorization {
            push(
                at(t.span()),
                &key("access_token"),
                "the parameter is read as an `Authorization: Bearer` token, which this route \
                 ignores; add \"authorization\" to vary"
                    .into(),
            );
        }
        name.to_string()
    });

    let check = w.auth.map(|a| validate_check(a, &w, push));
    let reauth = match (w.reauth, &check) {
        (Some(r), None) => {
            push(
                at(r.span()),
                &key("reauth"),
                "re-runs the `auth` check, which this route has not (per-credential topics are \
                 re-checked by every poll)"
                    .into(),
            );
            None
        }
        (Some(r), Some(_)) if r.get_ref().0 < MIN_REAUTH => {
            push(
                at(r.span()),
                &key("reauth"),
                format!("must be at least {MIN_REAUTH:?}"),
            );
            None
        }
        (Some(r), Some(_)) => Some(r.get_ref().0),
        (None, Some(_)) => Some(DEFAULT_REAUTH),
        (None, None) => None,
    };
    // A cached answer older than the re-check period would make the re-check a no-op.
    let check = check.map(|mut c| {
        if let Some(r) = reauth {
            c.cache = c.cache.min(r);
        }
        c
    });

    let jwt = w.jwt.and_then(|j| validate_jwt(j, &key, &at, push));
    RouteAuth {
        sharing: match share {
            Share::All => Sharing::All,
            Share::Credential => Sharing::Vary(sources),
        },
        access_token,
        check,
        reauth,
        jwt,
    }
}

fn validate_check(
    a: &Spanned<AuthSection>,
    w: &Written<'_>,
    push: &mut impl FnMut(Range<usize>, &str, String),
) -> AccessCheck {
    let url = a.get_ref().url.get_ref().trim();
    let span = if a.get_ref().url.span().is_empty() {
        w.route_span.clone()
    } else {
        a.get_ref().url.span()
    };
    let key = format!("{} auth.url", w.label);
    let mut parts = Vec::new();
    if !url.starts_with('/') || url.starts_with("//") {
        push(
            span.clone(),
            &key,
            format!("{url:?} must be a path on the upstream, starting with '/'"),
        );
    }
    if url.contains('#') || url.split(['/', '?']).any(|s| s == "..") {
        push(span.clone(), &key, format!("{url:?}: no fragment or '..'"));
    }
    let mut rest = url;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}').map(|c| open + c) else {
            push(span.clone(), &key, format!("{url:?}: unclosed '{{'"));
            break;
        };
        if open > 0 {
            parts.push(UrlPart::Text(rest[..open].to_string()));
        }
        let name = &rest[open + 1..close];
        let index = w
            .template
            .segments
            .iter()
            .position(|s| matches!(s, Segment::Param(p) if p == name));
        match index {
            Some(i) => parts.push(UrlPart::Param(i)),
            None => push(
                span.clone(),
                &key,
                format!("{{{name}}} is not a parameter of {:?}", w.template.source),
            ),
        }
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        if rest.contains('}') {
            push(span.clone(), &key, format!("{url:?}: stray '}}'"));
        }
        parts.push(UrlPart::Text(rest.to_string()));
    }
    AccessCheck {
        url: url.to_string(),
        parts,
        cache: a.get_ref().cache.0,
    }
}

fn validate_jwt(
    j: &Spanned<JwtSection>,
    key: &impl Fn(&str) -> String,
    at: &impl Fn(Range<usize>) -> Range<usize>,
    push: &mut impl FnMut(Range<usize>, &str, String),
) -> Option<Jwt> {
    let span = at(j.span());
    let s = j.get_ref();
    if s.claim.trim().is_empty() {
        push(span.clone(), &key("jwt.claim"), "must not be empty".into());
    }
    if s.cookie.as_deref().is_some_and(|c| !is_token(c)) {
        push(
            span.clone(),
            &key("jwt.cookie"),
            "must be a cookie name".into(),
        );
    }
    let keys = match (&s.key, &s.jwks) {
        (Some(_), Some(_)) | (None, None) => {
            push(
                span.clone(),
                &key("jwt"),
                "give exactly one of `key` (a key file) or `jwks` (a JWKS file)".into(),
            );
            return None;
        }
        (Some(k), None) => load_key(s.alg, k.get_ref()).map(|k| vec![(None, k)]),
        (None, Some(k)) => load_jwks(s.alg, k.get_ref()),
    };
    let keys = match keys {
        Ok(k) => k,
        Err(message) => {
            let (k, name) = match (&s.key, &s.jwks) {
                (Some(k), _) => (k, "jwt.key"),
                (_, Some(k)) => (k, "jwt.jwks"),
                _ => return None,
            };
            push(
                at(k.span()),
                &key(name),
                format!("{}: {message}", k.get_ref().display()),
            );
            return None;
        }
    };
    let key_fingerprint = {
        use std::hash::{BuildHasher, Hash, Hasher};
        // Keyed per process, so a fingerprint in a log says nothing about the key outside it.
        static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let mut h = KEY.get_or_init(Default::default).build_hasher();
        for path in s.key.iter().chain(s.jwks.iter()) {
            std::fs::read(path.get_ref())
                .unwrap_or_default()
                .hash(&mut h);
        }
        h.finish()
    };
    Some(Jwt {
        alg: s.alg,
        keys: Arc::new(keys),
        key_fingerprint,
        claim: s.claim.trim().to_string(),
        topic_claims: s
            .topic_claims
            .as_ref()
            .map(|c| c.iter().map(|n| n.trim().to_string()).collect()),
        cookie: s.cookie.clone(),
        leeway: s.leeway.as_ref().map_or(Duration::ZERO, |l| l.0),
        audience: s.audience.clone(),
        issuer: s.issuer.clone(),
    })
}

fn load_key(alg: JwtAlg, path: &std::path::Path) -> Result<jsonwebtoken::DecodingKey, String> {
    use jsonwebtoken::DecodingKey;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    match alg {
        JwtAlg::HS256 => {
            let secret = bytes.trim_ascii_end();
            if secret.len() < 16 {
                return Err("an HS256 secret must be at least 16 bytes".into());
            }
            Ok(DecodingKey::from_secret(secret))
        }
        JwtAlg::RS256 => {
            DecodingKey::from_rsa_pem(&bytes).map_err(|e| format!("not a PEM RSA public key ({e})"))
        }
        JwtAlg::ES256 => {
            DecodingKey::from_ec_pem(&bytes).map_err(|e| format!("not a PEM EC public key ({e})"))
        }
    }
}

fn load_jwks(
    alg: JwtAlg,
    path: &std::path::Path,
) -> Result<Vec<(Option<String>, jsonwebtoken::DecodingKey)>, String> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
    let text = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let set: JwkSet =
        serde_json::from_slice(&text).map_err(|e| format!("not a JWKS document ({e})"))?;
    let keys: Vec<_> = set
        .keys
        .iter()
        .filter(|k| match (&k.algorithm, alg) {
            (AlgorithmParameters::OctetKey(_), JwtAlg::HS256) => true,
            (AlgorithmParameters::RSA(_), JwtAlg::RS256) => true,
            (AlgorithmParameters::EllipticCurve(p), JwtAlg::ES256) => {
                p.curve == EllipticCurve::P256
            }
            _ => false,
        })
        .filter_map(|k| {
            jsonwebtoken::DecodingKey::from_jwk(k)
                .ok()
                .map(|d| (k.common.key_id.clone(), d))
        })
        .collect();
    if keys.is_empty() {
        return Err(format!("no usable {alg:?} key in the set"));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JWKS goes through `#[serde(flatten)]` and untagged enums in jsonwebtoken, which buffer
    /// members; with serde_json's `arbitrary_precision` a number there is a special map. Extra
    /// numeric members (floats, integers past 64 bits) must still leave the keys readable.
    #[test]
    fn jwks_with_numeric_members_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(
            &path,
            r#"{"keys":[{"kty":"oct","kid":"k1","alg":"HS256",
                "k":"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
                "iat":1.7e9,"nbf":1700000000.5,"serial":123456789012345678901234567890,
                "n":-0}],
               "generated":1796195052.4752579}"#,
        )
        .unwrap();
        let keys = load_jwks(JwtAlg::HS256, &path).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0.as_deref(), Some("k1"));
    }
}
