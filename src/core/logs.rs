//! Rate-limited logging for what a flood can repeat: per-connection and
//! per-packet warnings. Each call site (a fixed key) may log a few lines per
//! second; the rest are counted, and the next line that gets through says
//! how many were suppressed, so a flood neither fills the disk nor goes
//! unnoticed.
//!
//! And one event, one line: [`OneLine`] wraps the log writer so that no
//! string a client controls (a SOCKS user name, a requested host name, an
//! error quoting either) can break a line or forge another: every control
//! character but the event's final newline is written escaped (`\n`,
//! `\r`, `\x1b`, `\u{2028}`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per call site per window.
const BURST: u32 = 10;
/// The window.
const WINDOW: Duration = Duration::from_secs(1);

struct Site {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

static SITES: Mutex<Option<HashMap<&'static str, Site>>> = Mutex::new(None);

/// Whether the call site `key` may log now. `Some(n)`: log, mentioning the
/// `n` lines suppressed since the last one that got through; `None`: skip.
pub fn allow(key: &'static str) -> Option<u64> {
    allow_at(key, Instant::now())
}

fn allow_at(key: &'static str, now: Instant) -> Option<u64> {
    let mut guard = SITES.lock().unwrap_or_else(|e| e.into_inner());
    let sites = guard.get_or_insert_with(HashMap::new);
    let site = sites.entry(key).or_insert(Site {
        window_start: now,
        in_window: 0,
        suppressed: 0,
    });
    if now.saturating_duration_since(site.window_start) >= WINDOW {
        site.window_start = now;
        site.in_window = 0;
    }
    if site.in_window < BURST {
        site.in_window += 1;
        Some(std::mem::take(&mut site.suppressed))
    } else {
        site.suppressed += 1;
        None
    }
}

/// A log writer that keeps each event on one line (see the module doc).
/// `keep_esc`: the formatter colours its output (ANSI), so ESC passes.
#[derive(Debug, Clone, Copy)]
pub struct OneLine<M> {
    inner: M,
    keep_esc: bool,
}

impl<M> OneLine<M> {
    /// Wraps `inner`; with `keep_esc`, ESC passes (coloured output to a terminal).
    pub fn new(inner: M, keep_esc: bool) -> Self {
        Self { inner, keep_esc }
    }
}

/// The writer [`OneLine`] makes for one event.
pub struct OneLineWriter<W> {
    inner: W,
    keep_esc: bool,
}

/// `buf` with every control character but a final newline escaped.
pub fn escape_controls(buf: &[u8], keep_esc: bool) -> std::borrow::Cow<'_, [u8]> {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (buf, &b""[..]),
    };
    let text = String::from_utf8_lossy(body);
    let needs = text.chars().any(|c| needs_escape(c, keep_esc));
    if !needs && matches!(text, std::borrow::Cow::Borrowed(_)) {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c, keep_esc) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            }
        } else {
            out.push(c);
        }
    }
    let mut v = out.into_bytes();
    v.extend_from_slice(end);
    std::borrow::Cow::Owned(v)
}

fn needs_escape(c: char, keep_esc: bool) -> bool {
    match c {
        '\t' => false,
        '\u{1b}' => !keep_esc,
        '\u{85}' | '\u{2028}' | '\u{2029}' => true,
        c => c.is_control(),
    }
}

impl<W: std::io::Write> std::io::Write for OneLineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write_all(&escape_controls(buf, self.keep_esc))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for OneLine<M>
{
    type Writer = OneLineWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter {
            inner: self.inner.make_writer(),
            keep_esc: self.keep_esc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_counted_silence_then_the_count() {
        let t0 = Instant::now();
        let key = "test.flood";
        let passed = (0..100).filter(|_| allow_at(key, t0).is_some()).count();
        assert_eq!(passed, BURST as usize);
        assert_eq!(allow_at(key, t0 + WINDOW), Some(100 - u64::from(BURST)));
        assert_eq!(allow_at(key, t0 + WINDOW), Some(0));
        // Sites are independent.
        assert_eq!(allow_at("test.other", t0), Some(0));
    }

    #[test]
    fn one_event_one_line() {
        let forged = "user=\"x\"\n2026-01-01T00:00:00Z  INFO meshgate::audit: flow ended identity=\"admin\"\r\n";
        let line = format!("INFO socks refused detail={forged} \u{2028}\u{1b}[31m\n");
        let out = escape_controls(line.as_bytes(), false);
        let out = std::str::from_utf8(&out).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(out.ends_with('\n'));
        assert!(!out.contains('\r') && !out.contains('\u{2028}') && !out.contains('\u{1b}'));
        assert!(
            out.contains("\\n2026-01-01") && out.contains("\\r\\n") && out.contains("\\x1b[31m")
        );
        // Coloured output keeps its ESC; plain lines pass untouched.
        assert!(escape_controls(b"\x1b[2mok\x1b[0m\n", true).contains(&0x1b));
        assert!(matches!(
            escape_controls(b"plain\ttext\n", false),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
