//! Where a route's changes come from (`source = { kind, path, mode }`), how polls share the
//! upstream (`[polling]`), and who may publish (`[publish]`): the serde shapes and their checks,
//! each problem located at the value written.

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::model::{HumanDuration, PathTemplate, Segment};
use super::Secret;

/// `source = { kind = "sse", path = "/api/builds/{id}/events", mode = "states" }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    #[serde(default)]
    pub kind: SourceKind,
    /// The upstream path to subscribe to (route parameters substituted); default: the route's
    /// own path, asked for with `Accept: text/event-stream` (or `application/x-ndjson`).
    #[serde(default)]
    pub path: Option<Spanned<PathTemplate>>,
    /// For `kind = "sse"`: what an upstream event is.
    #[serde(default)]
    pub mode: Option<Spanned<PushMode>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Poll the route's path every `interval` (the default).
    #[default]
    Poll,
    /// One long-lived upstream SSE stream per topic.
    Sse,
    /// One long-lived upstream stream of JSON documents, one per line.
    Ndjson,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Poll => "poll",
            SourceKind::Sse => "sse",
            SourceKind::Ndjson => "ndjson",
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PushMode {
    /// Each `data:` is the resource's full JSON state, diffed like a poll.
    #[default]
    States,
    /// Each event is re-broadcast as is (with herald's ids, history and replay).
    Pass,
}

/// A route's validated source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    pub kind: SourceKind,
    /// None: the route's own path.
    pub path: Option<PathTemplate>,
    pub mode: PushMode,
}

/// `[polling]`: what every poll of the one upstream shares.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollingSection {
    /// Upstream requests in flight at once, all topics together (0: no cap).
    pub max_concurrent: Spanned<usize>,
    /// Upstream requests started per second, all topics together (0: no limit).
    pub max_rate: Spanned<f64>,
}

impl Default for PollingSection {
    fn default() -> Self {
        PollingSection {
            max_concurrent: Spanned::new(0..0, 256),
            max_rate: Spanned::new(0..0, 0.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Polling {
    pub max_concurrent: usize,
    /// Requests per second; 0: no limit.
    pub max_rate: f64,
}

/// `[publish]`: webhooks and pokes (`POST /_herald/publish`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishSection {
    /// Bearer token a publish must carry (also `HERALD_PUBLISH_TOKEN`). Without one, publishing
    /// is off.
    pub token: Option<Spanned<String>>,
    /// Also accept publishes at this path on the main listener (default: admin listener only).
    pub path: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct Publish {
    pub token: Option<Secret>,
    /// On the main listener too, at this path.
    pub path: Option<String>,
}

/// The environment variable that supplies `[publish] token` when the file does not.
pub const PUBLISH_TOKEN_ENV: &str = "HERALD_PUBLISH_TOKEN";
const MIN_TOKEN: usize = 16;

type Push<'a> = dyn FnMut(Range<usize>, &str, String) + 'a;

/// A route's `source`: a path only for push kinds, its parameters among the route's, `mode`
/// only for SSE.
pub(super) fn validate_source(
    written: Option<&Spanned<SourceSection>>,
    route: &PathTemplate,
    label: &str,
    push: &mut Push<'_>,
) -> Source {
    let Some(s) = written else {
        return Source::default();
    };
    let section = s.get_ref();
    let key = format!("{label} source");
    if let Some(p) = &section.path {
        if section.kind == SourceKind::Poll {
            push(
                p.span(),
                &format!("{key}.path"),
                "only push sources (kind = \"sse\" or \"ndjson\") take a path".into(),
            );
        }
        let params = |t: &PathTemplate| -> Vec<String> {
            t.segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Param(n) => Some(n.clone()),
                    Segment::Literal(_) => None,
                })
                .collect()
        };
        let have = params(route);
        for name in params(p.get_ref()) {
            if !have.contains(&name) {
                push(
                    p.span(),
                    &format!("{key}.path"),
                    format!("parameter {{{name}}} is not a parameter of the route's path"),
                );
            }
        }
    }
    if let Some(m) = &section.mode {
        if section.kind != SourceKind::Sse {
            push(
                m.span(),
                &format!("{key}.mode"),
                "only kind = \"sse\" takes a mode (\"states\" or \"pass\")".into(),
            );
        }
    }
    Source {
        kind: section.kind,
        path: section.path.as_ref().map(|p| p.get_ref().clone()),
        mode: section
            .mode
            .as_ref()
            .map_or_else(PushMode::default, |m| *m.get_ref()),
    }
}

/// A route's `max_interval`: at least its `interval` (None: no adaptive backoff).
pub(super) fn validate_max_interval(
    written: Option<&Spanned<HumanDuration>>,
    interval: Duration,
    label: &str,
    push: &mut Push<'_>,
) -> Duration {
    match written {
        Some(m) if m.get_ref().0 < interval => {
            push(
                m.span(),
                &format!("{label} max_interval"),
                format!(
                    "must be at least the route's interval ({interval:?}), got {:?}",
                    m.get_ref().0
                ),
            );
            interval
        }
        Some(m) => m.get_ref().0,
        None => interval,
    }
}

pub(super) fn validate_polling(p: &PollingSection, push: &mut Push<'_>) -> Polling {
    let rate = *p.max_rate.get_ref();
    if !rate.is_finite() || rate < 0.0 {
        push(
            p.max_rate.span(),
            "polling.max_rate",
            format!("must be a number of requests per second, 0 or more (0: no limit), got {rate}"),
        );
    }
    Polling {
        max_concurrent: *p.max_concurrent.get_ref(),
        max_rate: if rate.is_finite() { rate.max(0.0) } else { 0.0 },
    }
}

pub(super) fn validate_publish(p: &PublishSection, push: &mut Push<'_>) -> Publish {
    let token = match &p.token {
        Some(t) if t.get_ref().len() < MIN_TOKEN => {
            push(
                t.span(),
                "publish.token",
                format!("must be at least {MIN_TOKEN} characters"),
            );
            None
        }
        Some(t) => Some(Secret(t.get_ref().clone())),
        None => std::env::var(PUBLISH_TOKEN_ENV)
            .ok()
            .filter(|t| t.len() >= MIN_TOKEN)
            .map(Secret),
    };
    let path = p.path.as_ref().and_then(|v| {
        let s = v.get_ref().trim();
        if s.is_empty() {
            return None;
        }
        if !s.starts_with('/') || s.contains(['?', '#', '{', '}', ' ']) {
            push(
                v.span(),
                "publish.path",
                format!("invalid path {s:?}: expected an absolute path like \"/_herald/publish\""),
            );
            return None;
        }
        Some(s.to_string())
    });
    Publish { token, path }
}

/// The upstream path of a push topic: `template` with the route's parameters as `resource`
/// (`/api/builds/42?x=1` on route `/api/builds/{id}`) gave them, and the resource's query.
pub fn push_path(template: &PathTemplate, route: &PathTemplate, resource: &str) -> String {
    let (path, query) = match resource.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (resource, None),
    };
    let values: Vec<(&str, &str)> = route
        .segments
        .iter()
        .zip(path.split('/').skip(1))
        .filter_map(|(seg, value)| match seg {
            Segment::Param(n) => Some((n.as_str(), value)),
            Segment::Literal(_) => None,
        })
        .collect();
    let mut out = String::with_capacity(resource.len() + 16);
    for seg in &template.segments {
        out.push('/');
        match seg {
            Segment::Literal(l) => out.push_str(l),
            Segment::Param(n) => {
                let v = values.iter().find(|(k, _)| k == n).map_or("", |(_, v)| v);
                out.push_str(v);
            }
        }
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(extra: &str) -> String {
        let text = format!("listen = \"127.0.0.1:0\"\nupstream = \"http://u.test\"\n{extra}");
        match super::super::parse(&text, "proxy.toml") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn source_keys_are_checked_with_their_line() {
        let cases: &[(&str, &str)] = &[
            (
                "[[route]]\npath = \"/a\"\nsource = { kind = \"websocket\" }\n",
                "proxy.toml:5:",
            ),
            (
                "[[route]]\npath = \"/a/{id}\"\nsource = { kind = \"sse\", path = \"/b/{other}\" }\n",
                "proxy.toml:5:33: route \"/a/{id}\" source.path: parameter {other} is not a parameter of the route's path",
            ),
            (
                "[[route]]\npath = \"/a\"\nsource = { kind = \"ndjson\", mode = \"pass\" }\n",
                "proxy.toml:5:36: route \"/a\" source.mode: only kind = \"sse\" takes a mode",
            ),
            (
                "[[route]]\npath = \"/a\"\nsource = { path = \"/b\" }\n",
                "source.path: only push sources",
            ),
            (
                "[[route]]\npath = \"/a\"\ninterval = \"2s\"\nmax_interval = \"1s\"\n",
                "proxy.toml:6:16: route \"/a\" max_interval: must be at least the route's interval",
            ),
            (
                "[polling]\nmax_rate = -1.0\n",
                "proxy.toml:4:12: polling.max_rate: must be a number of requests per second",
            ),
            ("[publish]\ntoken = \"short\"\n", "proxy.toml:4:9: publish.token: must be at least 16"),
            ("[publish]\npath = \"nope\"\n", "proxy.toml:4:8: publish.path: invalid path"),
        ];
        for (extra, want) in cases {
            let got = problems(extra);
            assert!(got.contains(want), "{extra}\n got: {got}\nwant: {want}");
        }
        let ok = "[polling]\nmax_concurrent = 8\nmax_rate = 50.5\n[publish]\ntoken = \"0123456789abcdef\"\n\
                  [[route]]\npath = \"/a/{id}\"\nmax_interval = \"1m\"\nhonor_cache_control = true\n\
                  source = { kind = \"sse\", path = \"/a/{id}/events\", mode = \"pass\" }\n";
        assert_eq!(problems(ok), "");
    }

    #[test]
    fn push_path_substitutes_route_parameters() {
        let route: PathTemplate = "/api/builds/{id}".parse().unwrap();
        let events: PathTemplate = "/api/builds/{id}/events".parse().unwrap();
        assert_eq!(
            push_path(&events, &route, "/api/builds/42?page=2"),
            "/api/builds/42/events?page=2"
        );
        assert_eq!(push_path(&route, &route, "/api/builds/7"), "/api/builds/7");
    }
}
