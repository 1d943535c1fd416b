//! Trust as AGT scores it: 0..=1000, new agents at 500, five tiers (see
//! [`agt_jail_policy::context::tier_of`]). Denials cost trust, allowed actions earn a
//! little back up to a ceiling, and trust decays toward a floor over time. The
//! arithmetic is here, apart from its effects (demotion, the kill switch), which the
//! evaluator carries out.
use std::time::Duration;

use serde_json::Value;

/// The highest trust score.
pub const TRUST_MAX: u32 = 1000;

/// Trust lost over time while it is above `floor`: `points` every `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decay {
    pub points: u32,
    pub every: Duration,
    pub floor: u32,
}

/// How trust moves, and what trust ends an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustRules {
    /// Trust lost per denied action.
    pub penalty: u32,
    /// Below this trust the agent is killed (0: never).
    pub kill_below: u32,
    /// Trust earned per allowed action held for a decision (exec, open).
    pub reward: u32,
    /// Rewards never lift trust above this (`None`: the agent's starting trust, so rewards
    /// only win back what denials cost).
    pub reward_max: Option<u32>,
    pub decay: Option<Decay>,
}

impl Default for TrustRules {
    fn default() -> Self {
        TrustRules { penalty: 10, kill_below: 0, reward: 1, reward_max: None, decay: None }
    }
}

/// Trust after `denials` denials.
pub fn penalize(trust: u32, rules: &TrustRules, denials: u64) -> u32 {
    let penalty = u64::from(rules.penalty).saturating_mul(denials);
    u32::try_from(u64::from(trust).saturating_sub(penalty)).unwrap_or(0)
}

/// Trust after one allowed action: up by the reward, never above `ceiling` (and never
/// down, when it already is above it).
pub fn reward(trust: u32, rules: &TrustRules, ceiling: u32) -> u32 {
    if trust >= ceiling {
        return trust;
    }
    trust.saturating_add(rules.reward).min(ceiling).min(TRUST_MAX)
}

/// Trust after `elapsed` of decay, and how much of `elapsed` was used (whole steps only;
/// the rest counts toward the next step). Decay never lifts trust and stops at the floor.
pub fn decay(trust: u32, decay: &Decay, elapsed: Duration) -> (u32, Duration) {
    if decay.every.is_zero() {
        return (trust, Duration::ZERO);
    }
    let steps = elapsed.as_nanos() / decay.every.as_nanos();
    let used = decay.every.saturating_mul(u32::try_from(steps).unwrap_or(u32::MAX));
    if trust <= decay.floor {
        return (trust, used);
    }
    let loss = u128::from(decay.points).saturating_mul(steps);
    let after = u128::from(trust).saturating_sub(loss).max(u128::from(decay.floor));
    (u32::try_from(after).unwrap_or(trust), used)
}

/// A policy's `trust:` section could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{file}: trust.{key}: {message}")]
pub struct TrustSectionError {
    pub file: String,
    pub key: String,
    pub message: String,
}

/// What a policy's `trust:` section sets (every key optional).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrustSection {
    pub penalty: Option<u32>,
    pub reward: Option<u32>,
    pub reward_max: Option<u32>,
    pub kill_below: Option<u32>,
    pub decay: Option<Decay>,
}

impl TrustSection {
    /// Reads a `trust:` section of policy `file`:
    /// `{penalty, reward, reward_max, kill_below, decay: {points, every, floor}}`, each
    /// a whole number 0-1000 (`every`: seconds, 1 or more).
    pub fn parse(file: &str, section: &Value) -> Result<TrustSection, TrustSectionError> {
        let err = |key: &str, message: String| TrustSectionError { file: file.into(), key: key.into(), message };
        let Some(map) = section.as_object() else {
            return Err(err("", "expected a mapping of penalty, reward, reward_max, kill_below, decay".into()));
        };
        let score = |key: &str, v: &Value| -> Result<u32, TrustSectionError> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n <= TRUST_MAX)
                .ok_or_else(|| err(key, format!("expected a whole number 0-1000, found {v}")))
        };
        let mut out = TrustSection::default();
        for (key, value) in map {
            match key.as_str() {
                "penalty" => out.penalty = Some(score(key, value)?),
                "reward" => out.reward = Some(score(key, value)?),
                "reward_max" => out.reward_max = Some(score(key, value)?),
                "kill_below" => out.kill_below = Some(score(key, value)?),
                "decay" => out.decay = Some(parse_decay(value, &err, &score)?),
                other => {
                    return Err(err(
                        other,
                        "unknown field; expected penalty, reward, reward_max, kill_below or decay".into(),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// The rules with this section's values where the section has them.
    pub fn apply(&self, mut rules: TrustRules) -> TrustRules {
        rules.penalty = self.penalty.unwrap_or(rules.penalty);
        rules.reward = self.reward.unwrap_or(rules.reward);
        rules.reward_max = self.reward_max.or(rules.reward_max);
        rules.kill_below = self.kill_below.unwrap_or(rules.kill_below);
        rules.decay = self.decay.or(rules.decay);
        rules
    }
}

fn parse_decay(
    value: &Value,
    err: &dyn Fn(&str, String) -> TrustSectionError,
    score: &dyn Fn(&str, &Value) -> Result<u32, TrustSectionError>,
) -> Result<Decay, TrustSectionError> {
    let Some(map) = value.as_object() else {
        return Err(err("decay", "expected a mapping of points, every, floor".into()));
    };
    let field = |key: &str| map.get(key).ok_or_else(|| err(&format!("decay.{key}"), "missing".into()));
    for key in map.keys() {
        if !["points", "every", "floor"].contains(&key.as_str()) {
            return Err(err(&format!("decay.{key}"), "unknown field; expected points, every or floor".into()));
        }
    }
    let every = field("every")?;
    let secs = every
        .as_u64()
        .filter(|s| *s >= 1)
        .ok_or_else(|| err("decay.every", format!("expected whole seconds, 1 or more, found {every}")))?;
    Ok(Decay {
        points: score("decay.points", field("points")?)?,
        every: Duration::from_secs(secs),
        floor: score("decay.floor", field("floor")?)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn penalties_stop_at_zero() {
        let rules = TrustRules { penalty: 30, ..TrustRules::default() };
        assert_eq!(penalize(500, &rules, 1), 470);
        assert_eq!(penalize(500, &rules, 10), 200);
        assert_eq!(penalize(50, &rules, 2), 0);
        assert_eq!(penalize(500, &rules, u64::MAX), 0);
    }

    #[test]
    fn rewards_stop_at_the_ceiling_and_never_lower_trust() {
        let rules = TrustRules { reward: 5, ..TrustRules::default() };
        assert_eq!(reward(490, &rules, 500), 495);
        assert_eq!(reward(498, &rules, 500), 500);
        assert_eq!(reward(500, &rules, 500), 500);
        assert_eq!(reward(700, &rules, 500), 700, "above the ceiling: unchanged, not pulled down");
        assert_eq!(reward(999, &TrustRules { reward: 50, ..rules }, 5000), 1000);
    }

    #[test]
    fn decay_moves_toward_the_floor_in_whole_steps() {
        let d = Decay { points: 10, every: Duration::from_secs(60), floor: 300 };
        assert_eq!(decay(500, &d, Duration::from_secs(59)), (500, Duration::ZERO));
        assert_eq!(decay(500, &d, Duration::from_secs(61)), (490, Duration::from_secs(60)));
        assert_eq!(decay(500, &d, Duration::from_secs(600)), (400, Duration::from_secs(600)));
        assert_eq!(decay(320, &d, Duration::from_secs(600)).0, 300, "stops at the floor");
        assert_eq!(decay(200, &d, Duration::from_secs(600)).0, 200, "never lifts trust");
        let zero = Decay { every: Duration::ZERO, ..d };
        assert_eq!(decay(500, &zero, Duration::from_secs(600)).0, 500);
    }

    #[test]
    fn a_trust_section_sets_what_it_names() {
        let s = TrustSection::parse(
            "p.yaml",
            &json!({"penalty": 50, "reward": 2, "kill_below": 100, "decay": {"points": 5, "every": 30, "floor": 300}}),
        )
        .unwrap();
        let rules = s.apply(TrustRules::default());
        assert_eq!((rules.penalty, rules.reward, rules.kill_below, rules.reward_max), (50, 2, 100, None));
        assert_eq!(rules.decay, Some(Decay { points: 5, every: Duration::from_secs(30), floor: 300 }));
        assert_eq!(TrustSection::parse("p", &json!({})).unwrap().apply(TrustRules::default()), TrustRules::default());
    }

    #[test]
    fn a_bad_trust_section_is_one_located_error() {
        for (section, needle) in [
            (json!({"penalty": -1}), "p.yaml: trust.penalty: expected a whole number 0-1000, found -1"),
            (json!({"penalty": 1001}), "trust.penalty"),
            (json!({"reward": "x"}), "trust.reward"),
            (json!({"bonus": 1}), "trust.bonus: unknown field"),
            (json!({"decay": {"points": 1, "floor": 2}}), "trust.decay.every: missing"),
            (json!({"decay": {"points": 1, "every": 0, "floor": 2}}), "trust.decay.every"),
            (json!({"decay": {"points": 1, "every": 1, "floor": 2, "x": 1}}), "trust.decay.x"),
            (json!([1]), "expected a mapping"),
        ] {
            let err = TrustSection::parse("p.yaml", &section).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} (wanted {needle})");
            assert_eq!(err.lines().count(), 1);
        }
    }
}
