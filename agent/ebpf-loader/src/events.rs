//! Decoding of ring-buffer records into typed events, and a blocking reader.
//!
//! Decoding is a pure function over bytes so it is tested without a kernel; the
//! reader only adds `poll(2)` on the ring buffer's fd.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    time::Duration,
};

use agt_jail_common::{
    EventHeader, EventKind, ExecCheckEvent, ExecDenyReason, ExecTraceEvent, ExitEvent, FileEvent, FileOp, FileRuleKind,
    ForkEvent, GuardEvent, GuardHook, NetEvent, Verdict, AF_INET, AF_INET6, EXEC_FILENAME_LEN, FILE_ACCESS_BITS,
    FILE_DENY_PATH_TOO_LONG, FILE_DENY_PATH_UNREADABLE, FILE_PATH_LEN, NET_EVENT_LOG, NET_EVENT_PLAN,
    NET_EVENT_RATE_LIMITED, NET_LAYER_ALLOW_LIST, NET_LAYER_DENY_ALL, NET_LAYER_DENY_LIST, NET_LAYER_NONE,
    NET_LAYER_PLAN, NET_LAYER_UNKNOWN_AGENT, NET_RULE_DEFAULT,
};
use aya::maps::{MapData, PerCpuHashMap};

use crate::ring::Ring;
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event record of {len} bytes is shorter than the {need}-byte {what}")]
    Short { len: usize, need: usize, what: &'static str },
    #[error("event record has unknown kind {0}")]
    UnknownKind(u32),
    #[error("event record has unknown verdict {0}")]
    UnknownVerdict(u32),
    #[error("network event has unknown address family {0}")]
    UnknownFamily(u16),
    #[error("network event has unknown layer {0}")]
    UnknownLayer(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetFamily {
    Inet,
    Inet6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictName {
    Allow,
    Deny,
    /// Denied, and the policy asks for the agent's cgroup to be killed.
    Kill,
}

/// The network layer that decided a deny (`none` when every layer allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetLayer {
    None,
    /// The socket's cgroup is not a registered agent.
    UnknownAgent,
    /// The profile's deny list.
    DenyList,
    /// The profile's allow-list.
    AllowList,
    /// Live demotion: everything but loopback in the agent's own netns.
    DenyAll,
    /// The compiled policy plan.
    Plan,
}

/// What the compiled network plan said about a call (present when the plan governs the agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NetPlanHit {
    pub addr_class: u32,
    pub port_class: u16,
    /// The rule index in the plan's rule table; `None` for the policy default or when no
    /// verdict matched (then the call was denied).
    pub rule: Option<u16>,
    /// The verdict's limit id, if it has one.
    pub limit: Option<u32>,
    /// The limit was exhausted (the call was denied).
    pub rate_limited: bool,
    /// The verdict asks for the event to be logged.
    pub log: bool,
}

/// The calling process as the kernel saw it at a network event (so userspace needs no
/// /proc read to know it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Caller {
    /// Real uid.
    pub uid: u32,
    /// The real parent's process id (0 when unreadable).
    pub ppid: u32,
    pub comm: String,
    /// Which executable the caller runs: an opaque key (`agt_jail_common::ExeKey`, kernel
    /// addresses, so never written out), equal to [`Event::Exec`]'s `exe` for the exec
    /// that started it; all zero when the kernel did not know.
    #[serde(skip)]
    pub exe: [u64; 3],
}

/// The fields every network event (connect, sendmsg, bind) carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetDetail {
    pub family: NetFamily,
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub layer: NetLayer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<NetPlanHit>,
    #[serde(flatten)]
    pub caller: Caller,
    /// How many calls this record stands for: 1, or more for a deny summary (denies that
    /// did not fit into the priority ring and were counted in the kernel; their `pid` and
    /// `ktime_ns` are 0).
    #[serde(skip_serializing_if = "is_one")]
    pub count: u64,
}

fn is_one(count: &u64) -> bool {
    *count == 1
}

/// One event from the kernel side, in the shape written to `--events` files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// An agent's process completed an exec.
    Exec {
        pid: u32,
        tgid: u32,
        /// The real parent's process id (0 when unreadable).
        ppid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        filename: String,
        /// The task's name after the exec.
        comm: String,
        verdict: VerdictName,
        /// The executable the task runs now, as [`Caller::exe`] keys it (never written out).
        #[serde(skip)]
        exe: [u64; 3],
    },
    /// An agent's process was checked before an exec (Tier A, BPF LSM).
    ExecCheck {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        filename: String,
        verdict: VerdictName,
        /// rule | not_approved | wrong_file | fileless | unreadable
        reason: String,
        /// Identity of the file the kernel was about to run (kernel dev encoding).
        dev: u64,
        ino: u64,
    },
    /// A file access of an agent denied by a path rule (Tier A, BPF LSM).
    File {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        /// open | unlink | rename_from | rename_to | mkdir
        op: String,
        /// The accesses asked for: read, write, unlink, rename, create.
        access: Vec<String>,
        path: String,
        /// The denying rule's index; `None` when the path itself could not be checked.
        rule_index: Option<u32>,
        /// exact | prefix | component | basename | basename_prefix | path_too_long | path_unreadable
        rule_kind: String,
        verdict: VerdictName,
    },
    /// A guarded operation of an agent denied by a BPF LSM hook (Tier A).
    Guard {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        /// ptrace | signal | mount | bpf | kernel_load | socket_connect
        hook: String,
        /// ptrace mode, signal number, mount flags, bpf command, kernel read id, socket family.
        detail: u32,
        target_pid: u32,
        target_cgroup: u64,
        verdict: VerdictName,
    },
    /// An agent's process called connect(2).
    Connect {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        family: NetFamily,
        addr: IpAddr,
        port: u16,
        protocol: String,
        verdict: VerdictName,
        layer: NetLayer,
        #[serde(skip_serializing_if = "Option::is_none")]
        plan: Option<NetPlanHit>,
        #[serde(flatten)]
        caller: Caller,
        /// As [`NetDetail::count`].
        #[serde(skip_serializing_if = "is_one")]
        count: u64,
    },
    /// An agent's process sent a UDP datagram to an explicit address.
    Sendmsg {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        #[serde(flatten)]
        net: NetDetail,
        verdict: VerdictName,
    },
    /// An agent's process bound a socket (the local address and port).
    Bind {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        #[serde(flatten)]
        net: NetDetail,
        verdict: VerdictName,
    },
    /// An agent's process forked; `pid`/`tgid` name the forking thread.
    Fork {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        parent_pid: u32,
        parent_tgid: u32,
        child_pid: u32,
        child_tgid: u32,
        comm: String,
    },
    /// An agent's process (thread-group leader) exited.
    Exit {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        /// `exit_code` as wait(2) encodes it.
        exit_code: u32,
        /// The exit status when it exited normally.
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<i32>,
        /// The signal that ended it, if one did.
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        comm: String,
    },
}

impl Event {
    /// The kernel side denied the action (a `kill` verdict is a deny too).
    pub fn is_deny(&self) -> bool {
        matches!(self.verdict(), Some(VerdictName::Deny | VerdictName::Kill))
    }

    /// The policy asks for the agent's cgroup to be killed.
    pub fn is_kill(&self) -> bool {
        self.verdict() == Some(VerdictName::Kill)
    }

    /// The verdict of events that carry one (fork and exit do not).
    pub fn verdict(&self) -> Option<VerdictName> {
        match self {
            Event::Exec { verdict, .. }
            | Event::ExecCheck { verdict, .. }
            | Event::Connect { verdict, .. }
            | Event::Sendmsg { verdict, .. }
            | Event::Bind { verdict, .. }
            | Event::File { verdict, .. }
            | Event::Guard { verdict, .. } => Some(*verdict),
            Event::Fork { .. } | Event::Exit { .. } => None,
        }
    }
}

/// Reads a `#[repr(C)]` plain-old-data struct from the front of `bytes`.
fn read_pod<T: Copy>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short { len: bytes.len(), need, what });
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes; read_unaligned has no alignment
    // requirement; T is one of the common crate's #[repr(C)] integer/array structs, for
    // which every bit pattern is a valid value.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn verdict(raw: u32) -> Result<VerdictName, DecodeError> {
    match Verdict::from_u32(raw) {
        Some(Verdict::Allow) => Ok(VerdictName::Allow),
        Some(Verdict::Deny) => Ok(VerdictName::Deny),
        Some(Verdict::Kill) => Ok(VerdictName::Kill),
        None => Err(DecodeError::UnknownVerdict(raw)),
    }
}

fn protocol_name(protocol: u32) -> String {
    match protocol {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        1 => "icmp".to_string(),
        58 => "icmpv6".to_string(),
        other => other.to_string(),
    }
}

/// The name of a raw enum value, or `unknown_N` for values this build does not know.
fn name_of<T>(raw: u32, parse: fn(u32) -> Option<T>, name: fn(T) -> &'static str) -> String {
    parse(raw).map_or_else(|| format!("unknown_{raw}"), |known| name(known).to_string())
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read_pod(bytes, "event header")?;
    let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    let verdict = verdict(header.verdict)?;
    let EventHeader { pid, tgid, cgroup_id, agent_id, ktime_ns, .. } = header;
    match kind {
        EventKind::ExecCheck => {
            let event: ExecCheckEvent = read_pod(bytes, "exec check event")?;
            let reason = name_of(event.reason, ExecDenyReason::from_u32, |reason| match reason {
                ExecDenyReason::Rule => "rule",
                ExecDenyReason::NotApproved => "not_approved",
                ExecDenyReason::WrongFile => "wrong_file",
                ExecDenyReason::Fileless => "fileless",
                ExecDenyReason::Unreadable => "unreadable",
            });
            let filename = c_string(&event.filename, event.filename_len as usize, EXEC_FILENAME_LEN);
            let (dev, ino) = (event.dev, event.ino);
            Ok(Event::ExecCheck { pid, tgid, cgroup_id, agent_id, ktime_ns, filename, verdict, reason, dev, ino })
        }
        EventKind::File => {
            let event: FileEvent = read_pod(bytes, "file event")?;
            let op = name_of(event.op, FileOp::from_u32, |op| match op {
                FileOp::Open => "open",
                FileOp::Unlink => "unlink",
                FileOp::RenameFrom => "rename_from",
                FileOp::RenameTo => "rename_to",
                FileOp::Mkdir => "mkdir",
            });
            const ACCESS_NAMES: [&str; FILE_ACCESS_BITS] = ["read", "write", "unlink", "rename", "create"];
            let access = (0..FILE_ACCESS_BITS)
                .filter(|bit| event.access & (1 << bit) != 0)
                .map(|bit| ACCESS_NAMES[bit].to_string())
                .collect();
            let rule_kind = match event.rule_kind {
                FILE_DENY_PATH_TOO_LONG => "path_too_long".to_string(),
                FILE_DENY_PATH_UNREADABLE => "path_unreadable".to_string(),
                raw => name_of(raw, FileRuleKind::from_u32, |kind| match kind {
                    FileRuleKind::Exact => "exact",
                    FileRuleKind::Prefix => "prefix",
                    FileRuleKind::Component => "component",
                    FileRuleKind::Basename => "basename",
                    FileRuleKind::BasenamePrefix => "basename_prefix",
                }),
            };
            let rule_index = (event.rule_index != u32::MAX).then_some(event.rule_index);
            // path_len excludes the NUL; c_string stops at the first NUL anyway.
            let path = c_string(&event.path, event.path_len as usize, FILE_PATH_LEN);
            Ok(Event::File {
                pid,
                tgid,
                cgroup_id,
                agent_id,
                ktime_ns,
                op,
                access,
                path,
                rule_index,
                rule_kind,
                verdict,
            })
        }
        EventKind::Guard => {
            let event: GuardEvent = read_pod(bytes, "guard event")?;
            let hook = name_of(event.hook, GuardHook::from_u32, |hook| match hook {
                GuardHook::Ptrace => "ptrace",
                GuardHook::Signal => "signal",
                GuardHook::Mount => "mount",
                GuardHook::Bpf => "bpf",
                GuardHook::KernelLoad => "kernel_load",
                GuardHook::SocketConnect => "socket_connect",
            });
            let (detail, target_pid, target_cgroup) = (event.detail, event.target_pid, event.target_cgroup);
            Ok(Event::Guard {
                pid,
                tgid,
                cgroup_id,
                agent_id,
                ktime_ns,
                hook,
                detail,
                target_pid,
                target_cgroup,
                verdict,
            })
        }
        EventKind::Exec => {
            let event: ExecTraceEvent = read_pod(bytes, "exec event")?;
            let filename = kernel_string(&event.filename, event.filename_len as usize);
            let comm = comm_string(&event.comm);
            let exe = exe_key(event.exe);
            Ok(Event::Exec { pid, tgid, ppid: event.ppid, cgroup_id, agent_id, ktime_ns, filename, comm, verdict, exe })
        }
        EventKind::Connect | EventKind::Sendmsg | EventKind::Bind => {
            let event: NetEvent = read_pod(bytes, "network event")?;
            net_event(kind, verdict, &event, 1)
        }
        EventKind::Fork => {
            let event: ForkEvent = read_pod(bytes, "fork event")?;
            Ok(Event::Fork {
                pid,
                tgid,
                cgroup_id,
                agent_id,
                ktime_ns,
                parent_pid: event.parent_pid,
                parent_tgid: event.parent_tgid,
                child_pid: event.child_pid,
                child_tgid: event.child_tgid,
                comm: comm_string(&event.comm),
            })
        }
        EventKind::Exit => {
            let event: ExitEvent = read_pod(bytes, "exit event")?;
            let code = event.exit_code;
            let signal = (code & 0x7f) as i32;
            let (status, signal) =
                if signal == 0 { (Some(((code >> 8) & 0xff) as i32), None) } else { (None, Some(signal)) };
            Ok(Event::Exit {
                pid,
                tgid,
                cgroup_id,
                agent_id,
                ktime_ns,
                exit_code: code,
                status,
                signal,
                comm: comm_string(&event.comm),
            })
        }
    }
}

/// Decodes an entry of the kernel's deny summary: `count` denies recorded as one record.
pub fn decode_summary(key: &NetEvent, count: u64) -> Result<Event, DecodeError> {
    let kind = EventKind::from_u32(key.header.kind).ok_or(DecodeError::UnknownKind(key.header.kind))?;
    if !matches!(kind, EventKind::Connect | EventKind::Sendmsg | EventKind::Bind) {
        return Err(DecodeError::UnknownKind(key.header.kind));
    }
    net_event(kind, verdict(key.header.verdict)?, key, count)
}

fn net_event(kind: EventKind, verdict: VerdictName, event: &NetEvent, count: u64) -> Result<Event, DecodeError> {
    let EventHeader { pid, tgid, cgroup_id, agent_id, ktime_ns, .. } = event.header;
    let net = net_detail(event, count)?;
    Ok(match kind {
        EventKind::Connect => Event::Connect {
            pid,
            tgid,
            cgroup_id,
            agent_id,
            ktime_ns,
            family: net.family,
            addr: net.addr,
            port: net.port,
            protocol: net.protocol,
            verdict,
            layer: net.layer,
            plan: net.plan,
            caller: net.caller,
            count,
        },
        EventKind::Sendmsg => Event::Sendmsg { pid, tgid, cgroup_id, agent_id, ktime_ns, net, verdict },
        _ => Event::Bind { pid, tgid, cgroup_id, agent_id, ktime_ns, net, verdict },
    })
}

/// The text of a NUL-terminated kernel string of at most `len` bytes (clamped to `cap`).
fn c_string(raw: &[u8], len: usize, cap: usize) -> String {
    let raw = &raw[..len.min(cap).min(raw.len())];
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// A string the kernel's string helper copied: `len` counts the NUL it wrote.
fn kernel_string(buffer: &[u8], len: usize) -> String {
    let raw = &buffer[..len.min(buffer.len())];
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    String::from_utf8_lossy(raw).into_owned()
}

/// The kernel's executable key as the plain array userspace compares and hashes (every
/// record's and the task facts map's reading).
pub fn exe_key(key: agt_jail_common::ExeKey) -> [u64; 3] {
    [key.mnt, key.dentry, key.ino]
}

/// A NUL-padded `comm` as text (every record's and the task facts map's reading).
pub fn comm_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&byte| byte == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn net_detail(event: &NetEvent, count: u64) -> Result<NetDetail, DecodeError> {
    let (family, addr) = match event.family {
        AF_INET => {
            let [a, b, c, d, ..] = event.addr;
            (NetFamily::Inet, IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
        }
        AF_INET6 => (NetFamily::Inet6, IpAddr::V6(Ipv6Addr::from(event.addr))),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    let layer = match event.layer {
        NET_LAYER_NONE => NetLayer::None,
        NET_LAYER_UNKNOWN_AGENT => NetLayer::UnknownAgent,
        NET_LAYER_DENY_LIST => NetLayer::DenyList,
        NET_LAYER_ALLOW_LIST => NetLayer::AllowList,
        NET_LAYER_DENY_ALL => NetLayer::DenyAll,
        NET_LAYER_PLAN => NetLayer::Plan,
        other => return Err(DecodeError::UnknownLayer(other)),
    };
    let plan = (event.flags & NET_EVENT_PLAN != 0).then(|| NetPlanHit {
        addr_class: event.addr_class,
        port_class: event.port_class,
        rule: (event.rule != NET_RULE_DEFAULT).then_some(event.rule),
        limit: (event.limit != 0).then_some(event.limit),
        rate_limited: event.flags & NET_EVENT_RATE_LIMITED != 0,
        log: event.flags & NET_EVENT_LOG != 0,
    });
    let caller = Caller { uid: event.uid, ppid: event.ppid, comm: comm_string(&event.comm), exe: exe_key(event.exe) };
    Ok(NetDetail {
        family,
        addr,
        port: event.port,
        protocol: protocol_name(event.protocol),
        layer,
        plan,
        caller,
        count,
    })
}

/// Blocking reader over the kernel's event rings (the priority ring first: deny, kill and
/// process records) and its deny summary.
///
/// What it reads is handed back to the kernel when [`EventReader::drain`] (or a poll)
/// returns, after the sink saw every record; or, after [`EventReader::commit_manually`],
/// only by [`EventReader::commit`]: a caller writes the records it was handed (the audit
/// log's write(2)), then commits. Until then the rings keep them, and a reader of the
/// same (pinned) rings in another process starts with them.
pub struct EventReader {
    events: Ring,
    priority: Ring,
    summary: PerCpuHashMap<MapData, NetEvent, u64>,
    /// The summary map again (a second descriptor), for pinning.
    summary_map: MapData,
    /// Per summary key: the count written (as committed), kept in a map of its own so that
    /// it can be pinned with the summary: a later reader of the pins takes it from there.
    written: Option<aya::maps::HashMap<MapData, NetEvent, u64>>,
    /// Per summary key (its bytes): the count handed out and committed.
    reported: HashMap<Vec<u8>, u64>,
    /// Per summary key: the entry and the count handed out since the last commit.
    handed: HashMap<Vec<u8>, (NetEvent, u64)>,
    /// Commits only on [`EventReader::commit`].
    manual: bool,
    /// Ring records handed out per drain at most.
    batch_max: usize,
}

/// The names under which [`EventReader::pin`] pins the run's maps in its directory.
pub mod pins {
    /// The event ring (allowed observations).
    pub const EVENTS: &str = "events";
    /// The priority ring (deny, kill and process records).
    pub const PRIORITY: &str = "priority_events";
    /// The deny summary (per-CPU counts of denies that fit no ring).
    pub const DENY_SUMMARY: &str = "deny_summary";
    /// The per-CPU count of events the event ring could not take.
    pub const EVENT_DROPS: &str = "event_drops";
    /// The per-CPU count of denies that fit neither the priority ring nor the summary.
    pub const DENY_DROPS: &str = "deny_drops";
    /// Per deny summary entry, the count the reader wrote (and committed).
    pub const DENY_SUMMARY_WRITTEN: &str = "deny_summary_written";
}

/// The pinned map of the summary counts written.
fn open_written(dir: &std::path::Path) -> Result<aya::maps::HashMap<MapData, NetEvent, u64>, crate::LoaderError> {
    let error = |message: String| crate::LoaderError::Map { map: pins::DENY_SUMMARY_WRITTEN, message };
    let data = MapData::from_pin(dir.join(pins::DENY_SUMMARY_WRITTEN))
        .map_err(|err| error(format!("{}: {err}", dir.display())))?;
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|err| error(err.to_string()))
}

impl EventReader {
    pub(crate) fn new(events: MapData, priority: MapData, summary: MapData) -> Result<Self, crate::LoaderError> {
        let written = aya::maps::HashMap::create(agt_jail_common::MAX_DENY_SUMMARIES, 0)
            .map_err(|err| crate::LoaderError::Map { map: pins::DENY_SUMMARY_WRITTEN, message: err.to_string() })?;
        Self::with_written(events, priority, summary, Some(written))
    }

    fn with_written(
        events: MapData,
        priority: MapData,
        summary: MapData,
        written: Option<aya::maps::HashMap<MapData, NetEvent, u64>>,
    ) -> Result<Self, crate::LoaderError> {
        use std::os::fd::AsFd;
        let error =
            |map: &'static str| move |err: std::io::Error| crate::LoaderError::Map { map, message: err.to_string() };
        let summary_fd = summary.fd().as_fd().try_clone_to_owned().map_err(error(pins::DENY_SUMMARY))?;
        let summary_map = MapData::from_fd(summary_fd)
            .map_err(|err| crate::LoaderError::Map { map: pins::DENY_SUMMARY, message: err.to_string() })?;
        let summary = PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(summary))
            .map_err(|err| crate::LoaderError::Map { map: pins::DENY_SUMMARY, message: err.to_string() })?;
        Ok(Self {
            events: Ring::new(events).map_err(error(pins::EVENTS))?,
            priority: Ring::new(priority).map_err(error(pins::PRIORITY))?,
            summary,
            summary_map,
            written,
            reported: HashMap::new(),
            handed: HashMap::new(),
            manual: false,
            batch_max: usize::MAX,
        })
    }

    /// Opens the rings and the deny summary a run pinned in `dir` (see [`pins`]), reading
    /// from where its last commit left off: the summary hands out only what its counts
    /// grew beyond the counts committed as written.
    pub fn open_pinned(dir: &std::path::Path) -> Result<Self, crate::LoaderError> {
        let open = |name: &'static str| {
            MapData::from_pin(dir.join(name))
                .map_err(|err| crate::LoaderError::Map { map: name, message: format!("{}: {err}", dir.display()) })
        };
        let written = open_written(dir)?;
        let mut reported = HashMap::new();
        for entry in written.iter() {
            let (key, count) = entry
                .map_err(|err| crate::LoaderError::Map { map: pins::DENY_SUMMARY_WRITTEN, message: err.to_string() })?;
            reported.insert(bytes_of(&key).to_vec(), count);
        }
        let mut reader =
            Self::with_written(open(pins::EVENTS)?, open(pins::PRIORITY)?, open(pins::DENY_SUMMARY)?, Some(written))?;
        reader.reported = reported;
        Ok(reader)
    }

    /// Pins the rings, the deny summary and the counts written of it in `dir` (which must
    /// exist, on bpffs).
    pub fn pin(&mut self, dir: &std::path::Path) -> Result<(), crate::LoaderError> {
        let pin = |map: &MapData, name: &'static str| {
            map.pin(dir.join(name)).map_err(|err| crate::LoaderError::Map {
                map: name,
                message: format!("cannot pin at {}: {err}", dir.join(name).display()),
            })
        };
        pin(self.events.map(), pins::EVENTS)?;
        pin(self.priority.map(), pins::PRIORITY)?;
        pin(&self.summary_map, pins::DENY_SUMMARY)?;
        let written =
            self.written.take().ok_or(crate::LoaderError::Missing { what: "map", name: pins::DENY_SUMMARY_WRITTEN })?;
        written.pin(dir.join(pins::DENY_SUMMARY_WRITTEN)).map_err(|err| crate::LoaderError::Map {
            map: pins::DENY_SUMMARY_WRITTEN,
            message: format!("cannot pin at {}: {err}", dir.display()),
        })?;
        self.written = Some(open_written(dir)?);
        Ok(())
    }

    /// Hands every record already queued to `sink`, without waiting: the priority ring, the
    /// event ring, then the denies the kernel counted since the last look (one event per
    /// summary key with the increment as its count). Returns how many events were handed out.
    /// With [`EventReader::commit_manually`], nothing is given back to the kernel before
    /// [`EventReader::commit`].
    /// After [`EventReader::set_batch_max`] a drain stops after that many ring records
    /// (the summary is read when the rings are empty).
    pub fn drain(&mut self, sink: &mut dyn FnMut(Result<Event, DecodeError>)) -> usize {
        let mut count = 0;
        for ring in [&mut self.priority, &mut self.events] {
            while count < self.batch_max && ring.next_with(|bytes| sink(decode(bytes))).is_some() {
                count += 1;
            }
        }
        if count < self.batch_max {
            count += self.drain_summary(sink);
        }
        if !self.manual {
            // Without the pinned map (not updated in this mode) nothing can fail.
            let _ = self.commit();
        }
        count
    }

    /// At most `max` ring records per drain: a caller that writes each drain's records
    /// before it commits keeps what it holds unwritten (and its writes) that small.
    pub fn set_batch_max(&mut self, max: usize) {
        self.batch_max = max.max(1);
    }

    /// From now on what is read goes back to the kernel only on [`EventReader::commit`].
    pub fn commit_manually(&mut self) {
        self.manual = true;
    }

    /// The records handed out are written: the summary's counts handed out are kept as
    /// written (in memory and, with [`EventReader::commit_manually`], in the map that is
    /// pinned with the summary), then the rings' space goes back to the kernel. An error
    /// (the map refused an update) gives nothing back.
    pub fn commit(&mut self) -> Result<(), crate::LoaderError> {
        if self.manual {
            if let Some(written) = self.written.as_mut() {
                for (key, count) in self.handed.values() {
                    written.insert(key, count, 0).map_err(|err| crate::LoaderError::Map {
                        map: pins::DENY_SUMMARY_WRITTEN,
                        message: err.to_string(),
                    })?;
                }
            }
        }
        for (bytes, (_, count)) in self.handed.drain() {
            self.reported.insert(bytes, count);
        }
        self.priority.commit();
        self.events.commit();
        Ok(())
    }

    /// Every count of the deny summary (summed over CPUs), as events whose `count` is the
    /// kernel's total for the entry.
    pub fn summary_totals(&self) -> Vec<Result<Event, DecodeError>> {
        let mut out = Vec::new();
        for entry in self.summary.iter() {
            let Ok((key, per_cpu)) = entry else { continue };
            let total: u64 = per_cpu.iter().sum();
            out.push(decode_summary(&key, total));
        }
        out
    }

    fn drain_summary(&mut self, sink: &mut dyn FnMut(Result<Event, DecodeError>)) -> usize {
        let mut count = 0;
        for entry in self.summary.iter() {
            let Ok((key, per_cpu)) = entry else { continue };
            let total: u64 = per_cpu.iter().sum();
            let bytes = bytes_of(&key).to_vec();
            let seen =
                self.handed.get(&bytes).map(|(_, n)| n).or_else(|| self.reported.get(&bytes)).copied().unwrap_or(0);
            if total > seen {
                sink(decode_summary(&key, total - seen));
                self.handed.insert(bytes, (key, total));
                count += 1;
            }
        }
        count
    }

    /// Waits up to `timeout` for records of either ring, then drains them (process records
    /// in the priority ring do not wake it: they come with the next record that does, or at
    /// the timeout). Returns how many were read.
    pub fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Result<Event, DecodeError>),
    ) -> std::io::Result<usize> {
        self.wait_then_drain(2, timeout, sink)
    }

    /// Waits up to `timeout` for a deny or kill record only, then drains every ring. A
    /// reader that calls this in a loop picks observations up once per `timeout` instead of
    /// being woken for each: on a busy agent (three records per fork, exec and exit) the
    /// wake-ups would otherwise take CPU time from the agent itself. Denies still wake it
    /// at once.
    pub fn poll_denies(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Result<Event, DecodeError>),
    ) -> std::io::Result<usize> {
        self.wait_then_drain(1, timeout, sink)
    }

    /// Waits on the first `rings` of (priority ring, event ring), then drains everything.
    fn wait_then_drain(
        &mut self,
        rings: usize,
        timeout: Duration,
        sink: &mut dyn FnMut(Result<Event, DecodeError>),
    ) -> std::io::Result<usize> {
        let mut fds = [self.priority.as_raw_fd(), self.events.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let waited = &mut fds[..rings.min(2)];
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `waited` is a slice of valid, initialised pollfds and we pass its length.
        let ready = unsafe { libc::poll(waited.as_mut_ptr(), waited.len() as libc::nfds_t, millis) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(err);
        }
        Ok(self.drain(sink))
    }
}

/// The bytes of a `#[repr(C)]` record of the common crate.
fn bytes_of<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: T is one of the common crate's #[repr(C)] structs without implicit padding
    // (size-asserted there), so all its bytes are initialised.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use agt_jail_common::{ExeKey, EXEC_FILENAME_LEN, TASK_COMM_LEN};

    fn header(kind: EventKind, verdict: Verdict) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            verdict: verdict as u32,
            pid: 11,
            tgid: 10,
            cgroup_id: 77,
            agent_id: 5,
            ktime_ns: 123,
        }
    }

    fn net_event(kind: EventKind, verdict: Verdict, family: u16, addr: [u8; 16], port: u16) -> NetEvent {
        NetEvent {
            header: header(kind, verdict),
            family,
            port,
            protocol: 6,
            addr,
            addr_class: 0,
            limit: 0,
            port_class: 0,
            rule: NET_RULE_DEFAULT,
            layer: NET_LAYER_NONE,
            flags: 0,
            _pad: 0,
            uid: 1000,
            ppid: 4,
            comm: comm(b"curl"),
            exe: ExeKey { mnt: 1, dentry: 2, ino: 3 },
        }
    }

    fn comm(name: &[u8]) -> [u8; TASK_COMM_LEN] {
        let mut comm = [0u8; TASK_COMM_LEN];
        comm[..name.len()].copy_from_slice(name);
        comm
    }

    #[test]
    fn decodes_exec_with_nul_counted() {
        let mut filename = [0u8; EXEC_FILENAME_LEN];
        filename[..10].copy_from_slice(b"/bin/true\0");
        let event = ExecTraceEvent {
            header: header(EventKind::Exec, Verdict::Allow),
            ppid: 9,
            filename_len: 10,
            comm: comm(b"true"),
            exe: ExeKey { mnt: 4, dentry: 5, ino: 6 },
            filename,
        };
        let decoded = decode(bytes_of(&event)).unwrap();
        assert_eq!(
            decoded,
            Event::Exec {
                pid: 11,
                tgid: 10,
                ppid: 9,
                cgroup_id: 77,
                agent_id: 5,
                ktime_ns: 123,
                filename: "/bin/true".into(),
                comm: "true".into(),
                verdict: VerdictName::Allow,
                exe: [4, 5, 6],
            }
        );
        let json = serde_json::to_value(&decoded).unwrap();
        assert_eq!((json["kind"].as_str(), json["ppid"].as_u64()), (Some("exec"), Some(9)));
        assert!(json.get("exe").is_none(), "the key is kernel addresses, never written out: {json}");
    }

    #[test]
    fn decodes_denied_ipv4_connect() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut event = net_event(EventKind::Connect, Verdict::Deny, AF_INET, addr, 8080);
        event.layer = NET_LAYER_DENY_LIST;
        let decoded = decode(bytes_of(&event)).unwrap();
        assert!(decoded.is_deny());
        let json = serde_json::to_value(&decoded).unwrap();
        assert_eq!(json["kind"], "connect");
        assert_eq!(json["addr"], "127.0.0.1");
        assert_eq!(json["port"], 8080);
        assert_eq!(json["protocol"], "tcp");
        assert_eq!(json["verdict"], "deny");
        assert_eq!(json["layer"], "deny_list");
        assert!(json.get("plan").is_none(), "no plan consulted, no plan field: {json}");
    }

    #[test]
    fn network_records_carry_the_caller_and_summaries_their_count() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        let mut event = net_event(EventKind::Connect, Verdict::Deny, AF_INET, addr, 80);
        event.layer = NET_LAYER_ALLOW_LIST;
        let json = serde_json::to_value(decode(bytes_of(&event)).unwrap()).unwrap();
        assert_eq!(
            (json["uid"].as_u64(), json["ppid"].as_u64(), json["comm"].as_str()),
            (Some(1000), Some(4), Some("curl"))
        );
        assert!(json.get("count").is_none(), "a record of one call has no count: {json}");
        assert!(json.get("exe").is_none(), "the executable key is kernel addresses, never written out: {json}");
        let Ok(Event::Connect { caller, .. }) = decode(bytes_of(&event)) else { panic!("not a connect") };
        assert_eq!(caller.exe, [1, 2, 3]);

        event.header.pid = 0;
        event.header.ktime_ns = 0;
        let summary = decode_summary(&event, 7).unwrap();
        assert!(summary.is_deny());
        assert!(matches!(&summary, Event::Connect { count: 7, tgid: 10, .. }));
        assert_eq!(serde_json::to_value(&summary).unwrap()["count"], 7);
        let mut bind = net_event(EventKind::Bind, Verdict::Kill, AF_INET, addr, 80);
        bind.layer = NET_LAYER_PLAN;
        let Event::Bind { net, .. } = decode_summary(&bind, 3).unwrap() else { panic!("not bind") };
        assert_eq!((net.count, net.caller.comm.as_str()), (3, "curl"));
        let exec = NetEvent { header: header(EventKind::Exec, Verdict::Deny), ..event };
        assert_eq!(decode_summary(&exec, 1), Err(DecodeError::UnknownKind(EventKind::Exec as u32)));
    }

    #[test]
    fn decodes_ipv6_connect() {
        let mut event = net_event(EventKind::Connect, Verdict::Allow, AF_INET6, Ipv6Addr::LOCALHOST.octets(), 443);
        event.protocol = 17;
        let json = serde_json::to_value(decode(bytes_of(&event)).unwrap()).unwrap();
        assert_eq!(json["addr"], "::1");
        assert_eq!(json["family"], "inet6");
        assert_eq!(json["protocol"], "udp");
        assert_eq!(json["layer"], "none");
    }

    #[test]
    fn decodes_plan_fields_of_sendmsg_and_bind() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 0, 0, 53]);
        let mut event = net_event(EventKind::Sendmsg, Verdict::Deny, AF_INET, addr, 53);
        event.protocol = 17;
        event.layer = NET_LAYER_PLAN;
        event.flags = NET_EVENT_PLAN | NET_EVENT_RATE_LIMITED | NET_EVENT_LOG;
        event.addr_class = 4;
        event.port_class = 2;
        event.rule = 12;
        event.limit = 3;
        let decoded = decode(bytes_of(&event)).unwrap();
        let Event::Sendmsg { net, verdict, .. } = &decoded else { panic!("not sendmsg: {decoded:?}") };
        assert_eq!(*verdict, VerdictName::Deny);
        assert_eq!(net.layer, NetLayer::Plan);
        assert_eq!(
            net.plan,
            Some(NetPlanHit {
                addr_class: 4,
                port_class: 2,
                rule: Some(12),
                limit: Some(3),
                rate_limited: true,
                log: true
            })
        );
        let json = serde_json::to_value(&decoded).unwrap();
        assert_eq!(json["kind"], "sendmsg");
        assert_eq!(json["addr"], "10.0.0.53", "net fields are flattened: {json}");
        assert_eq!(json["plan"]["rate_limited"], true);
        assert_eq!(json["plan"]["rule"], 12);

        let mut bind = net_event(EventKind::Bind, Verdict::Kill, AF_INET6, Ipv6Addr::UNSPECIFIED.octets(), 8000);
        bind.layer = NET_LAYER_PLAN;
        bind.flags = NET_EVENT_PLAN;
        let decoded = decode(bytes_of(&bind)).unwrap();
        assert!(decoded.is_kill() && decoded.is_deny());
        let json = serde_json::to_value(&decoded).unwrap();
        assert_eq!((json["kind"].as_str(), json["verdict"].as_str()), (Some("bind"), Some("kill")));
        assert_eq!(json["plan"]["rule"], serde_json::Value::Null, "0xffff is the policy default");
        assert_eq!(json["plan"]["limit"], serde_json::Value::Null);
    }

    #[test]
    fn decodes_fork_and_exit() {
        let fork = ForkEvent {
            header: header(EventKind::Fork, Verdict::Allow),
            parent_pid: 11,
            parent_tgid: 10,
            child_pid: 12,
            child_tgid: 12,
            comm: comm(b"bash"),
        };
        let decoded = decode(bytes_of(&fork)).unwrap();
        assert!(matches!(&decoded,
            Event::Fork { parent_tgid: 10, child_pid: 12, child_tgid: 12, comm, .. } if comm == "bash"));
        assert!(!decoded.is_deny() && decoded.verdict().is_none());
        assert_eq!(serde_json::to_value(&decoded).unwrap()["kind"], "fork");

        let exit = |exit_code| ExitEvent {
            header: header(EventKind::Exit, Verdict::Allow),
            exit_code,
            _pad: 0,
            comm: comm(b"sleep-with-a-lon"),
        };
        let decoded = decode(bytes_of(&exit(3 << 8))).unwrap();
        let Event::Exit { status, signal, comm, .. } = &decoded else { panic!("not exit") };
        assert_eq!((*status, *signal), (Some(3), None));
        assert_eq!(comm.len(), TASK_COMM_LEN, "an unterminated comm is kept whole");
        let Event::Exit { status, signal, .. } = decode(bytes_of(&exit(9))).unwrap() else { panic!("not exit") };
        assert_eq!((status, signal), (None, Some(9)));
        let json = serde_json::to_value(decode(bytes_of(&exit(9))).unwrap()).unwrap();
        assert_eq!((json["kind"].as_str(), json["signal"].as_i64()), (Some("exit"), Some(9)));
        assert!(json.get("status").is_none());
    }

    #[test]
    fn rejects_short_and_unknown_records_without_panicking() {
        assert!(matches!(decode(&[1, 2, 3]), Err(DecodeError::Short { .. })));
        let bad_kind = EventHeader { kind: 99, ..header(EventKind::Exec, Verdict::Allow) };
        assert_eq!(decode(bytes_of(&bad_kind)), Err(DecodeError::UnknownKind(99)));
        let bad_verdict = EventHeader { verdict: 7, ..header(EventKind::Exec, Verdict::Allow) };
        assert_eq!(decode(bytes_of(&bad_verdict)), Err(DecodeError::UnknownVerdict(7)));
        // Headers that claim a kind but are cut short.
        for kind in
            [EventKind::Exec, EventKind::Connect, EventKind::Sendmsg, EventKind::Bind, EventKind::Fork, EventKind::Exit]
        {
            assert!(matches!(decode(bytes_of(&header(kind, Verdict::Allow))), Err(DecodeError::Short { .. })));
        }
        let event = net_event(EventKind::Connect, Verdict::Allow, 1, [0; 16], 1);
        assert_eq!(decode(bytes_of(&event)), Err(DecodeError::UnknownFamily(1)));
        let mut event = net_event(EventKind::Bind, Verdict::Allow, AF_INET, [0; 16], 1);
        event.layer = 42;
        assert_eq!(decode(bytes_of(&event)), Err(DecodeError::UnknownLayer(42)));
        for len in 0..400 {
            let _ = decode(&vec![0xff; len]);
            let mut record = bytes_of(&header(EventKind::Exit, Verdict::Allow)).to_vec();
            record.resize(len.max(40), 0xff);
            let _ = decode(&record);
        }
    }

    #[test]
    fn filename_length_is_clamped() {
        let event = ExecTraceEvent {
            header: header(EventKind::Exec, Verdict::Allow),
            ppid: 1,
            filename_len: 10_000,
            comm: [0; TASK_COMM_LEN],
            exe: ExeKey::default(),
            filename: [b'a'; EXEC_FILENAME_LEN],
        };
        let Event::Exec { filename, comm, .. } = decode(bytes_of(&event)).unwrap() else { panic!("not exec") };
        assert_eq!(filename.len(), EXEC_FILENAME_LEN);
        assert_eq!(comm, "");
    }
}

#[cfg(test)]
mod lsm_event_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(kind: EventKind) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            verdict: Verdict::Deny as u32,
            pid: 3,
            tgid: 3,
            cgroup_id: 8,
            agent_id: 9,
            ktime_ns: 1,
        }
    }

    #[test]
    fn decodes_exec_check_with_reason_and_identity() {
        let mut filename = [0u8; EXEC_FILENAME_LEN];
        filename[..6].copy_from_slice(b"/x/y\0\0");
        let event = ExecCheckEvent {
            header: header(EventKind::ExecCheck),
            reason: ExecDenyReason::Fileless as u32,
            filename_len: 5,
            dev: 12,
            ino: 34,
            filename,
        };
        let json = serde_json::to_value(decode(bytes_of(&event)).unwrap()).unwrap();
        assert_eq!(json["kind"], "exec_check");
        assert_eq!(json["reason"], "fileless");
        assert_eq!(json["filename"], "/x/y");
        assert_eq!((json["dev"].as_u64(), json["ino"].as_u64()), (Some(12), Some(34)));
    }

    #[test]
    fn decodes_file_and_guard_events() {
        let mut path = [0u8; FILE_PATH_LEN];
        path[..11].copy_from_slice(b"/h/.ssh/key");
        let event = FileEvent {
            header: header(EventKind::File),
            op: FileOp::Open as u32,
            access: 1 | 16,
            rule_index: 4,
            rule_kind: FileRuleKind::Component as u32,
            path_len: 11,
            _pad: 0,
            path,
        };
        let decoded = decode(bytes_of(&event)).unwrap();
        assert!(decoded.is_deny());
        let json = serde_json::to_value(&decoded).unwrap();
        assert_eq!(json["kind"], "file");
        assert_eq!(json["path"], "/h/.ssh/key");
        assert_eq!(json["access"], serde_json::json!(["read", "create"]));
        assert_eq!(json["rule_kind"], "component");
        assert_eq!(json["rule_index"], 4);
        let too_long = FileEvent { rule_kind: FILE_DENY_PATH_TOO_LONG, rule_index: u32::MAX, ..event };
        let json = serde_json::to_value(decode(bytes_of(&too_long)).unwrap()).unwrap();
        assert_eq!(json["rule_kind"], "path_too_long");
        assert!(json["rule_index"].is_null());

        let guard = GuardEvent {
            header: header(EventKind::Guard),
            hook: GuardHook::Signal as u32,
            detail: 15,
            target_pid: 1,
            _pad: 0,
            target_cgroup: 2,
        };
        let json = serde_json::to_value(decode(bytes_of(&guard)).unwrap()).unwrap();
        assert_eq!(
            (json["kind"].as_str(), json["hook"].as_str(), json["detail"].as_u64()),
            (Some("guard"), Some("signal"), Some(15))
        );
        // Cut short: an error, not a panic.
        assert!(matches!(decode(&bytes_of(&guard)[..50]), Err(DecodeError::Short { .. })));
    }
}
