//! Any string through the condition grammar; a parsed condition is evaluated against a context
//! built from the same input, so both the parser and the evaluator are exercised.
#![no_main]
use agt_jail_policy::Expr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(expr) = Expr::parse(text) {
        let ctx = serde_json::json!({
            "event": text,
            "a": {"b": [1, "x", null, true], "c": 1.5},
            "n": "12",
        });
        let _ = expr.eval(&ctx);
        let _ = expr.paths();
    }
});
