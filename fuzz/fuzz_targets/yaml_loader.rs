//! Any bytes through the policy loader (toolkit v1, Agent-OS v4 detection, extends-free), then
//! one evaluation if it loaded: must never panic, and must finish within the loader's limits.
#![no_main]
use agt_jail_policy::{EvalOptions, PolicySet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(set) = PolicySet::from_str("fuzz.yaml", text) {
        let ctx = serde_json::json!({
            "event": "exec",
            "agent": {"did": "did:agt:fuzz"},
            "proc": {"uid": 0, "comm": "sh"},
            "exec": {"path": "/bin/sh", "argv": ["sh", "-c", "id"]},
            "file": {"path": "/home/u/.ssh/id_rsa"},
        });
        let _ = set.evaluate(&ctx, &EvalOptions::default());
    }
});
