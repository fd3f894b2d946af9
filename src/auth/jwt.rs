//! Local JWT verification: signature (HS256/RS256/ES256, one configured algorithm only, so a token
//! cannot pick a weaker one), `exp`/`nbf` with the configured leeway, optional `aud`/`iss`, and the
//! claim that names the user. Errors never include the token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, Validation};

use crate::config::auth::{Jwt, JwtAlg};

/// A verified token: who it is for and when it stops being valid.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    /// The configured claim's value, as a string (numbers are written as JSON).
    pub subject: String,
    /// `exp` plus leeway: the stream ends then.
    pub valid_until: SystemTime,
}

/// Why a token was refused (short, safe to show and log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Invalid {
    #[error("the token has expired")]
    Expired,
    #[error("the token signature does not verify")]
    Signature,
    #[error("the token lacks the {0:?} claim")]
    MissingClaim(String),
    #[error("the token is not valid ({0})")]
    Other(&'static str),
}

pub(crate) fn verify(cfg: &Jwt, token: &str) -> Result<Verified, Invalid> {
    let alg = match cfg.alg {
        JwtAlg::HS256 => Algorithm::HS256,
        JwtAlg::RS256 => Algorithm::RS256,
        JwtAlg::ES256 => Algorithm::ES256,
    };
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway.as_secs();
    // `exp` is what closes the stream: a token without one is refused.
    v.set_required_spec_claims(&["exp"]);
    if !cfg.audience.is_empty() {
        v.set_audience(&cfg.audience);
    } else {
        v.validate_aud = false;
    }
    if !cfg.issuer.is_empty() {
        v.set_issuer(&cfg.issuer);
    }
    v.validate_nbf = true;
    let header = jsonwebtoken::decode_header(token).map_err(|_| Invalid::Other("malformed"))?;
    if header.alg != alg {
        return Err(Invalid::Other("wrong algorithm"));
    }
    // With a JWKS the `kid` picks the key; a token without one (or with one not in the set) is
    // tried against every key of the configured algorithm.
    let by_kid: Vec<_> = cfg
        .keys
        .iter()
        .filter(|(kid, _)| kid.is_some() && *kid == header.kid)
        .collect();
    let candidates = if by_kid.is_empty() {
        cfg.keys.iter().collect()
    } else {
        by_kid
    };
    let mut last = Invalid::Signature;
    for (_, key) in candidates {
        match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &v) {
            Ok(data) => return claims(cfg, &data.claims),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                last = match e.kind() {
                    K::InvalidSignature => Invalid::Signature,
                    K::ExpiredSignature => return Err(Invalid::Expired),
                    K::ImmatureSignature => return Err(Invalid::Other("not yet valid")),
                    K::InvalidAudience => return Err(Invalid::Other("wrong audience")),
                    K::InvalidIssuer => return Err(Invalid::Other("wrong issuer")),
                    K::MissingRequiredClaim(c) => return Err(Invalid::MissingClaim(c.clone())),
                    K::InvalidAlgorithm => Invalid::Other("wrong algorithm"),
                    _ => Invalid::Other("malformed"),
                };
            }
        }
    }
    Err(last)
}

fn claims(
    cfg: &Jwt,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<Verified, Invalid> {
    let subject = match claims.get(&cfg.claim) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(v @ serde_json::Value::Number(_)) => v.to_string(),
        _ => return Err(Invalid::MissingClaim(cfg.claim.clone())),
    };
    let exp = claims
        .get("exp")
        .and_then(|e| e.as_u64().or_else(|| e.as_f64().map(|f| f as u64)))
        .ok_or_else(|| Invalid::MissingClaim("exp".into()))?;
    let valid_until = UNIX_EPOCH + Duration::from_secs(exp) + cfg.leeway;
    Ok(Verified {
        subject,
        valid_until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, DecodingKey, EncodingKey, Header};
    use std::sync::Arc;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn cfg() -> Jwt {
        Jwt {
            alg: JwtAlg::HS256,
            keys: Arc::new(vec![(None, DecodingKey::from_secret(SECRET))]),
            claim: "sub".into(),
            cookie: None,
            leeway: Duration::ZERO,
            audience: vec![],
            issuer: vec![],
            key_fingerprint: 0,
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn valid_expired_forged_and_claimless() {
        let exp = now() + 60;
        let ok = verify(
            &cfg(),
            &token(serde_json::json!({"sub": "alice", "exp": exp}), SECRET),
        )
        .unwrap();
        assert_eq!(ok.subject, "alice");
        assert_eq!(ok.valid_until, UNIX_EPOCH + Duration::from_secs(exp));
        let old = token(serde_json::json!({"sub": "a", "exp": now() - 5}), SECRET);
        assert_eq!(verify(&cfg(), &old).unwrap_err(), Invalid::Expired);
        let forged = token(
            serde_json::json!({"sub": "a", "exp": exp}),
            b"another-secret-another-secret!!!",
        );
        assert_eq!(verify(&cfg(), &forged).unwrap_err(), Invalid::Signature);
        let no_sub = token(serde_json::json!({"exp": exp}), SECRET);
        assert!(matches!(
            verify(&cfg(), &no_sub),
            Err(Invalid::MissingClaim(_))
        ));
        let no_exp = token(serde_json::json!({"sub": "a"}), SECRET);
        assert!(matches!(
            verify(&cfg(), &no_exp),
            Err(Invalid::MissingClaim(_))
        ));
        assert!(verify(&cfg(), "not.a.token").is_err());
    }

    #[test]
    fn algorithm_is_pinned() {
        let t = encode(
            &Header::new(Algorithm::HS384),
            &serde_json::json!({"sub": "a", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(matches!(verify(&cfg(), &t), Err(Invalid::Other(_))));
    }
}
