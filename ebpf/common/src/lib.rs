//! Types shared between the eBPF programs and userspace.
//!
//! Every type here crosses the kernel/user boundary byte for byte, so each is
//! `#[repr(C)]`, has explicit padding fields (the verifier and the ring buffer
//! see every byte; implicit padding would be uninitialised stack memory) and a
//! `const` size assertion that breaks the build if a field change moves the
//! layout.
#![no_std]

/// Bytes of an exec'd file name kept in an event (NUL-terminated when shorter).
pub const EXEC_FILENAME_LEN: usize = 256;

/// Capacity of the event ring buffer in bytes (a power of two, a multiple of the page size).
/// One ring for every program and agent: 4 MiB holds ~40k network events.
pub const EVENT_RING_BYTES: u32 = 4 << 20;

/// Capacity of the priority ring buffer: deny and kill records, so that a flood of allowed
/// events cannot crowd them out (1 MiB holds ~8k network denies), and process records
/// (fork, exec, exit) while it is less than half full, so that the record of the process a
/// deny came from is read before the deny.
pub const PRIORITY_RING_BYTES: u32 = 1 << 20;

/// Entries of the deny summary map: distinct (agent, process, destination, verdict)
/// keys whose denies did not fit into the deny ring and are counted instead.
pub const MAX_DENY_SUMMARIES: u32 = 16384;

/// Bytes of a task's `comm` (the kernel's TASK_COMM_LEN).
pub const TASK_COMM_LEN: usize = 16;

/// Maximum number of agents (cgroups) one loaded object tracks.
pub const MAX_AGENTS: u32 = 4096;

/// Maximum number of connect rules one loaded object holds.
pub const MAX_CONNECT_RULES: u32 = 16384;

/// Maximum number of exec rules (file identities) one loaded object holds.
pub const MAX_EXEC_RULES: u32 = 16384;

/// Address families as the kernel numbers them (AF_INET, AF_INET6).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// What an event reports. Stored as `u32` in [`EventHeader::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A process of an agent completed an exec (tp_btf/sched_process_exec).
    Exec = 1,
    /// A process of an agent called connect(2) on an IPv4/IPv6 socket.
    Connect = 2,
    /// A process of an agent asked to exec a file (BPF LSM bprm_check_security).
    ExecCheck = 3,
    /// A file access of an agent denied by a path rule (BPF LSM file_open, path_*).
    File = 16,
    /// A guarded operation of an agent denied by a BPF LSM hook (ptrace, signal, mount, ...).
    Guard = 17,
    /// A process of an agent sent a UDP datagram to an explicit address (cgroup/sendmsg4/6).
    Sendmsg = 4,
    /// A process of an agent bound a socket to an address/port (cgroup/bind4/6).
    Bind = 5,
    /// A process of an agent forked (tp_btf/sched_process_fork).
    Fork = 6,
    /// A process of an agent exited (tp_btf/sched_process_exit, thread-group leaders only).
    Exit = 7,
}

impl EventKind {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Exec),
            2 => Some(Self::Connect),
            3 => Some(Self::ExecCheck),
            16 => Some(Self::File),
            17 => Some(Self::Guard),
            4 => Some(Self::Sendmsg),
            5 => Some(Self::Bind),
            6 => Some(Self::Fork),
            7 => Some(Self::Exit),
            _ => None,
        }
    }
}

/// The decision the kernel side applied. Stored as `u32` in [`EventHeader::verdict`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow = 0,
    Deny = 1,
    /// Denied, and the policy asks userspace to kill the agent's whole cgroup.
    Kill = 2,
}

impl Verdict {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Allow),
            1 => Some(Self::Deny),
            2 => Some(Self::Kill),
            _ => None,
        }
    }
}

/// Leads every record in the event ring buffer; `kind` says which struct follows.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    pub kind: u32,
    pub verdict: u32,
    /// Thread id (kernel `pid`) as seen from the initial pid namespace.
    pub pid: u32,
    /// Process id (kernel `tgid`) as seen from the initial pid namespace.
    pub tgid: u32,
    /// cgroup v2 id of the task (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// The agent the cgroup belongs to, 0 when the cgroup is not registered.
    pub agent_id: u64,
    /// `bpf_ktime_get_boot_ns()` at the event.
    pub ktime_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 40);

/// An exec seen by `tp_btf/sched_process_exec` (kind [`EventKind::Exec`]); the LSM's
/// [`EventKind::ExecCheck`] uses [`ExecCheckEvent`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecTraceEvent {
    pub header: EventHeader,
    /// Process id of the real parent (initial pid namespace); 0 when unreadable.
    pub ppid: u32,
    /// Bytes of `filename` that hold the name (the kernel's string helper counts the NUL).
    pub filename_len: u32,
    /// The task's `comm` after the exec, NUL-padded.
    pub comm: [u8; TASK_COMM_LEN],
    /// The executable the task runs now (what [`NetEvent::exe`] of its later events says).
    pub exe: ExeKey,
    pub filename: [u8; EXEC_FILENAME_LEN],
}
const _: () = assert!(core::mem::size_of::<ExecTraceEvent>() == 40 + 8 + TASK_COMM_LEN + 24 + EXEC_FILENAME_LEN);

/// A fork of an agent's task (kind [`EventKind::Fork`]); the header names the parent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub header: EventHeader,
    pub parent_pid: u32,
    pub parent_tgid: u32,
    pub child_pid: u32,
    pub child_tgid: u32,
    /// The parent's `comm` (the child starts with the same), NUL-padded.
    pub comm: [u8; TASK_COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<ForkEvent>() == 40 + 16 + TASK_COMM_LEN);

/// The exit of an agent's thread-group leader (kind [`EventKind::Exit`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// `task_struct.exit_code` as wait(2) encodes it: `(status << 8) | signal`.
    pub exit_code: u32,
    pub _pad: u32,
    pub comm: [u8; TASK_COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<ExitEvent>() == 40 + 8 + TASK_COMM_LEN);

/// Entries of the task facts map (threads of agents the exec plane can look up).
pub const MAX_TASK_FACTS: u32 = 65536;

/// Which executable a task runs, as the kernel holds it: the `vfsmount` and `dentry` of
/// `mm->exe_file` (kernel addresses, pinned while any task runs that file) and the inode
/// number. The addresses serve only as a key that userspace never dereferences; all zero
/// means unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExeKey {
    pub mnt: u64,
    pub dentry: u64,
    pub ino: u64,
}
const _: () = assert!(core::mem::size_of::<ExeKey>() == 24);

/// What the kernel keeps per thread of an agent (map `TASK_FACTS`, keyed by the thread id
/// in the initial pid namespace), so the exec plane can read the caller's `comm` and
/// executable with one lookup instead of from `/proc`. Written at fork (the child's entry),
/// exec and rename (`task_rename`), removed at the thread's exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskFacts {
    pub exe: ExeKey,
    /// The thread's `comm`, NUL-padded.
    pub comm: [u8; TASK_COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<TaskFacts>() == 24 + TASK_COMM_LEN);

/// A connect(2), UDP sendmsg(2) or bind(2) of an agent (kinds [`EventKind::Connect`],
/// [`EventKind::Sendmsg`], [`EventKind::Bind`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetEvent {
    pub header: EventHeader,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Destination (bind: local) port in host byte order.
    pub port: u16,
    /// IPPROTO_TCP, IPPROTO_UDP, ... as the socket says.
    pub protocol: u32,
    /// Destination (bind: local) address in network byte order; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
    /// The plan's address class (meaningful with [`NET_EVENT_PLAN`]).
    pub addr_class: u32,
    /// The plan verdict's limit id, 0 for none.
    pub limit: u32,
    /// The plan's port class.
    pub port_class: u16,
    /// The plan verdict's rule index, [`NET_RULE_DEFAULT`] for the policy default.
    pub rule: u16,
    /// Which layer decided a deny (`NET_LAYER_*`), [`NET_LAYER_NONE`] when all allowed.
    pub layer: u8,
    /// `NET_EVENT_*` bits.
    pub flags: u8,
    pub _pad: u16,
    /// The caller's real uid (`bpf_get_current_uid_gid`).
    pub uid: u32,
    /// The caller's real parent's process id (initial pid namespace), 0 when unreadable.
    pub ppid: u32,
    /// The calling task's `comm`, NUL-padded.
    pub comm: [u8; TASK_COMM_LEN],
    /// The executable the calling thread runs, from `TASK_FACTS` (all zero when unknown), so
    /// that userspace can name it after the process has gone.
    pub exe: ExeKey,
}
const _: () = assert!(core::mem::size_of::<NetEvent>() == 40 + 40 + 8 + TASK_COMM_LEN + 24);

/// [`NetEvent::layer`]: nothing denied.
pub const NET_LAYER_NONE: u8 = 0;
/// The task's cgroup is not a registered agent (a nested cgroup the agent made).
pub const NET_LAYER_UNKNOWN_AGENT: u8 = 1;
/// The profile's deny list (`CONNECT_DENY`).
pub const NET_LAYER_DENY_LIST: u8 = 2;
/// The profile's allow-list (`CONNECT_ALLOW`, [`AGENT_FLAG_CONNECT_ALLOWLIST`]).
pub const NET_LAYER_ALLOW_LIST: u8 = 3;
/// Live demotion: all networking but loopback inside the agent's own netns ([`AGENT_FLAG_NET_DENY_ALL`]).
pub const NET_LAYER_DENY_ALL: u8 = 4;
/// The compiled policy plan ([`AGENT_FLAG_NET_POLICY`]).
pub const NET_LAYER_PLAN: u8 = 5;

/// [`NetEvent::flags`]: the plan was consulted; the class, rule and limit fields are meaningful.
pub const NET_EVENT_PLAN: u8 = 1;
/// The plan's verdict allowed but its rate limit was exhausted.
pub const NET_EVENT_RATE_LIMITED: u8 = 2;
/// The plan's verdict asks for the event to be logged.
pub const NET_EVENT_LOG: u8 = 4;

/// Key of the connect deny map: one destination for one agent.
/// `port == 0` matches every port of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectRuleKey {
    pub agent_id: u64,
    /// Network byte order; IPv4 uses the first four bytes, the rest stay zero.
    pub addr: [u8; 16],
    pub family: u16,
    /// Host byte order; 0 = any port.
    pub port: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ConnectRuleKey>() == 32);

/// Key of the exec deny map: one file identity (device + inode) for one agent.
/// Keyed by identity, not by path, so that renames and hard links do not evade it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExecRuleKey {
    pub agent_id: u64,
    /// `super_block.s_dev` in the kernel's internal encoding (major << 20 | minor).
    pub dev: u64,
    pub ino: u64,
}
const _: () = assert!(core::mem::size_of::<ExecRuleKey>() == 24);

/// Data of a connect allow-list entry (the key of an LPM trie, after its prefix length).
/// Field order is match order: an entry matches one agent, one family and one port (or
/// port 0 = every port) exactly, then the leading `prefix` bits of `addr`, so the trie's
/// prefix length is [`CONNECT_ALLOW_FIXED_BITS`] plus the CIDR's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectAllowData {
    pub agent_id: u64,
    pub family: u16,
    /// Host byte order; 0 = any port.
    pub port: u16,
    pub _pad: u32,
    /// Network byte order; IPv4 uses the first four bytes, the rest stay zero.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnectAllowData>() == 32);

/// Bits of [`ConnectAllowData`] before `addr`: always matched exactly.
pub const CONNECT_ALLOW_FIXED_BITS: u32 = 128;

/// Maximum number of connect allow-list entries one loaded object holds.
pub const MAX_CONNECT_ALLOW: u32 = 16384;

/// Agent flag: connects are denied unless the destination is in the allow-list.
pub const AGENT_FLAG_CONNECT_ALLOWLIST: u32 = 1;

/// Agent flag: a compiled network plan governs connect, sendmsg and bind (`NET_*` maps).
pub const AGENT_FLAG_NET_POLICY: u32 = 2;
/// Agent flag: every connect, sendmsg and bind is denied except loopback inside a network
/// namespace other than the loader's (live demotion to ring 3).
pub const AGENT_FLAG_NET_DENY_ALL: u32 = 4;

/// Network plan hook numbers ([`NetVerdictKey::event`]).
pub const NET_HOOK_CONNECT: u8 = 1;
pub const NET_HOOK_SENDMSG: u8 = 2;
pub const NET_HOOK_BIND: u8 = 3;

/// Network plan protocol numbers ([`NetVerdictKey::proto`]): TCP, UDP, anything else.
pub const NET_PROTO_TCP: u8 = 6;
pub const NET_PROTO_UDP: u8 = 17;
pub const NET_PROTO_OTHER: u8 = 0;

/// [`NetVerdict::action`] values.
pub const NET_ACTION_ALLOW: u8 = 0;
pub const NET_ACTION_DENY: u8 = 1;
pub const NET_ACTION_KILL: u8 = 2;
/// [`NetVerdict::flags`] bit: log the event.
pub const NET_VERDICT_LOG: u8 = 1;
/// [`NetVerdict::rule`] of the policy's default action.
pub const NET_RULE_DEFAULT: u16 = 0xffff;

/// Capacities of the network plan maps (all agents together).
pub const MAX_NET_ADDRS: u32 = 16384;
pub const MAX_NET_PORTS: u32 = 16384;
pub const MAX_NET_VERDICTS: u32 = 65536;
pub const MAX_NET_LIMITS: u32 = 4096;

/// Data of an IPv4 address-class entry (LPM trie key after its prefix length): agent id and
/// plan generation (both big-endian, matched exactly), then the address. The trie's prefix
/// length is [`NET_ADDR_FIXED_BITS`] plus the CIDR's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetAddr4Data {
    pub agent_id: [u8; 8],
    pub generation: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<NetAddr4Data>() == 16);

/// Data of an IPv6 address-class entry; see [`NetAddr4Data`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetAddr6Data {
    pub agent_id: [u8; 8],
    pub generation: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<NetAddr6Data>() == 28);

/// Bits of the address-class keys before the address: agent id and generation.
pub const NET_ADDR_FIXED_BITS: u32 = 96;

/// Key of the port-class map; a miss is port class 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetPortKey {
    pub agent_id: u64,
    pub generation: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<NetPortKey>() == 16);

/// Key of the verdict map; a miss is a deny.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetVerdictKey {
    pub agent_id: u64,
    pub generation: u32,
    pub addr_class: u32,
    pub port_class: u16,
    /// `NET_HOOK_*`.
    pub event: u8,
    /// `NET_PROTO_*`.
    pub proto: u8,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<NetVerdictKey>() == 24);

/// Value of the verdict map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetVerdict {
    /// `NET_ACTION_*`.
    pub action: u8,
    /// `NET_VERDICT_*` bits.
    pub flags: u8,
    /// Index into the userspace rule table, [`NET_RULE_DEFAULT`] for the default.
    pub rule: u16,
    /// Limit id, 0 for none.
    pub limit: u32,
}
const _: () = assert!(core::mem::size_of::<NetVerdict>() == 8);

/// Key of the rate-limit map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetLimitKey {
    pub agent_id: u64,
    pub generation: u32,
    pub limit: u32,
}
const _: () = assert!(core::mem::size_of::<NetLimitKey>() == 16);

/// The kernel's `struct bpf_spin_lock`; the name matters, the verifier finds it by BTF name.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// State of one rate limit (value of the rate-limit map). A window exists while
/// `count > 0`; with `period_ns == 0` it never resets (a per-session limit).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetLimitState {
    pub max: u64,
    pub period_ns: u64,
    /// `bpf_ktime_get_boot_ns()` after which the window resets.
    pub reset_at_ns: u64,
    pub count: u64,
    pub lock: bpf_spin_lock,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<NetLimitState>() == 40);

/// Values stored in the rule maps.
pub const RULE_DENY: u32 = 1;
pub const RULE_ALLOW: u32 = 2;

/// Agent flag (BPF LSM): an exec runs only when userspace approved that exact file for
/// that thread in `EXEC_APPROVED` (see [`ExecApproval`]).
pub const AGENT_FLAG_EXEC_VERDICT: u32 = 1 << 1;
/// Agent flag (BPF LSM): file opens, unlinks, renames and mkdirs are checked against path rules.
pub const AGENT_FLAG_FILE_RULES: u32 = 1 << 2;
/// Agent flag (BPF LSM): ptrace of any task outside the agent is denied.
pub const AGENT_FLAG_DENY_PTRACE: u32 = 1 << 3;
/// Agent flag (BPF LSM): signals to tasks outside the agent are denied.
pub const AGENT_FLAG_DENY_FOREIGN_SIGNALS: u32 = 1 << 4;
/// Agent flag (BPF LSM): mount(2) and move_mount(2) are denied.
pub const AGENT_FLAG_DENY_MOUNT: u32 = 1 << 5;
/// Agent flag (BPF LSM): bpf(2) is denied.
pub const AGENT_FLAG_DENY_BPF: u32 = 1 << 6;
/// Agent flag (BPF LSM): the kernel reading a file or blob on the agent's behalf (module
/// load, kexec image, firmware, policy) is denied.
pub const AGENT_FLAG_DENY_KERNEL_LOAD: u32 = 1 << 7;
/// Agent flag (BPF LSM): connect(2) on sockets the cgroup connect hooks do not see is
/// denied: abstract AF_UNIX addresses and every family other than AF_UNIX, AF_INET, AF_INET6
/// and AF_UNSPEC.
pub const AGENT_FLAG_DENY_FOREIGN_SOCKETS: u32 = 1 << 8;

/// Per-agent configuration of the BPF LSM programs (value of `LSM_AGENTS`, keyed by agent id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LsmAgentConfig {
    /// `AGENT_FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// Bit N set: the agent has a basename-prefix rule of N bytes (1..=63), so the kernel
    /// looks that prefix length up; other lengths cost nothing.
    pub basename_prefix_lens: u64,
}
const _: () = assert!(core::mem::size_of::<LsmAgentConfig>() == 16);

/// Value of `EXEC_APPROVED` (keyed by thread id in the initial pid namespace): the one file
/// this thread's next exec may run. Consumed by the exec it approves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecApproval {
    /// `super_block.s_dev` in the kernel's encoding (major << 20 | minor).
    pub dev: u64,
    pub ino: u64,
}
const _: () = assert!(core::mem::size_of::<ExecApproval>() == 16);

/// Why `bprm_check_security` denied an exec ([`ExecCheckEvent::reason`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecDenyReason {
    /// The file's identity is in the agent's deny list.
    Rule = 1,
    /// Exec verdicts are on and userspace approved nothing for this thread.
    NotApproved = 2,
    /// Userspace approved another file than the one the kernel is executing.
    WrongFile = 3,
    /// The file has no name in any directory (memfd, O_TMPFILE, deleted): fileless exec.
    Fileless = 4,
    /// The file's identity could not be read; exec verdicts fail closed.
    Unreadable = 5,
}

impl ExecDenyReason {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Rule),
            2 => Some(Self::NotApproved),
            3 => Some(Self::WrongFile),
            4 => Some(Self::Fileless),
            5 => Some(Self::Unreadable),
            _ => None,
        }
    }
}

/// An exec checked by `lsm/bprm_check_security` ([`EventKind::ExecCheck`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecCheckEvent {
    pub header: EventHeader,
    /// An [`ExecDenyReason`].
    pub reason: u32,
    /// Bytes of `filename` that hold the name (the kernel counts the NUL).
    pub filename_len: u32,
    /// Identity of the file the kernel was about to run (0 when unreadable).
    pub dev: u64,
    pub ino: u64,
    pub filename: [u8; EXEC_FILENAME_LEN],
}
const _: () = assert!(core::mem::size_of::<ExecCheckEvent>() == 40 + 24 + EXEC_FILENAME_LEN);

/// Bytes of a path the file hooks match and report, NUL included. Longer paths are
/// denied for agents with file rules (fail closed): a rule cannot be checked on a path
/// the kernel side cannot hold.
pub const FILE_PATH_LEN: usize = 248;

/// Data of a path-rule entry (an LPM trie key after its prefix length): the agent id,
/// always matched in full, then the path bytes. An exact rule is stored with its NUL
/// (so only that path matches), a directory rule as `dir/` (everything below it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilePathData {
    pub agent_id: u64,
    pub path: [u8; FILE_PATH_LEN],
}
const _: () = assert!(core::mem::size_of::<FilePathData>() == 256);

/// Bits of [`FilePathData`] before `path`.
pub const FILE_PATH_FIXED_BITS: u32 = 64;

/// Key of the name-rule hash map: one name (component, basename or basename prefix) of
/// one agent, by its [`name_hash`] and length. A hash collision can only deny more.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileNameKey {
    pub agent_id: u64,
    pub hash: u64,
    pub len: u32,
    /// [`FileRuleKind::Component`], [`FileRuleKind::Basename`] or [`FileRuleKind::BasenamePrefix`].
    pub kind: u32,
}
const _: () = assert!(core::mem::size_of::<FileNameKey>() == 24);

/// How a path rule matches.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRuleKind {
    /// The whole path.
    Exact = 1,
    /// The directory and everything below it.
    Prefix = 2,
    /// Any component of the path (".ssh" anywhere).
    Component = 3,
    /// The last component.
    Basename = 4,
    /// The start of the last component (".env." matches ".env.local").
    BasenamePrefix = 5,
}

impl FileRuleKind {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Exact),
            2 => Some(Self::Prefix),
            3 => Some(Self::Component),
            4 => Some(Self::Basename),
            5 => Some(Self::BasenamePrefix),
            _ => None,
        }
    }
}

/// Access bits of path rules and file events.
pub const FILE_ACCESS_READ: u32 = 1;
pub const FILE_ACCESS_WRITE: u32 = 1 << 1;
pub const FILE_ACCESS_UNLINK: u32 = 1 << 2;
pub const FILE_ACCESS_RENAME: u32 = 1 << 3;
pub const FILE_ACCESS_CREATE: u32 = 1 << 4;
/// Number of access bits ([`FileRuleValue::rule_index`] has one slot per bit).
pub const FILE_ACCESS_BITS: usize = 5;

/// Value of both path-rule maps: which accesses the entry denies and, per access bit, the
/// first rule (index and kind) that denies it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileRuleValue {
    pub access_mask: u32,
    pub rule_index: [u32; FILE_ACCESS_BITS],
    pub rule_kind: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<FileRuleValue>() == 32);

/// Which hook reported a file event ([`FileEvent::op`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOp {
    Open = 1,
    Unlink = 2,
    RenameFrom = 3,
    RenameTo = 4,
    Mkdir = 5,
}

impl FileOp {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Open),
            2 => Some(Self::Unlink),
            3 => Some(Self::RenameFrom),
            4 => Some(Self::RenameTo),
            5 => Some(Self::Mkdir),
            _ => None,
        }
    }
}

/// [`FileEvent::rule_kind`] when no rule matched but the path could not be checked.
pub const FILE_DENY_PATH_TOO_LONG: u32 = 100;
pub const FILE_DENY_PATH_UNREADABLE: u32 = 101;

/// A file access denied by a path rule ([`EventKind::File`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileEvent {
    pub header: EventHeader,
    /// A [`FileOp`].
    pub op: u32,
    /// `FILE_ACCESS_*` bits the operation asked for.
    pub access: u32,
    /// Index of the rule (as userspace numbered it) that denied the access.
    pub rule_index: u32,
    /// A [`FileRuleKind`], or `FILE_DENY_PATH_*` when the path could not be checked.
    pub rule_kind: u32,
    /// Bytes of `path` before its NUL.
    pub path_len: u32,
    pub _pad: u32,
    pub path: [u8; FILE_PATH_LEN],
}
const _: () = assert!(core::mem::size_of::<FileEvent>() == 40 + 24 + FILE_PATH_LEN);

/// Which guard hook denied ([`GuardEvent::hook`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardHook {
    Ptrace = 1,
    Signal = 2,
    Mount = 3,
    Bpf = 4,
    KernelLoad = 5,
    SocketConnect = 6,
}

impl GuardHook {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Ptrace),
            2 => Some(Self::Signal),
            3 => Some(Self::Mount),
            4 => Some(Self::Bpf),
            5 => Some(Self::KernelLoad),
            6 => Some(Self::SocketConnect),
            _ => None,
        }
    }
}

/// A guarded operation denied by a BPF LSM hook ([`EventKind::Guard`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuardEvent {
    pub header: EventHeader,
    /// A [`GuardHook`].
    pub hook: u32,
    /// Per hook: ptrace mode, signal number, mount flags (low bits), bpf command,
    /// kernel read/load id, socket family.
    pub detail: u32,
    /// The target task's process id (ptrace, signal), else 0.
    pub target_pid: u32,
    pub _pad: u32,
    /// The target task's cgroup v2 id (ptrace, signal), else 0.
    pub target_cgroup: u64,
}
const _: () = assert!(core::mem::size_of::<GuardEvent>() == 40 + 24);

/// FNV-1a (64 bit), the hash the kernel side computes byte by byte over path names.
pub const NAME_HASH_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const NAME_HASH_PRIME: u64 = 0x0000_0100_0000_01b3;

/// [`NAME_HASH_OFFSET`]/[`NAME_HASH_PRIME`] FNV-1a over `bytes`.
pub const fn name_hash(bytes: &[u8]) -> u64 {
    let mut hash = NAME_HASH_OFFSET;
    let mut i = 0;
    while i < bytes.len() {
        hash = (hash ^ bytes[i] as u64).wrapping_mul(NAME_HASH_PRIME);
        i += 1;
    }
    hash
}

/// Maximum entries of the exec approval map (threads with an approval in flight).
pub const MAX_EXEC_APPROVALS: u32 = 16384;
/// Maximum entries of each path-rule map.
pub const MAX_FILE_RULES: u32 = 16384;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], only integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for super::LsmAgentConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExecApproval {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FilePathData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FileNameKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FileRuleValue {}
    // SAFETY: both are #[repr(C)], contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::ConnectRuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExecRuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectAllowData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetAddr4Data {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetAddr6Data {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetVerdictKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetVerdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetLimitKey {}
    // SAFETY: as above (the lock is a plain u32 the kernel manages; userspace writes 0).
    unsafe impl aya::Pod for super::NetLimitState {}
    // SAFETY: as above (the key of the deny summary map is a network record).
    unsafe impl aya::Pod for super::NetEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TaskFacts {}
}
