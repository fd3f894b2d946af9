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
/// replaced by `***`.
pub fn redact(resource: &str) -> String {
    let Some((path, query)) = resource.split_once('?') else {
        return resource.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or(pair);
            let lower = name.to_ascii_lowercase();
            let secret = SECRET_PARAMS
                .iter()
                .any(|s| lower == *s || lower.ends_with(&format!("_{s}")));
            if secret {
                format!("{name}=***")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
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
}
