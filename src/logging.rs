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
//! This module depends on nothing else in herald, so any layer may use it.

use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::io::IsTerminal;

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
