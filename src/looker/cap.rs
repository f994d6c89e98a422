//! Caps the length of every JSON string in a byte stream before the parser sees it, so a
//! 20 MiB cell costs no more memory than a short one.
//!
//! A string longer than the cap is cut at a character boundary outside any escape and
//! closed there; the rest of it is skipped. The cap is far above anything the export keeps
//! (identifiers up to 987 bytes, attributes up to 255 characters), so a cut string is still
//! recognised as too long by the mapping and reported by row number.

use std::io::{self, Read};

/// Longest string the parser sees, in bytes.
pub const MAX_STRING_BYTES: usize = 64 * 1024;

/// Where the filter is in the JSON text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Between strings.
    Outside,
    /// Inside a string, copying.
    Copy,
    /// Inside a string past the cap, dropping bytes until it ends.
    Skip,
}

/// A [`Read`] adapter that cuts long JSON strings (see the module header).
pub struct CapStrings<R> {
    inner: R,
    cap: usize,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    mode: Mode,
    /// Bytes of the current string copied so far.
    len: usize,
    /// The previous byte was a backslash.
    escape: bool,
    /// Hex digits still to come in a `\uXXXX` escape.
    hex_left: u8,
    /// Hex digits of the current `\u` escape seen so far (to spot a high surrogate).
    hex: [u8; 2],
    /// The last escape was a high surrogate, whose low half must not be cut off.
    high_surrogate: bool,
    /// The string being cut needs its closing quote written.
    close_pending: bool,
}

impl<R: Read> CapStrings<R> {
    /// Wraps `inner`, cutting strings longer than `cap` bytes.
    pub fn new(inner: R, cap: usize) -> Self {
        Self {
            inner,
            cap,
            buf: vec![0; 64 * 1024].into_boxed_slice(),
            pos: 0,
            end: 0,
            mode: Mode::Outside,
            len: 0,
            escape: false,
            hex_left: 0,
            hex: [0; 2],
            high_surrogate: false,
            close_pending: false,
        }
    }

    /// True when the string may be cut before byte `b`: past the cap, not inside an escape,
    /// at the start of a character, and not between the halves of a surrogate pair.
    fn may_cut(&self, b: u8) -> bool {
        self.len >= self.cap
            && !self.escape
            && self.hex_left == 0
            && (b & 0xC0) != 0x80
            && !(b == b'\\' && self.high_surrogate)
    }

    /// Copies in-string byte `b`, tracking escapes.
    fn track(&mut self, b: u8) {
        self.len += 1;
        if self.hex_left > 0 {
            let seen = 4 - self.hex_left;
            if seen < 2 {
                self.hex[seen as usize] = b.to_ascii_lowercase();
            }
            self.hex_left -= 1;
            if self.hex_left == 0 {
                self.high_surrogate = self.hex[0] == b'd' && matches!(self.hex[1], b'8'..=b'b');
            }
        } else if self.escape {
            self.escape = false;
            if b == b'u' {
                self.hex_left = 4;
            } else {
                self.high_surrogate = false;
            }
        } else if b == b'\\' {
            self.escape = true;
        } else {
            self.high_surrogate = false;
        }
    }
}

impl<R: Read> Read for CapStrings<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < out.len() {
            if self.close_pending {
                out[n] = b'"';
                n += 1;
                self.close_pending = false;
                continue;
            }
            if self.pos == self.end {
                if n > 0 {
                    break;
                }
                self.end = self.inner.read(&mut self.buf)?;
                self.pos = 0;
                if self.end == 0 {
                    break;
                }
            }
            let b = self.buf[self.pos];
            self.pos += 1;
            match self.mode {
                Mode::Outside => {
                    out[n] = b;
                    n += 1;
                    if b == b'"' {
                        self.mode = Mode::Copy;
                        self.len = 0;
                        self.escape = false;
                        self.hex_left = 0;
                        self.high_surrogate = false;
                    }
                }
                Mode::Copy if b == b'"' && !self.escape => {
                    out[n] = b;
                    n += 1;
                    self.mode = Mode::Outside;
                }
                Mode::Copy if self.may_cut(b) => {
                    self.mode = Mode::Skip;
                    self.close_pending = true;
                    // `b` itself is dropped; it may start an escape, so track that.
                    self.escape = b == b'\\';
                }
                Mode::Copy => {
                    out[n] = b;
                    n += 1;
                    self.track(b);
                }
                Mode::Skip => {
                    if self.escape {
                        self.escape = false;
                    } else if b == b'\\' {
                        self.escape = true;
                    } else if b == b'"' {
                        self.mode = Mode::Outside;
                    }
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn capped(input: &str, cap: usize) -> Vec<u8> {
        let mut out = Vec::new();
        // Tiny reads on both sides, to cross every buffer boundary.
        let mut r = CapStrings::new(OneByte(input.as_bytes()), cap);
        let mut byte = [0u8; 3];
        loop {
            let k = r.read(&mut byte).unwrap();
            if k == 0 {
                break;
            }
            out.extend_from_slice(&byte[..k]);
        }
        out
    }

    struct OneByte<'a>(&'a [u8]);
    impl Read for OneByte<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.split_first() {
                Some((b, rest)) if !buf.is_empty() => {
                    buf[0] = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    fn bytes_capped(input: &str, cap: usize) -> Vec<u8> {
        let mut out = Vec::new();
        CapStrings::new(input.as_bytes(), cap)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn short_strings_and_structure_pass_unchanged() {
        let doc = r#"{"a":"x\"y\\","b":[1,2.5,null,true],"c":{"value":"é"}}"#;
        assert_eq!(capped(doc, 8), doc.as_bytes());
        assert_eq!(bytes_capped(doc, 8), doc.as_bytes());
    }

    #[test]
    fn long_strings_are_cut_and_stay_valid_json() {
        let long = "z".repeat(100);
        let doc = format!(r#"{{"k":"{long}","n":7}}"#);
        let out = bytes_capped(&doc, 10);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["k"], "z".repeat(10));
        assert_eq!(v["n"], 7);
    }

    #[test]
    fn cuts_never_split_escapes_characters_or_surrogate_pairs() {
        for cap in 0..24 {
            for body in [
                r#"ab\"cd\\ef\u00e9gh\nij\"kl\\"#.to_owned(),
                "ééééééééééééééé".to_owned(),
                r#"\ud83d\ude00\ud83d\ude00\ud83d\ude00x"#.to_owned(),
                r#"a\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\"#.to_owned(),
            ] {
                let doc = format!(r#"["{body}","after"]"#);
                let out = bytes_capped(&doc, cap);
                let v: Vec<String> = serde_json::from_slice(&out).unwrap_or_else(|e| {
                    panic!("cap {cap}: {e}: {}", String::from_utf8_lossy(&out))
                });
                let full: Vec<String> = serde_json::from_str(&doc).unwrap();
                assert!(full[0].starts_with(&v[0]), "cap {cap}");
                assert!(
                    "after".starts_with(&v[1]) && v[1].len() >= cap.min(5),
                    "cap {cap}"
                );
                assert_eq!(capped(&doc, cap), out, "cap {cap}");
            }
        }
    }

    #[test]
    fn memory_does_not_follow_the_string() {
        let doc = format!(r#"{{"big":"{}"}}"#, "x".repeat(5_000_000));
        let out = bytes_capped(&doc, MAX_STRING_BYTES);
        assert!(out.len() < MAX_STRING_BYTES + 32, "{}", out.len());
    }
}
