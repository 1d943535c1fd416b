//! `agt-jail policy lint|eval|test`: thin edges over the agt-jail-policy crate.
use std::io::{BufRead, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agt_jail_policy::testrun;
use agt_jail_policy::{Decision, EvalOptions, PolicySet, RateLimiter, Stage, Strategy};
use clap::{Args, Subcommand};

/// Largest single context accepted (a whole `--input` file, or one `--batch` line).
const MAX_CONTEXT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Check policy files (YAML governance.toolkit/v1, Agent-OS v4, .rego, or *.test.yaml); errors print as file:line:col: message.
    #[command(
        after_help = "Warnings (file:line:col: warning: ...) name constructs that load but almost certainly do \
        not do what was meant, e.g. a policy that names no agent, or a bare literal condition.\n\n\
        Exit status: 0 every file loads (warnings may be printed), 1 a file does not load, 125 usage error."
    )]
    Lint {
        /// Policy files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Evaluate one event context (or, with --batch, one per input line) and print the decision as JSON.
    #[command(after_help = "A decision is printed for every context, including a deny caused by an evaluation \
        error (\"error\": true, e.g. a Rego policy that fails at run time: fail closed).\n\n\
        Exit status: 0 every context was evaluated; 2 a policy does not load, the input cannot be read, or a \
        context is not a JSON object (in --batch mode the bad line gets an error decision and the rest are still \
        evaluated; a line over the 16 MiB limit stops the run); 125 usage error (e.g. an invalid --stage).")]
    Eval(EvalArgs),
    /// Run the *.test.yaml cases under DIR and report pass/fail per case.
    #[command(after_help = "Exit status: 0 every case passed, 1 a case failed or a test file (or a policy it \
        names) does not load, 125 usage error.")]
    Test {
        /// Directory (searched recursively) or a single test file.
        dir: PathBuf,
    },
    /// Show, per rule, which plane enforces it on this host (kernel tables, LSM, seccomp
    /// user-notification, fanotify), the compiled network plan's size, and every rule that
    /// cannot be enforced before effect.
    #[command(
        after_help = "Example:\n  agt-jail policy explain --policy policies/coding-agent/policy.yaml --ring 2\n  \
        agt-jail policy explain --policy p.yaml --strict --json   # exit 1 if a rule cannot be enforced\n\n\
        Domains the rules test (net.domain) are resolved with the system resolver; names that do not \
        resolve are listed and match no address in the kernel tables."
    )]
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct ExplainArgs {
    /// Policy file; repeat for several.
    #[arg(long = "policy", required = true)]
    policies: Vec<PathBuf>,
    /// Ring the agent runs in (0-3); rings 1-3 are confined (own mount namespace).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=3))]
    ring: u8,
    /// Fail (exit 1) when any deny rule cannot be enforced before effect on this host.
    #[arg(long)]
    strict: bool,
    /// Print the whole plan as JSON.
    #[arg(long)]
    json: bool,
    /// Agent DID the plan is compiled for (policies targeting other agents are left out).
    #[arg(long, default_value = "did:mesh:00000000000000000000000000000000")]
    agent: String,
    /// Trust score of the agent (0..1000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(0..=1000))]
    trust: u32,
    /// Query for .rego policies (default: data.<package>.allow).
    #[arg(long)]
    rego_query: Option<String>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Policy file; repeat for several (.rego files are Rego, others YAML/JSON).
    #[arg(long = "policy", required = true)]
    policies: Vec<PathBuf>,
    /// Lifecycle stage of governance.toolkit/v1 rules to consider: pre_input, pre_tool (the
    /// default), post_tool, pre_output (AGT's stages; rules of other stages are skipped).
    #[arg(long, value_parser = parse_stage)]
    stage: Option<Stage>,
    /// Acting agent's DID (default: the context's agent.did, then agent.id).
    #[arg(long)]
    agent: Option<String>,
    /// JSON context file, or - for stdin.
    #[arg(long)]
    input: String,
    /// Read JSON lines (one context each) and write one decision per line, in order.
    /// Rate limits count across the lines, as for one session.
    #[arg(long)]
    batch: bool,
    /// Conflict strategy, overriding the policies' conflict_strategy.
    #[arg(long, value_parser = ["priority_first_match", "deny_overrides", "allow_overrides", "most_specific_wins"])]
    strategy: Option<String>,
    /// Query for .rego policies (default: data.<package>.allow).
    #[arg(long)]
    rego_query: Option<String>,
}

fn parse_stage(s: &str) -> Result<Stage, String> {
    Stage::parse_or_explain(s)
}

pub fn run(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Lint { files } => lint(&files),
        PolicyCommand::Eval(args) => eval(&args),
        PolicyCommand::Test { dir } => test(&dir),
        PolicyCommand::Explain(args) => explain(&args),
    }
}

fn lint(files: &[PathBuf]) -> ExitCode {
    let mut bad = 0usize;
    let mut warnings = 0usize;
    for f in files {
        // Test files beside the policies are checked as test files (structure and the policies
        // they load), so `policy lint policies/*/*` works.
        let result = if testrun::is_test_file(f) {
            testrun::lint_file(f).map(|_| Vec::new()).map_err(|e| e.to_string())
        } else {
            PolicySet::load(std::slice::from_ref(f))
                .map_err(|e| e.to_string())
                .and_then(|set| lint_trust(&set).map(|()| set.warnings().to_vec()))
        };
        match result {
            Ok(found) => {
                print_warnings(&found);
                warnings += found.len();
            }
            Err(e) => {
                bad += 1;
                eprintln!("{e}");
            }
        }
    }
    if bad == 0 {
        match warnings {
            0 => println!("{} file(s) ok", files.len()),
            n => println!("{} file(s) ok, {n} warning(s)", files.len()),
        }
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The `trust:` sections are agt-jail's (the policy kernel keeps them as written): checked
/// here as `exec` reads them.
fn lint_trust(set: &PolicySet) -> Result<(), String> {
    for (file, section) in set.trust_sections() {
        agt_jail_supervisor::trust::TrustSection::parse(file, section).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn open_input(input: &str) -> Result<Box<dyn BufRead>, String> {
    if input == "-" {
        Ok(Box::new(std::io::BufReader::new(std::io::stdin())))
    } else {
        let f = std::fs::File::open(input).map_err(|e| format!("{input}: cannot read input: {e}"))?;
        Ok(Box::new(std::io::BufReader::new(f)))
    }
}

/// Loads the policies and refuses flags that would have no effect on them. `toolkit_flags`
/// names the given flags that only governance.toolkit/v1 policies use.
fn load_for(policies: &[PathBuf], rego_query: Option<&str>, toolkit_flags: &[&str]) -> Result<PolicySet, String> {
    let set = PolicySet::load_with(policies, rego_query).map_err(|e| e.to_string())?;
    if rego_query.is_some() && !set.has_rego() {
        return Err("agt-jail: --rego-query is given but none of the --policy files is a .rego file".to_string());
    }
    if let (Some(flag), false) = (toolkit_flags.first(), set.has_toolkit()) {
        return Err(format!(
            "agt-jail: {flag} applies to governance.toolkit/v1 policies and none is loaded (Agent-OS v4 and Rego policies have no strategy, stage or agent targeting)"
        ));
    }
    print_warnings(set.warnings());
    Ok(set)
}

fn print_warnings(warnings: &[agt_jail_policy::LoadError]) {
    for w in warnings {
        eprintln!("{}", crate::govern::load_warning(w));
    }
}

fn eval(args: &EvalArgs) -> ExitCode {
    let given =
        [("--strategy", args.strategy.is_some()), ("--stage", args.stage.is_some()), ("--agent", args.agent.is_some())];
    let toolkit_flags: Vec<&str> = given.iter().filter(|(_, on)| *on).map(|(f, _)| *f).collect();
    let set = match load_for(&args.policies, args.rego_query.as_deref(), &toolkit_flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let opts = EvalOptions {
        stage: args.stage.unwrap_or_default(),
        agent: args.agent.clone(),
        strategy: args.strategy.as_deref().and_then(Strategy::parse),
    };
    let mut reader = match open_input(&args.input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut limiter = RateLimiter::default();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if !args.batch {
        let mut buf = Vec::new();
        if let Err(e) = reader.take(MAX_CONTEXT_BYTES as u64 + 1).read_to_end(&mut buf) {
            eprintln!("{}: cannot read input: {e}", args.input);
            return ExitCode::from(2);
        }
        let ctx = match decode(&buf) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: {e}", args.input);
                return ExitCode::from(2);
            }
        };
        let d = limiter.apply(set.evaluate(&ctx, &opts));
        return match write_decision(&mut out, &d).and_then(|()| out.flush()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cannot write output: {e}");
                ExitCode::from(2)
            }
        };
    }
    let mut bad_input = false;
    let mut line_no = 0usize;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        line_no += 1;
        // Bounded read: a line longer than the limit is an error, not an allocation.
        let n = match reader.by_ref().take(MAX_CONTEXT_BYTES as u64 + 1).read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("{}: cannot read input: {e}", args.input);
                return ExitCode::from(2);
            }
        };
        if n == 0 {
            break;
        }
        let decision = if buf.len() > MAX_CONTEXT_BYTES && !buf.ends_with(b"\n") {
            // Finding the end of the line could mean reading without end (`--input /dev/zero`):
            // stop here, after the decisions already written.
            let _ = out.flush();
            eprintln!("{}:{line_no}: line longer than {MAX_CONTEXT_BYTES} bytes; stopping", args.input);
            return ExitCode::from(2);
        } else {
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match decode(&buf) {
                Ok(ctx) => limiter.apply(set.evaluate(&ctx, &opts)),
                Err(e) => {
                    bad_input = true;
                    eprintln!("{}:{line_no}: {e}", args.input);
                    Decision::error(format!("invalid input line {line_no}: {e}"))
                }
            }
        };
        if let Err(e) = write_decision(&mut out, &decision) {
            eprintln!("cannot write output: {e}");
            return ExitCode::from(2);
        }
    }
    if let Err(e) = out.flush() {
        eprintln!("cannot write output: {e}");
        return ExitCode::from(2);
    }
    if bad_input {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn decode(buf: &[u8]) -> Result<serde_json::Value, String> {
    if buf.len() > MAX_CONTEXT_BYTES {
        return Err(format!("input larger than {MAX_CONTEXT_BYTES} bytes"));
    }
    let text = std::str::from_utf8(buf).map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    testrun::parse_context(text)
}

fn write_decision(out: &mut impl Write, d: &Decision) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, d)?;
    out.write_all(b"\n")
}

fn test(dir: &Path) -> ExitCode {
    let report = testrun::run_dir(dir);
    for e in &report.errors {
        println!("ERROR {e}");
    }
    for c in &report.cases {
        if c.passed {
            println!("PASS {}: {}", c.file, c.name);
        } else {
            println!("FAIL {}: {}: {}", c.file, c.name, c.detail);
        }
    }
    let failed = report.failed();
    println!("{} passed, {} failed", report.cases.len() - report.cases.iter().filter(|c| !c.passed).count(), failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Whether BPF LSM programs load here (as `agt-jail doctor` checks); needs root.
pub(crate) fn bpf_lsm_usable() -> (bool, String) {
    if agt_jail_jail::host::euid() != 0 {
        return (false, "not checked (needs root): assuming Tier B".into());
    }
    match agt_jail_ebpf_loader::AgentPrograms::load() {
        Ok(mut programs) => match agt_jail_ebpf_loader::lsm::ExecLsm::load(&mut programs) {
            Ok(_) => (true, "BPF LSM programs load (Tier A)".into()),
            Err(e) => {
                let e = e.to_string();
                let short = e.split(". Verifier output").next().unwrap_or(&e).trim_end_matches(['.', ' ', ':']);
                (false, format!("BPF LSM unavailable: {short} (Tier B)"))
            }
        },
        Err(e) => (false, format!("eBPF programs do not load: {e} (Tier B)")),
    }
}

fn explain(args: &ExplainArgs) -> ExitCode {
    use agt_jail_policy::context::AgentFacts;
    use agt_jail_policy::plan;
    let set = match load_for(&args.policies, args.rego_query.as_deref(), &[]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let (bpf_lsm, lsm_note) = bpf_lsm_usable();
    let caps = crate::govern::host_caps(args.ring, args.ring > 0, bpf_lsm);
    let agent = AgentFacts::new("explain", args.agent.clone(), args.ring, args.trust, "explain");
    let names = plan::domains(&set);
    let (resolved, unresolved) = crate::govern::resolve_domains(&names);
    let result = plan::compile(&set, &agent, &caps, &resolved, args.strict);
    let plan = match result {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agt-jail: policy cannot be enforced on this host: {e}");
            return ExitCode::from(1);
        }
    };
    if args.json {
        let v = serde_json::json!({
            "host": {"bpf_lsm": bpf_lsm, "bpf_lsm_detail": lsm_note, "fanotify": caps.fanotify, "ring": args.ring,
                     "confined": caps.confined},
            "domains": names,
            "unresolved": unresolved,
            "plan": plan,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!(
        "host: {lsm_note}; fanotify {}; ring {} ({})",
        if caps.fanotify { "available" } else { "unavailable" },
        args.ring,
        if caps.confined { "confined" } else { "not confined" }
    );
    for r in &plan.rules {
        let events = r.events.as_ref().map_or_else(|| "any event".to_string(), |e| e.join(", "));
        println!("{}/{} [{}] ({})", r.policy, r.rule, r.action, events);
        for p in &r.planes {
            match (&p.plane, &p.problem) {
                (Some(pl), _) => println!("    {:<15} {pl}", p.class),
                (None, Some(pr)) => println!("    {:<15} NOT ENFORCED BEFORE EFFECT: {pr}", p.class),
                (None, None) => {}
            }
        }
    }
    match &plan.net {
        Some(n) => println!(
            "network plan: {} address classes, {} port classes ({} explicit ports), {} verdict rows, {} rules, {} limits",
            n.addr_classes.len(),
            n.port_classes,
            n.ports.len(),
            n.rows.len(),
            n.rules.len(),
            n.limits.len()
        ),
        None => println!("network plan: not compiled ({})", plan.net_error.as_deref().unwrap_or("?")),
    }
    if let Some(f) = &plan.file {
        println!("file path forms (lsm): {} forms from {} rules", f.paths.len(), f.rules.len());
    }
    if !names.is_empty() {
        println!("domains resolved: {} of {}", names.len() - unresolved.len(), names.len());
    }
    for w in &plan.warnings {
        println!("warning: {w}");
    }
    ExitCode::SUCCESS
}
