//! One evaluation against 1, 10, 100 and 1,000 governance.toolkit/v1 rules (the matching rule
//! is the last one loaded, so every rule is evaluated), and one Rego evaluation.
use agt_jail_policy::{EvalOptions, PolicySet};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::json;

#[path = "workload.rs"]
mod workload;
use workload::{yaml_with_rules, REGO};

fn context() -> serde_json::Value {
    json!({
        "event": "exec",
        "agent": {"did": "did:agt:coder", "ring": 2, "session": "s1"},
        "proc": {"pid": 4242, "ppid": 1, "uid": 501, "comm": "rm", "exe": "/usr/bin/rm"},
        "exec": {"path": "/usr/bin/rm", "argv": ["rm", "-rf", "target"]},
    })
}

fn bench(c: &mut Criterion) {
    let ctx = context();
    let opts = EvalOptions::default();
    for (group, indexed) in [("yaml_rules_indexed", true), ("yaml_rules_scan", false)] {
        let mut g = c.benchmark_group(group);
        for n in [1usize, 10, 100, 1000] {
            let set = match PolicySet::from_str("bench.yaml", &yaml_with_rules(n, indexed)) {
                Ok(s) => s,
                Err(e) => panic!("bench policy: {e}"),
            };
            g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| std::hint::black_box(set.evaluate(std::hint::black_box(&ctx), &opts)))
            });
        }
        g.finish();
    }
    let set = match PolicySet::from_rego_str("bench.rego", REGO, None) {
        Ok(s) => s,
        Err(e) => panic!("bench rego: {e}"),
    };
    c.bench_function("rego_allow", |b| {
        b.iter(|| std::hint::black_box(set.evaluate(std::hint::black_box(&ctx), &opts)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
