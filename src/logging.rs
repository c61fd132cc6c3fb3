//! Where log lines go: a writer thread of their own with a bounded queue, so a request's
//! access-log line costs its worker a copy into the queue, never a wait for stdout (a slow
//! terminal, a full pipe, a log collector that stalls). Lines are written in batches: the
//! thread drains the queue into a buffer and flushes it once the queue is empty. When the queue
//! is full, lines are dropped and counted (`pullthrough_log_lines_dropped_total`) rather than
//! blocking a worker.

use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use tracing::Level;
use tracing::field::{Field, Visit};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

/// Lines waiting for the writer thread at most. The queue is allocated whole at startup (about
/// 32 bytes a line: 128 KiB here), so it is sized for idle memory; the writer drains it in
/// batches far faster than 4,096 lines arrive.
pub const QUEUED_LINES: usize = 4096;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The writer for standard output, and the guard that flushes what is queued when dropped
/// (keep it until the process ends).
pub fn stdout() -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("pullthrough-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// Log lines dropped since start because the writer thread's queue was full.
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// The target of the access-log event.
const ACCESS_TARGET: &str = "pullthrough::http::observe";

/// The fields of spans and events, written as tracing-subscriber's `DefaultFields` writes them
/// (the same bytes), without its `Debug` formatting of every value and painting of every part,
/// when there is no colour. Every request's span (its `request_id`) is formatted once, when it
/// is made.
#[derive(Debug, Default)]
pub struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        // Gathered first: a span's fields go to a `String` of their own, which then grows
        // once rather than at every doubling.
        let mut gathered = Gathered {
            out: &mut writer,
            text: [0; GATHERED],
            len: 0,
        };
        let mut inner = Writer::new(&mut gathered);
        let mut visitor = Fields {
            writer: &mut inner,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result.and_then(|()| gathered.flush())
    }
}

/// Bytes [`Gathered`] holds before it writes them on.
const GATHERED: usize = 256;

/// Text gathered on the stack and written on in one piece (in more only when it is longer
/// than [`GATHERED`]).
struct Gathered<'a, 'w> {
    out: &'a mut Writer<'w>,
    text: [u8; GATHERED],
    len: usize,
}

impl Gathered<'_, '_> {
    fn flush(&mut self) -> fmt::Result {
        let len = std::mem::take(&mut self.len);
        // Whole `str`s were copied in, so this is UTF-8.
        let text = std::str::from_utf8(&self.text[..len]).map_err(|_| fmt::Error)?;
        self.out.write_str(text)
    }
}

impl fmt::Write for Gathered<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > GATHERED {
            self.flush()?;
            if s.len() > GATHERED {
                return self.out.write_str(s);
            }
        }
        self.text[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

/// Where access-log lines are written directly ([`AccessLine::log`]), when log
/// lines are plain text without colour: the writer every other line goes to.
static DIRECT: OnceLock<NonBlocking> = OnceLock::new();

/// Access-log lines from now on skip `tracing` and go straight to `writer`, formatted exactly
/// as tracing-subscriber's default format writes the access-log event. Only for a subscriber
/// that writes plain text in that format without colour to `writer`.
pub fn write_access_lines_to(writer: NonBlocking) {
    let _ = DIRECT.set(writer);
}

/// One request's access-log line: the event `http::observe` makes at the end of a request,
/// inside its `request` span. When `main` chose plain text, [`AccessLine::log`] writes the
/// event's bytes without making it: no event dispatch, no field visitor, no span lookup (the
/// request id is at hand).
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub upstream: Option<&'a str>,
    pub cache: &'a str,
    pub upstream_ms: Option<f64>,
    pub elapsed_ms: f64,
}

impl AccessLine<'_> {
    /// Logs the line: straight to the direct writer when there is one, else as the access-log
    /// event in `span` (the request's), for JSON, colour, and tests with a subscriber of their
    /// own. The caller has checked that `INFO` is enabled for the event's target and
    /// fields ([`AccessLine::enabled`]).
    pub fn log(&self, span: &tracing::Span) {
        use std::io::Write as _;
        thread_local! {
            static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let Some(writer) = DIRECT.get() else {
            return span.in_scope(|| self.emit());
        };
        LINE.with_borrow_mut(|line| {
            line.clear();
            if self.render(line).is_ok() {
                // A full queue drops the line and counts it, as for every other line.
                let _ = writer.clone().write_all(line.as_bytes());
            }
        });
    }

    /// Whether the filter lets the access-log event through (its level, target and fields).
    pub fn enabled() -> bool {
        tracing::enabled!(
            target: ACCESS_TARGET,
            Level::INFO,
            message,
            method,
            path,
            status,
            upstream,
            cache,
            upstream_ms,
            elapsed_ms
        )
    }

    /// The access-log event.
    fn emit(&self) {
        tracing::info!(
            target: ACCESS_TARGET,
            method = tracing::field::display(self.method),
            path = self.path,
            status = self.status,
            upstream = self.upstream,
            cache = self.cache,
            upstream_ms = self.upstream_ms,
            elapsed_ms = self.elapsed_ms,
            "request"
        );
    }

    /// The line as the default format writes the event, timestamp and newline included,
    /// pushed straight onto `line` (no `Writer` between: every piece is a `push_str`).
    fn render(&self, line: &mut String) -> fmt::Result {
        write!(
            line,
            "{} ",
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
        )?;
        push_quoted(line, " INFO request{request_id=", self.request_id)?;
        line.push_str("}: ");
        line.push_str(ACCESS_TARGET);
        // `%method`: its `Display` form, unquoted.
        line.push_str(": request method=");
        line.push_str(self.method);
        push_quoted(line, " path=", self.path)?;
        line.push_str(" status=");
        line.push_str(itoa::Buffer::new().format(self.status));
        if let Some(upstream) = self.upstream {
            push_quoted(line, " upstream=", upstream)?;
        }
        push_quoted(line, " cache=", self.cache)?;
        if let Some(ms) = self.upstream_ms {
            write!(line, " upstream_ms={ms:?}")?;
        }
        writeln!(line, " elapsed_ms={:?}", self.elapsed_ms)
    }
}

/// Whether `Debug` writes `value` as it is between quotes: printable ASCII without `"` or `\`.
/// Every byte is looked at (no early exit), so the loop runs on vectors.
fn plain(value: &str) -> bool {
    value.bytes().fold(true, |plain, b| {
        plain & (b' '..=b'~').contains(&b) & (b != b'"') & (b != b'\\')
    })
}

/// `before`, then `value` in `Debug` form: in quotes, escaped when it needs it.
fn push_quoted(line: &mut String, before: &str, value: &str) -> fmt::Result {
    line.push_str(before);
    if plain(value) {
        line.push('"');
        line.push_str(value);
        line.push('"');
        Ok(())
    } else {
        write!(line, "{value:?}")
    }
}

/// Writes an event's fields as the default formatter does: `message` first as it is (with
/// terminal control characters escaped), then `name=value` with values in `Debug` form.
struct Fields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// The separating space and `name=`, or nothing but the space for the message.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name == "message" {
            return self.separate();
        }
        // A raw identifier (`r#type`) is written without its prefix.
        self.start_named(name.strip_prefix("r#").unwrap_or(name))
    }

    /// The space before every field but the first.
    fn separate(&mut self) -> bool {
        if self.result.is_ok() && !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(' ');
        }
        self.result.is_ok()
    }

    /// The separating space and `name=`.
    fn start_named(&mut self, name: &str) -> bool {
        if self.separate() {
            self.result = self
                .writer
                .write_str(name)
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }

    /// A `str` field that is not the message: in quotes, or in `Debug` form when it needs
    /// escaping.
    fn str_named(&mut self, name: &str, value: &str) {
        // `Debug` of a string that needs no escaping is the string in quotes.
        if !self.start_named(name) {
            return;
        }
        self.result = if plain(value) {
            self.writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'))
        } else {
            write!(self.writer, "{value:?}")
        };
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.record_debug(field, &format_args!("{value}"));
        }
        let name = field.name();
        self.str_named(name.strip_prefix("r#").unwrap_or(name), value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.result = write!(self.writer, "{value}");
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = write!(self.writer, "{value}");
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.start(field) {
            return;
        }
        self.result = write!(Escaping(&mut *self.writer), "{value}");
        let mut source = value.source();
        if source.is_some() {
            self.result = self
                .result
                .and_then(|()| write!(self.writer, " {}.sources=[", field.name()));
        }
        // The error's sources, from the first: `[a, b]`.
        let mut separator = "";
        while let Some(error) = source {
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(separator))
                .and_then(|()| write!(Escaping(&mut *self.writer), "{error}"));
            separator = ", ";
            source = error.source();
        }
        if value.source().is_some() {
            self.result = self.result.and_then(|()| self.writer.write_char(']'));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            // The default formatter writes a `str` message through `Display`, and escapes
            // terminal control characters in it.
            if self.start(field) {
                self.result = write!(Escaping(&mut *self.writer), "{value:?}");
            }
            return;
        }
        if self.start(field) {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

/// Escapes terminal control characters as the default formatter does in messages.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                ch if ('\u{80}'..='\u{9f}').contains(&ch) => {
                    write!(self.0, "\\u{{{:x}}}", u32::from(ch))?;
                }
                ch => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::FormatEvent;
    use tracing_subscriber::fmt::format::Format;

    /// Lines written through a subscriber with `format`, for the events `emit` makes.
    fn lines<F, N>(format: F, fields: N, emit: impl Fn()) -> Vec<String>
    where
        F: FormatEvent<tracing_subscriber::Registry, N> + Send + Sync + 'static,
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&out);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(Level::TRACE)
            .fmt_fields(fields)
            .event_format(format)
            .with_writer(move || Capture(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

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

    #[derive(Debug)]
    struct Failure(&'static str, Option<Box<Failure>>);

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Failure {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    /// Paths that need quoting and escaping, or are empty.
    const AWKWARD_PATHS: [&str; 7] = [
        "/v2/library/alpine/manifests/3.20",
        "/v2/a/tags/list?n=10&last=b",
        "/v2/\"quoted\"/back\\slash",
        // The edges of what `Debug` writes as it is (' ', '\'', '~'), and just past them.
        "/v2/it's ~ fine",
        "/v2/del\u{7f}",
        "/v2/caf\u{e9}/\u{1b}[31mred\t\u{85}",
        "",
    ];

    /// Access-log events as `http::observe` writes them, with awkward values, and a few
    /// fields of other kinds.
    fn access_events() {
        let method = axum::http::Method::GET;
        let paths = AWKWARD_PATHS;
        let span = tracing::info_span!("request", request_id = "5f0c2a");
        let _entered = span.enter();
        for (i, path) in paths.into_iter().enumerate() {
            let upstream = (i % 2 == 0).then_some("registry-1.docker.io");
            let upstream_ms = (i % 3 == 0).then_some(12.5_f64);
            tracing::info!(
                target: ACCESS_TARGET,
                %method,
                path,
                status = 200_u16,
                upstream,
                cache = "HIT",
                upstream_ms,
                elapsed_ms = 1.0_f64 / (i as f64 + 1.0),
                "request"
            );
        }
        let chain = Failure("outer", Some(Box::new(Failure("in\u{1b}ner", None))));
        tracing::warn!(
            target: ACCESS_TARGET,
            r#type = "x",
            negative = -3_i64,
            yes = true,
            error = &chain as &(dyn std::error::Error + 'static),
            single = &Failure("alone", None) as &(dyn std::error::Error + 'static),
            "a \u{1b}[0m message {}",
            7
        );
        // Other events: the default format with these fields.
        tracing::info!(
            repo = "a/b",
            tag = "x\"y",
            count = 3_u64,
            ratio = 0.5_f64,
            "tag moved"
        );
        drop(_entered);
        // Span fields longer than what is gathered before it is written on.
        let long = "x".repeat(300);
        let outer = tracing::info_span!("outer", id = 7_u64, name = "n\u{e9}", long, more = %long);
        let _outer = outer.enter();
        tracing::warn!(error = %"upstream said \"no\"", "request failed");
        drop(_outer);
        tracing::info!(target: ACCESS_TARGET, "outside any span");
    }

    #[test]
    fn a_direct_access_line_is_the_line_the_event_makes() {
        let paths = AWKWARD_PATHS;
        let ids = ["5f0c2a", "with\"quote", "back\\slash"];
        let lines_of = |i: usize| AccessLine {
            request_id: ids[i % ids.len()],
            method: ["GET", "HEAD", "DELETE"][i % 3],
            path: paths[i],
            status: [200, 404, 503][i % 3],
            upstream: i.is_multiple_of(2).then_some("registry-1.docker.io"),
            cache: ["HIT", "-", "MISS"][i % 3],
            upstream_ms: i.is_multiple_of(3).then_some(12.5),
            elapsed_ms: [1.0, 0.123, 1234.567, 1e-3, 0.0, 7e22, 0.5][i],
        };
        let events = lines(Format::default(), PlainFields, || {
            for i in 0..paths.len() {
                let line = lines_of(i);
                let span = tracing::info_span!("request", request_id = line.request_id);
                // No direct writer is set in tests: this is the event.
                line.log(&span);
            }
        });
        assert_eq!(events.len(), paths.len());
        for (i, event) in events.iter().enumerate() {
            let mut direct = String::new();
            lines_of(i).render(&mut direct).unwrap();
            let direct = direct.strip_suffix('\n').unwrap();
            let (direct_time, direct_rest) = direct.split_once(' ').unwrap();
            let (event_time, event_rest) = event.split_once(' ').unwrap();
            assert_eq!(direct_rest, event_rest);
            assert_eq!(direct_time.len(), event_time.len());
            humantime::parse_rfc3339(direct_time).unwrap();
        }
        assert!(
            events[1].contains("request{request_id=\"with\\\"quote\"}"),
            "{}",
            events[1]
        );
    }

    #[test]
    fn the_line_is_filtered_as_the_access_event_is() {
        let enabled = |directives: &str| {
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(directives))
                .with_writer(std::io::sink)
                .finish();
            tracing::subscriber::with_default(subscriber, AccessLine::enabled)
        };
        assert!(enabled("pullthrough=info"));
        assert!(enabled("pullthrough::http=info,warn"));
        assert!(!enabled("pullthrough=warn"));
        assert!(!enabled("pullthrough=info,pullthrough::http::observe=warn"));
        // A directive on the event's fields.
        assert!(!enabled(
            "pullthrough=info,pullthrough::http::observe[{path}]=warn"
        ));
    }

    #[test]
    fn plain_fields_are_written_exactly_as_the_default_fields_are() {
        let default = lines(Format::default(), DefaultFields::new(), access_events);
        let fast = lines(Format::default(), PlainFields, access_events);
        assert_eq!(default.len(), 11);
        assert_eq!(fast.len(), default.len());
        for (fast, default) in fast.iter().zip(&default) {
            // The same line after the timestamp, and a timestamp of the same form.
            let (fast_time, fast_rest) = fast.split_once(' ').unwrap();
            let (default_time, default_rest) = default.split_once(' ').unwrap();
            assert_eq!(fast_rest, default_rest);
            assert_eq!(
                fast_time.len(),
                default_time.len(),
                "{fast_time} {default_time}"
            );
            humantime::parse_rfc3339(fast_time).unwrap();
        }
        assert!(
            fast[0].ends_with(
                " INFO request{request_id=\"5f0c2a\"}: pullthrough::http::observe: request method=GET path=\"/v2/library/alpine/manifests/3.20\" status=200 upstream=\"registry-1.docker.io\" cache=\"HIT\" upstream_ms=12.5 elapsed_ms=1.0"
            ),
            "{}",
            fast[0]
        );
    }
}
