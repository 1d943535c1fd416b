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
pub const EVENT_RING_BYTES: u32 = 1 << 20;

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
}

impl EventKind {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Exec),
            2 => Some(Self::Connect),
            3 => Some(Self::ExecCheck),
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
}

impl Verdict {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Allow),
            1 => Some(Self::Deny),
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

/// An exec seen by `tp_btf/sched_process_exec` or checked by `lsm/bprm_check_security`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Bytes of `filename` that hold the name (without the NUL).
    pub filename_len: u32,
    pub _pad: u32,
    pub filename: [u8; EXEC_FILENAME_LEN],
}
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 40 + 8 + EXEC_FILENAME_LEN);

/// A connect(2) seen by `cgroup/connect4` or `cgroup/connect6`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    pub header: EventHeader,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Destination port in host byte order.
    pub port: u16,
    /// IPPROTO_TCP, IPPROTO_UDP, ... as the socket says.
    pub protocol: u32,
    /// Destination address in network byte order; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnectEvent>() == 40 + 24);

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

/// Values stored in the rule maps.
pub const RULE_DENY: u32 = 1;
pub const RULE_ALLOW: u32 = 2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are #[repr(C)], contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::ConnectRuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExecRuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectAllowData {}
}
