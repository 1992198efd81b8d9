//! Routing: which functions a message's topic triggers.
//!
//! Filters follow MQTT 3.1.1 §4.7 / MQTT 5 §4.7: `+` matches exactly one
//! level, `#` (last, alone in its level) matches the parent level and any
//! number of levels below, and topics starting with `$` are not matched by a
//! filter starting with a wildcard. Levels may be empty (`a//b`).
//!
//! The [`Router`] is built once per configuration and is read-only
//! afterwards, so it is shared without locks.

use std::fmt;

/// Why a topic filter is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// The filter is the empty string.
    #[error("a topic filter cannot be empty")]
    Empty,
    /// `#` is not alone in the last level.
    #[error("'#' must be the last level, alone (e.g. \"sensors/#\")")]
    MisplacedHash,
    /// `+` shares its level with other characters.
    #[error("'+' must be alone in its level (e.g. \"sensors/+/temperature\")")]
    MisplacedPlus,
    /// Contains a NUL character.
    #[error("a topic filter cannot contain NUL")]
    Nul,
}

/// A validated MQTT topic filter.
#[derive(Clone, PartialEq, Eq)]
pub struct TopicFilter {
    /// The filter as written.
    text: String,
}

impl TopicFilter {
    /// Validates `text` as a topic filter.
    ///
    /// Fails when a wildcard is misplaced, or the filter is empty.
    pub fn new(text: &str) -> Result<TopicFilter, FilterError> {
        if text.is_empty() {
            return Err(FilterError::Empty);
        }
        if text.contains('\0') {
            return Err(FilterError::Nul);
        }
        let levels: Vec<&str> = text.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
                return Err(FilterError::MisplacedHash);
            }
            if level.contains('+') && *level != "+" {
                return Err(FilterError::MisplacedPlus);
            }
        }
        Ok(TopicFilter {
            text: text.to_owned(),
        })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic` (a topic name, without wildcards) matches this filter.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && self.text.starts_with(['+', '#']) {
            return false;
        }
        let mut filter = self.text.split('/');
        let mut name = topic.split('/');
        loop {
            match (filter.next(), name.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(n)) if f == n => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl TopicFilter {
    /// Whether some topic name matches both this filter and `other`.
    pub fn overlaps(&self, other: &TopicFilter) -> bool {
        let dollar = |f: &TopicFilter| f.text.starts_with('$');
        let wild = |f: &TopicFilter| f.text.starts_with(['+', '#']);
        if (wild(self) && dollar(other)) || (wild(other) && dollar(self)) {
            return false;
        }
        let mut a = self.text.split('/');
        let mut b = other.text.split('/');
        loop {
            match (a.next(), b.next()) {
                (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
                (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
                _ => return false,
            }
        }
    }

    /// Whether every topic name `other` matches, this filter matches too.
    pub fn covers(&self, other: &TopicFilter) -> bool {
        if self.text.starts_with(['+', '#']) && other.text.starts_with('$') {
            return false;
        }
        let mut a = self.text.split('/');
        let mut b = other.text.split('/');
        loop {
            match (a.next(), b.next()) {
                (Some("#"), _) | (None, None) => return true,
                (Some(_), Some("#")) => return false,
                (Some(x), Some(y)) if x == "+" || x == y => {}
                _ => return false,
            }
        }
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Maps topics to the indexes of the functions they trigger.
#[derive(Debug, Default)]
pub struct Router {
    /// `(filter, function index)`, in configuration order.
    routes: Vec<(TopicFilter, usize)>,
}

impl Router {
    /// Builds a router from each function's triggers; `functions[i]` is the
    /// trigger list of function `i`.
    pub fn new<'a>(functions: impl IntoIterator<Item = &'a [TopicFilter]>) -> Router {
        let mut routes = Vec::new();
        for (i, triggers) in functions.into_iter().enumerate() {
            for t in triggers {
                routes.push((t.clone(), i));
            }
        }
        Router { routes }
    }

    /// The functions `topic` triggers, each once, in configuration order,
    /// written into `out` (cleared first) so the caller can reuse it.
    pub fn route_into(&self, topic: &str, out: &mut Vec<usize>) {
        out.clear();
        for (filter, f) in &self.routes {
            if !out.contains(f) && filter.matches(topic) {
                out.push(*f);
            }
        }
        out.sort_unstable();
    }

    /// Whether any function is triggered by `topic`.
    pub fn matches_any(&self, topic: &str) -> bool {
        self.routes.iter().any(|(f, _)| f.matches(topic))
    }

    /// Every distinct filter, for subscribing.
    pub fn filters(&self) -> Vec<&TopicFilter> {
        let mut out: Vec<&TopicFilter> = Vec::new();
        for (f, _) in &self.routes {
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(text: &str) -> TopicFilter {
        TopicFilter::new(text).unwrap()
    }

    #[test]
    fn filters_overlap_when_some_topic_matches_both() {
        for (a, b) in [
            ("a/#", "a"),
            ("#", "x/y"),
            ("+/b", "a/+"),
            ("a/+/c", "a/b/#"),
            ("$SYS/#", "$SYS/+"),
            ("a//b", "a/+/b"),
        ] {
            assert!(f(a).overlaps(&f(b)), "{a} {b}");
            assert!(f(b).overlaps(&f(a)), "{b} {a}");
        }
        for (a, b) in [
            ("a/b", "a/c"),
            ("a/+", "a"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
            ("a/b/c", "a/+"),
        ] {
            assert!(!f(a).overlaps(&f(b)), "{a} {b}");
            assert!(!f(b).overlaps(&f(a)), "{b} {a}");
        }
    }

    #[test]
    fn a_filter_covers_another_when_it_matches_all_its_topics() {
        for (a, b) in [
            ("a/#", "a"),
            ("a/#", "a/+/c"),
            ("#", "x/#"),
            ("+/+", "a/+"),
            ("a/+", "a/b"),
        ] {
            assert!(f(a).covers(&f(b)), "{a} covers {b}");
        }
        for (a, b) in [
            ("a", "a/#"),
            ("a/+", "a/#"),
            ("a/b", "a/+"),
            ("#", "$SYS/x"),
            ("a/+/c", "a/b"),
        ] {
            assert!(!f(a).covers(&f(b)), "{a} does not cover {b}");
        }
    }

    fn m(filter: &str, topic: &str) -> bool {
        TopicFilter::new(filter).unwrap().matches(topic)
    }

    #[test]
    fn wildcards_match_per_the_spec() {
        assert!(m("sensors/+/temperature", "sensors/a/temperature"));
        assert!(!m("sensors/+/temperature", "sensors/a/b/temperature"));
        assert!(!m("sensors/+/temperature", "sensors/temperature"));
        assert!(m("sensors/+", "sensors/"));
        assert!(m("sensors/#", "sensors"));
        assert!(m("sensors/#", "sensors/a/b"));
        assert!(m("#", "a/b/c"));
        assert!(m("+/+", "/x"));
        assert!(m("a//b", "a//b"));
        assert!(!m("a/b", "a/b/c"));
        assert!(!m("a/b/c", "a/b"));
        assert!(!m("A/b", "a/b"));
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert!(!m("#", "$SYS/broker/load"));
        assert!(!m("+/broker/load", "$SYS/broker/load"));
        assert!(m("$SYS/#", "$SYS/broker/load"));
        assert!(m("$SYS/+/load", "$SYS/broker/load"));
    }

    #[test]
    fn misplaced_wildcards_are_refused() {
        assert_eq!(TopicFilter::new("a/#/b"), Err(FilterError::MisplacedHash));
        assert_eq!(TopicFilter::new("a/b#"), Err(FilterError::MisplacedHash));
        assert_eq!(TopicFilter::new("a/b+"), Err(FilterError::MisplacedPlus));
        assert_eq!(TopicFilter::new(""), Err(FilterError::Empty));
    }

    #[test]
    fn a_message_reaches_each_matching_function_once() {
        let f = |s: &[&str]| -> Vec<TopicFilter> {
            s.iter().map(|t| TopicFilter::new(t).unwrap()).collect()
        };
        let a = f(&["sensors/+/temperature", "sensors/#"]);
        let b = f(&["other/#"]);
        let c = f(&["sensors/x/temperature"]);
        let r = Router::new([a.as_slice(), b.as_slice(), c.as_slice()]);
        let mut out = Vec::new();
        r.route_into("sensors/x/temperature", &mut out);
        assert_eq!(out, [0, 2]);
        r.route_into("nothing", &mut out);
        assert!(out.is_empty());
        assert!(r.matches_any("other/1"));
        assert_eq!(r.filters().len(), 4);
    }
}
