//! Which names an agent may resolve, and to which ports their addresses are opened.
//!
//! A pattern is an exact name (`api.example.com`) or a wildcard (`*.example.com`), which
//! matches every name below `example.com` at any depth (`a.example.com`,
//! `a.b.example.com`) but not `example.com` itself. Names compare case-insensitively and
//! a trailing dot is ignored. Cilium's `matchPattern` lets `*` match inside one label
//! only and has `**.` for deeper names; here a leading `*.` is the only wildcard and
//! reaches every depth, so one rule covers a CDN's nested names.
use std::fmt;

/// A name pattern: exact or `*.suffix`. Stored lowercase, without the trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NamePattern {
    Exact(String),
    Wildcard(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("'{0}': empty name")]
    Empty(String),
    #[error("'{0}': only a leading '*.' is a wildcard (e.g. *.example.com)")]
    Wildcard(String),
    #[error("'{0}': '*' alone would allow every name; allow addresses instead (0.0.0.0/0:PORT)")]
    Everything(String),
    #[error("'{text}': label '{label}' is not 1-63 letters, digits, '-' or '_'")]
    Label { text: String, label: String },
    #[error("'{0}': longer than 253 characters")]
    TooLong(String),
    #[error("'{0}': expected NAME:PORT, e.g. api.example.com:443 or *.example.com:443")]
    NoPort(String),
    #[error("'{0}': bad port (1-65535)")]
    Port(String),
}

impl NamePattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let name = text.trim().trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return Err(PatternError::Empty(text.into()));
        }
        if name == "*" {
            return Err(PatternError::Everything(text.into()));
        }
        let (wildcard, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, name),
        };
        if rest.contains('*') {
            return Err(PatternError::Wildcard(text.into()));
        }
        check_name(text, &rest)?;
        Ok(if wildcard { Self::Wildcard(rest) } else { Self::Exact(rest) })
    }

    /// Whether `name` (already [`normalize`]d) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::Wildcard(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

fn check_name(text: &str, name: &str) -> Result<(), PatternError> {
    if name.len() > 253 {
        return Err(PatternError::TooLong(text.into()));
    }
    for label in name.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(PatternError::Label { text: text.into(), label: label.into() });
        }
    }
    Ok(())
}

/// A query name as patterns compare it: lowercase, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The allowed names, each with the ports its addresses are opened to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowSet {
    rules: Vec<(NamePattern, Vec<u16>)>,
}

impl AllowSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `pattern` with `port`; a pattern given twice collects its ports.
    pub fn add(&mut self, pattern: NamePattern, port: u16) {
        match self.rules.iter_mut().find(|(p, _)| *p == pattern) {
            Some((_, ports)) => {
                if !ports.contains(&port) {
                    ports.push(port);
                    ports.sort_unstable();
                }
            }
            None => self.rules.push((pattern, vec![port])),
        }
    }

    /// Adds one `NAME:PORT` entry (the form of `--allow-connect`).
    pub fn add_entry(&mut self, text: &str) -> Result<(), PatternError> {
        let (name, port) = text.rsplit_once(':').ok_or_else(|| PatternError::NoPort(text.into()))?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| PatternError::Port(text.into()))?;
        self.add(NamePattern::parse(name)?, port);
        Ok(())
    }

    /// The ports `name` may reach, ascending; empty when no pattern matches.
    pub fn ports_for(&self, name: &str) -> Vec<u16> {
        let name = normalize(name);
        let mut ports: Vec<u16> =
            self.rules.iter().filter(|(p, _)| p.matches(&name)).flat_map(|(_, ports)| ports.iter().copied()).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn set(entries: &[&str]) -> AllowSet {
        let mut set = AllowSet::new();
        for entry in entries {
            set.add_entry(entry).unwrap();
        }
        set
    }

    #[test]
    fn exact_names_match_case_insensitively_with_or_without_the_trailing_dot() {
        let set = set(&["API.Example.com.:443"]);
        assert_eq!(set.ports_for("api.example.com"), vec![443]);
        assert_eq!(set.ports_for("Api.EXAMPLE.com."), vec![443]);
        assert!(set.ports_for("example.com").is_empty());
        assert!(set.ports_for("x.api.example.com").is_empty());
        assert!(set.ports_for("api.example.com.evil").is_empty());
    }

    #[test]
    fn wildcards_match_every_depth_below_but_not_the_name_itself() {
        let set = set(&["*.example.com:443"]);
        assert_eq!(set.ports_for("a.example.com"), vec![443]);
        assert_eq!(set.ports_for("a.b.c.example.com."), vec![443]);
        assert!(set.ports_for("example.com").is_empty());
        assert!(set.ports_for("badexample.com").is_empty(), "a suffix match must start at a label");
        assert!(set.ports_for(".example.com").is_empty());
    }

    #[test]
    fn ports_of_every_matching_pattern_are_united() {
        let set = set(&["*.example.com:443", "api.example.com:8443", "api.example.com:443", "*.example.com:80"]);
        assert_eq!(set.ports_for("api.example.com"), vec![80, 443, 8443]);
        assert_eq!(set.ports_for("www.example.com"), vec![80, 443]);
    }

    #[test]
    fn bad_patterns_are_refused_with_the_text() {
        let err = |text: &str| NamePattern::parse(text).unwrap_err().to_string();
        assert!(err("*").contains("every name"));
        assert!(err("api*.example.com").contains("leading '*.'"));
        assert!(err("*.*.example.com").contains("leading '*.'"));
        assert!(err("a..b").contains("label ''"));
        assert!(err("exa mple.com").contains("label 'exa mple'"));
        assert!(err(&format!("{}.com", "a".repeat(64))).contains("1-63"));
        assert!(err(" ").contains("empty"));
        let entry = |text: &str| AllowSet::new().add_entry(text).unwrap_err().to_string();
        assert!(entry("api.example.com").contains("expected NAME:PORT"));
        assert!(entry("api.example.com:0").contains("bad port"));
        assert!(entry("api.example.com:70000").contains("bad port"));
        assert_eq!(NamePattern::parse("*.Example.COM.").unwrap().to_string(), "*.example.com");
    }
}
