//! Latency percentiles for one evaluation (criterion reports means/medians only).
//! `cargo run --release -p agt-jail-policy --example latency [-- ITERATIONS]`
//! Times each of ITERATIONS (default 100,000) evaluations individually and prints p50/p99/p99.9.
use std::time::Instant;

use agt_jail_policy::{EvalOptions, PolicySet};
use serde_json::json;

#[path = "../benches/workload.rs"]
mod workload;
use workload::{yaml_with_rules, REGO};

fn percentiles(name: &str, iterations: usize, mut f: impl FnMut()) {
    for _ in 0..iterations / 10 {
        f();
    }
    let mut ns: Vec<u64> = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        f();
        ns.push(t.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
    println!(
        "{name:<26} n={iterations:<7} p50={:>7} ns  p99={:>7} ns  p99.9={:>7} ns  max={:>8} ns",
        at(0.50),
        at(0.99),
        at(0.999),
        ns[ns.len() - 1]
    );
}

fn main() {
    let iterations: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let ctx = json!({
        "event": "exec",
        "agent": {"did": "did:agt:coder", "ring": 2, "session": "s1"},
        "proc": {"pid": 4242, "ppid": 1, "uid": 501, "comm": "rm", "exe": "/usr/bin/rm"},
        "exec": {"path": "/usr/bin/rm", "argv": ["rm", "-rf", "target"]},
    });
    let opts = EvalOptions::default();
    for (kind, indexed) in [("indexed", true), ("scan", false)] {
        for n in [1usize, 10, 100, 1000] {
            let set = match PolicySet::from_str("bench.yaml", &yaml_with_rules(n, indexed)) {
                Ok(s) => s,
                Err(e) => panic!("bench policy: {e}"),
            };
            let d = set.evaluate(&ctx, &opts);
            assert_eq!(d.matched_rule.as_deref(), Some(format!("r{}", n - 1).as_str()), "the last rule must match");
            percentiles(&format!("yaml {kind} {n} rules"), iterations, || {
                std::hint::black_box(set.evaluate(std::hint::black_box(&ctx), &opts));
            });
        }
    }
    let set = match PolicySet::from_rego_str("bench.rego", REGO, None) {
        Ok(s) => s,
        Err(e) => panic!("bench rego: {e}"),
    };
    percentiles("rego", iterations / 10, || {
        std::hint::black_box(set.evaluate(std::hint::black_box(&ctx), &opts));
    });
}
