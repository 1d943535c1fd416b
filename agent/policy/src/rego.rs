//! Rego policies evaluated in process with regorus (AGT shells out to `opa` per evaluation).

use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::yaml::Pos;
use crate::{Action, Decision, LoadError};

/// Wall-clock cap for one Rego evaluation; a runaway policy is a deny, not a hang.
const REGO_TIME_LIMIT: Duration = Duration::from_millis(250);

pub(crate) struct RegoPolicy {
    pub name: String,
    pub query: String,
    // regorus evaluates with `&mut self`; the lock keeps `PolicySet::evaluate(&self)` shareable.
    engine: Mutex<regorus::Engine>,
}

impl std::fmt::Debug for RegoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoPolicy").field("name", &self.name).field("query", &self.query).finish()
    }
}

/// regorus errors look like `--> file:line:col`, a source excerpt, then `error: message`.
fn locate(msg: &str) -> (Pos, String) {
    let mut pos = Pos { line: 1, col: 1 };
    for line in msg.lines() {
        if let Some(loc) = line.trim().strip_prefix("-->") {
            let mut it = loc.trim().rsplitn(3, ':');
            if let (Some(c), Some(l)) = (it.next(), it.next()) {
                if let (Ok(l), Ok(c)) = (l.parse(), c.parse()) {
                    pos = Pos { line: l, col: c };
                }
            }
        }
    }
    let message = msg
        .lines()
        .find_map(|l| l.trim().strip_prefix("error:").map(|m| m.trim().to_string()))
        .unwrap_or_else(|| msg.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or(msg).to_string());
    (pos, message)
}

impl RegoPolicy {
    pub fn new(file: &str, text: &str, query: Option<&str>) -> Result<RegoPolicy, LoadError> {
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: REGO_TIME_LIMIT,
            check_interval: std::num::NonZeroU32::MIN,
        });
        let package = engine.add_policy(file.to_string(), text.to_string()).map_err(|e| {
            let (pos, msg) = locate(&e.to_string());
            LoadError::new(file, pos, format!("rego: {msg}"))
        })?;
        let query = match query {
            Some(q) => q.to_string(),
            None => format!("{package}.allow"),
        };
        Ok(RegoPolicy { name: file.to_string(), query, engine: Mutex::new(engine) })
    }

    pub fn evaluate(&self, ctx: &Value) -> Decision {
        let mut engine = match self.engine.lock() {
            Ok(g) => g,
            // A panic while holding the lock cannot leave regorus state we rely on (input is
            // reset each time), so keep going rather than deny forever.
            Err(poisoned) => poisoned.into_inner(),
        };
        engine.set_input(regorus::Value::from(ctx.clone()));
        let results = match engine.eval_query(self.query.clone(), false) {
            Ok(r) => r,
            Err(e) => {
                let mut d = Decision::error(format!(
                    "rego evaluation error in {} ({}): {} (fail closed)",
                    self.name,
                    self.query,
                    e.to_string().lines().next().unwrap_or_default()
                ));
                d.policy = Some(self.name.clone());
                return d;
            }
        };
        let value = results.result.first().and_then(|r| r.expressions.first()).map(|e| e.value.clone());
        let json = value.and_then(|v| v.to_json_str().ok()).and_then(|s| serde_json::from_str::<Value>(&s).ok());
        let policy = Some(self.name.clone());
        match json {
            Some(Value::Bool(b)) => {
                let action = if b { Action::Allow } else { Action::Deny };
                Decision::new(
                    action,
                    None,
                    policy,
                    format!("OPA/Rego policy ({}): {}", self.query, if b { "allowed" } else { "denied" }),
                )
            }
            Some(Value::Object(map)) => {
                let decision = map.get("decision").and_then(Value::as_str).and_then(Action::parse);
                let reason = map
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("OPA/Rego policy ({})", self.query));
                match decision {
                    Some(a) => {
                        let rule = map.get("rule").and_then(Value::as_str).map(str::to_string);
                        Decision::new(a, rule, policy, reason)
                    }
                    None => {
                        let mut d = Decision::error(format!(
                            "rego verdict from {} has no valid `decision` (fail closed)",
                            self.query
                        ));
                        d.policy = policy;
                        d
                    }
                }
            }
            None => Decision::new(
                Action::Deny,
                None,
                policy,
                format!("OPA/Rego policy ({}): undefined, denied", self.query),
            ),
            Some(other) => {
                let mut d = Decision::error(format!(
                    "rego query {} returned {other}, expected a boolean or {{decision, reason}} (fail closed)",
                    self.query
                ));
                d.policy = policy;
                d
            }
        }
    }
}
