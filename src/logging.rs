//! How herald logs: the subscriber `main` installs (`init`), text or JSON on stderr, its level from
//! `RUST_LOG` (default `info`).
//!
//! Two rules hold for every line, whatever the call site logs:
//! - **One event, one line.** Values come from clients (paths, watched resources, query strings,
//!   header-derived text), so in the text format every value (messages and fields, of events and
//!   spans) is escaped: CR, LF, tab, every other C0 and C1 control, DEL (and so ANSI `ESC`) and
//!   the Unicode line and paragraph separators are written as `\n`, `\r`, `\t` or `\u{..}`. A
//!   value can then never start a line of its own, or forge one. The JSON format escapes by
//!   construction.
//! - **Colour only for a person.** ANSI colours are used only when stderr is a terminal and
//!   `NO_COLOR` is unset or empty (<https://no-color.org>); files, pipes and journald get plain
//!   text.
//!
//! The access log is here too: an [`AccessRecord`] per pass-through request, on target
//! `herald::access` at INFO (`[log] access`), written when the response body ends or is dropped.
//!
//! From the rest of herald this module uses only `admin::observe::redact` (text in, text out), so
//! any layer may use it.

use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The log line format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One human-readable line per event (values escaped; colours on a terminal).
    Text,
    /// One JSON object per line, event fields flattened into it.
    Json,
}

/// Install the process-wide subscriber: `format` on stderr, the level from `RUST_LOG` (default
/// `info`), colour only when stderr is a terminal and `NO_COLOR` is not set. `log` records (from
/// dependencies) go through it too. Fails if a subscriber is already installed.
pub fn init(format: Format) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let color = use_color(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    subscriber(format, filter, color, std::io::stderr).try_init()?;
    Ok(())
}

/// Whether to colour log lines: on a terminal, unless `NO_COLOR` holds a non-empty value.
pub fn use_color(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

/// The subscriber `init` installs, writing to `writer` (tests capture its output).
pub fn subscriber<W>(format: Format, filter: EnvFilter, color: bool, writer: W) -> tracing::Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        Format::Text => builder
            .with_ansi(color)
            .fmt_fields(EscapedFields)
            .finish()
            .into(),
        // serde_json escapes every control character; JSON lines are never coloured.
        Format::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .finish()
            .into(),
    }
}

/// The text format's fields, as tracing-subscriber's default formats them (`message` first and
/// bare, then `name=value` with values in their `Debug` form), with every value escaped (see the
/// module doc) and the names, separators and colours left alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapedVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> EscapedVisitor<'a> {
        EscapedVisitor {
            writer,
            empty: true,
            result: Ok(()),
        }
    }
}

/// Writes one event's (or span's) fields; see [`EscapedFields`].
pub struct EscapedVisitor<'a> {
    writer: Writer<'a>,
    /// Nothing written yet: no separating space before the first field.
    empty: bool,
    result: fmt::Result,
}

impl EscapedVisitor<'_> {
    fn field(&mut self, name: &str, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        // `log` records carry their metadata as `log.*` fields, already shown in the line head.
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let ansi = self.writer.has_ansi_escapes();
        self.result = (|| {
            if !self.empty {
                self.writer.write_char(' ')?;
            }
            self.empty = false;
            if name != "message" {
                // Italic name, dimmed `=`: the default format's styling.
                match ansi {
                    true => write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?,
                    false => write!(self.writer, "{name}=")?,
                }
            }
            Escaping(&mut self.writer).write_fmt(value)
        })();
    }
}

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // The message bare, other strings quoted (as the default format writes them).
        match field.name() {
            "message" => self.field("message", format_args!("{value}")),
            name => self.field(name, format_args!("{value:?}")),
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field.name(), format_args!("{value}"));
        let mut sources = Vec::new();
        let mut source = value.source();
        while let Some(s) = source {
            sources.push(s.to_string());
            source = s.source();
        }
        if !sources.is_empty() {
            let name = format!("{}.sources", field.name());
            self.field(&name, format_args!("{sources:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field.name(), format_args!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for EscapedVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapedVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// A `fmt::Write` that escapes what could break or forge a line (see the module doc).
struct Escaping<W>(W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Runs of ordinary text are written whole; only the characters to escape are split out.
        let mut rest = s;
        while let Some(i) = rest.find(needs_escape) {
            let (plain, tail) = rest.split_at(i);
            self.0.write_str(plain)?;
            let mut chars = tail.chars();
            let c = chars.next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = chars.as_str();
        }
        self.0.write_str(rest)
    }
}

/// C0 and C1 controls and DEL (`char::is_control`), and the line and paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// An error and its sources for a log line, `outer: inner: root`; a source whose text its
/// parent already shows is skipped. For a `reqwest::Error`, pass `e.without_url()`: its URL can
/// carry credentials in its query.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// One request as the access log writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessRecord {
    pub method: Method,
    /// Path and query as requested, the values of credential-like query parameters replaced by
    /// `***` (`admin::observe::redact`).
    pub path: String,
    pub status: u16,
    /// Response body bytes sent to the client (after compression).
    pub bytes: u64,
    /// From the request reaching herald to the end of its response body (or the client leaving).
    pub duration: Duration,
    /// From the request reaching herald to the upstream's response head (or to giving up on it).
    pub upstream: Option<Duration>,
    pub protocol: Version,
    pub peer: SocketAddr,
}

/// Milliseconds, to the microsecond.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

impl AccessRecord {
    /// Write the record: on target `herald::access` at INFO, with typed fields in JSON
    /// (`status`, `bytes` integers; `duration_ms`, `upstream_ms` numbers).
    pub fn emit(&self) {
        tracing::info!(
            target: "herald::access",
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes = self.bytes,
            duration_ms = millis(self.duration),
            upstream_ms = self.upstream.map(millis),
            protocol = ?self.protocol,
            peer = %self.peer,
        );
    }
}

/// The body type of herald's responses (`server::ResponseBody`).
pub type AccessBodyInner = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A request's access record in the making: started when the request arrives, finished by
/// [`Access::wrap`] around its response. A no-op when the access log is off.
#[derive(Debug)]
pub struct Access(Option<(AccessRecord, Instant)>);

impl Access {
    /// The request arrived (its head read): note what it asks and when.
    pub fn start<B>(req: &Request<B>, peer: SocketAddr, enabled: bool) -> Access {
        Access(enabled.then(|| {
            let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            let record = AccessRecord {
                method: req.method().clone(),
                path: crate::telemetry::redact(target),
                status: 0,
                bytes: 0,
                duration: Duration::ZERO,
                upstream: None,
                protocol: req.version(),
                peer,
            };
            (record, Instant::now())
        }))
    }

    /// The upstream has answered (or failed) with `resp`: its record is written when the
    /// response body ends or is dropped, so `bytes` and `duration` are what the client got.
    pub fn wrap(self, resp: Response<AccessBodyInner>) -> Response<AccessBodyInner> {
        let Some((mut record, started)) = self.0 else {
            return resp;
        };
        record.status = resp.status().as_u16();
        record.upstream = Some(started.elapsed());
        resp.map(|body| {
            AccessBody {
                body,
                record: Some(record),
                started,
            }
            .boxed_unsync()
        })
    }
}

/// A response body that counts what it sends and writes its access record at its end.
struct AccessBody {
    body: AccessBodyInner,
    /// Taken when written, so it is written once.
    record: Option<AccessRecord>,
    started: Instant,
}

impl AccessBody {
    fn finish(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.duration = self.started.elapsed();
            record.emit();
        }
    }
}

impl Body for AccessBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(r) = &mut self.record {
                    r.bytes += n;
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for AccessBody {
    /// A body hyper never polls to its end (empty, HEAD, a client gone) is logged here.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `MakeWriter` that keeps everything written, for reading back.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn logged(format: Format, color: bool, f: impl FnOnce()) -> String {
        let out = Capture::default();
        let dispatch = subscriber(format, EnvFilter::new("info"), color, out.clone());
        tracing::dispatcher::with_default(&dispatch, f);
        out.text()
    }

    const FORGED: &str = "/a?q=x\n2025-01-01T00:00:00Z  INFO herald::admin::reload: config reloaded\r\x1b[31mred\u{85}\u{2028}";

    #[test]
    fn a_value_with_line_breaks_stays_on_one_line() {
        let text = logged(Format::Text, false, || {
            let span = tracing::info_span!("poller", topic = %FORGED);
            let _in = span.enter();
            tracing::warn!(
                path = %FORGED,
                quoted = FORGED,
                debug = ?FORGED,
                error = &std::io::Error::other(FORGED) as &(dyn std::error::Error + 'static),
                "{FORGED}"
            );
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        assert!(
            !text.contains(['\r', '\x1b', '\u{85}', '\u{2028}']),
            "{text:?}"
        );
        assert!(
            text.contains("poller{topic=/a?q=x\\n2025-01-01T00:00:00Z  INFO herald::admin::reload: config reloaded\\r\\u{1b}[31mred\\u{85}\\u{2028}}"),
            "{text}"
        );
        // The field names and the message keep their place; only values changed.
        assert!(text.contains(" path=/a?q=x\\n2025"), "{text}");
        assert!(text.contains(" quoted=\"/a?q=x\\n2025"), "{text}");
        assert!(text.contains(" debug=\"/a?q=x\\n2025"), "{text}");
        assert!(text.contains(" error=/a?q=x\\n2025"), "{text}");
        assert!(text.contains(": /a?q=x\\n2025"), "{text}");
    }

    #[test]
    fn json_lines_are_one_line_and_plain() {
        let text = logged(Format::Json, true, || {
            tracing::info!(path = %FORGED, bytes = 12u64, "{FORGED}");
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["path"], FORGED);
        assert_eq!(v["bytes"], 12);
        assert!(!text.contains('\x1b'), "{text:?}");
    }

    #[test]
    fn colour_is_for_terminals_without_no_color() {
        assert!(use_color(true, None));
        assert!(use_color(true, Some(OsStr::new(""))));
        assert!(!use_color(true, Some(OsStr::new("1"))));
        assert!(!use_color(true, Some(OsStr::new("0"))));
        assert!(!use_color(false, None));
        // And with colour off, no escape code at all; with it on, names are styled.
        let plain = logged(Format::Text, false, || tracing::info!(a = 1, "m"));
        assert!(!plain.contains('\x1b'), "{plain:?}");
        let styled = logged(Format::Text, true, || tracing::info!(a = 1, "m"));
        assert!(
            styled.contains("\x1b[3ma\x1b[0m\x1b[2m=\x1b[0m1"),
            "{styled:?}"
        );
    }

    fn record() -> AccessRecord {
        AccessRecord {
            method: Method::GET,
            path: "/a?token=***".into(),
            status: 502,
            bytes: 17,
            duration: Duration::from_micros(1500),
            upstream: Some(Duration::from_micros(1200)),
            protocol: Version::HTTP_11,
            peer: "127.0.0.1:5000".parse().unwrap(),
        }
    }

    #[test]
    fn access_records_in_text_and_typed_json() {
        let text = logged(Format::Text, false, || record().emit());
        assert!(
            text.ends_with(" INFO herald::access: method=GET path=/a?token=*** status=502 bytes=17 duration_ms=1.5 upstream_ms=1.2 protocol=HTTP/1.1 peer=127.0.0.1:5000\n"),
            "{text}"
        );
        let json = logged(Format::Json, false, || record().emit());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["target"], "herald::access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/a?token=***");
        assert_eq!(v["status"], 502);
        assert_eq!(v["bytes"], 17);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["upstream_ms"], 1.2);
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["peer"], "127.0.0.1:5000");
    }

    fn response(body: &'static str) -> Response<AccessBodyInner> {
        Response::new(
            http_body_util::Full::new(Bytes::from(body))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
    }

    #[tokio::test]
    async fn a_response_is_logged_once_with_what_was_sent() {
        let out = Capture::default();
        let dispatch = subscriber(Format::Json, EnvFilter::new("info"), false, out.clone());
        let _default = tracing::dispatcher::set_default(&dispatch);
        let peer: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let req = Request::post("/x?access%5Ftoken=s&page=2")
            .body(())
            .unwrap();

        // Read to the end: logged then, with the bytes read.
        let resp = Access::start(&req, peer, true).wrap(response("hello"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        // Dropped unread (a client gone, a HEAD): logged when dropped, with nothing sent.
        drop(Access::start(&req, peer, true).wrap(response("unread")));
        // Access log off: nothing.
        let resp = Access::start(&req, peer, false).wrap(response("off"));
        resp.into_body().collect().await.unwrap();

        let text = out.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["bytes"], 5);
        assert_eq!(lines[1]["bytes"], 0);
        for l in &lines {
            assert_eq!(l["method"], "POST");
            assert_eq!(l["path"], "/x?access%5Ftoken=***&page=2");
            assert_eq!(l["status"], 200);
            assert_eq!(l["peer"], "10.0.0.1:4000");
            assert!(l["upstream_ms"].as_f64().unwrap() <= l["duration_ms"].as_f64().unwrap());
        }
    }

    #[test]
    fn error_chains_read_outer_to_root() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("tcp connect error"));
        assert_eq!(error_chain(&e), "error sending request: tcp connect error");
        assert_eq!(error_chain(&e.0), "tcp connect error");
    }

    fn escape(text: &str) -> String {
        let mut out = String::new();
        Escaping(&mut out).write_str(text).unwrap();
        out
    }

    #[test]
    fn escape_keeps_ordinary_text() {
        assert_eq!(escape("/api/builds/1?q=é ü"), "/api/builds/1?q=é ü");
        assert_eq!(escape("a\nb\tc\u{7f}\u{9b}"), "a\\nb\\tc\\u{7f}\\u{9b}");
    }
}
