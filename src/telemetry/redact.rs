//! Redaction for anything herald writes down (logs, the status page): the values of
//! credential-like query parameters never leave the process.

/// Query parameters whose values never reach a log line.
const SECRET_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "auth",
    "key",
    "api_key",
    "apikey",
    "secret",
    "password",
    "session",
    "signature",
    "sig",
    "jwt",
    "code",
];

/// A resource for logs: the path, and the query with the values of credential-like parameters
/// replaced by `***`. Names are matched as the upstream reads them (`%74oken`, `access%5Ftoken`
/// and `access+token` are secrets too); everything else is kept exactly as written.
pub fn redact(resource: &str) -> String {
    let Some((path, query)) = resource.split_once('?') else {
        return resource.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or(pair);
            if is_secret(name) {
                format!("{name}=***")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

/// Whether a query parameter name, as written, names a credential: decoded as a form (`+` is a
/// space, then `%XX`), lowercased, trimmed, with ` `, `.` and `-` read as `_` (PHP reads
/// `access+token` and `access.token` as `access_token`).
fn is_secret(written: &str) -> bool {
    let decoded = form_decode(written);
    let name: String = decoded
        .trim()
        .chars()
        .map(|c| match c {
            ' ' | '.' | '-' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    SECRET_PARAMS
        .iter()
        .any(|s| name == *s || name.ends_with(&format!("_{s}")))
}

/// `+` as a space, then `%XX` as its byte; malformed escapes are kept as written.
fn form_decode(written: &str) -> String {
    let bytes = written.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("/a/b"), "/a/b");
        assert_eq!(
            redact("/a?page=2&access_token=abc&x_api_key=k"),
            "/a?page=2&access_token=***&x_api_key=***"
        );
    }

    #[test]
    fn redacts_encoded_names_like_plain_ones() {
        for (written, logged) in [
            ("/a?%74oken=abc", "/a?%74oken=***"),
            ("/a?%54OKEN=abc", "/a?%54OKEN=***"),
            ("/a?access%5Ftoken=abc", "/a?access%5Ftoken=***"),
            ("/a?access%5ftoken=abc", "/a?access%5ftoken=***"),
            ("/a?access+token=abc", "/a?access+token=***"),
            ("/a?access.token=abc", "/a?access.token=***"),
            ("/a?+token+=abc", "/a?+token+=***"),
            ("/a?x%2Dapi%2Dkey=k", "/a?x%2Dapi%2Dkey=***"),
            ("/a?%70assword", "/a?%70assword=***"),
        ] {
            assert_eq!(redact(written), logged, "{written}");
        }
        // Pairs that are not secrets are kept byte for byte, odd encodings included.
        assert_eq!(
            redact("/a?page=%32&q=a+b&%zz=1&tok=%zz&token=x&n%61me=v"),
            "/a?page=%32&q=a+b&%zz=1&tok=%zz&token=***&n%61me=v"
        );
    }
}
