//! Text that came from devices, functions or bundles, made safe to print.
//!
//! A topic, a payload, a guest's log line or error text can hold control
//! characters: an escape sequence printed raw to an operator's terminal
//! can move the cursor, rewrite what is on screen, retitle the window or,
//! on some terminals, answer back as if typed. Wherever edgefn prints such
//! text (the CLI's tables, `edgefn invoke`, log fields) it goes through
//! [`Printable`], which writes every control character (C0, DEL, C1) and
//! every bidirectional-override character as a visible escape: `\x1b`,
//! `\u{202e}`. Everything else is written as it is.

use std::borrow::Cow;
use std::fmt;

/// Displays the text with its control characters escaped (see the module
/// doc).
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(needs_escape) {
            f.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().expect("found at i");
            if (c as u32) < 0x80 {
                write!(f, "\\x{:02x}", c as u32)?;
            } else {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            }
            rest = &rest[i + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// `text` with its control characters escaped; borrowed when it has none.
pub fn printable(text: &str) -> Cow<'_, str> {
    if text.contains(needs_escape) {
        Cow::Owned(Printable(text).to_string())
    } else {
        Cow::Borrowed(text)
    }
}

/// Bytes that should be text (a payload, a topic), lossily decoded and
/// escaped.
pub fn printable_bytes(bytes: &[u8]) -> String {
    printable(&String::from_utf8_lossy(bytes)).into_owned()
}

/// A size in bytes as the configuration writes it: `"16MiB"` when whole
/// mebibytes, else `"16.5MiB"` (one decimal, rounded up), `"512KiB"` below
/// one mebibyte.
pub fn mib(bytes: usize) -> String {
    const MIB: u64 = 1 << 20;
    let bytes = bytes as u64;
    if bytes.is_multiple_of(MIB) {
        format!("{}MiB", bytes / MIB)
    } else if bytes < MIB {
        format!("{}KiB", bytes.div_ceil(1024))
    } else {
        let tenths = (bytes * 10).div_ceil(MIB);
        format!("{}.{}MiB", tenths / 10, tenths % 10)
    }
}

/// Whether `c` is written as an escape.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            printable("sensors/\u{1b}]0;pwned\u{7}/temp\u{1b}[2J"),
            "sensors/\\x1b]0;pwned\\x07/temp\\x1b[2J"
        );
        assert_eq!(
            printable("a\nb\tc\u{7f}\u{9b}"),
            "a\\x0ab\\x09c\\x7f\\u{9b}"
        );
        assert_eq!(printable("admin\u{202e}txt.exe"), "admin\\u{202e}txt.exe");
        assert!(matches!(printable("température 25°C ✓"), Cow::Borrowed(_)));
        assert_eq!(printable_bytes(b"ok\x1b[31m\xff"), "ok\\x1b[31m\u{fffd}");
    }

    #[test]
    fn sizes_are_written_in_mebibytes() {
        assert_eq!(mib(16 << 20), "16MiB");
        assert_eq!(mib((16 << 20) + (1 << 19)), "16.5MiB");
        assert_eq!(mib((16 << 20) + 1), "16.1MiB");
        assert_eq!(mib(512 << 10), "512KiB");
    }
}
