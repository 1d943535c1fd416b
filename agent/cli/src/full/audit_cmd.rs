//! `agt-jail audit`: verify a log, prove a record is in it, prove a later checkpoint
//! extends an earlier one, check such proofs with the public key alone, and summarise.
use std::{
    io::Read,
    path::{Path, PathBuf},
    process::ExitCode,
};

use agt_jail_audit::{
    entry::CheckpointEntry,
    key,
    proof::{self, Proof, ProveError},
    show, to_hex,
    verify::{walk, VerifyError},
    SignedHead, VerifyingKey,
};
use clap::{Args, Subcommand};

/// Exit status: the log (or proof) checks out.
const OK: u8 = 0;
/// Exit status: the log is tampered with, or the proof does not hold.
const TAMPERED: u8 = 1;
/// Exit status: bad usage, unreadable files, unparsable input.
pub const USAGE: u8 = 2;

/// Longest proof or checkpoint file read.
const DOC_MAX: u64 = 16 << 20;

const EXIT_HELP: &str = "\
Exit status: 0 the log or proof checks out (warnings, such as an unsigned tail, go to stderr);
1 tampered: the first bad record is named by number, file and line; 2 bad usage or unreadable input.";

const RECOVER_HELP: &str = "\
Exit status: 0 every run asked for was recovered (or there was none); 1 a run could not be
recovered (its log is tampered, closed while its rings still hold records, or cannot be
written): its pins stay; 2 bad usage or a run that is not orphaned.";

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the chain and every checkpoint of a log (its files in order, rotated ones too).
    #[command(after_help = EXIT_HELP)]
    Verify {
        /// The log's files, first to last (FILE, FILE.1, FILE.2, ...).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Print (as JSON) the inclusion proof of record N in the tree of the log's last checkpoint.
    #[command(after_help = EXIT_HELP)]
    Prove {
        /// The record's number (`seq`).
        #[arg(long, value_name = "N")]
        seq: u64,
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print (as JSON) the proof that checkpoint NEW extends checkpoint OLD, from the log.
    #[command(after_help = EXIT_HELP)]
    Consistency {
        /// A checkpoint a witness kept (as `audit checkpoint` prints it, or a checkpoint line of the log).
        #[arg(value_name = "OLD")]
        old: PathBuf,
        /// A later checkpoint.
        #[arg(value_name = "NEW")]
        new: PathBuf,
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Check a proof printed by `audit prove` or `audit consistency` with the public key alone.
    #[command(name = "verify-proof", after_help = EXIT_HELP)]
    VerifyProof {
        #[arg(value_name = "PROOF")]
        proof: PathBuf,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Print the log's last checkpoint (verified), for a witness to keep.
    #[command(after_help = EXIT_HELP)]
    Checkpoint {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Per agent: records, decisions, denies, kills, approvals (the chain is checked).
    #[command(after_help = EXIT_HELP)]
    Show {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Write what killed `exec --audit` runs left in the kernel into their logs, and close them.
    ///
    /// An audited run pins its event rings, deny summary and drop counters under
    /// /sys/fs/bpf/agt-jail/exec-<pid>-<cgroup id>/ and describes itself in
    /// /run/agt-jail/runs/<that id>.json. When agt-jail is killed (kill -9, a crash) they
    /// stay. For each such run whose agt-jail is gone, this kills what is left of its agent,
    /// verifies the log with the key, cuts a partial last line (reported), appends the
    /// records the rings still hold (each marked "recovered": true; without a policy, records
    /// the dead writer had already written are recognised and not written twice; see
    /// docs/audit.md), what the deny summary counted beyond what was written, the kernel's
    /// drop counters, a summary record ("event": "audit_recovered"), signs a closing
    /// checkpoint and unpins. `exec --audit` warns while such runs exist.
    #[command(after_help = RECOVER_HELP)]
    Recover {
        /// Only these runs (ids as --list prints them); default every orphaned run.
        #[arg(value_name = "RUN")]
        runs: Vec<String>,
        /// List the pinned runs (running or orphaned) and their logs; recover nothing.
        #[arg(long, conflicts_with_all = ["runs", "key"])]
        list: bool,
        /// The signing key (default: the key the run was started with).
        #[arg(long = "audit-key", value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Print the host key's public half (hex), creating the key on first use.
    Key {
        /// The signing key file.
        #[arg(long = "audit-key", value_name = "FILE", default_value = key::DEFAULT_KEY_PATH)]
        key: PathBuf,
    },
}

#[derive(Args)]
pub struct KeyArgs {
    /// The host's public key: 64 hex digits or a file holding them (`agt-jail audit key`).
    /// Repeat for the keys of a rotation.
    #[arg(long = "key", value_name = "PUB", required = true)]
    key: Vec<String>,
}

impl KeyArgs {
    fn load(&self) -> Result<Vec<VerifyingKey>, String> {
        self.key.iter().map(|k| key::parse_public(k).map_err(|e| e.to_string())).collect()
    }
}

/// A failure and the exit status it means.
struct Failed(u8, String);

impl From<VerifyError> for Failed {
    fn from(err: VerifyError) -> Failed {
        match err {
            VerifyError::Tampered(t) => Failed(TAMPERED, format!("audit log tampered: {t}")),
            VerifyError::Io(e) => Failed(USAGE, e.to_string()),
        }
    }
}

impl From<ProveError> for Failed {
    fn from(err: ProveError) -> Failed {
        match err {
            ProveError::Log(e) => e.into(),
            ProveError::Unprovable(why) => Failed(USAGE, why),
        }
    }
}

fn usage(msg: String) -> Failed {
    Failed(USAGE, msg)
}

pub fn run(cmd: AuditCommand) -> ExitCode {
    match dispatch(cmd) {
        Ok(()) => ExitCode::from(OK),
        Err(Failed(code, msg)) => {
            eprintln!("agt-jail: {msg}");
            ExitCode::from(code)
        }
    }
}

fn dispatch(cmd: AuditCommand) -> Result<(), Failed> {
    match cmd {
        AuditCommand::Verify { files, keys } => {
            let keys = keys.load().map_err(usage)?;
            let v = walk(&files, Some(&keys), |_| {})?;
            let signed = v.last_head.as_ref().map_or(0, |h| h.checkpoint.tree_size);
            println!(
                "audit log intact: {} entries ({} records, {} checkpoints); the last checkpoint signs {signed} entries",
                v.entries, v.records, v.checkpoints
            );
            for warning in v.warnings() {
                eprintln!("agt-jail: warning: {warning}");
            }
            Ok(())
        }
        AuditCommand::Prove { seq, files } => print_json(&proof::prove(&files, seq)?),
        AuditCommand::Consistency { old, new, files } => {
            print_json(&proof::consistency(&files, read_head(&old)?, read_head(&new)?)?)
        }
        AuditCommand::VerifyProof { proof, keys } => {
            let keys = keys.load().map_err(usage)?;
            let text = read_bounded(&proof)?;
            let proof: Proof =
                serde_json::from_str(&text).map_err(|e| usage(format!("{}: not a proof: {e}", proof.display())))?;
            let what = proof::verify_proof(&proof, &keys).map_err(|e| Failed(TAMPERED, format!("proof fails: {e}")))?;
            println!("proof holds: {what}");
            Ok(())
        }
        AuditCommand::Checkpoint { files, keys } => {
            let keys = keys.load().map_err(usage)?;
            let v = walk(&files, Some(&keys), |_| {})?;
            let head = v.last_head.ok_or_else(|| usage("the log has no checkpoint yet".into()))?;
            print_json(&head)
        }
        AuditCommand::Show { files } => {
            let (agents, v) = show::summarise(&files)?;
            for (did, s) in &agents {
                println!(
                    "{} ({did}): {} records, {} decisions, {} denies, {} kills, {} approvals{}",
                    s.name.as_deref().unwrap_or("unnamed agent"),
                    s.records,
                    s.decisions,
                    s.denies,
                    s.kills,
                    s.approvals,
                    if s.dropped > 0 { format!(", {} events dropped by the kernel", s.dropped) } else { String::new() }
                );
            }
            println!(
                "{} entries, {} checkpoints (signatures not checked: `agt-jail audit verify`)",
                v.entries, v.checkpoints
            );
            for warning in v.warnings() {
                eprintln!("agt-jail: warning: {warning}");
            }
            Ok(())
        }
        AuditCommand::Recover { runs, list, key } => recover(&runs, list, key.as_deref()),
        AuditCommand::Key { key } => {
            let signing = key::load_or_create(&key).map_err(|e| usage(e.to_string()))?;
            println!("{}", to_hex(signing.verifying_key().as_bytes()));
            Ok(())
        }
    }
}

fn recover(ids: &[String], list: bool, key: Option<&Path>) -> Result<(), Failed> {
    use crate::{audit_recover, pinned_run};
    let all = pinned_run::runs().map_err(|e| usage(format!("{e:#}")))?;
    if list {
        for run in &all {
            let state = if run.writer_alive() { "running" } else { "orphaned" };
            println!(
                "{} {state} {} (agent {}, pid {})",
                run.id,
                run.audit.display(),
                run.agent.as_deref().unwrap_or("-"),
                run.pid
            );
        }
        return Ok(());
    }
    let mut chosen = Vec::new();
    for id in ids {
        let run =
            all.iter().find(|r| &r.id == id).ok_or_else(|| usage(format!("no pinned run {id:?} (see --list)")))?;
        if run.writer_alive() {
            return Err(usage(format!("run {id} is not orphaned: agt-jail (pid {}) still runs it", run.pid)));
        }
        chosen.push(run.clone());
    }
    if ids.is_empty() {
        chosen = all.into_iter().filter(|r| !r.writer_alive()).collect();
    }
    if chosen.is_empty() {
        println!("no orphaned audited runs");
        return Ok(());
    }
    let mut failed = 0;
    for run in &chosen {
        match audit_recover::recover(run, key) {
            Ok(r) => {
                println!(
                    "{}: {} closed; {} record(s) recovered from the kernel's rings ({} already written), {} deny(ies) \
                     from its deny summary",
                    run.id,
                    run.audit.display(),
                    r.records,
                    r.already_written,
                    r.summary_denies
                );
                if r.torn_bytes > 0 {
                    eprintln!(
                        "agt-jail: warning: {}: a partial last line of {} bytes (written as agt-jail was killed) was cut \
                         off; its text is in the audit_recovered record",
                        run.audit.display(),
                        r.torn_bytes
                    );
                }
            }
            Err(err) => {
                eprintln!("agt-jail: {err:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(Failed(TAMPERED, format!("{failed} run(s) not recovered; their pins stay")));
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failed> {
    let text = serde_json::to_string(value).map_err(|e| usage(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn read_bounded(path: &Path) -> Result<String, Failed> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(DOC_MAX).read_to_string(&mut text))
        .map_err(|e| usage(format!("{}: {e}", path.display())))?;
    if text.len() as u64 >= DOC_MAX {
        return Err(usage(format!("{}: longer than {DOC_MAX} bytes", path.display())));
    }
    Ok(text)
}

/// A checkpoint from a file: a signed head as `audit checkpoint` prints it, or a
/// checkpoint line copied from the log.
fn read_head(path: &Path) -> Result<SignedHead, Failed> {
    let text = read_bounded(path)?;
    let text = text.trim();
    serde_json::from_str::<SignedHead>(text)
        .or_else(|_| serde_json::from_str::<CheckpointEntry>(text).map(CheckpointEntry::head))
        .map_err(|e| usage(format!("{}: not a checkpoint: {e}", path.display())))
}
