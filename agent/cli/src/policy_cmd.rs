//! `agt-jail policy lint|eval|test`: thin edges over the agt-jail-policy crate.
use std::io::{BufRead, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agt_jail_policy::testrun;
use agt_jail_policy::{Decision, EvalOptions, PolicySet, RateLimiter, Strategy};
use clap::{Args, Subcommand};

/// Largest single context accepted (a whole `--input` file, or one `--batch` line).
const MAX_CONTEXT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Check policy files (YAML governance.toolkit/v1, Agent-OS v4, .rego, or *.test.yaml); errors print as file:line:col: message.
    Lint {
        /// Policy files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Evaluate one event context (or, with --batch, one per input line) and print the decision as JSON.
    Eval(EvalArgs),
    /// Run the *.test.yaml cases under DIR and report pass/fail per case.
    Test {
        /// Directory (searched recursively) or a single test file.
        dir: PathBuf,
    },
}

#[derive(Args)]
pub struct EvalArgs {
    /// Policy file; repeat for several (.rego files are Rego, others YAML/JSON).
    #[arg(long = "policy", required = true)]
    policies: Vec<PathBuf>,
    /// Lifecycle stage of governance.toolkit/v1 rules to consider.
    #[arg(long, default_value = "pre_tool")]
    stage: String,
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

pub fn run(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Lint { files } => lint(&files),
        PolicyCommand::Eval(args) => eval(&args),
        PolicyCommand::Test { dir } => test(&dir),
    }
}

fn lint(files: &[PathBuf]) -> ExitCode {
    let mut bad = 0usize;
    for f in files {
        // Test files beside the policies are checked as test files (structure and the policies
        // they load), so `policy lint policies/*/*` works.
        let result = if testrun::is_test_file(f) {
            testrun::lint_file(f)
        } else {
            PolicySet::load(std::slice::from_ref(f)).map(|_| ())
        };
        match result {
            Ok(_) => {}
            Err(e) => {
                bad += 1;
                eprintln!("{e}");
            }
        }
    }
    if bad == 0 {
        println!("{} file(s) ok", files.len());
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn open_input(input: &str) -> Result<Box<dyn BufRead>, String> {
    if input == "-" {
        Ok(Box::new(std::io::BufReader::new(std::io::stdin())))
    } else {
        let f = std::fs::File::open(input).map_err(|e| format!("{input}: cannot read input: {e}"))?;
        Ok(Box::new(std::io::BufReader::new(f)))
    }
}

fn eval(args: &EvalArgs) -> ExitCode {
    let set = match PolicySet::load_with(&args.policies, args.rego_query.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let opts = EvalOptions {
        stage: args.stage.clone(),
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
            // Skip the rest of the oversized line.
            let mut sink = Vec::new();
            let _ = reader.read_until(b'\n', &mut sink);
            bad_input = true;
            Decision::error(format!("invalid input line {line_no}: longer than {MAX_CONTEXT_BYTES} bytes"))
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
