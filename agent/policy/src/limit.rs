//! Rate limits (`limit: "N/period"`) are state, so they live outside the pure evaluator:
//! the decision names the rule whose limit applies, and a [`RateLimiter`] owned by the caller
//! counts and turns the (N+1)th matching event in a window into a deny, as AGT does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Action, Decision};

/// A parsed `"N/second|minute|hour|day|session"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateSpec {
    pub max: u64,
    /// Window length; 0 means `session`: one budget for the limiter's lifetime, never reset
    /// (an agt-jail extension; AGT rejects the period).
    pub period_secs: u64,
    #[serde(rename = "limit")]
    pub text: String,
}

impl RateSpec {
    pub fn parse(s: &str) -> Result<RateSpec, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let [count, period] = parts.as_slice() else {
            return Err(format!(
                "invalid limit {}: expected \"<count>/<period>\", e.g. \"100/hour\"",
                crate::quoted(s)
            ));
        };
        let max: u64 = count
            .trim()
            .parse()
            .map_err(|_| format!("invalid limit {}: count must be a non-negative integer", crate::quoted(s)))?;
        let period_secs = match period.trim().to_ascii_lowercase().as_str() {
            "second" => 1,
            "minute" => 60,
            "hour" => 3600,
            "day" => 86_400,
            "session" => 0,
            _ => {
                return Err(format!(
                    "invalid limit {}: period must be one of second, minute, hour, day, session",
                    crate::quoted(s)
                ))
            }
        };
        Ok(RateSpec { max, period_secs, text: s.to_string() })
    }

    /// A per-session budget (`N/session`): counted from the first event, never reset.
    pub fn is_session(&self) -> bool {
        self.period_secs == 0
    }
}

/// The limit attached to a decision: which counter to charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitRef {
    pub agent: String,
    pub policy: String,
    pub rule: String,
    #[serde(flatten)]
    pub spec: RateSpec,
}

/// Time source for windows; injectable so tests need no sleeping.
pub trait Clock {
    /// Time since an arbitrary fixed origin.
    fn now(&self) -> Duration;
}

/// The real monotonic clock.
#[derive(Debug, Clone)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(std::rc::Rc<std::cell::Cell<Duration>>);

impl ManualClock {
    pub fn advance(&self, d: Duration) {
        self.0.set(self.0.get() + d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        self.0.get()
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    count: u64,
    reset_at: Duration,
}

/// Most distinct (agent, policy, rule) counters kept; beyond it, expired ones are dropped and,
/// if still full, new counters fail closed.
pub const MAX_COUNTERS: usize = 100_000;

/// Fixed-window counters keyed by (agent, policy, rule), AGT's semantics.
#[derive(Debug)]
pub struct RateLimiter<C: Clock = MonotonicClock> {
    clock: C,
    windows: HashMap<(String, String, String), Window>,
}

impl Default for RateLimiter<MonotonicClock> {
    fn default() -> Self {
        RateLimiter::new(MonotonicClock::default())
    }
}

impl<C: Clock> RateLimiter<C> {
    pub fn new(clock: C) -> Self {
        RateLimiter { clock, windows: HashMap::new() }
    }

    /// Charges the decision's limit (if any) and returns the decision to enforce: unchanged
    /// while under the limit, a deny `Rate limited: N/period` once over it.
    pub fn apply(&mut self, decision: Decision) -> Decision {
        let Some(l) = decision.limit.as_ref() else {
            return decision;
        };
        let now = self.clock.now();
        let key = (l.agent.clone(), l.policy.clone(), l.rule.clone());
        if let Some(w) = self.windows.get(&key) {
            if now > w.reset_at {
                self.windows.remove(&key);
            }
        }
        let limited = match self.windows.get(&key) {
            Some(w) => w.count >= l.spec.max,
            // A zero budget means no event at all (AGT lets the first one through).
            None => l.spec.max == 0,
        };
        if limited {
            return self.limited(decision);
        }
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_COUNTERS {
            self.windows.retain(|_, w| now <= w.reset_at);
            if self.windows.len() >= MAX_COUNTERS {
                let mut d = Decision::error("rate limiter is full; denying (fail closed)");
                d.matched_rule = decision.matched_rule.clone();
                d.policy = decision.policy.clone();
                return d;
            }
        }
        // A session budget's window never ends.
        let reset_at = match l.spec.period_secs {
            0 => Duration::MAX,
            secs => now.saturating_add(Duration::from_secs(secs)),
        };
        let w = self.windows.entry(key).or_insert(Window { count: 0, reset_at });
        w.count += 1;
        decision
    }

    fn limited(&self, decision: Decision) -> Decision {
        let text = decision.limit.as_ref().map(|l| l.spec.text.clone()).unwrap_or_default();
        let mut d = Decision::new(
            Action::Deny,
            decision.matched_rule.clone(),
            decision.policy.clone(),
            format!("Rate limited: {text}"),
        );
        d.limit = decision.limit;
        d.rate_limited = true;
        d
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dec(limit: &str) -> Decision {
        let mut d = Decision::new(Action::Allow, Some("r".into()), Some("p".into()), "ok".into());
        d.limit = Some(LimitRef {
            agent: "a".into(),
            policy: "p".into(),
            rule: "r".into(),
            spec: RateSpec::parse(limit).unwrap(),
        });
        d
    }

    #[test]
    fn window_counts_and_resets() {
        let clock = ManualClock::default();
        let mut rl = RateLimiter::new(clock.clone());
        for _ in 0..3 {
            assert!(rl.apply(dec("3/minute")).allowed);
        }
        let d = rl.apply(dec("3/minute"));
        assert!(!d.allowed && d.rate_limited);
        assert_eq!(d.reason, "Rate limited: 3/minute");
        clock.advance(Duration::from_secs(61));
        assert!(rl.apply(dec("3/minute")).allowed);
    }

    #[test]
    fn session_budgets_never_reset() {
        let clock = ManualClock::default();
        let mut rl = RateLimiter::new(clock.clone());
        assert_eq!(RateSpec::parse("2/session").unwrap().period_secs, 0);
        assert!(RateSpec::parse("2/session").unwrap().is_session());
        assert!(rl.apply(dec("2/session")).allowed);
        clock.advance(Duration::from_secs(86_400 * 365));
        assert!(rl.apply(dec("2/session")).allowed);
        clock.advance(Duration::from_secs(86_400 * 365 * 100));
        let d = rl.apply(dec("2/session"));
        assert!(!d.allowed && d.rate_limited);
        assert_eq!(d.reason, "Rate limited: 2/session");
        assert!(!rl.apply(dec("0/session")).allowed);
    }

    #[test]
    fn zero_means_none() {
        let mut rl = RateLimiter::new(ManualClock::default());
        assert!(!rl.apply(dec("0/hour")).allowed);
    }

    #[test]
    fn bad_specs() {
        assert!(RateSpec::parse("10").is_err());
        assert!(RateSpec::parse("x/hour").is_err());
        assert!(RateSpec::parse("-1/hour").is_err());
        assert!(RateSpec::parse("1/week").is_err());
        assert_eq!(RateSpec::parse(" 5 / Hour ").unwrap().period_secs, 3600);
    }
}
