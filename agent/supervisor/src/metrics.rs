//! Counters of one agent's evaluator: decisions by outcome and plane, denied calls, the
//! kernel's drop counters and a latency histogram with fixed buckets.
//!
//! Plain atomics, so that counting adds no lock to a decision; the control socket's
//! `metrics` request reads them ([`DecisionMetrics::snapshot`]) and the daemon serves them
//! in the Prometheus text format (docs/metrics.md).
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// The outcomes a decision record can carry (`held` is a request waiting for approval;
/// `approved`, `denied`, `timeout` and `killed` end one).
pub const ACTIONS: [&str; 8] = ["allow", "deny", "kill", "held", "approved", "denied", "timeout", "killed"];
/// The planes that decide; anything else is counted as `other`.
pub const PLANES: [&str; 4] = ["seccomp_notify", "fanotify", "kernel", "other"];
/// Upper bounds of the latency buckets in microseconds; one more bucket is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 12] = [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000];

#[derive(Default)]
pub struct DecisionMetrics {
    /// [action][plane]; an outcome outside [`ACTIONS`] is not a decision and is not counted.
    decisions: [[AtomicU64; 4]; 8],
    /// Calls denied, per plane (a kernel deny summary stands for several).
    denied_calls: [AtomicU64; 4],
    /// Not cumulative here; the last is +Inf.
    latency: [AtomicU64; 13],
    latency_sum_us: AtomicU64,
    kernel_events_dropped: AtomicU64,
    kernel_denies_dropped: AtomicU64,
}

/// What [`DecisionMetrics`] held at one moment (the `metrics` answer's shape).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// (action, plane, count), counts above zero only.
    pub decisions: Vec<(String, String, u64)>,
    /// (plane, calls), above zero only.
    pub denied_calls: Vec<(String, u64)>,
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS_US`], then +Inf (= the count).
    pub latency_buckets: Vec<u64>,
    pub latency_sum_us: u64,
    pub kernel_events_dropped: u64,
    pub kernel_denies_dropped: u64,
}

fn plane_index(plane: &str) -> usize {
    PLANES.iter().position(|p| *p == plane).unwrap_or(PLANES.len() - 1)
}

impl DecisionMetrics {
    /// Counts one decision record: its outcome on `plane`, `calls` calls (more than one for
    /// a kernel deny summary), decided in `latency_us`.
    pub fn decision(&self, outcome: &str, plane: &str, calls: u64, latency_us: u64) {
        let Some(action) = ACTIONS.iter().position(|a| *a == outcome) else { return };
        let plane = plane_index(plane);
        self.decisions[action][plane].fetch_add(1, Relaxed);
        if matches!(outcome, "deny" | "denied" | "timeout" | "killed" | "kill") {
            self.denied_calls[plane].fetch_add(calls.max(1), Relaxed);
        }
        let bucket = LATENCY_BUCKETS_US.iter().position(|b| latency_us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(latency_us, Relaxed);
    }

    /// The kernel's drop counters as the loader last read them (they only grow).
    pub fn kernel_drops(&self, events: u64, denies: u64) {
        self.kernel_events_dropped.fetch_max(events, Relaxed);
        self.kernel_denies_dropped.fetch_max(denies, Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut decisions = Vec::new();
        for (a, row) in self.decisions.iter().enumerate() {
            for (p, n) in row.iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    decisions.push((ACTIONS[a].to_string(), PLANES[p].to_string(), n));
                }
            }
        }
        let denied_calls = (self.denied_calls.iter().enumerate())
            .map(|(p, n)| (PLANES[p].to_string(), n.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let mut total = 0;
        let latency_buckets = self
            .latency
            .iter()
            .map(|n| {
                total += n.load(Relaxed);
                total
            })
            .collect();
        MetricsSnapshot {
            decisions,
            denied_calls,
            latency_buckets,
            latency_sum_us: self.latency_sum_us.load(Relaxed),
            kernel_events_dropped: self.kernel_events_dropped.load(Relaxed),
            kernel_denies_dropped: self.kernel_denies_dropped.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn decisions_denials_and_the_histogram_agree() {
        let m = DecisionMetrics::default();
        m.decision("allow", "seccomp_notify", 1, 5);
        m.decision("deny", "seccomp_notify", 1, 30);
        m.decision("deny", "kernel", 7, 1_000_000);
        m.decision("held", "fanotify", 1, 100);
        m.decision("not-a-decision", "kernel", 1, 1);
        m.decision("allow", "elsewhere", 1, 10);
        m.kernel_drops(3, 1);
        m.kernel_drops(2, 4);
        let s = m.snapshot();
        let count: u64 = s.decisions.iter().map(|d| d.2).sum();
        assert_eq!(count, 5);
        assert_eq!(*s.latency_buckets.last().unwrap(), count);
        assert_eq!(s.latency_buckets[0], 2, "5 us and 10 us are in the 10 us bucket");
        assert_eq!(s.latency_buckets[LATENCY_BUCKETS_US.len() - 1], 4, "1 s is above the last bound");
        assert_eq!(s.latency_sum_us, 5 + 30 + 1_000_000 + 100 + 10);
        assert!(s.decisions.contains(&("allow".into(), "other".into(), 1)));
        assert!(s.decisions.contains(&("deny".into(), "kernel".into(), 1)));
        assert_eq!(s.denied_calls, vec![("seccomp_notify".into(), 1), ("kernel".into(), 7)]);
        assert_eq!((s.kernel_events_dropped, s.kernel_denies_dropped), (3, 4));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<MetricsSnapshot>(&json).unwrap(), s);
    }
}
