//! vm-tests/matrix: which integration tests run on which kernel of the test VM.
//!
//! Every guest runs under TCG on the build machines (≈ 10× slower than the host), so the
//! VM suite costs what it runs: the newest kernel runs every test that exercises the
//! kernel, the older ones the suites that must hold on every kernel. A line is
//!
//! ```text
//! SELECTION  KERNEL...  # why
//! ```
//!
//! where SELECTION is a test target (`jail_escape`), a target and the start of test names
//! in it (`exec_flags::ring_0_applies`), or `*` (every target no whole-target line names);
//! KERNEL is a series of the matrix (`5.10`, `6.1`, `6.12`) or `-` (none: the target runs
//! natively only). The reason is required: a line without one is an error, as is an
//! unknown kernel, a target named twice or a target that cargo did not build.
use std::collections::BTreeSet;

use anyhow::{bail, Result};

/// Where the matrix lives, for messages.
pub const PATH: &str = "vm-tests/matrix";

/// What a matrix line selects.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Selection {
    /// `*`: every target that no whole-target line names.
    Rest,
    Target(String),
    /// `TARGET::PREFIX`: the tests of TARGET whose names start with PREFIX.
    Tests {
        target: String,
        prefix: String,
    },
}

#[derive(Debug)]
struct Line {
    number: usize,
    selection: Selection,
    kernels: BTreeSet<String>,
}

#[derive(Debug)]
pub struct Matrix {
    lines: Vec<Line>,
}

/// The tests of one binary a kernel runs: all of them, or those matching a prefix
/// (`TARGET::NAME-PREFIX`, the form the guest's init compares with).
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    Whole,
    Tests(Vec<String>),
}

impl Part {
    /// Whether the test `TARGET::NAME` is in this part.
    pub fn selects(&self, full: &str) -> bool {
        match self {
            Part::Whole => true,
            Part::Tests(prefixes) => prefixes.iter().any(|prefix| full.starts_with(prefix.as_str())),
        }
    }
}

impl Matrix {
    /// Parses the matrix; `series` are the kernels a line may name.
    pub fn parse(text: &str, series: &[&str]) -> Result<Self> {
        let mut lines = Vec::new();
        let mut named = BTreeSet::new();
        for (index, raw) in text.lines().enumerate() {
            let number = index + 1;
            let (body, reason) = raw.split_once('#').unwrap_or((raw, ""));
            let mut words = body.split_whitespace();
            let Some(first) = words.next() else { continue };
            if reason.trim().is_empty() {
                bail!("{PATH}:{number}: `{}` has no `# reason` (say why these kernels)", raw.trim());
            }
            let selection = match first.split_once("::") {
                _ if first == "*" => Selection::Rest,
                Some((target, prefix)) if !target.is_empty() && !prefix.is_empty() => {
                    Selection::Tests { target: target.to_string(), prefix: prefix.to_string() }
                }
                Some(_) => bail!("{PATH}:{number}: `{first}` is not TARGET::TEST-NAME-PREFIX"),
                None => Selection::Target(first.to_string()),
            };
            let key = match &selection {
                Selection::Rest => "*".to_string(),
                Selection::Target(target) => target.clone(),
                Selection::Tests { .. } => first.to_string(),
            };
            if !named.insert(key) {
                bail!("{PATH}:{number}: `{first}` is placed twice");
            }
            let words: Vec<&str> = words.collect();
            let kernels = match words.as_slice() {
                [] => bail!("{PATH}:{number}: `{first}` names no kernel (`-` for none)"),
                ["-"] => BTreeSet::new(),
                list => {
                    if let Some(unknown) = list.iter().find(|k| !series.contains(k)) {
                        bail!("{PATH}:{number}: unknown kernel `{unknown}` (the matrix has {})", series.join(", "));
                    }
                    list.iter().map(|k| k.to_string()).collect()
                }
            };
            lines.push(Line { number, selection, kernels });
        }
        Ok(Matrix { lines })
    }

    /// Every line that names a target must name one cargo built (a stale line selects
    /// nothing without a word otherwise).
    pub fn check_targets(&self, built: &[&str]) -> Result<()> {
        for line in &self.lines {
            let target = match &line.selection {
                Selection::Rest => continue,
                Selection::Target(target) | Selection::Tests { target, .. } => target,
            };
            if !built.contains(&target.as_str()) {
                bail!("{PATH}:{}: names test target `{target}`, which cargo did not build", line.number);
            }
        }
        Ok(())
    }

    /// What `kernel` runs of `target`, or None for nothing.
    pub fn part(&self, kernel: &str, target: &str) -> Result<Option<Part>> {
        let whole = self.lines.iter().find(|l| l.selection == Selection::Target(target.to_string()));
        let whole = match whole {
            Some(line) => line,
            None => match self.lines.iter().find(|l| l.selection == Selection::Rest) {
                Some(line) => line,
                None => bail!("{PATH} does not place test target `{target}` and has no `*` line"),
            },
        };
        if whole.kernels.contains(kernel) {
            return Ok(Some(Part::Whole));
        }
        let prefixes: Vec<String> = self
            .lines
            .iter()
            .filter(|l| l.kernels.contains(kernel))
            .filter_map(|l| match &l.selection {
                Selection::Tests { target: t, prefix } if t == target => Some(format!("{t}::{prefix}")),
                _ => None,
            })
            .collect();
        Ok((!prefixes.is_empty()).then_some(Part::Tests(prefixes)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SERIES: [&str; 3] = ["5.10", "6.1", "6.12"];

    fn matrix(text: &str) -> Matrix {
        Matrix::parse(text, &SERIES).unwrap()
    }

    fn error(text: &str) -> String {
        format!("{:#}", Matrix::parse(text, &SERIES).unwrap_err())
    }

    #[test]
    fn targets_run_where_their_line_says_and_the_rest_where_star_says() {
        let m = matrix(
            "# comment line\n\
             *            6.12        # the whole suite on the newest kernel\n\
             jail_escape  5.10 6.1 6.12  # must hold everywhere\n\
             policy       -           # no kernel in it\n\
             flags::ring_0_limits 5.10 6.1 # limits on every kernel\n\
             \n",
        );
        assert_eq!(m.part("5.10", "jail_escape").unwrap(), Some(Part::Whole));
        assert_eq!(m.part("6.12", "jail_escape").unwrap(), Some(Part::Whole));
        assert_eq!(m.part("6.12", "net_plane").unwrap(), Some(Part::Whole));
        assert_eq!(m.part("6.1", "net_plane").unwrap(), None);
        assert_eq!(m.part("6.12", "policy").unwrap(), None);
        assert_eq!(m.part("6.12", "flags").unwrap(), Some(Part::Whole));
        let part = m.part("6.1", "flags").unwrap().unwrap();
        assert_eq!(part, Part::Tests(vec!["flags::ring_0_limits".to_string()]));
        assert!(part.selects("flags::ring_0_limits_hold") && !part.selects("flags::other"));
        assert!(Part::Whole.selects("flags::other"));
        assert!(m.check_targets(&["jail_escape", "policy", "flags", "net_plane"]).is_ok());
        let stale = format!("{:#}", m.check_targets(&["jail_escape", "flags"]).unwrap_err());
        assert!(stale.contains(":4:") && stale.contains("`policy`"), "{stale}");
    }

    #[test]
    fn without_a_star_line_an_unplaced_target_is_an_error() {
        let m = matrix("jail_escape 6.1 # why\n");
        assert!(format!("{:#}", m.part("6.1", "other").unwrap_err()).contains("does not place test target `other`"));
    }

    #[test]
    fn every_line_says_why_names_known_kernels_and_places_a_target_once() {
        assert!(error("jail_escape 6.1\n").contains("vm-tests/matrix:1: `jail_escape 6.1` has no `# reason`"));
        assert!(error("jail_escape 6.1 #   \n").contains("has no `# reason`"));
        assert!(error("# ok\njail_escape 4.19 # old\n").contains(":2: unknown kernel `4.19`"));
        assert!(error("jail_escape # none\n").contains("names no kernel"));
        assert!(error("a 6.1 # x\na 6.12 # y\n").contains(":2: `a` is placed twice"));
        assert!(error("a::  6.1 # x\n").contains("is not TARGET::TEST-NAME-PREFIX"));
        assert!(error("::b  6.1 # x\n").contains("is not TARGET::TEST-NAME-PREFIX"));
    }
}
