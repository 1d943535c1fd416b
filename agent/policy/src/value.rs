//! Value semantics over JSON that reproduce Python's, because AGT's evaluators are Python and
//! a policy must decide the same way in both (e.g. `True == 1`, `"a" < "b"`, `1 < "a"` raises).

use std::cmp::Ordering;

use serde_json::Value;

/// Python's `TypeError` for an unorderable or non-iterable pair; the caller fails closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMismatch(pub String);

/// A JSON number or boolean as Python sees it (`bool` is an `int`).
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
}

fn as_num(v: &Value) -> Option<Num> {
    match v {
        Value::Bool(b) => Some(Num::Int(i128::from(*b))),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(Num::Int(i128::from(i)))
            } else if let Some(u) = n.as_u64() {
                Some(Num::Int(i128::from(u)))
            } else {
                n.as_f64().map(Num::Float)
            }
        }
        _ => None,
    }
}

fn num_cmp(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(&y)),
        // Python compares int and float exactly; i128 -> f64 only loses precision beyond 2^53,
        // which event contexts do not carry.
        (Num::Int(x), Num::Float(y)) => (x as f64).partial_cmp(&y),
        (Num::Float(x), Num::Int(y)) => x.partial_cmp(&(y as f64)),
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y),
    }
}

/// Python `==` between two JSON values.
pub fn py_eq(a: &Value, b: &Value) -> bool {
    if let (Some(x), Some(y)) = (as_num(a), as_num(b)) {
        return num_cmp(x, y) == Some(Ordering::Equal);
    }
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
        }
        _ => false,
    }
}

/// Python ordering (`<` and friends); `Err` where Python raises `TypeError`.
pub fn py_cmp(a: &Value, b: &Value) -> Result<Option<Ordering>, TypeMismatch> {
    if let (Some(x), Some(y)) = (as_num(a), as_num(b)) {
        return Ok(num_cmp(x, y));
    }
    match (a, b) {
        // Rust orders str by UTF-8 bytes, which is the same order as Python's code points.
        (Value::String(x), Value::String(y)) => Ok(Some(x.cmp(y))),
        (Value::Array(x), Value::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                if !py_eq(p, q) {
                    return py_cmp(p, q);
                }
            }
            Ok(Some(x.len().cmp(&y.len())))
        }
        _ => Err(TypeMismatch(format!("'<' not supported between instances of '{}' and '{}'", py_type(a), py_type(b)))),
    }
}

pub fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// Python truthiness.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Python `needle in haystack`; `Err` where Python raises.
pub fn py_in(needle: &Value, haystack: &Value) -> Result<bool, TypeMismatch> {
    match haystack {
        Value::Array(items) => Ok(items.iter().any(|x| py_eq(needle, x))),
        Value::String(h) => match needle {
            Value::String(n) => Ok(h.contains(n.as_str())),
            other => {
                Err(TypeMismatch(format!("'in <string>' requires string as left operand, not {}", py_type(other))))
            }
        },
        Value::Object(map) => match needle {
            Value::String(n) => Ok(map.contains_key(n)),
            Value::Array(_) | Value::Object(_) => Err(TypeMismatch(format!("unhashable type: '{}'", py_type(needle)))),
            // JSON object keys are strings; a number or bool is never one of them.
            _ => Ok(false),
        },
        other => Err(TypeMismatch(format!("argument of type '{}' is not iterable", py_type(other)))),
    }
}

/// Python's `float(x)` for the values AGT's comparison coerces, with AGT's `None -> 0`.
/// `None` here means Python raised (`TypeError`/`ValueError`) and AGT treats the rule as not matching.
pub fn agt_float(v: &Value) -> Option<f64> {
    match v {
        Value::Null => Some(0.0),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::Number(n) => n.as_f64(),
        Value::String(s) => py_float_str(s),
        _ => None,
    }
}

/// Python's `float(str)`: surrounding whitespace, `_` between digits, inf/nan in any case.
pub fn py_float_str(s: &str) -> Option<f64> {
    let t = s.trim();
    if t.is_empty() {
        return None;
    }
    let cleaned: String = if t.contains('_') {
        let chars: Vec<char> = t.chars().collect();
        for (i, c) in chars.iter().enumerate() {
            if *c == '_' {
                let before = i.checked_sub(1).and_then(|j| chars.get(j));
                let after = chars.get(i + 1);
                if !(before.is_some_and(char::is_ascii_digit) && after.is_some_and(char::is_ascii_digit)) {
                    return None;
                }
            }
        }
        chars.into_iter().filter(|c| *c != '_').collect()
    } else {
        t.to_string()
    };
    let lower = cleaned.to_ascii_lowercase();
    let body = lower.strip_prefix(['+', '-']).unwrap_or(&lower);
    // Rust also accepts forms Python does not; keep to Python's grammar.
    let named = matches!(body, "inf" | "infinity" | "nan");
    if !named && !body.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | '+' | '-')) {
        return None;
    }
    lower.parse::<f64>().ok()
}

/// Python's `str(x)` for JSON values (used by Agent-OS `matches`).
pub fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => {
            if n.is_f64() {
                n.as_f64().map_or_else(String::new, py_float_repr)
            } else {
                n.to_string()
            }
        }
        Value::String(s) => {
            let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            let mut out = String::with_capacity(s.len() + 2);
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
            out
        }
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(py_repr).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> =
                map.iter().map(|(k, v)| format!("{}: {}", py_repr(&Value::String(k.clone())), py_repr(v))).collect();
            format!("{{{}}}", parts.join(", "))
        }
    }
}

/// Python's float repr: shortest round-trip digits, exponent outside [1e-4, 1e16).
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let a = f.abs();
    if a == 0.0 || (1e-4..1e16).contains(&a) {
        let s = format!("{f:?}");
        if s.contains('.') || s.contains('e') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((m, e)) => {
                let (sign, digits) = match e.strip_prefix('-') {
                    Some(d) => ('-', d),
                    None => ('+', e),
                };
                format!("{m}e{sign}{digits:0>2}")
            }
            None => s,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn python_equality() {
        assert!(py_eq(&json!(true), &json!(1)));
        assert!(py_eq(&json!(1), &json!(1.0)));
        assert!(!py_eq(&json!("1"), &json!(1)));
        assert!(py_eq(&json!([1, "a"]), &json!([1.0, "a"])));
    }

    #[test]
    fn python_ordering() {
        assert_eq!(py_cmp(&json!("a"), &json!("b")).unwrap(), Some(Ordering::Less));
        assert!(py_cmp(&json!("a"), &json!(1)).is_err());
        assert!(py_cmp(&json!(null), &json!(1)).is_err());
        assert_eq!(py_cmp(&json!([1, 2]), &json!([1])).unwrap(), Some(Ordering::Greater));
    }

    #[test]
    fn python_float() {
        assert_eq!(py_float_str(" 12 "), Some(12.0));
        assert_eq!(py_float_str("1_000"), Some(1000.0));
        assert_eq!(py_float_str("1__0"), None);
        assert_eq!(py_float_str("Infinity"), Some(f64::INFINITY));
        assert_eq!(py_float_str("0x10"), None);
        assert_eq!(py_float_str("abc"), None);
        assert_eq!(py_float_str("1e3"), Some(1000.0));
    }

    #[test]
    fn python_repr() {
        assert_eq!(py_str(&json!(1.0)), "1.0");
        assert_eq!(py_str(&json!(1e16)), "1e+16");
        assert_eq!(py_str(&json!(true)), "True");
        assert_eq!(py_str(&json!(["a", 1])), "['a', 1]");
    }
}
