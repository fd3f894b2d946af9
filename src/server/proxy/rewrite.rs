//! What the client is told about where it is: URLs in `Location`, `Content-Location` and
//! `Refresh` that point at the upstream's own origin (and prefix) are rewritten to the origin the
//! client used, as nginx's `proxy_redirect default` does, so internal addresses never reach
//! clients; and `Via` names herald on requests and responses (RFC 9110 §7.6.3).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Version};

use super::pass::Base;

/// The client-facing origin of a request: the scheme of the client's connection (https when it
/// came over TLS; an incoming `X-Forwarded-Proto` is not trusted) and the authority it asked for
/// (`:authority` on HTTP/2 or an absolute-form target, else `Host`).
#[derive(Debug, Clone)]
pub(super) struct Public {
    scheme: &'static str,
    host: Option<String>,
}

impl Public {
    pub(super) fn of<B>(req: &Request<B>, tls: bool) -> Public {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .filter(|h| !h.contains('@') && Authority::try_from(h.as_str()).is_ok());
        Public {
            scheme: if tls { "https" } else { "http" },
            host,
        }
    }

    /// The authority the client asked for, if it named a valid one.
    pub(super) fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    fn origin(&self) -> Option<String> {
        self.host.as_ref().map(|h| format!("{}://{h}", self.scheme))
    }
}

/// Rewrite the redirect-like headers of an upstream response in place.
pub(super) fn redirects(headers: &mut HeaderMap, base: &Base, public: &Public) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        rewrite_each(headers, name, |v| rewrite_url(v, base, public));
    }
    rewrite_each(headers, HeaderName::from_static("refresh"), |v| {
        rewrite_refresh(v, base, public)
    });
}

fn rewrite_each(
    headers: &mut HeaderMap,
    name: HeaderName,
    mut f: impl FnMut(&str) -> Option<String>,
) {
    if !headers.contains_key(&name) {
        return;
    }
    let values: Vec<HeaderValue> = headers
        .get_all(&name)
        .iter()
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(&mut f)
                .and_then(|new| HeaderValue::from_str(&new).ok())
                .unwrap_or_else(|| v.clone())
        })
        .collect();
    headers.remove(&name);
    for v in values {
        headers.append(name.clone(), v);
    }
}

/// `value` with the upstream's origin and prefix replaced by the client-facing origin, or `None`
/// when it points elsewhere. A path-absolute value (`/legacy/x`) loses the prefix and stays
/// relative; with no client-facing host known, an absolute one becomes relative too.
pub(super) fn rewrite_url(value: &str, base: &Base, public: &Public) -> Option<String> {
    let (up_scheme, up_authority) = base.parts();
    let rest = if let Some((scheme, after)) = value.split_once("://") {
        if !scheme.eq_ignore_ascii_case(up_scheme.as_str()) {
            return None;
        }
        same_origin_rest(after, up_authority, up_scheme.as_str())?
    } else if let Some(after) = value.strip_prefix("//") {
        same_origin_rest(after, up_authority, up_scheme.as_str())?
    } else if value.starts_with('/') {
        if base.prefix().is_empty() {
            return None;
        }
        return under_prefix(value, base.prefix());
    } else {
        return None;
    };
    let path = under_prefix(rest, base.prefix())?;
    Some(match public.origin() {
        Some(origin) => format!("{origin}{path}"),
        None => path,
    })
}

/// The path (and after) of `after` (an authority and what follows) when its authority is the
/// upstream's.
fn same_origin_rest<'a>(after: &'a str, up: &Authority, scheme: &str) -> Option<&'a str> {
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    let authority = Authority::try_from(authority).ok()?;
    let default = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    let same = authority.host().eq_ignore_ascii_case(up.host())
        && authority.port_u16().unwrap_or(default) == up.port_u16().unwrap_or(default);
    same.then_some(rest)
}

/// `path` without `prefix` (which it must start with, at a segment boundary), always starting
/// with `/`.
fn under_prefix(path: &str, prefix: &str) -> Option<String> {
    let rest = path.strip_prefix(prefix)?;
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        return None;
    }
    Some(if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    })
}

/// `Refresh: 5; url=http://…` (also `,` and quoted URLs): the URL rewritten, the rest kept.
fn rewrite_refresh(value: &str, base: &Base, public: &Public) -> Option<String> {
    let sep = value.find([';', ','])?;
    let mut start = sep + 1;
    start += value[start..].len() - value[start..].trim_start().len();
    let t = &value[start..];
    if t.get(..3).is_some_and(|u| u.eq_ignore_ascii_case("url")) {
        let after = t[3..].trim_start();
        if let Some(a) = after.strip_prefix('=') {
            start = value.len() - a.trim_start().len();
        }
    }
    let rest = &value[start..];
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"');
    let url_start = start + quote.map_or(0, char::len_utf8);
    let inner = &value[url_start..];
    let end = quote.and_then(|q| inner.find(q)).unwrap_or(inner.len());
    let url = inner[..end].trim_end();
    let new = rewrite_url(url, base, public)?;
    Some(format!(
        "{}{}{}",
        &value[..url_start],
        new,
        &inner[url.len()..]
    ))
}

/// Add herald to `Via` with the protocol version of the message it received.
pub(super) fn add_via(headers: &mut HeaderMap, received: Version) {
    let value = match received {
        Version::HTTP_09 => "0.9 herald",
        Version::HTTP_10 => "1.0 herald",
        Version::HTTP_2 => "2 herald",
        Version::HTTP_3 => "3 herald",
        _ => "1.1 herald",
    };
    headers.append(header::VIA, HeaderValue::from_static(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(url: &str) -> Base {
        Base::new(&reqwest::Url::parse(url).unwrap()).unwrap()
    }

    fn public(host: Option<&str>, tls: bool) -> Public {
        Public {
            scheme: if tls { "https" } else { "http" },
            host: host.map(str::to_string),
        }
    }

    #[test]
    fn locations_under_the_upstream_are_rewritten() {
        let b = base("http://127.0.0.1:3200/legacy");
        let p = public(Some("api.example.com"), true);
        for (from, to) in [
            (
                "http://127.0.0.1:3200/legacy/x?y=1",
                Some("https://api.example.com/x?y=1"),
            ),
            (
                "http://127.0.0.1:3200/legacy",
                Some("https://api.example.com/"),
            ),
            (
                "HTTP://127.0.0.1:3200/legacy?q",
                Some("https://api.example.com/?q"),
            ),
            (
                "//127.0.0.1:3200/legacy/a",
                Some("https://api.example.com/a"),
            ),
            ("/legacy/a/b", Some("/a/b")),
            // Elsewhere: left alone.
            ("http://127.0.0.1:3200/legacyx", None),
            ("http://127.0.0.1:3200/other", None),
            ("http://127.0.0.1:9999/legacy/x", None),
            ("https://127.0.0.1:3200/legacy/x", None),
            ("https://example.org/legacy/x", None),
            ("/other", None),
            ("relative/x", None),
        ] {
            assert_eq!(rewrite_url(from, &b, &p).as_deref(), to, "{from}");
        }
        let root = base("http://up:80/");
        let p = public(Some("h:8080"), false);
        assert_eq!(
            rewrite_url("http://UP/a#f", &root, &p).as_deref(),
            Some("http://h:8080/a#f")
        );
        assert_eq!(rewrite_url("/a", &root, &p), None);
        assert_eq!(
            rewrite_url("http://up/a", &root, &public(None, false)).as_deref(),
            Some("/a")
        );
    }

    #[test]
    fn refresh_urls_are_rewritten() {
        let b = base("http://10.0.0.5:3000/legacy");
        let p = public(Some("h"), false);
        for (from, to) in [
            ("5; url=http://10.0.0.5:3000/legacy/x", "5; url=http://h/x"),
            (
                "0;URL='http://10.0.0.5:3000/legacy/x' ",
                "0;URL='http://h/x' ",
            ),
            ("3, http://10.0.0.5:3000/legacy/y", "3, http://h/y"),
            ("1; url = \"/legacy/z\"", "1; url = \"/z\""),
        ] {
            assert_eq!(rewrite_refresh(from, &b, &p).as_deref(), Some(to), "{from}");
        }
        assert_eq!(rewrite_refresh("5", &b, &p), None);
        assert_eq!(rewrite_refresh("5; url=http://other/x", &b, &p), None);
    }

    #[test]
    fn via_names_the_received_protocol() {
        let mut h = HeaderMap::new();
        h.insert(header::VIA, HeaderValue::from_static("1.0 fred"));
        add_via(&mut h, Version::HTTP_2);
        let all: Vec<_> = h.get_all(header::VIA).iter().collect();
        assert_eq!(all, ["1.0 fred", "2 herald"]);
    }
}
