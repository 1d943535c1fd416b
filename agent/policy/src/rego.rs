//! Rego policies evaluated in process with regorus (AGT shells out to `opa` per evaluation).

use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::yaml::Pos;
use crate::{Action, Decision, LoadError};

/// Wall-clock cap for one Rego evaluation; a runaway policy is a deny, not a hang.
const REGO_TIME_LIMIT: Duration = Duration::from_millis(250);

/// Most elements `numbers.range`/`numbers.range_step` (and `array.concat`) may build. regorus reserves the whole
/// array before its time check runs, so `numbers.range(1, 1e10)` would abort the process on a
/// failed allocation; our replacements refuse such a range (an evaluation error, so a deny).
pub const MAX_RANGE_ELEMENTS: u64 = 1_000_000;

/// The integer value of a Rego number argument; `None` when it is a non-integral number (OPA
/// then returns undefined).
fn int_arg(name: &str, v: &regorus::Value) -> anyhow::Result<Option<i64>> {
    let n = v.as_number().map_err(|_| anyhow::anyhow!("{name}: operand must be a number"))?;
    if !n.is_integer() {
        return Ok(None);
    }
    n.as_i64().map(Some).ok_or_else(|| anyhow::anyhow!("{name}: operand is out of the 64-bit integer range"))
}

/// `numbers.range_step(from, to, step)`; `numbers.range` is the step-1 case.
fn bounded_range(name: &str, args: &[regorus::Value], step_arg: bool) -> anyhow::Result<regorus::Value> {
    let (Some(from), Some(to)) = (int_arg(name, &args[0])?, int_arg(name, &args[1])?) else {
        return Ok(regorus::Value::Undefined);
    };
    let step = if step_arg {
        match int_arg(name, &args[2])? {
            Some(s) if s > 0 => s,
            _ => anyhow::bail!("{name}: step must be a positive integer"),
        }
    } else {
        1
    };
    let span = (i128::from(to) - i128::from(from)).unsigned_abs();
    let count = span / step.unsigned_abs() as u128 + 1;
    if count > u128::from(MAX_RANGE_ELEMENTS) {
        anyhow::bail!("{name}: a range of {count} elements is over agt-jail's limit of {MAX_RANGE_ELEMENTS}");
    }
    let dir: i128 = if to >= from { 1 } else { -1 };
    let items: Vec<regorus::Value> = (0..count as i128)
        .map(|i| i128::from(from) + dir * i * i128::from(step))
        .filter_map(|v| i64::try_from(v).ok())
        .map(regorus::Value::from)
        .collect();
    Ok(regorus::Value::from(items))
}

/// Longest string `concat`, `replace` and `strings.replace_n` may build. `replace` multiplies
/// (a 4 MiB string with each byte replaced by 4 MiB is 16 TiB), and doubling `concat`s grow
/// faster than the time check between rule evaluations can stop them.
pub const MAX_STRING_BYTES: usize = 64 << 20;

fn str_arg<'a>(name: &str, v: &'a regorus::Value) -> anyhow::Result<&'a str> {
    v.as_string().map(|s| s.as_ref()).map_err(|_| anyhow::anyhow!("{name}: operand must be a string"))
}

fn check_len(name: &str, len: usize) -> anyhow::Result<()> {
    if len > MAX_STRING_BYTES {
        anyhow::bail!("{name}: a result of {len} bytes is over agt-jail's limit of {MAX_STRING_BYTES}");
    }
    Ok(())
}

/// `replace(s, old, new)` (Go's `strings.ReplaceAll`, as regorus does it), sized before it is built.
fn bounded_replace(name: &str, s: &str, old: &str, new: &str) -> anyhow::Result<String> {
    let (count, removed) =
        if old.is_empty() { (s.chars().count() + 1, 0) } else { (s.matches(old).count(), old.len()) };
    let len = (s.len() - count * removed).saturating_add(count.saturating_mul(new.len()));
    check_len(name, len)?;
    Ok(s.replace(old, new))
}

/// `concat(delimiter, array or set of strings)`.
fn bounded_concat(args: &[regorus::Value]) -> anyhow::Result<regorus::Value> {
    let name = "concat";
    let delim = str_arg(name, &args[0])?;
    let items: Vec<&str> = match &args[1] {
        regorus::Value::Array(a) => a.iter().map(|v| str_arg(name, v)).collect::<anyhow::Result<_>>()?,
        regorus::Value::Set(s) => s.iter().map(|v| str_arg(name, v)).collect::<anyhow::Result<_>>()?,
        _ => anyhow::bail!("`{name}` expects array/set of strings."),
    };
    let len = items.iter().map(|i| i.len()).sum::<usize>() + delim.len() * items.len().saturating_sub(1);
    check_len(name, len)?;
    Ok(regorus::Value::from(items.join(delim)))
}

/// `strings.replace_n(patterns, s)`: each pattern in key order, one after the other (as regorus).
fn bounded_replace_n(args: &[regorus::Value]) -> anyhow::Result<regorus::Value> {
    let name = "strings.replace_n";
    let patterns = args[0].as_object().map_err(|_| anyhow::anyhow!("{name}: patterns must be an object"))?;
    let mut s = str_arg(name, &args[1])?.to_string();
    for (k, v) in patterns.iter() {
        let (Ok(old), Ok(new)) = (k.as_string(), v.as_string()) else {
            anyhow::bail!("`{name}` expects string keys and values in pattern object.");
        };
        s = bounded_replace(name, &s, old, new)?;
    }
    Ok(regorus::Value::from(s))
}

/// `array.concat(a, b)`, refused over [`MAX_RANGE_ELEMENTS`] elements (doubling chains).
fn bounded_array_concat(args: &[regorus::Value]) -> anyhow::Result<regorus::Value> {
    let name = "array.concat";
    let not_array = || anyhow::anyhow!("{name}: operand must be an array");
    let (a, b) = (args[0].as_array().map_err(|_| not_array())?, args[1].as_array().map_err(|_| not_array())?);
    let count = a.len() + b.len();
    if count as u64 > MAX_RANGE_ELEMENTS {
        anyhow::bail!("{name}: an array of {count} elements is over agt-jail's limit of {MAX_RANGE_ELEMENTS}");
    }
    Ok(regorus::Value::from(a.iter().chain(b.iter()).cloned().collect::<Vec<regorus::Value>>()))
}

/// Replaces the builtins that can allocate without bound in one call.
fn add_bounded_builtins(engine: &mut regorus::Engine) -> anyhow::Result<()> {
    engine.add_extension(
        "array.concat".to_string(),
        2,
        Box::new(|args: Vec<regorus::Value>| bounded_array_concat(&args)),
    )?;
    engine.add_extension("concat".to_string(), 2, Box::new(|args: Vec<regorus::Value>| bounded_concat(&args)))?;
    engine.add_extension(
        "replace".to_string(),
        3,
        Box::new(|args: Vec<regorus::Value>| {
            let name = "replace";
            let r =
                bounded_replace(name, str_arg(name, &args[0])?, str_arg(name, &args[1])?, str_arg(name, &args[2])?)?;
            Ok(regorus::Value::from(r))
        }),
    )?;
    engine.add_extension(
        "strings.replace_n".to_string(),
        2,
        Box::new(|args: Vec<regorus::Value>| bounded_replace_n(&args)),
    )?;
    engine.add_extension(
        "numbers.range".to_string(),
        2,
        Box::new(|args: Vec<regorus::Value>| bounded_range("numbers.range", &args, false)),
    )?;
    engine.add_extension(
        "numbers.range_step".to_string(),
        3,
        Box::new(|args: Vec<regorus::Value>| bounded_range("numbers.range_step", &args, true)),
    )
}

pub(crate) struct RegoPolicy {
    pub name: String,
    pub query: String,
    // regorus evaluates with `&mut self`; the lock keeps `PolicySet::evaluate(&self)` shareable.
    engine: Mutex<regorus::Engine>,
    /// The engine as loaded, before any evaluation: a panic inside regorus leaves the engine's
    /// rule bookkeeping half-done, so the evaluating engine is replaced by a copy of this one.
    pristine: regorus::Engine,
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
    // regorus leaves the expectation empty for some syntax errors ("expecting ").
    let message = if message.is_empty() || message == "expecting" {
        "syntax error: the expression is incomplete or malformed".to_string()
    } else {
        message
    };
    (pos, message)
}

/// Runs a query, turning a panic inside regorus (some builtins panic on hostile arguments, e.g.
/// an overflowing `sprintf` width) into an error, so that the caller fails closed instead of
/// the process dying. After a panic the engine is replaced by a copy of `pristine`.
fn eval_guarded(
    engine: &mut regorus::Engine,
    pristine: &regorus::Engine,
    query: &str,
) -> anyhow::Result<regorus::QueryResults> {
    let run = std::panic::AssertUnwindSafe(|| engine.eval_query(query.to_string(), false));
    std::panic::catch_unwind(run).unwrap_or_else(|payload| {
        *engine = pristine.clone();
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(anyhow::anyhow!("the Rego evaluator failed: {what}"))
    })
}

/// Evaluates the query once on an empty input so that a query that does not parse, or names a
/// function that does not exist, is a load error rather than a deny on every event. Errors
/// located in the policy itself depend on the input and are left to evaluation (a deny).
fn check_query(pristine: &regorus::Engine, file: &str, query: &str) -> Result<(), LoadError> {
    let mut engine = pristine.clone();
    engine.set_input(regorus::Value::new_object());
    match eval_guarded(&mut engine, pristine, query) {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            if !text.contains("<query.rego>") {
                return Ok(());
            }
            let (pos, msg) = locate(&text);
            Err(LoadError::new(
                file,
                Pos::default(),
                format!("rego query {} is invalid at column {}: {msg}", crate::quoted(query), pos.col),
            ))
        }
    }
}

impl RegoPolicy {
    pub fn new(file: &str, text: &str, query: Option<&str>) -> Result<RegoPolicy, LoadError> {
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: REGO_TIME_LIMIT,
            check_interval: std::num::NonZeroU32::MIN,
        });
        add_bounded_builtins(&mut engine)
            .map_err(|e| LoadError::new(file, Pos::default(), format!("rego: cannot install bounded builtins: {e}")))?;
        let package = engine.add_policy(file.to_string(), text.to_string()).map_err(|e| {
            let (pos, msg) = locate(&e.to_string());
            LoadError::new(file, pos, format!("rego: {msg}"))
        })?;
        let query = match query {
            Some(q) => q.to_string(),
            None => format!("{package}.allow"),
        };
        check_query(&engine, file, &query)?;
        Ok(RegoPolicy { name: file.to_string(), query, pristine: engine.clone(), engine: Mutex::new(engine) })
    }

    pub fn evaluate(&self, ctx: &Value) -> Decision {
        let mut engine = match self.engine.lock() {
            Ok(g) => g,
            // A panic while holding the lock cannot leave regorus state we rely on (input is
            // reset each time), so keep going rather than deny forever.
            Err(poisoned) => poisoned.into_inner(),
        };
        engine.set_input(regorus::Value::from(ctx.clone()));
        let results = match eval_guarded(&mut engine, &self.pristine, &self.query) {
            Ok(r) => r,
            Err(e) => {
                let mut d = Decision::error(format!(
                    "rego evaluation error in {} ({}): {} (fail closed)",
                    self.name,
                    self.query,
                    locate(&e.to_string()).1
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
