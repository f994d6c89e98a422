//! Prepares Looker's body for the parser, on the body's chunks as they arrive (on the async
//! side, beside the parser thread), passing a chunk on untouched unless one of two things is
//! in it:
//!
//! - a string longer than the cap, so a 20 MiB cell costs no more memory than a short one;
//! - a number a float cannot hold exactly (a fraction, an exponent, or more than 18 digits),
//!   which becomes a string marked with [`NUMBER_MARK`], so the parser hands over its exact
//!   text (a 21-digit id must not become `1.2345678901234567e20`).
//!
//! A string longer than the cap is cut at a character boundary outside any escape and
//! closed there; the rest of it is skipped. The cap is far above anything the export keeps
//! (identifiers up to 987 bytes, attributes up to 255 characters), so a cut string is still
//! recognised as too long by the mapping and reported by row number.

use bytes::Bytes;

/// Longest string the parser sees, in bytes.
pub const MAX_STRING_BYTES: usize = 64 * 1024;
/// Prefix of a string that stands for a number's exact text (a NUL character, which no
/// Looker value starts with, then `#`).
pub const NUMBER_MARK: &str = "\u{0}#";

/// Where the filter is in the JSON text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Between strings.
    Outside,
    /// Inside a string, copying.
    Copy,
    /// Inside a string past the cap, dropping bytes until it ends.
    Skip,
    /// Inside a number that began in an earlier chunk.
    Number,
}

/// Cuts long JSON strings in a stream of chunks (see the module header).
#[derive(Debug)]
pub struct StringCap {
    cap: usize,
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
    /// The text of a number cut by a chunk's end.
    number: Vec<u8>,
}

impl StringCap {
    /// Cuts strings longer than `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            mode: Mode::Outside,
            len: 0,
            escape: false,
            hex_left: 0,
            hex: [0; 2],
            high_surrogate: false,
            number: Vec::new(),
        }
    }

    /// Appends to `out` the pieces of `chunk` to pass on: the chunk itself when nothing in it
    /// needs changing, else the untouched runs with each change between them.
    pub fn filter(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        let n = chunk.len();
        // `start` begins the run of input still to pass on as it is.
        let (mut start, mut i) = (0, 0);
        let keep = |out: &mut Vec<Bytes>, from: usize, to: usize| {
            if from < to {
                out.push(chunk.slice(from..to));
            }
        };
        while i < n {
            match self.mode {
                Mode::Outside => {
                    let b = chunk[i];
                    if b == b'"' {
                        self.enter_string();
                        i += 1;
                    } else if b == b'-' || b.is_ascii_digit() {
                        let k = number_len(&chunk[i..]);
                        if i + k == n {
                            // The number may go on in the next chunk: hold it.
                            keep(out, start, i);
                            self.number.clear();
                            self.number.extend_from_slice(&chunk[i..]);
                            self.mode = Mode::Number;
                            return;
                        }
                        if !exact_as_float(&chunk[i..i + k]) {
                            keep(out, start, i);
                            out.push(marked(&chunk[i..i + k]));
                            start = i + k;
                        }
                        i += k;
                    } else {
                        i += 1;
                    }
                }
                Mode::Number => {
                    let k = number_len(&chunk[i..]);
                    if self.number.len() < MAX_STRING_BYTES {
                        self.number.extend_from_slice(&chunk[i..i + k]);
                    }
                    i += k;
                    if i == n {
                        return;
                    }
                    self.finish(out);
                    start = i;
                }
                Mode::Copy => {
                    let (k, cut) = self.copy(&chunk[i..]);
                    i += k;
                    if cut {
                        keep(out, start, i);
                        out.push(Bytes::from_static(b"\""));
                        // The byte at the cut is dropped; it may start an escape.
                        self.escape = chunk[i] == b'\\';
                        self.mode = Mode::Skip;
                        i += 1;
                        start = i;
                    }
                }
                Mode::Skip => {
                    i += self.skip(&chunk[i..]);
                    start = i;
                }
            }
        }
        if start == 0 {
            out.push(chunk);
        } else {
            keep(out, start, n);
        }
    }

    /// Passes on what is held when the body ends (a number cut by the last chunk's end).
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.mode == Mode::Number {
            let text = std::mem::take(&mut self.number);
            out.push(if exact_as_float(&text) {
                Bytes::from(text)
            } else {
                marked(&text)
            });
            self.mode = Mode::Outside;
        }
    }

    fn enter_string(&mut self) {
        self.mode = Mode::Copy;
        self.len = 0;
        self.escape = false;
        self.hex_left = 0;
        self.high_surrogate = false;
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

    /// Walks string bytes at the front of `avail` that pass as they are, until the string
    /// ends or must be cut; returns how many, and whether a cut comes right after them.
    /// Runs of plain bytes are found with `memchr` and counted in bulk.
    fn copy(&mut self, avail: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < avail.len() {
            if !self.escape && self.hex_left == 0 {
                let room = self.cap.saturating_sub(self.len);
                let window = &avail[i..avail.len().min(i + room)];
                let k = memchr::memchr2(b'"', b'\\', window).unwrap_or(window.len());
                if k > 0 {
                    self.len += k;
                    self.high_surrogate = false;
                    i += k;
                    continue;
                }
            }
            let b = avail[i];
            if b == b'"' && !self.escape {
                self.mode = Mode::Outside;
                return (i + 1, false);
            }
            if self.may_cut(b) {
                return (i, true);
            }
            self.track(b);
            i += 1;
        }
        (avail.len(), false)
    }

    /// Drops the bytes of a cut string up to its end; returns how many were consumed.
    fn skip(&mut self, avail: &[u8]) -> usize {
        let mut i = 0;
        while i < avail.len() {
            if self.escape {
                self.escape = false;
                i += 1;
                continue;
            }
            match memchr::memchr2(b'"', b'\\', &avail[i..]) {
                None => return avail.len(),
                Some(k) if avail[i + k] == b'"' => {
                    self.mode = Mode::Outside;
                    return i + k + 1;
                }
                Some(k) => {
                    self.escape = true;
                    i += k + 1;
                }
            }
        }
        avail.len()
    }
}

/// Length of the number token at the front of `bytes` (JSON numbers use no other bytes).
fn number_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .unwrap_or(bytes.len())
}

/// True for an integer of at most 18 digits, which the parser reads exactly.
fn exact_as_float(token: &[u8]) -> bool {
    let digits = token.strip_prefix(b"-").unwrap_or(token);
    !digits.is_empty() && digits.len() <= 18 && digits.iter().all(u8::is_ascii_digit)
}

/// `"\u0000#<token>"`: a string the parser reads as [`NUMBER_MARK`] and the token.
fn marked(token: &[u8]) -> Bytes {
    let mut s = Vec::with_capacity(token.len() + 10);
    s.extend_from_slice(b"\"\\u0000#");
    s.extend_from_slice(token);
    s.push(b'"');
    Bytes::from(s)
}

/// The exact text of a marked number, if `s` is one.
pub fn unmark(s: &str) -> Option<&str> {
    s.strip_prefix(NUMBER_MARK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Feeds `input` in chunks of `size` bytes and joins what comes out.
    fn chunked(input: &str, cap: usize, size: usize) -> Vec<u8> {
        let mut f = StringCap::new(cap);
        let mut pieces = Vec::new();
        for c in input.as_bytes().chunks(size) {
            f.filter(Bytes::copy_from_slice(c), &mut pieces);
        }
        pieces.iter().flat_map(|p| p.iter().copied()).collect()
    }

    /// Byte-sized chunks, to cross every boundary.
    fn capped(input: &str, cap: usize) -> Vec<u8> {
        chunked(input, cap, 1)
    }

    fn bytes_capped(input: &str, cap: usize) -> Vec<u8> {
        chunked(input, cap, 1 << 20)
    }

    #[test]
    fn a_chunk_without_a_cut_passes_untouched() {
        let mut f = StringCap::new(4);
        let chunk = Bytes::from_static(br#"{"a":"abc","b":1}"#);
        let mut out = Vec::new();
        f.filter(chunk.clone(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ptr(), chunk.as_ptr(), "no copy");
    }

    #[test]
    fn short_strings_and_structure_pass_unchanged() {
        let doc = r#"{"a":"x\"y\\","b":[1,25,null,true],"c":{"value":"é"}}"#;
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
    fn numbers_a_float_cannot_hold_become_marked_strings() {
        let doc = r#"{"a":123456789012345678901,"b":[1.5,-7,2e3,123456789012345678],"c":"9.5"}"#;
        for size in [1, 2, 3, 7, 1 << 20] {
            let out = chunked(doc, 100, size);
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(
                unmark(v["a"].as_str().unwrap()),
                Some("123456789012345678901")
            );
            assert_eq!(unmark(v["b"][0].as_str().unwrap()), Some("1.5"));
            assert_eq!(v["b"][1], -7, "short integers stay numbers");
            assert_eq!(unmark(v["b"][2].as_str().unwrap()), Some("2e3"));
            assert_eq!(v["b"][3], 123456789012345678_u64);
            assert_eq!(v["c"], "9.5", "numbers inside strings are text");
        }
        // A number at a chunk's end is held until the body ends, then passed on.
        let mut f = StringCap::new(10);
        let mut out = Vec::new();
        f.filter(Bytes::from_static(b"[12"), &mut out);
        assert_eq!(out, [Bytes::from_static(b"[")]);
        f.finish(&mut out);
        assert_eq!(out, [Bytes::from_static(b"["), Bytes::from_static(b"12")]);
    }

    #[test]
    fn memory_does_not_follow_the_string() {
        let doc = format!(r#"{{"big":"{}"}}"#, "x".repeat(5_000_000));
        let out = bytes_capped(&doc, MAX_STRING_BYTES);
        assert!(out.len() < MAX_STRING_BYTES + 32, "{}", out.len());
    }
}
