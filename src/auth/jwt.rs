//! Local JWT verification: signature (HS256/RS256/ES256, one configured algorithm only, so a token
//! cannot pick a weaker one), `exp`/`nbf` with the configured leeway, optional `aud`/`iss`, and the
//! claim that names the user. Errors never include the token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, Validation};

use crate::config::auth::{Jwt, JwtAlg};

/// A verified token: who it is for, what its topic is keyed by, and when it stops being valid.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    /// The configured claim's value, as a string (numbers are written as JSON).
    pub subject: String,
    /// What the topic varies by: the configured claims, each type-tagged (`42` and `"42"`
    /// differ), or empty when every token is its own topic.
    pub topic_key: Vec<u8>,
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
    // `exp` and `nbf` are checked by `claims` from the numbers' exact text. jsonwebtoken's own
    // check reads them as `u64`/`f64` through serde, and with serde_json's
    // `arbitrary_precision` (which herald needs) any non-integer such as `1.7e9` or
    // `1700000000.5` fails that read and is then skipped: a fractional `nbf` would be ignored.
    v.validate_exp = false;
    v.validate_nbf = false;
    // An audience or issuer that is configured is required: jsonwebtoken only checks them
    // when the token carries them, so a token without `aud` would otherwise pass.
    let mut required: Vec<&str> = Vec::new();
    if !cfg.audience.is_empty() {
        v.set_audience(&cfg.audience);
        required.push("aud");
    } else {
        v.validate_aud = false;
    }
    if !cfg.issuer.is_empty() {
        v.set_issuer(&cfg.issuer);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
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
            Ok(data) => return claims(cfg, &data.claims, SystemTime::now()),
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

/// Check `exp` (required: it is what closes the stream) and `nbf` against `now` with the
/// configured leeway, and read the subject claim.
fn claims(
    cfg: &Jwt,
    claims: &serde_json::Map<String, serde_json::Value>,
    now: SystemTime,
) -> Result<Verified, Invalid> {
    let subject = match claims.get(&cfg.claim) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        // A numeric subject is its exact text (a 30-digit id stays itself).
        Some(v @ serde_json::Value::Number(_)) => v.to_string(),
        _ => return Err(Invalid::MissingClaim(cfg.claim.clone())),
    };
    let exp = match claims.get("exp") {
        Some(serde_json::Value::Number(n)) => numeric_date(n),
        _ => return Err(Invalid::MissingClaim("exp".into())),
    };
    let valid_until = later_by(exp, cfg.leeway);
    if valid_until < now {
        return Err(Invalid::Expired);
    }
    match claims.get("nbf") {
        None => {}
        Some(serde_json::Value::Number(n)) => {
            let nbf = numeric_date(n);
            if nbf > later_by(now, cfg.leeway) {
                return Err(Invalid::Other("not yet valid"));
            }
        }
        // Refused rather than ignored: a check we cannot read must not pass.
        Some(_) => return Err(Invalid::Other("malformed")),
    }
    let mut topic_key = Vec::new();
    for name in cfg.topic_claims.iter().flatten() {
        tagged(&mut topic_key, name, claims.get(name));
    }
    Ok(Verified {
        subject,
        topic_key,
        valid_until,
    })
}

/// Append `name` and its value to `out`, length-prefixed and tagged with its JSON type, so no two
/// different claim sets (a number and a string with the same text, an absent claim and `null`)
/// share an encoding.
fn tagged(out: &mut Vec<u8>, name: &str, value: Option<&serde_json::Value>) {
    use serde_json::Value;
    let (tag, text) = match value {
        None => (b'-', String::new()),
        Some(Value::Null) => (b'z', String::new()),
        Some(Value::Bool(b)) => (b'b', b.to_string()),
        Some(Value::Number(n)) => (b'n', n.to_string()),
        Some(Value::String(s)) => (b's', s.clone()),
        Some(v @ Value::Array(_)) => (b'a', v.to_string()),
        Some(v @ Value::Object(_)) => (b'o', v.to_string()),
    };
    for part in [name.as_bytes(), text.as_bytes()] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out.push(tag);
}

/// The latest time a NumericDate is taken to mean, 9999-12-31T23:59:59Z: later ones (a 30-digit
/// `exp`, `1e+400`) read as this, so no time arithmetic downstream (the stream's expiry timer)
/// can overflow.
const LATEST: Duration = Duration::from_secs(253_402_300_799);

/// `t + by`, at most [`LATEST`] (a leeway is not bounded by the config).
fn later_by(t: SystemTime, by: Duration) -> SystemTime {
    let latest = UNIX_EPOCH + LATEST;
    t.checked_add(by).map_or(latest, |t| t.min(latest))
}

/// A NumericDate (RFC 7519 §2: seconds since the epoch, not necessarily an integer) as a time,
/// from the number's exact text: `1700000000`, `1.7e9` and `1700000000.5` all work. Dates
/// before the epoch read as the epoch, dates after [`LATEST`] as `LATEST`.
fn numeric_date(n: &serde_json::Number) -> SystemTime {
    // Rust's parser rounds correctly and saturates: a huge exponent is infinity, a tiny one 0.
    let secs = n.as_str().parse::<f64>().unwrap_or(0.0);
    let since_epoch = if secs > 0.0 {
        Duration::try_from_secs_f64(secs).map_or(LATEST, |d| d.min(LATEST))
    } else {
        Duration::ZERO
    };
    UNIX_EPOCH + since_epoch
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
            topic_claims: None,
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

    /// Claims written as JSON text, so numbers keep the exact form under test.
    fn claims_text(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap()
    }

    /// RFC 7519 NumericDates need not be integers: `exp`/`nbf` written as fractions or with an
    /// exponent are read by value; huge ones are clamped instead of overflowing the clock.
    #[test]
    fn numeric_dates_in_any_spelling() {
        let soon = now() + 60;
        let valid_until = |exp: &str| {
            let t = token(
                claims_text(&format!(r#"{{"sub":"a","exp":{exp}}}"#)),
                SECRET,
            );
            verify(&cfg(), &t).map(|v| v.valid_until)
        };
        assert_eq!(
            valid_until(&format!("{soon}.5")),
            Ok(UNIX_EPOCH + Duration::from_millis(soon * 1000 + 500))
        );
        assert_eq!(
            valid_until(&format!("{}e-1", soon * 10)),
            Ok(UNIX_EPOCH + Duration::from_secs(soon))
        );
        assert_eq!(
            valid_until(&format!("{soon}.0")),
            Ok(UNIX_EPOCH + Duration::from_secs(soon))
        );
        // 2023-11-14: long past, so expired (not "missing").
        assert_eq!(valid_until("1.7e9"), Err(Invalid::Expired));
        assert_eq!(valid_until("-1"), Err(Invalid::Expired));
        let latest = Ok(UNIX_EPOCH + LATEST);
        for huge in [
            "18446744073709551615",
            "123456789012345678901234567890",
            "1e400",
        ] {
            assert_eq!(valid_until(huge), latest, "{huge}");
        }
        assert_eq!(
            valid_until(r#""9999999999""#),
            Err(Invalid::MissingClaim("exp".into()))
        );

        let with_nbf = |nbf: &str| {
            let t = token(
                claims_text(&format!(r#"{{"sub":"a","exp":{soon},"nbf":{nbf}}}"#)),
                SECRET,
            );
            verify(&cfg(), &t).map(|_| ())
        };
        assert_eq!(with_nbf("1.7e9"), Ok(()));
        assert_eq!(with_nbf(&format!("{}.5", now() - 1)), Ok(()));
        let later = format!("{}.5", now() + 3600);
        assert_eq!(with_nbf(&later), Err(Invalid::Other("not yet valid")));
        assert_eq!(
            with_nbf(&format!("{}e1", (now() + 3600) / 10 + 1)),
            Err(Invalid::Other("not yet valid"))
        );
        assert_eq!(with_nbf("1e400"), Err(Invalid::Other("not yet valid")));
        assert_eq!(with_nbf(r#""0""#), Err(Invalid::Other("malformed")));
        let lenient = Jwt {
            leeway: Duration::from_secs(7200),
            ..cfg()
        };
        let t = token(
            claims_text(&format!(r#"{{"sub":"a","exp":{soon},"nbf":{later}}}"#)),
            SECRET,
        );
        assert!(verify(&lenient, &t).is_ok());
        let huge_leeway = Jwt {
            leeway: Duration::MAX,
            ..cfg()
        };
        let t = token(
            claims_text(r#"{"sub":"a","exp":18446744073709551615}"#),
            SECRET,
        );
        assert_eq!(
            verify(&huge_leeway, &t).map(|v| v.valid_until),
            Ok(UNIX_EPOCH + LATEST)
        );
    }

    #[test]
    fn numeric_subject_is_its_exact_text() {
        let t = token(
            claims_text(&format!(
                r#"{{"sub":123456789012345678901234567890,"exp":{}}}"#,
                now() + 60
            )),
            SECRET,
        );
        assert_eq!(
            verify(&cfg(), &t).unwrap().subject,
            "123456789012345678901234567890"
        );
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
