//! Logging setup. Metric names live in [`metrics`]; the live tap of decisions in [`tap`].

pub mod metrics;
pub mod tap;
pub mod traces;

use crate::config::redact::scrub;
use crate::config::{LogConfig, LogFormat};
use crate::outcome::mask_emails;
use std::borrow::Cow;
use std::fmt;
use std::io::{self, IsTerminal};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the global subscriber: `RUST_LOG` wins over `log.level`; JSON when stdout is
/// not a terminal (or `log.format = "json"`). JSON lines logged inside a traced message's
/// work carry its `trace_id` and `span_id` ([`traces::current_ids`]).
pub fn init_logging(config: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        // Colour codes only for a person at a terminal, never in files or collectors.
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(MaskEmails(std::io::stdout));
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .map_event_format(WithTraceIds)
            .boxed()
    } else {
        fmt.fmt_fields(EscapeControls::default()).boxed()
    };
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    // Already initialised (tests run several apps in one process): keep the first.
    drop(result);
    install_panic_hook();
}

/// A JSON event format whose lines, inside a traced message's work, start with its
/// `trace_id` and `span_id`.
#[derive(Debug)]
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some((trace_id, span_id)) = traces::current_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// Panics also leave one structured log line (with where, not what), so a JSON log
/// pipeline sees them; the default hook then prints as usual.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, "crisp-bridge panicked; this is a bug, please report it");
        default(info);
    }));
}

/// Text-log fields with control characters escaped: a message's `\n` or ESC must not
/// forge a log line or drive the terminal. (JSON escapes them already.)
#[derive(Debug, Default)]
pub struct EscapeControls(DefaultFields);

impl<'w> FormatFields<'w> for EscapeControls {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut raw = String::new();
        self.0.format_fields(Writer::new(&mut raw), fields)?;
        write_escaped(&mut writer, &raw)
    }
}

/// Writes `text` with every control character (C0, DEL, C1) and every character that
/// reorders or breaks lines (U+2028/9, bidi controls) as a visible escape.
fn write_escaped(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    for c in text.chars() {
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                write!(out, "\\u{{{:x}}}", c as u32)?
            }
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

/// Log output with every remembered secret and URL password removed (see
/// [`crate::config::redact`]), then every email-like word masked, whatever field or
/// message holds them. The fmt layer hands each formatted event over in one write, so
/// nothing is split. Secrets go first: masking an email-like `pass@host` first would
/// leave the start of the password.
#[derive(Debug, Clone)]
pub struct MaskEmails<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for MaskEmails<M> {
    type Writer = MaskingWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        MaskingWriter(self.0.make_writer())
    }
}

pub struct MaskingWriter<W>(W);

impl<W: io::Write> io::Write for MaskingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Ok(text) = std::str::from_utf8(buf) else {
            return self.0.write(buf);
        };
        let scrubbed = scrub(text);
        if scrubbed.contains('@') {
            self.0.write_all(mask_emails(&scrubbed).as_bytes())?;
            Ok(buf.len())
        } else if let Cow::Owned(scrubbed) = scrubbed {
            self.0.write_all(scrubbed.as_bytes())?;
            Ok(buf.len())
        } else {
            self.0.write(buf)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn log_text(emit: impl FnOnce()) -> String {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(MaskEmails(out.clone()))
            .fmt_fields(EscapeControls::default())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        out.text()
    }

    fn log_json(emit: impl FnOnce()) -> String {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(MaskEmails(out.clone()))
            .json()
            .flatten_event(true)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        out.text()
    }

    const FORGED: &str =
        "x\n{\"level\":\"ERROR\",\"fields\":{\"message\":\"forged\"}}\r\u{1b}[31mred\u{9b}";

    #[test]
    fn text_logs_escape_control_characters_in_fields_and_messages() {
        let text = log_text(|| {
            let detail = FORGED;
            tracing::warn!(detail = %detail, debug = ?detail, "dead-lettered {}", detail);
            tracing::info_span!("span", key = %detail).in_scope(|| tracing::info!("inside"));
        });
        assert_eq!(text.lines().count(), 2, "one line per event:\n{text}");
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "raw control characters: {text:?}"
        );
        assert!(text.contains("x\\n{\"level\""), "{text}");
        assert!(text.contains("\\u{1b}[31m"), "{text}");
    }

    #[test]
    fn logs_hold_no_remembered_secret_and_no_url_password() {
        crate::config::redact::remember_url("amqp:guest:T3lem=\"canary\"@host");
        let emit = || {
            tracing::warn!(error = %"Invalid URL: 'amqp:guest:T3lem=\"canary\"@host:1/%2f'", "cannot connect");
            tracing::warn!(uri = ?("guest", "T3lem=\"canary\""), "Connecting.");
            tracing::warn!("unknown password of amqps://u:Unremembered-pw@h/%2f");
        };
        for out in [log_text(emit), log_json(emit)] {
            assert_eq!(out.lines().count(), 3, "{out}");
            for leak in ["T3lem", "canary", "Unremembered"] {
                assert!(!out.contains(leak), "{leak} in {out}");
            }
            assert!(out.contains("amqps://u:***@h/%2f"), "{out}");
        }
    }

    #[test]
    fn logs_mask_every_email() {
        let emit = || {
            let id = "x@jane.doe@example.com";
            tracing::warn!(people_id = %id, "rejected jane.doe@example.com");
        };
        for out in [log_text(emit), log_json(emit)] {
            assert!(!out.contains("jane"), "{out}");
            assert!(out.contains("x***@example.com"), "{out}");
            assert!(out.contains("j***@example.com"), "{out}");
        }
        let json = log_json(|| tracing::warn!(detail = FORGED, "m"));
        assert_eq!(json.lines().count(), 1, "{json}");
        let line: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(line["detail"], FORGED);
    }
}
