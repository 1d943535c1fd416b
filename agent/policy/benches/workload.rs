//! The policies both `benches/eval.rs` and `examples/latency.rs` measure, so their numbers
//! describe the same workload.

/// `n` rules, the matching one last. `indexed`: rules test `exec.path == '...'`, which the
/// kernel indexes; otherwise `exec.path startswith '...'`, which forces a scan of every rule.
pub fn yaml_with_rules(n: usize, indexed: bool) -> String {
    let mut doc =
        String::from("apiVersion: governance.toolkit/v1\nname: bench\nagents: ['*']\ndefault_action: allow\nrules:\n");
    for i in 0..n {
        let path = if i + 1 == n { "/usr/bin/rm".to_string() } else { format!("/usr/bin/tool{i}") };
        let op = if indexed { "==" } else { "startswith" };
        doc.push_str(&format!(
            "  - name: r{i}\n    condition: \"event == 'exec' and exec.path {op} '{path}' and proc.uid < 1000\"\n    action: deny\n"
        ));
    }
    doc
}

pub const REGO: &str = r#"package bench
import rego.v1
default allow := false
blocked := {"/usr/bin/curl", "/usr/bin/wget", "/usr/bin/nc"}
allow if {
    input.event == "exec"
    not blocked[input.exec.path]
    input.proc.uid >= 500
}
"#;
