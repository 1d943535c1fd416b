//! The seccomp policy as data, compiled to classic BPF by a pure builder.
//!
//! The filter is a deny-list on top of "allow": it refuses what Docker's default
//! profile refuses plus what an agent must never reach (bpf, perf, io_uring, keyrings,
//! ptrace, every mount API, namespaces, handle-based opens, modules, kexec,
//! personality changes, fileless exec). Non-native ABIs (i386/x32 on x86_64, arm32 on
//! aarch64) are refused wholesale, so the compat entry points cannot be used to reach a
//! syscall under another number. Applying it is [`crate::sys::seccomp_set_filter`];
//! everything here runs and is tested without touching the kernel.

/// The architecture a filter is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// The architecture this binary runs on.
    pub fn native() -> Option<Self> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Aarch64)
        } else {
            None
        }
    }

    /// AUDIT_ARCH_* value the kernel puts in seccomp_data.arch.
    pub fn audit_arch(self) -> u32 {
        match self {
            Arch::X86_64 => 0xC000_003E,
            Arch::Aarch64 => 0xC000_00B7,
        }
    }

    /// The syscall number of `name`, or None when the architecture has no such call
    /// (e.g. `uselib` on aarch64).
    pub fn syscall(self, name: &str) -> Option<u32> {
        let table: &[(&str, u32)] = match self {
            Arch::X86_64 => X86_64,
            Arch::Aarch64 => AARCH64,
        };
        table.iter().chain(COMMON).find(|(n, _)| *n == name).map(|(_, nr)| *nr)
    }
}

/// Numbers ≥ 424 are the same on every architecture (unified numbering).
const COMMON: &[(&str, u32)] = &[
    ("io_uring_setup", 425),
    ("io_uring_enter", 426),
    ("io_uring_register", 427),
    ("open_tree", 428),
    ("move_mount", 429),
    ("fsopen", 430),
    ("fsconfig", 431),
    ("fsmount", 432),
    ("fspick", 433),
    ("clone3", 435),
    ("pidfd_getfd", 438),
    ("process_madvise", 440),
    ("mount_setattr", 442),
    ("quotactl_fd", 443),
    ("memfd_secret", 447),
    ("set_mempolicy_home_node", 450),
    ("statmount", 457),
    ("listmount", 458),
    ("lsm_set_self_attr", 460),
    ("open_tree_attr", 467),
];

const X86_64: &[(&str, u32)] = &[
    ("socket", 41),
    ("memfd_create", 319),
    ("clone", 56),
    ("execve", 59),
    ("ptrace", 101),
    ("syslog", 103),
    ("uselib", 134),
    ("personality", 135),
    ("ustat", 136),
    ("sysfs", 139),
    ("vhangup", 153),
    ("pivot_root", 155),
    ("_sysctl", 156),
    ("acct", 163),
    ("settimeofday", 164),
    ("mount", 165),
    ("umount2", 166),
    ("swapon", 167),
    ("swapoff", 168),
    ("reboot", 169),
    ("iopl", 172),
    ("ioperm", 173),
    ("create_module", 174),
    ("init_module", 175),
    ("delete_module", 176),
    ("get_kernel_syms", 177),
    ("query_module", 178),
    ("quotactl", 179),
    ("nfsservctl", 180),
    ("lookup_dcookie", 212),
    ("clock_settime", 227),
    ("mbind", 237),
    ("set_mempolicy", 238),
    ("get_mempolicy", 239),
    ("kexec_load", 246),
    ("add_key", 248),
    ("request_key", 249),
    ("keyctl", 250),
    ("unshare", 272),
    ("move_pages", 279),
    ("perf_event_open", 298),
    ("fanotify_init", 300),
    ("name_to_handle_at", 303),
    ("open_by_handle_at", 304),
    ("clock_adjtime", 305),
    ("setns", 308),
    ("process_vm_readv", 310),
    ("process_vm_writev", 311),
    ("kcmp", 312),
    ("finit_module", 313),
    ("kexec_file_load", 320),
    ("bpf", 321),
    ("execveat", 322),
    ("userfaultfd", 323),
];

const AARCH64: &[(&str, u32)] = &[
    ("lookup_dcookie", 18),
    ("umount2", 39),
    ("mount", 40),
    ("pivot_root", 41),
    ("nfsservctl", 42),
    ("vhangup", 58),
    ("quotactl", 60),
    ("acct", 89),
    ("personality", 92),
    ("unshare", 97),
    ("kexec_load", 104),
    ("init_module", 105),
    ("delete_module", 106),
    ("clock_settime", 112),
    ("syslog", 116),
    ("ptrace", 117),
    ("reboot", 142),
    ("settimeofday", 170),
    ("socket", 198),
    ("memfd_create", 279),
    ("add_key", 217),
    ("request_key", 218),
    ("keyctl", 219),
    ("clone", 220),
    ("execve", 221),
    ("swapon", 224),
    ("swapoff", 225),
    ("mbind", 235),
    ("get_mempolicy", 236),
    ("set_mempolicy", 237),
    ("move_pages", 239),
    ("perf_event_open", 241),
    ("fanotify_init", 262),
    ("name_to_handle_at", 264),
    ("open_by_handle_at", 265),
    ("clock_adjtime", 266),
    ("setns", 268),
    ("process_vm_readv", 270),
    ("process_vm_writev", 271),
    ("kcmp", 272),
    ("finit_module", 273),
    ("bpf", 280),
    ("execveat", 281),
    ("userfaultfd", 282),
    ("kexec_file_load", 294),
];

/// Namespace-creating clone flags (CLONE_NEWNS..CLONE_NEWNET). CLONE_NEWTIME (0x80)
/// overlaps clone(2)'s exit-signal byte, so it is only checked for unshare.
pub const CLONE_NS_FLAGS: u64 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;
const CLONE_NEWTIME: u64 = 0x80;
const AT_EMPTY_PATH: u64 = 0x1000;

/// What happens when a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Errno(u16),
    KillProcess,
}

impl Action {
    fn ret(self) -> u32 {
        match self {
            Action::Allow => libc::SECCOMP_RET_ALLOW,
            Action::Errno(e) => libc::SECCOMP_RET_ERRNO | u32::from(e),
            Action::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
}

/// A condition on one argument (its low 32 bits: every flag checked here fits there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgCheck {
    /// Matches when `arg & mask != 0`.
    AnyBits { arg: u8, mask: u32 },
    /// Matches when the argument is none of `values`.
    NotIn { arg: u8, values: Vec<u32> },
    /// socket(2): matches an AF_INET/AF_INET6 domain (arg 0) with SOCK_DGRAM type (arg 1,
    /// flags masked off).
    InetDgram,
    /// socket(2): like [`ArgCheck::InetDgram`], but a UDP socket (protocol 0 or
    /// IPPROTO_UDP, arg 2) does not match: ICMP ping and other datagram protocols do.
    InetDgramNotUdp,
}

/// One deny rule: `action` applies to `syscall` (when `when` matches, or always).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub syscall: String,
    pub action: Action,
    pub when: Option<ArgCheck>,
}

impl Rule {
    fn deny(name: &str, errno: i32) -> Self {
        Rule { syscall: name.into(), action: Action::Errno(errno as u16), when: None }
    }
}

/// Syscalls an agent never gets, whatever its profile says.
pub const NEVER: &[&str] = &[
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "process_madvise",
    "kcmp",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "open_tree_attr",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "kexec_load",
    "kexec_file_load",
];

/// The rest of Docker's default deny-list (clock, swap, quota, NUMA, legacy calls).
pub const DOCKER_EXTRA: &[&str] = &[
    "acct",
    "clock_adjtime",
    "clock_settime",
    "settimeofday",
    "reboot",
    "swapon",
    "swapoff",
    "sysfs",
    "_sysctl",
    "uselib",
    "ustat",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "nfsservctl",
    "iopl",
    "ioperm",
    "syslog",
    "vhangup",
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "set_mempolicy_home_node",
    "move_pages",
    "fanotify_init",
    "memfd_secret",
    "statmount",
    "listmount",
    "lsm_set_self_attr",
];

/// personality(2) values Docker allows: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE
/// variants and the 0xffffffff query.
const PERSONALITY_OK: [u32; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The policy: the built-in list, minus `allow`, plus `deny`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeccompPolicy {
    /// Extra syscalls to deny with EPERM (must be known names).
    pub deny: Vec<String>,
    /// Names from [`DOCKER_EXTRA`] to allow after all; [`NEVER`] names cannot be allowed.
    pub allow: Vec<String>,
    /// Refuse IPv4/IPv6 datagram sockets (UDP, ICMP ping): allowlist egress is enforced
    /// for TCP only (Landlock, BPF connect), so UDP would be an unfiltered way out.
    pub deny_inet_dgram: bool,
    /// Refuse IPv4/IPv6 datagram sockets other than UDP (ICMP ping, whose sends the cgroup
    /// sendmsg programs never see). Set instead of `deny_inet_dgram` when the agent's
    /// resolver is served (docs/dns-egress.md): UDP is then decided per datagram by the
    /// cgroup sendmsg programs' allow-list, whose only UDP exception is that resolver.
    pub deny_inet_dgram_not_udp: bool,
    /// Refuse `memfd_create` (EPERM): set where the kernel cannot make memfds
    /// non-executable (before Linux 6.3), which Landlock's exec rules do not cover.
    pub deny_memfd: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    #[error("unknown syscall '{0}' (not in agt-jail's tables for this architecture)")]
    Unknown(String),
    #[error("syscall '{0}' can never be allowed inside a jail")]
    Never(String),
    #[error("filter too long ({0} instructions)")]
    TooLong(usize),
}

/// Whether agt-jail's tables know `name` (on either architecture).
pub fn known(name: &str) -> bool {
    Arch::X86_64.syscall(name).is_some() || Arch::Aarch64.syscall(name).is_some()
}

impl SeccompPolicy {
    /// Checks names: unknown names and attempts to allow a NEVER name are errors.
    pub fn validate(&self) -> Result<(), SeccompError> {
        for name in self.deny.iter().chain(&self.allow) {
            if !known(name) {
                return Err(SeccompError::Unknown(name.clone()));
            }
        }
        if let Some(name) = self.allow.iter().find(|n| NEVER.contains(&n.as_str())) {
            return Err(SeccompError::Never(name.clone()));
        }
        Ok(())
    }

    /// The rules in evaluation order.
    pub fn rules(&self) -> Vec<Rule> {
        let mut rules: Vec<Rule> = NEVER
            .iter()
            .chain(DOCKER_EXTRA)
            .filter(|name| !self.allow.iter().any(|a| a == *name))
            .map(|name| Rule::deny(name, libc::EPERM))
            .collect();
        for name in &self.deny {
            if !rules.iter().any(|r| &r.syscall == name) {
                rules.push(Rule::deny(name, libc::EPERM));
            }
        }
        // clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc
        // fall back to clone(2), whose flags can be checked.
        rules.push(Rule::deny("clone3", libc::ENOSYS));
        let ns = CLONE_NS_FLAGS as u32;
        rules.push(Rule {
            syscall: "clone".into(),
            action: Action::Errno(libc::EPERM as u16),
            when: Some(ArgCheck::AnyBits { arg: 0, mask: ns }),
        });
        rules.push(Rule {
            syscall: "unshare".into(),
            action: Action::Errno(libc::EPERM as u16),
            when: Some(ArgCheck::AnyBits { arg: 0, mask: ns | CLONE_NEWTIME as u32 }),
        });
        // Fileless exec: execveat(fd, "", ..., AT_EMPTY_PATH) runs an fd (a memfd).
        rules.push(Rule {
            syscall: "execveat".into(),
            action: Action::Errno(libc::EPERM as u16),
            when: Some(ArgCheck::AnyBits { arg: 4, mask: AT_EMPTY_PATH as u32 }),
        });
        rules.push(Rule {
            syscall: "personality".into(),
            action: Action::Errno(libc::EPERM as u16),
            when: Some(ArgCheck::NotIn { arg: 0, values: PERSONALITY_OK.to_vec() }),
        });
        if self.deny_memfd && !rules.iter().any(|r| r.syscall == "memfd_create") {
            rules.push(Rule::deny("memfd_create", libc::EPERM));
        }
        if self.deny_inet_dgram {
            rules.push(Rule {
                syscall: "socket".into(),
                action: Action::Errno(libc::EPERM as u16),
                when: Some(ArgCheck::InetDgram),
            });
        } else if self.deny_inet_dgram_not_udp {
            rules.push(Rule {
                syscall: "socket".into(),
                action: Action::Errno(libc::EPERM as u16),
                when: Some(ArgCheck::InetDgramNotUdp),
            });
        }
        rules
    }

    /// Compiles the policy for `arch`. Names the architecture lacks are skipped.
    pub fn build(&self, arch: Arch) -> Result<Vec<libc::sock_filter>, SeccompError> {
        self.validate()?;
        let mut prog = vec![load(OFF_ARCH), jeq(arch.audit_arch(), 1, 0), ret(Action::KillProcess.ret()), load(OFF_NR)];
        if arch == Arch::X86_64 {
            // x32 syscalls are the x86_64 numbers with bit 30 set.
            prog.push(jge(X32_SYSCALL_BIT, 0, 1));
            prog.push(ret(Action::KillProcess.ret()));
        }
        for rule in self.rules() {
            let Some(nr) = arch.syscall(&rule.syscall) else { continue };
            match &rule.when {
                None => {
                    prog.push(jeq(nr, 0, 1));
                    prog.push(ret(rule.action.ret()));
                }
                Some(check) => {
                    let block = arg_block(check, rule.action);
                    let skip = u8::try_from(block.len()).map_err(|_| SeccompError::TooLong(block.len()))?;
                    prog.push(jeq(nr, 0, skip));
                    prog.extend(block);
                }
            }
        }
        prog.push(ret(Action::Allow.ret()));
        if prog.len() > 4096 {
            return Err(SeccompError::TooLong(prog.len()));
        }
        Ok(prog)
    }
}

/// The exec listener: `execve` and `execveat` return SECCOMP_RET_USER_NOTIF (the kernel
/// holds the call until the supervisor answers on the listener fd), everything else is
/// allowed. Installed with SECCOMP_FILTER_FLAG_NEW_LISTENER as the last filter before exec,
/// on top of the deny filter: the kernel runs every filter and the highest-precedence
/// action wins, so the deny filter's ERRNO (fileless `execveat`) still beats USER_NOTIF.
///
/// Foreign ABIs are killed exactly as in [`SeccompPolicy::build`]: a 32-bit (i386, arm32)
/// or x32 process would reach exec under other numbers, which this filter would not see.
pub fn exec_listener(arch: Arch) -> Vec<libc::sock_filter> {
    let mut prog = vec![load(OFF_ARCH), jeq(arch.audit_arch(), 1, 0), ret(Action::KillProcess.ret()), load(OFF_NR)];
    if arch == Arch::X86_64 {
        prog.push(jge(X32_SYSCALL_BIT, 0, 1));
        prog.push(ret(Action::KillProcess.ret()));
    }
    for name in ["execve", "execveat"] {
        // Both names are in every table (see the tests); a missing one would be a build bug,
        // and skipping it would leave a way around the listener, so notify on nothing less.
        let nr = arch.syscall(name).unwrap_or(u32::MAX);
        prog.push(jeq(nr, 0, 1));
        prog.push(ret(libc::SECCOMP_RET_USER_NOTIF));
    }
    prog.push(ret(Action::Allow.ret()));
    prog
}

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The instructions after a syscall-number match: decide on the argument and return.
fn arg_block(check: &ArgCheck, action: Action) -> Vec<libc::sock_filter> {
    match check {
        ArgCheck::AnyBits { arg, mask } => {
            vec![load(OFF_ARGS + 8 * u32::from(*arg)), jset(*mask, 0, 1), ret(action.ret()), ret(Action::Allow.ret())]
        }
        ArgCheck::NotIn { arg, values } => {
            let mut block = vec![load(OFF_ARGS + 8 * u32::from(*arg))];
            let n = values.len();
            for (i, value) in values.iter().enumerate() {
                // On a match jump to the final "allow" (n - i jumps ahead, past the deny).
                block.push(jeq(*value, (n - i) as u8, 0));
            }
            block.push(ret(action.ret()));
            block.push(ret(Action::Allow.ret()));
            block
        }
        ArgCheck::InetDgram => vec![
            load(OFF_ARGS),
            jeq(libc::AF_INET as u32, 1, 0),
            jeq(libc::AF_INET6 as u32, 0, 4),
            load(OFF_ARGS + 8),
            stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0xf),
            jeq(libc::SOCK_DGRAM as u32, 0, 1),
            ret(action.ret()),
            ret(Action::Allow.ret()),
        ],
        ArgCheck::InetDgramNotUdp => vec![
            load(OFF_ARGS),
            jeq(libc::AF_INET as u32, 1, 0),
            jeq(libc::AF_INET6 as u32, 0, 7),
            load(OFF_ARGS + 8),
            stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0xf),
            jeq(libc::SOCK_DGRAM as u32, 0, 4),
            load(OFF_ARGS + 16),
            jeq(0, 2, 0),
            jeq(libc::IPPROTO_UDP as u32, 1, 0),
            ret(action.ret()),
            ret(Action::Allow.ret()),
        ],
    }
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(op: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_JMP | op | libc::BPF_K) as u16, jt, jf, k }
}

fn load(offset: u32) -> libc::sock_filter {
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

fn ret(k: u32) -> libc::sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, k)
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    jump(libc::BPF_JEQ, k, jt, jf)
}

fn jge(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    jump(libc::BPF_JGE, k, jt, jf)
}

fn jset(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    jump(libc::BPF_JSET, k, jt, jf)
}

/// A tiny classic-BPF interpreter for the subset the builder emits, so tests (and
/// `agt-jail doctor`) can say what a filter does with a given call.
pub fn simulate(prog: &[libc::sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> Option<u32> {
    let mut pc = 0usize;
    let mut acc: u32 = 0;
    let word = |offset: u32| -> Option<u32> {
        match offset {
            OFF_NR => Some(nr),
            OFF_ARCH => Some(arch),
            o if o >= OFF_ARGS && (o - OFF_ARGS).is_multiple_of(4) && o < OFF_ARGS + 48 => {
                let idx = ((o - OFF_ARGS) / 8) as usize;
                let high = (o - OFF_ARGS) % 8 == 4;
                let v = args[idx];
                Some(if high { (v >> 32) as u32 } else { v as u32 })
            }
            _ => None,
        }
    };
    for _ in 0..prog.len() + 1 {
        let ins = prog.get(pc)?;
        let code = u32::from(ins.code);
        if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
            acc = word(ins.k)?;
            pc += 1;
        } else if code == libc::BPF_RET | libc::BPF_K {
            return Some(ins.k);
        } else if code == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K {
            acc &= ins.k;
            pc += 1;
        } else if code & 0x07 == libc::BPF_JMP {
            let taken = match code & 0xf0 {
                op if op == libc::BPF_JEQ => acc == ins.k,
                op if op == libc::BPF_JGE => acc >= ins.k,
                op if op == libc::BPF_JSET => acc & ins.k != 0,
                _ => return None,
            };
            pc += 1 + usize::from(if taken { ins.jt } else { ins.jf });
        } else {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    fn verdict(arch: Arch, name: &str, args: [u64; 6]) -> u32 {
        let prog = SeccompPolicy::default().build(arch).unwrap();
        simulate(&prog, arch.audit_arch(), arch.syscall(name).unwrap(), args).unwrap()
    }

    #[test]
    fn never_list_is_denied_on_both_architectures() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            for name in NEVER {
                if arch.syscall(name).is_none() {
                    assert!(matches!(*name, "create_module" | "get_kernel_syms" | "query_module"), "{name}");
                    continue;
                }
                assert_eq!(verdict(arch, name, [0; 6]), EPERM, "{arch:?} {name}");
            }
        }
    }

    #[test]
    fn ordinary_calls_are_allowed() {
        let prog = SeccompPolicy::default().build(Arch::X86_64).unwrap();
        for nr in [0u32, 1, 2, 3, 59, 60, 231, 257] {
            assert_eq!(simulate(&prog, Arch::X86_64.audit_arch(), nr, [0; 6]), Some(libc::SECCOMP_RET_ALLOW), "{nr}");
        }
    }

    #[test]
    fn clone_with_namespace_flags_is_denied_and_plain_fork_is_not() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let fork = u64::from(libc::SIGCHLD as u32);
            assert_eq!(verdict(arch, "clone", [fork, 0, 0, 0, 0, 0]), libc::SECCOMP_RET_ALLOW);
            let thread = 0x3d0f00; // pthread_create's flags
            assert_eq!(verdict(arch, "clone", [thread, 0, 0, 0, 0, 0]), libc::SECCOMP_RET_ALLOW);
            for flag in [0x1000_0000u64, 0x2000_0000, 0x0002_0000, 0x4000_0000] {
                assert_eq!(verdict(arch, "clone", [flag | fork, 0, 0, 0, 0, 0]), EPERM, "{flag:#x}");
                assert_eq!(verdict(arch, "unshare", [flag, 0, 0, 0, 0, 0]), EPERM, "{flag:#x}");
            }
            assert_eq!(verdict(arch, "unshare", [0x80, 0, 0, 0, 0, 0]), EPERM);
            assert_eq!(verdict(arch, "unshare", [0x400, 0, 0, 0, 0, 0]), libc::SECCOMP_RET_ALLOW); // CLONE_FILES
            assert_eq!(verdict(arch, "clone3", [0; 6]), ENOSYS);
        }
    }

    #[test]
    fn fileless_exec_and_personality() {
        let arch = Arch::X86_64;
        assert_eq!(verdict(arch, "execveat", [3, 0, 0, 0, 0x1000, 0]), EPERM);
        assert_eq!(verdict(arch, "execveat", [3, 0, 0, 0, 0, 0]), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(arch, "personality", [0xffff_ffff, 0, 0, 0, 0, 0]), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(arch, "personality", [0x0, 0, 0, 0, 0, 0]), libc::SECCOMP_RET_ALLOW);
        assert_eq!(verdict(arch, "personality", [0x0040_0000, 0, 0, 0, 0, 0]), EPERM);
        // READ_IMPLIES_EXEC
    }

    #[test]
    fn foreign_abis_are_killed() {
        let prog = SeccompPolicy::default().build(Arch::X86_64).unwrap();
        let i386 = 0x4000_0003;
        assert_eq!(simulate(&prog, i386, 1, [0; 6]), Some(libc::SECCOMP_RET_KILL_PROCESS));
        let x32 = X32_SYSCALL_BIT | 1;
        assert_eq!(simulate(&prog, Arch::X86_64.audit_arch(), x32, [0; 6]), Some(libc::SECCOMP_RET_KILL_PROCESS));
        let prog = SeccompPolicy::default().build(Arch::Aarch64).unwrap();
        let arm = 0x4000_0028;
        assert_eq!(simulate(&prog, arm, 1, [0; 6]), Some(libc::SECCOMP_RET_KILL_PROCESS));
    }

    #[test]
    fn profile_allow_and_deny() {
        let policy = SeccompPolicy { deny: vec!["socket".into()], allow: vec!["syslog".into()], ..Default::default() };
        let prog = policy.build(Arch::X86_64).unwrap();
        let a = Arch::X86_64;
        assert_eq!(simulate(&prog, a.audit_arch(), a.syscall("socket").unwrap(), [0; 6]), Some(EPERM));
        assert_eq!(
            simulate(&prog, a.audit_arch(), a.syscall("syslog").unwrap(), [0; 6]),
            Some(libc::SECCOMP_RET_ALLOW)
        );
        let bad = SeccompPolicy { allow: vec!["bpf".into()], ..Default::default() };
        assert_eq!(bad.build(a).unwrap_err(), SeccompError::Never("bpf".into()));
        let unknown = SeccompPolicy { deny: vec!["frobnicate".into()], ..Default::default() };
        assert!(matches!(unknown.build(a), Err(SeccompError::Unknown(_))));
    }

    #[test]
    fn memfd_create_can_be_refused_on_both_architectures() {
        for a in [Arch::X86_64, Arch::Aarch64] {
            let memfd = a.syscall("memfd_create").unwrap();
            let refused = SeccompPolicy { deny_memfd: true, ..Default::default() }.build(a).unwrap();
            assert_eq!(simulate(&refused, a.audit_arch(), memfd, [0; 6]), Some(EPERM));
            let allowed = SeccompPolicy::default().build(a).unwrap();
            assert_eq!(simulate(&allowed, a.audit_arch(), memfd, [0; 6]), Some(libc::SECCOMP_RET_ALLOW));
        }
    }

    #[test]
    fn inet_datagram_sockets_can_be_refused() {
        let a = Arch::X86_64;
        let policy = SeccompPolicy { deny_inet_dgram: true, ..Default::default() };
        let prog = policy.build(a).unwrap();
        let socket = a.syscall("socket").unwrap();
        let run =
            |domain: i32, ty: i32| simulate(&prog, a.audit_arch(), socket, [domain as u64, ty as u64, 0, 0, 0, 0]);
        assert_eq!(run(libc::AF_INET, libc::SOCK_DGRAM), Some(EPERM));
        assert_eq!(run(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC), Some(EPERM));
        assert_eq!(run(libc::AF_INET, libc::SOCK_STREAM), Some(libc::SECCOMP_RET_ALLOW));
        assert_eq!(run(libc::AF_UNIX, libc::SOCK_DGRAM), Some(libc::SECCOMP_RET_ALLOW));
        // Off by default.
        let prog = SeccompPolicy::default().build(a).unwrap();
        let dgram = [libc::AF_INET as u64, libc::SOCK_DGRAM as u64, 0, 0, 0, 0];
        assert_eq!(simulate(&prog, a.audit_arch(), socket, dgram), Some(libc::SECCOMP_RET_ALLOW));
    }

    #[test]
    fn only_udp_datagram_sockets_can_be_let_through() {
        for a in [Arch::X86_64, Arch::Aarch64] {
            let policy = SeccompPolicy { deny_inet_dgram_not_udp: true, ..Default::default() };
            let prog = policy.build(a).unwrap();
            let socket = a.syscall("socket").unwrap();
            let run = |domain: i32, ty: i32, proto: i32| {
                simulate(&prog, a.audit_arch(), socket, [domain as u64, ty as u64, proto as u64, 0, 0, 0])
            };
            let allow = Some(libc::SECCOMP_RET_ALLOW);
            assert_eq!(run(libc::AF_INET, libc::SOCK_DGRAM, 0), allow);
            assert_eq!(run(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::IPPROTO_UDP), allow);
            assert_eq!(run(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP), Some(EPERM));
            assert_eq!(run(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6), Some(EPERM));
            assert_eq!(run(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE), Some(EPERM));
            assert_eq!(run(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_ICMP), allow, "not a datagram socket");
            assert_eq!(run(libc::AF_UNIX, libc::SOCK_DGRAM, 1), allow);
        }
    }

    #[test]
    fn the_exec_listener_notifies_exec_only() {
        let notify = libc::SECCOMP_RET_USER_NOTIF;
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let prog = exec_listener(arch);
            let a = arch.audit_arch();
            for name in ["execve", "execveat"] {
                let nr = arch.syscall(name).unwrap();
                assert_eq!(simulate(&prog, a, nr, [0; 6]), Some(notify), "{arch:?} {name}");
                // Whatever the flags: AT_EMPTY_PATH is refused by the deny filter, not here.
                assert_eq!(simulate(&prog, a, nr, [3, 0, 0, 0, AT_EMPTY_PATH, 0]), Some(notify), "{arch:?} {name}");
            }
            for name in ["socket", "clone", "ptrace", "bpf", "mount"] {
                let nr = arch.syscall(name).unwrap();
                assert_eq!(simulate(&prog, a, nr, [0; 6]), Some(libc::SECCOMP_RET_ALLOW), "{arch:?} {name}");
            }
            for nr in [0u32, 1, 2, 3, 63, 64, 231, 257] {
                assert_eq!(simulate(&prog, a, nr, [0; 6]), Some(libc::SECCOMP_RET_ALLOW), "{arch:?} {nr}");
            }
        }
        assert_eq!(Arch::X86_64.syscall("execve"), Some(59));
        assert_eq!(Arch::Aarch64.syscall("execve"), Some(221));
    }

    #[test]
    fn the_exec_listener_kills_foreign_abis() {
        let prog = exec_listener(Arch::X86_64);
        let kill = Some(libc::SECCOMP_RET_KILL_PROCESS);
        // i386 execve is 11, execveat 358; x32 execve is 520 | X32 bit, execveat 545 | X32 bit.
        let i386 = 0x4000_0003;
        for nr in [11, 358, 1] {
            assert_eq!(simulate(&prog, i386, nr, [0; 6]), kill, "i386 {nr}");
        }
        for nr in [520, 545, 59, 1] {
            assert_eq!(simulate(&prog, Arch::X86_64.audit_arch(), X32_SYSCALL_BIT | nr, [0; 6]), kill, "x32 {nr}");
        }
        let prog = exec_listener(Arch::Aarch64);
        let arm = 0x4000_0028;
        for nr in [11, 387, 1] {
            assert_eq!(simulate(&prog, arm, nr, [0; 6]), kill, "arm32 {nr}");
        }
        // The aarch64 filter run on an x86_64 call (or the reverse) is a foreign ABI too.
        assert_eq!(simulate(&prog, Arch::X86_64.audit_arch(), 59, [0; 6]), kill);
    }

    #[test]
    fn tables_have_no_duplicate_names_or_numbers() {
        for table in [X86_64, AARCH64] {
            let all: Vec<_> = table.iter().chain(COMMON).collect();
            for (i, (n, nr)) in all.iter().enumerate() {
                for (m, mr) in &all[i + 1..] {
                    assert!(n != m && nr != mr, "{n}/{m} {nr}/{mr}");
                }
            }
        }
    }
}
