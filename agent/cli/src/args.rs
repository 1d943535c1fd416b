//! The flags of `agt-jail exec`, shared by both executables so that a command line means
//! the same to the jail-only front (`agt-jail`) as to the full command set (`agt-jail-full`).
use std::{
    ffi::{OsStr, OsString},
    net::{IpAddr, SocketAddr},
    os::unix::ffi::OsStrExt,
    path::PathBuf,
};

use agt_jail_jail::profile::AllowEntry;
use clap::Args;

/// A `--deny-connect` destination; port 0 means every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectDest {
    pub addr: IpAddr,
    pub port: u16,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Rings (profiles/ring0..3.yaml, built in; --profile FILE loads another):
  0  record mode (the default without --ring): own cgroup, observed, killable; not confined
  1  privileged: system ro, workspace rw, broad TCP egress (ports 80/443/22/9418)
  2  standard: system ro, workspace rw, secrets hidden, TCP egress only to --allow-connect
  3  sandbox: no network, scratch /workspace, only the entry command may be executed
Rings 1-2 execute system binaries and what the agent builds (files in the workspace and in the
paths given with --rw; never in the private /tmp). A profile's exec.workspace: false turns that
off. Under --policy every exec still passes the policy's exec rules, budgets and approvals.
Rings 1-3 run in new pid, mount, ipc, uts, cgroup and net namespaces (loopback inside;
allowlist egress leaves through a per-agent veth and the host's NAT), without capabilities,
under Landlock and seccomp; the environment is scrubbed to PATH, HOME, TERM, LANG and what
--env adds. A CMD without a slash is looked up in the PATH it runs with (the jail's, or
--env PATH=), as a shell inside would.
Flags that need rings 1-3: --workspace, --rw, --ro, --allow-exec, --allow-connect, --tty,
--net none|allowlist. Flags can only narrow a ring: --net none|allowlist in rings 1-2 (and
host with --policy, whose network rules then decide every connect), --net none in ring 3,
host in ring 0; --rw and --allow-connect are refused in ring 3 (no network, nothing
writable but the scratch /workspace). --memory, --pids and --cpu apply in every ring.
A flag that cannot be honoured is refused (exit 125), never ignored.

Examples:
  agt-jail exec --deny-connect 169.254.169.254:80 -- python3 agent.py
  agt-jail exec --ring 2 --workspace ./proj --allow-connect 140.82.112.3:443 -- git pull
  agt-jail exec --ring 3 --memory 256M --pids 32 -- /usr/bin/python3 -c 'print(1)'
  agt-jail exec --ring 2 --agent coder --policy policies/coding-agent/policy.yaml \\
      --events decisions.jsonl -- python3 agent.py
      (held actions: agt-jail approve|deny --agent coder N; agt-jail demote|kill --agent coder)
  agt-jail exec --audit run.audit --deny-connect 169.254.169.254:* -- python3 agent.py
      (then: agt-jail audit verify run.audit --key \"$(agt-jail audit key)\"; docs/audit.md)

Exit status: the command's own; 128+N when it was killed by signal N; 125 when \
agt-jail itself fails (bad flags, arguments or environment over the kernel's limits); \
126/127 when the command cannot be run or is not found; 126 with a \
\"denied by policy\" line when the policy refuses the command itself.")]
pub struct ExecArgs {
    /// Deny connect(2) to this destination with EPERM inside the command. ADDR is an
    /// IPv4 address or a bracketed IPv6 address; PORT is a number or `*` for every port.
    /// Repeatable.
    #[arg(long = "deny-connect", value_name = "ADDR:PORT", value_parser = parse_connect_rule)]
    pub deny_connect: Vec<ConnectDest>,

    /// Append every kernel event of the command (exec, connect, with verdicts) to FILE as
    /// JSON lines; `-` writes them to stdout.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,

    /// Do not print denials, the policy's load warnings (those `policy lint` prints) or the
    /// agent's name on stderr; errors and warnings about enforcement still print.
    #[arg(long, short)]
    pub quiet: bool,

    /// Ring 0-3 (built-in profile). Without --ring and --profile: ring 0 (record mode).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=3))]
    pub ring: Option<u8>,

    /// Profile file to use instead of the built-in one (its `ring` must match --ring if both are given).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,

    /// Workspace directory, mounted at the same path (rw in rings 1-2, ro beside the scratch /workspace in ring 3). Default: the current directory (rings 1-2).
    /// Its files may be executed in rings 1-2 (not in ring 3), unless the profile sets exec.workspace: false.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,

    /// Extra path visible and writable inside; its files may also be executed, as the
    /// workspace's are (rings 1-2, unless the profile sets exec.workspace: false). Repeatable.
    #[arg(long = "rw", value_name = "PATH")]
    pub rw: Vec<PathBuf>,

    /// Extra path visible read-only inside. Repeatable.
    #[arg(long = "ro", value_name = "PATH")]
    pub ro: Vec<PathBuf>,

    /// Allow exec of this file (or everything under this directory). Repeatable.
    #[arg(long = "allow-exec", value_name = "PATH")]
    pub allow_exec: Vec<PathBuf>,

    /// Allow connects to DEST (allowlist mode; rings 1-2): ADDR:PORT or CIDR:PORT (address and
    /// port, in the kernel), or NAME:PORT / *.SUFFIX:PORT: the agent's resolver (served by
    /// agt-jail on its gateway) answers for such names and opens each answer's addresses for
    /// PORT, for the answer's TTL, before the agent sees it; other names are refused
    /// (docs/dns-egress.md). Repeatable.
    #[arg(long = "allow-connect", value_name = "DEST", value_parser = AllowEntry::parse)]
    pub allow_connect: Vec<AllowEntry>,

    /// Where the agent's resolver sends the queries it allows (ADDR:PORT or ADDR for port
    /// 53). Default: the first nameserver of the host's /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_name = "ADDR", value_parser = parse_upstream)]
    pub dns_upstream: Option<std::net::SocketAddr>,

    /// Network: none (own namespace, loopback only), allowlist (own namespace with loopback and a veth
    /// routed out through the host's NAT; TCP egress to --allow-connect only) or host.
    /// Default: the ring's (0 host, 1-2 allowlist, 3 none); it can only be narrowed (rings
    /// 1-2 take host with --policy: the policy's network rules decide every connect).
    #[arg(long, value_name = "MODE", value_parser = ["none", "allowlist", "host"])]
    pub net: Option<String>,

    /// Memory limit: bytes or K/M/G/T (e.g. 512M, 2G; at least 1M), or max for none.
    /// Every ring (ring 0 too). Default: the ring's (3: 512M, 2: 2G, 1: 8G, 0: none).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// Process/thread limit: 2 or more, or max for none. Every ring. Default: the ring's (3: 64).
    #[arg(long, value_name = "N")]
    pub pids: Option<String>,

    /// CPU limit in cores, 0.01-1024 (e.g. 0.5, 2), or max for none. Every ring. Default: the ring's (3: 1).
    #[arg(long, value_name = "CORES")]
    pub cpu: Option<String>,

    /// Set KEY=VAL in the command's environment (any bytes but NUL). Repeatable.
    #[arg(long = "env", value_name = "KEY=VAL", value_parser = clap::builder::TypedValueParser::try_map(clap::builder::OsStringValueParser::new(), parse_env))]
    pub env: Vec<(OsString, OsString)>,

    /// Run the command on a new pseudo-terminal (rings 1-3). Always standalone: the
    /// daemon does not relay terminals.
    #[arg(long)]
    pub tty: bool,

    /// Run here, without the host daemon, even when its socket answers (otherwise a
    /// running daemon launches the command; same flags, output and exit status).
    #[arg(long)]
    pub standalone: bool,

    /// Seconds (0-86400) between forwarding SIGTERM/SIGINT/SIGHUP and killing everything with SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub grace: u64,

    #[command(flatten)]
    pub policy: PolicyArgs,

    #[command(flatten)]
    pub audit: AuditArgs,

    /// The command and its arguments (any bytes: they need not be UTF-8).
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Parses `ADDR:PORT`, `[V6]:PORT`, with `*` as "any port".
/// `--dns-upstream`: `ADDR:PORT`, `[V6]:PORT` or a bare address (port 53).
pub fn parse_upstream(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .map_err(|_| format!("'{text}' is not ADDR, ADDR:PORT or [V6]:PORT"))
}

pub fn parse_connect_rule(text: &str) -> Result<ConnectDest, String> {
    let expected = "expected ADDR:PORT, e.g. 127.0.0.1:8080, [::1]:443 or 10.0.0.1:*";
    if let Some(any) = text.strip_suffix(":*") {
        let host = any.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(any);
        let addr: IpAddr = host.parse().map_err(|_| format!("'{host}' is not an IP address; {expected}"))?;
        return Ok(ConnectDest { addr, port: 0 });
    }
    let addr: SocketAddr = text.parse().map_err(|_| expected.to_string())?;
    if addr.port() == 0 {
        return Err(format!("port 0 is not a destination; use '*' for every port ({expected})"));
    }
    Ok(ConnectDest { addr: addr.ip(), port: addr.port() })
}

/// Parses `KEY=VAL` for --env (bytes, as the kernel takes them: the key up to the first
/// `=`, not empty).
pub fn parse_env(text: OsString) -> Result<(OsString, OsString), String> {
    let bytes = text.as_bytes();
    match bytes.iter().position(|b| *b == b'=') {
        Some(eq) if eq > 0 && !bytes.contains(&0) => {
            Ok((OsStr::from_bytes(&bytes[..eq]).to_owned(), OsStr::from_bytes(&bytes[eq + 1..]).to_owned()))
        }
        _ => Err(format!("'{}' is not KEY=VAL", text.to_string_lossy())),
    }
}

fn parse_trust_domain(text: &str) -> Result<String, String> {
    agt_jail_supervisor::identity::check_trust_domain(text).map_err(|e| e.to_string())?;
    Ok(text.to_string())
}

/// Parses `--agent NAME`: a name that is also a file name in the control directory, so
/// no path separators and no leading dot (the same rule as the control socket's).
pub fn parse_agent_name(text: &str) -> Result<String, String> {
    agt_jail_supervisor::control::check_name(text).map(|()| text.to_string()).map_err(|_| {
        format!("'{text}' is not an agent name: use 1-64 of A-Z a-z 0-9 . _ - and do not start with a dot")
    })
}

/// The flags of `exec` that put an agent under policy.
#[derive(Args, Debug, Default)]
pub struct PolicyArgs {
    /// Policy file (governance.toolkit/v1 or Agent-OS v4 YAML, or .rego) that governs the
    /// command's exec, file and network activity. Repeatable.
    #[arg(long = "policy", value_name = "FILE")]
    pub policy: Vec<PathBuf>,

    /// The agent's name: its control socket (`agt-jail approve/deny/kill/demote --agent NAME`)
    /// and `agent.id` in the policy; 1-64 of A-Z a-z 0-9 . _ - (not starting with a dot).
    /// Needs --policy (the control socket serves the policy's evaluator).
    /// Default: agent-<pid of agt-jail>.
    #[arg(long, value_name = "NAME", requires = "policy", value_parser = parse_agent_name)]
    pub agent: Option<String>,

    /// Starting trust score 0-1000 (`agent.trust`; tiers as in AGT). Needs --policy.
    #[arg(long, value_name = "N", default_value_t = 500, requires = "policy", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub trust: u32,

    /// Trust lost per denied action (0-1000); crossing a tier boundary demotes the ring live.
    /// Default: the policy's `trust.penalty`, else 10. Needs --policy.
    #[arg(long, value_name = "N", requires = "policy", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub deny_penalty: Option<u32>,

    /// Kill the agent when its trust falls below N (0-1000; 0: never). Default: the policy's
    /// `trust.kill_below`, else 0. Needs --policy.
    #[arg(long, value_name = "N", requires = "policy", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub kill_below: Option<u32>,

    /// Seconds a `require_approval` action is held before it is denied (1-86400). Needs --policy.
    #[arg(long, value_name = "SECS", default_value_t = 60, requires = "policy", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub approval_timeout: u64,

    /// Refuse to start when a deny rule cannot be enforced before effect on this host
    /// (otherwise: a warning per rule). Needs --policy.
    #[arg(long, requires = "policy")]
    pub strict: bool,

    /// Lifetime in seconds (1-3600) of the identity tokens (JWT-SVIDs) the agent gets from
    /// its identity socket (docs/identity.md).
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub token_ttl: u64,

    /// SPIFFE trust domain of the agent's identity: tokens name
    /// `spiffe://DOMAIN/agt-jail/AGENT` (lower-case letters, digits, `.`, `-`, `_`).
    #[arg(long, value_name = "DOMAIN", default_value = agt_jail_supervisor::identity::TRUST_DOMAIN_DEFAULT,
          value_parser = parse_trust_domain)]
    pub trust_domain: String,

    /// Seconds between DNS lookups of the policy's domains; when an answer changes the
    /// network tables are re-installed (0: resolve only at start; at most 86400). Needs --policy.
    /// Ring 0 and --net host only: in network mode allowlist the agent's resolver feeds the
    /// domains from its own answers (docs/dns-egress.md).
    /// Default 30; refused where the agent's resolver is served.
    #[arg(long, value_name = "SECS", requires = "policy", value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub dns_refresh: Option<u64>,
}

/// The tamper-evident audit log of `exec` (docs/audit.md).
#[derive(Args, Debug, Default)]
pub struct AuditArgs {
    /// Also write every record (decisions and observations) to FILE as a signed hash chain
    /// (`agt-jail audit verify FILE --key PUB` checks it). FILE must be new or empty.
    #[arg(long = "audit", value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// The host's Ed25519 signing key (created, mode 0600, on first use; `agt-jail audit key`
    /// prints its public half).
    #[arg(long = "audit-key", value_name = "FILE", default_value = "/var/lib/agt-jail/audit.key")]
    pub key: PathBuf,

    /// When records reach the disk: always (fdatasync before every answer), batch (written
    /// before every answer, fdatasync at each checkpoint and at close) or none (never fdatasync).
    #[arg(long = "audit-sync", value_name = "POLICY", default_value = "batch", value_parser = ["always", "batch", "none"])]
    pub sync: String,

    /// Sign a checkpoint after every N entries (and at close).
    #[arg(long = "audit-checkpoint-every", value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,

    /// Sign a checkpoint when records have waited SECS unsigned.
    #[arg(long = "audit-checkpoint-secs", value_name = "SECS", default_value_t = 10)]
    pub checkpoint_secs: u64,

    /// Continue the log in FILE.1, FILE.2, ... when a file would grow beyond SIZE (e.g. 64M, 1G);
    /// the chain runs on across files.
    #[arg(long = "audit-rotate", value_name = "SIZE", value_parser = parse_rotate)]
    pub rotate: Option<u64>,
}

/// A rotation size: at least 64K, so that a file holds more than a few records.
fn parse_rotate(text: &str) -> Result<u64, String> {
    match agt_jail_jail::profile::parse_bytes(text)? {
        Some(bytes) if bytes >= 64 << 10 => Ok(bytes),
        Some(_) => Err(format!("'{text}' is below 64K")),
        None => Err(format!("'{text}' is not a size (expected e.g. 64M or 1G)")),
    }
}

impl PolicyArgs {
    pub fn given(&self) -> bool {
        !self.policy.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dest(addr: &str, port: u16) -> ConnectDest {
        ConnectDest { addr: addr.parse().unwrap(), port }
    }

    #[test]
    fn parses_connect_rules() {
        assert_eq!(parse_connect_rule("127.0.0.1:8080").unwrap(), dest("127.0.0.1", 8080));
        assert_eq!(parse_connect_rule("[::1]:443").unwrap(), dest("::1", 443));
        assert_eq!(parse_connect_rule("10.0.0.1:*").unwrap(), dest("10.0.0.1", 0));
        assert_eq!(parse_connect_rule("[fe80::1]:*").unwrap(), dest("fe80::1", 0));
    }

    #[test]
    fn rejects_bad_connect_rules_with_a_reason() {
        for bad in ["", "127.0.0.1", "localhost:80", "127.0.0.1:99999", "127.0.0.1:0", "::1:80", "x:*", "1.2.3.4:-1"] {
            let err = parse_connect_rule(bad).unwrap_err();
            assert!(err.contains("expected ADDR:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn env_flags_parse() {
        assert_eq!(parse_env("A=b=c".into()).unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=".into()).unwrap(), ("A".into(), "".into()));
        let raw = OsStr::from_bytes(b"L=caf\xe9").to_owned();
        assert_eq!(parse_env(raw).unwrap().1, OsStr::from_bytes(b"caf\xe9"));
        assert!(parse_env("=x".into()).is_err() && parse_env("novalue".into()).is_err());
    }
}
