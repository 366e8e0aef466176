//! MQTT topic name and topic filter rules (MQTT 3.1.1 / 5.0 section 4.7).
//!
//! Topic names are what PUBLISH carries; topic filters are what SUBSCRIBE
//! carries and may contain the wildcards `+` (one level) and `#` (the rest).

/// Longest topic name or filter, in bytes (a two-byte length prefix).
const MAX_LEN: usize = 65_535;

/// True if `t` is a valid topic name: non-empty, at most 65535 bytes, and
/// free of the wildcards `+` and `#` and of U+0000.
pub fn valid_topic_name(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_LEN && !t.contains(['+', '#', '\0'])
}

/// True if `f` is a valid topic filter: non-empty, at most 65535 bytes, no
/// U+0000, `#` only as the whole last level and `+` only as a whole level.
pub fn valid_topic_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > MAX_LEN || f.contains('\0') {
        return false;
    }
    let mut levels = f.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        match level {
            "#" if is_last => {}
            "+" => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// True if topic name `topic` matches topic filter `filter`.
///
/// Both are assumed valid (an invalid filter simply matches less). A filter
/// whose first level is a wildcard does not match a topic starting with `$`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            // Matches the parent level too ("a/#" matches "a").
            return true;
        }
        match topic_levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        let cases = [
            ("a", true),
            ("a/b/c", true),
            ("/", true),
            ("a//b", true),
            ("$SYS/x", true),
            (" ", true),
            ("", false),
            ("a/+", false),
            ("a/#", false),
            ("a+b", false),
            ("a\0b", false),
        ];
        for (t, ok) in cases {
            assert_eq!(valid_topic_name(t), ok, "{t:?}");
        }
        assert!(valid_topic_name(&"a".repeat(MAX_LEN)));
        assert!(!valid_topic_name(&"a".repeat(MAX_LEN + 1)));
    }

    #[test]
    fn topic_filters() {
        let cases = [
            ("a", true),
            ("#", true),
            ("+", true),
            ("a/#", true),
            ("a/+/b", true),
            ("+/+", true),
            ("/+", true),
            ("a//#", true),
            ("$SYS/#", true),
            ("", false),
            ("a/#/b", false),
            ("#/a", false),
            ("a#", false),
            ("a/b#", false),
            ("a+", false),
            ("a/+b", false),
            ("a/\0", false),
            ("##", false),
        ];
        for (f, ok) in cases {
            assert_eq!(valid_topic_filter(f), ok, "{f:?}");
        }
        assert!(!valid_topic_filter(&"a".repeat(MAX_LEN + 1)));
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("a/+", "a/b", true),
            ("a/+", "a/", true),
            ("a/+", "a", false),
            ("a/+", "a/b/c", false),
            ("+/b", "a/b", true),
            ("+/+", "/b", true),
            ("+", "a", true),
            ("+", "/a", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("#", "a/b/c", true),
            ("#", "/", true),
            ("/#", "/a", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("A", "a", false),
        ];
        for (f, t, ok) in cases {
            assert_eq!(filter_matches(f, t), ok, "{f:?} vs {t:?}");
        }
    }
}
