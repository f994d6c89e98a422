//! Small text helpers shared by every layer: error chains and cut strings for messages.

/// An error with its causes, which say what actually happened (reqwest's top-level message
/// alone is "error sending request").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Cuts `s` to at most `max` bytes of UTF-8, on a character boundary, marking the cut (the
/// mark, `…`, 3 bytes, counts in `max`): for fields limited in bytes, like an Event's note.
pub fn truncate_bytes(s: &str, max: usize) -> String {
    const MARK: &str = "…";
    if s.len() <= max {
        return s.to_owned();
    }
    if max < MARK.len() {
        return String::new();
    }
    let mut end = max - MARK.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end])
}

/// Makes text from outside (another service's error message, a field name) fit for a
/// status, an Event or a log line: control and bidirectional-override characters become
/// spaces, runs of white space one space, and the result is cut to `max` characters.
pub fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max * 4 + 4));
    let mut chars = 0;
    let mut pending_space = false;
    for c in s.chars() {
        if c.is_whitespace() || is_hidden(c) {
            pending_space = true;
            continue;
        }
        if chars == max {
            out.push('…');
            return out;
        }
        if pending_space && !out.is_empty() {
            if chars + 1 == max {
                out.push('…');
                return out;
            }
            out.push(' ');
            chars += 1;
        }
        pending_space = false;
        out.push(c);
        chars += 1;
    }
    out
}

/// Names from outside (a Look's field names) for a message: each [`clean`]ed and cut to 80
/// characters, at most `shown` of them, the rest counted.
pub fn name_list<S: AsRef<str>>(names: &[S], shown: usize) -> String {
    let mut out: Vec<String> = names
        .iter()
        .take(shown)
        .map(|n| clean(n.as_ref(), 80))
        .collect();
    if names.len() > shown {
        out.push(format!("{} more", names.len() - shown));
    }
    out.join(", ")
}

/// Characters that hide or reorder text on a terminal: C0/C1 controls and the Unicode
/// direction marks and overrides.
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_removes_controls_and_cuts() {
        assert_eq!(clean("  a\n\tb\u{0}c \u{202E}d  ", 100), "a b c d");
        assert_eq!(clean("\u{1b}[31mred\u{1b}[0m", 100), "[31mred [0m");
        assert_eq!(clean("abcdef", 3), "abc…");
        assert_eq!(clean("ab cdef", 3), "ab…", "a cut never ends on a space");
        assert_eq!(clean("abc", 3), "abc");
        assert_eq!(clean("abc   ", 3), "abc");
        assert_eq!(clean("ééé", 2), "éé…");
        assert_eq!(clean("", 5), "");
        assert_eq!(clean("\r\n", 5), "");
    }

    #[test]
    fn name_lists_are_bounded() {
        assert_eq!(name_list(&["a", "b"], 5), "a, b");
        assert_eq!(name_list(&["a", "b\nc", "d"], 2), "a, b c, 1 more");
        assert_eq!(
            name_list(&["x".repeat(100)], 1),
            format!("{}…", "x".repeat(80))
        );
        assert_eq!(name_list::<&str>(&[], 3), "");
    }

    #[test]
    fn truncate_marks_the_cut() {
        assert_eq!(truncate("abcdef", 3), "abc…");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("ééé", 2), "éé…");
    }

    #[test]
    fn truncate_bytes_cuts_on_a_character_boundary_within_the_budget() {
        // ASCII: the mark's 3 bytes count.
        assert_eq!(truncate_bytes("abcdef", 6), "abcdef");
        assert_eq!(truncate_bytes("abcdefg", 6), "abc…");
        assert_eq!(truncate_bytes(&"a".repeat(2000), 1024).len(), 1024);
        // "é" is 2 bytes: a cut inside one moves back before it.
        let e = "é".repeat(600);
        let cut = truncate_bytes(&e, 1024);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert_eq!(cut, format!("{}…", "é".repeat(510)));
        assert_eq!(truncate_bytes("aé", 3), "aé");
        assert_eq!(truncate_bytes("aéb!", 4), "a…");
        // An emoji is 4 bytes.
        let emoji = format!("x{}", "🎉".repeat(300));
        let cut = truncate_bytes(&emoji, 1024);
        assert!(cut.len() <= 1024);
        assert_eq!(cut, format!("x{}…", "🎉".repeat(255)));
        assert_eq!(truncate_bytes("🎉🎉", 7), "🎉…");
        assert_eq!(truncate_bytes("🎉🎉", 6), "…");
        assert_eq!(truncate_bytes("🎉🎉", 2), "");
        assert_eq!(truncate_bytes("", 0), "");
    }

    #[test]
    fn error_chain_names_each_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(error_chain(&e), "error sending request: connection refused");
    }
}
