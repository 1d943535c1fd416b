//! `cgroup/connect4/6`, `cgroup/sendmsg4/6` and `cgroup/bind4/6`: the network layers.
//!
//! Attached to each agent's cgroup, so they run only for agents' sockets. Every layer must
//! allow; a deny returns EPERM to the caller before anything leaves the socket:
//! 1. the cgroup must be a registered agent (a nested cgroup the agent made is denied:
//!    the program only runs inside an agent's subtree, and unknown means unattributed);
//! 2. the profile's deny list and, in allow-list mode, its allow-list (connect, sendmsg);
//! 3. live demotion ([`AGENT_FLAG_NET_DENY_ALL`]): only loopback inside a network namespace
//!    other than the loader's passes;
//! 4. the compiled policy plan ([`AGENT_FLAG_NET_POLICY`]): address class (LPM tries),
//!    port class, then the verdict of (classes, hook, protocol); any miss denies. A `kill`
//!    verdict denies whatever the earlier layers said and reports [`Verdict::Kill`]; a
//!    rate limit is charged only when every other layer allows.
//!
//! Plan keys carry the agent's plan generation, read once per call from `NET_GENERATION`,
//! so userspace can write a new plan beside the old one and switch with one map update.

use agt_jail_common::{
    bpf_spin_lock, ConnectAllowData, ConnectRuleKey, EventKind, ExeKey, NetAddr4Data, NetAddr6Data, NetEvent,
    NetLimitKey, NetLimitState, NetPortKey, NetVerdict, NetVerdictKey, Verdict, AF_INET, AF_INET6,
    AGENT_FLAG_CONNECT_ALLOWLIST, AGENT_FLAG_NET_DENY_ALL, AGENT_FLAG_NET_POLICY, CONNECT_ALLOW_FIXED_BITS, MAX_AGENTS,
    MAX_CONNECT_ALLOW, MAX_CONNECT_RULES, MAX_NET_ADDRS, MAX_NET_LIMITS, MAX_NET_PORTS, MAX_NET_VERDICTS,
    NET_ACTION_ALLOW, NET_ACTION_KILL, NET_ADDR_FIXED_BITS, NET_EVENT_LOG, NET_EVENT_PLAN, NET_EVENT_RATE_LIMITED,
    NET_HOOK_BIND, NET_HOOK_CONNECT, NET_HOOK_SENDMSG, NET_LAYER_ALLOW_LIST, NET_LAYER_DENY_ALL, NET_LAYER_DENY_LIST,
    NET_LAYER_NONE, NET_LAYER_PLAN, NET_LAYER_UNKNOWN_AGENT, NET_PROTO_OTHER, NET_PROTO_TCP, NET_PROTO_UDP,
    NET_RULE_DEFAULT, NET_VERDICT_LOG, RULE_ALLOW, RULE_DENY,
};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    bindings::BPF_NOEXIST,
    btf_maps,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_task, bpf_get_current_uid_gid,
        bpf_get_netns_cookie, bpf_ktime_get_boot_ns, bpf_spin_lock as spin_lock, bpf_spin_unlock as spin_unlock,
    },
    macros::{btf_map, cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
    programs::SockAddrContext,
};

use crate::{
    count_deny_drop, count_drop, header,
    proc::{known_exe, parent_tgid},
    AGENT_CGROUPS, DENY_SUMMARY, EVENTS, PRIORITY_EVENTS, WAKE_AT_ONCE,
};

/// Denied destinations per agent; value is `RULE_DENY`. `port == 0` in a key means any port.
#[map]
static CONNECT_DENY: HashMap<ConnectRuleKey, u32> = HashMap::with_max_entries(MAX_CONNECT_RULES, 0);

/// Allowed destinations (CIDR + port) of agents in allow-list mode; value is `RULE_ALLOW`.
#[map]
static CONNECT_ALLOW: LpmTrie<ConnectAllowData, u32> = LpmTrie::with_max_entries(MAX_CONNECT_ALLOW, 0);

/// Per-agent flags (`AGENT_FLAG_*`).
#[map]
static AGENT_FLAGS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// Agent id → the generation of its current network plan.
#[map]
static NET_GENERATION: HashMap<u64, u32> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// (agent, generation, IPv4 prefix) → address class.
#[map]
static NET_ADDR4: LpmTrie<NetAddr4Data, u32> = LpmTrie::with_max_entries(MAX_NET_ADDRS, 0);

/// (agent, generation, IPv6 prefix) → address class.
#[map]
static NET_ADDR6: LpmTrie<NetAddr6Data, u32> = LpmTrie::with_max_entries(MAX_NET_ADDRS, 0);

/// (agent, generation, port) → port class; a miss is class 0.
#[map]
static NET_PORTS: HashMap<NetPortKey, u16> = HashMap::with_max_entries(MAX_NET_PORTS, 0);

/// (agent, generation, classes, hook, protocol) → verdict; a miss denies.
#[map]
static NET_VERDICTS: HashMap<NetVerdictKey, NetVerdict> = HashMap::with_max_entries(MAX_NET_VERDICTS, 0);

/// (agent, generation, limit id) → rate-limit state. A BTF map: the verifier needs the
/// value's BTF to accept its `bpf_spin_lock`.
#[btf_map]
static NET_LIMITS: btf_maps::HashMap<NetLimitKey, NetLimitState, { MAX_NET_LIMITS as usize }> =
    btf_maps::HashMap::new();

/// Index 0: the network namespace cookie of the loader (the host's). 0 = unknown, then no
/// loopback passes under [`AGENT_FLAG_NET_DENY_ALL`].
#[map]
static HOST_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// Return values of cgroup sock_addr programs.
const REJECT: i32 = 0;
const PASS: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    govern4(&ctx, NET_HOOK_CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    govern6(&ctx, NET_HOOK_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    govern4(&ctx, NET_HOOK_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    govern6(&ctx, NET_HOOK_SENDMSG)
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    govern4(&ctx, NET_HOOK_BIND)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    govern6(&ctx, NET_HOOK_BIND)
}

#[inline(always)]
fn govern4(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr to cgroup sock_addr programs.
    let sock_addr = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    let ip = sock_addr.user_ip4.to_ne_bytes();
    addr[0] = ip[0];
    addr[1] = ip[1];
    addr[2] = ip[2];
    addr[3] = ip[3];
    decide(ctx, sock_addr, hook, AF_INET, addr)
}

#[inline(always)]
fn govern6(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr to cgroup sock_addr programs.
    let sock_addr = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    let mut word = 0;
    while word < 4 {
        let bytes = sock_addr.user_ip6[word].to_ne_bytes();
        addr[word * 4] = bytes[0];
        addr[word * 4 + 1] = bytes[1];
        addr[word * 4 + 2] = bytes[2];
        addr[word * 4 + 3] = bytes[3];
        word += 1;
    }
    decide(ctx, sock_addr, hook, AF_INET6, addr)
}

/// What the plan layer found.
struct PlanResult {
    /// `NET_ACTION_*`, or `None` when a lookup missed (deny).
    verdict: Option<NetVerdict>,
    addr_class: u32,
    port_class: u16,
    generation: u32,
}

#[inline(always)]
fn decide(ctx: &SockAddrContext, sock_addr: &bpf_sock_addr, hook: u8, family: u16, addr: [u8; 16]) -> i32 {
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sock_addr.user_port as u16);
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is a plain u64 copied out at once.
    let Some(agent_id) = unsafe { AGENT_CGROUPS.get(&cgroup_id) }.copied() else {
        let mut event = net_event(sock_addr, family, addr, port);
        event.layer = NET_LAYER_UNKNOWN_AGENT;
        report(hook, cgroup_id, 0, Verdict::Deny, event);
        return REJECT;
    };
    // SAFETY: the value is a plain u32 copied out at once.
    let flags = unsafe { AGENT_FLAGS.get(&agent_id) }.copied().unwrap_or(0);
    let mut event = net_event(sock_addr, family, addr, port);

    // Layers 2 and 3: the profile and live demotion.
    let mut layer = NET_LAYER_NONE;
    if hook != NET_HOOK_BIND {
        layer = profile_layer(agent_id, flags, family, port, addr);
    }
    if layer == NET_LAYER_NONE && flags & AGENT_FLAG_NET_DENY_ALL != 0 && !own_loopback(ctx, family, &addr) {
        layer = NET_LAYER_DENY_ALL;
    }

    // Layer 4: the plan.
    let mut verdict = if layer == NET_LAYER_NONE { Verdict::Allow } else { Verdict::Deny };
    if flags & AGENT_FLAG_NET_POLICY != 0 {
        let proto = match sock_addr.protocol {
            6 => NET_PROTO_TCP,
            17 => NET_PROTO_UDP,
            _ => NET_PROTO_OTHER,
        };
        let plan = plan_lookup(agent_id, hook, proto, family, port, &addr);
        event.flags |= NET_EVENT_PLAN;
        event.addr_class = plan.addr_class;
        event.port_class = plan.port_class;
        match plan.verdict {
            None => {
                if layer == NET_LAYER_NONE {
                    layer = NET_LAYER_PLAN;
                    verdict = Verdict::Deny;
                }
            }
            Some(found) => {
                event.rule = found.rule;
                event.limit = found.limit;
                if found.flags & NET_VERDICT_LOG != 0 {
                    event.flags |= NET_EVENT_LOG;
                }
                if found.action == NET_ACTION_KILL {
                    verdict = Verdict::Kill;
                    if layer == NET_LAYER_NONE {
                        layer = NET_LAYER_PLAN;
                    }
                } else if layer == NET_LAYER_NONE {
                    if found.action != NET_ACTION_ALLOW {
                        layer = NET_LAYER_PLAN;
                        verdict = Verdict::Deny;
                    } else if found.limit != 0 && rate_limited(agent_id, plan.generation, found.limit) {
                        layer = NET_LAYER_PLAN;
                        verdict = Verdict::Deny;
                        event.flags |= NET_EVENT_RATE_LIMITED;
                    }
                }
            }
        }
    }
    event.layer = layer;

    // Connects are always reported (as before the plan existed); sendmsg and bind only
    // when something denied or the plan governs them, so UDP traffic does not flood the ring.
    if hook == NET_HOOK_CONNECT || verdict != Verdict::Allow || flags & AGENT_FLAG_NET_POLICY != 0 {
        report(hook, cgroup_id, agent_id, verdict, event);
    }
    match verdict {
        Verdict::Allow => PASS,
        _ => REJECT,
    }
}

#[inline(always)]
fn net_event(sock_addr: &bpf_sock_addr, family: u16, addr: [u8; 16], port: u16) -> NetEvent {
    NetEvent {
        header: agt_jail_common::EventHeader {
            kind: 0,
            verdict: 0,
            pid: 0,
            tgid: 0,
            cgroup_id: 0,
            agent_id: 0,
            ktime_ns: 0,
        },
        family,
        port,
        protocol: sock_addr.protocol,
        addr,
        addr_class: 0,
        limit: 0,
        port_class: 0,
        rule: NET_RULE_DEFAULT,
        layer: NET_LAYER_NONE,
        flags: 0,
        _pad: 0,
        uid: 0,
        ppid: 0,
        comm: [0; 16],
        exe: ExeKey { mnt: 0, dentry: 0, ino: 0 },
    }
}

/// The profile's deny list and allow-list; returns the layer that denied or `NET_LAYER_NONE`.
#[inline(always)]
fn profile_layer(agent_id: u64, flags: u32, family: u16, port: u16, addr: [u8; 16]) -> u8 {
    let mut key = ConnectRuleKey { agent_id, addr, family, port, _pad: 0 };
    // Values are read, not just tested for presence: OR-ing two map pointers
    // (what the optimiser makes of `a.is_some() || b.is_some()`) is refused
    // by the verifier, OR-ing two integers is not.
    // SAFETY: values are plain u32s copied out at once.
    let exact = unsafe { CONNECT_DENY.get(&key) }.copied().unwrap_or(0);
    key.port = 0;
    // SAFETY: as above.
    let any_port = unsafe { CONNECT_DENY.get(&key) }.copied().unwrap_or(0);
    if (exact | any_port) & RULE_DENY != 0 {
        return NET_LAYER_DENY_LIST;
    }
    if flags & AGENT_FLAG_CONNECT_ALLOWLIST == 0 {
        return NET_LAYER_NONE;
    }
    let addr_bits = if family == AF_INET { 32 } else { 128 };
    let mut data = ConnectAllowData { agent_id, family, port, _pad: 0, addr };
    let exact = CONNECT_ALLOW.get(Key::new(CONNECT_ALLOW_FIXED_BITS + addr_bits, data)).copied().unwrap_or(0);
    data.port = 0;
    let any_port = CONNECT_ALLOW.get(Key::new(CONNECT_ALLOW_FIXED_BITS + addr_bits, data)).copied().unwrap_or(0);
    if (exact | any_port) & RULE_ALLOW == 0 {
        NET_LAYER_ALLOW_LIST
    } else {
        NET_LAYER_NONE
    }
}

/// Loopback (127/8, ::1, ::ffff:127/104) in a network namespace that is not the loader's.
#[inline(always)]
fn own_loopback(ctx: &SockAddrContext, family: u16, addr: &[u8; 16]) -> bool {
    let loopback = if family == AF_INET {
        addr[0] == 127
    } else {
        let mut zero_head = true;
        let mut index = 0;
        while index < 10 {
            zero_head &= addr[index] == 0;
            index += 1;
        }
        let mut low_zero = true;
        index = 10;
        while index < 15 {
            low_zero &= addr[index] == 0;
            index += 1;
        }
        zero_head && ((low_zero && addr[15] == 1) || (addr[10] == 0xff && addr[11] == 0xff && addr[12] == 127))
    };
    if !loopback {
        return false;
    }
    let host = HOST_NETNS.get(0).copied().unwrap_or(0);
    // SAFETY: the helper reads the netns of the context's socket; the context is valid.
    let own = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) };
    host != 0 && own != host
}

#[inline(always)]
fn plan_lookup(agent_id: u64, hook: u8, proto: u8, family: u16, port: u16, addr: &[u8; 16]) -> PlanResult {
    let mut result = PlanResult { verdict: None, addr_class: 0, port_class: 0, generation: 0 };
    // SAFETY: the value is a plain u32 copied out at once.
    let Some(generation) = unsafe { NET_GENERATION.get(&agent_id) }.copied() else {
        return result;
    };
    result.generation = generation;
    let agent = agent_id.to_be_bytes();
    let gen = generation.to_be_bytes();
    let addr_class = if family == AF_INET {
        let data = NetAddr4Data { agent_id: agent, generation: gen, addr: [addr[0], addr[1], addr[2], addr[3]] };
        NET_ADDR4.get(Key::new(NET_ADDR_FIXED_BITS + 32, data)).copied()
    } else {
        let data = NetAddr6Data { agent_id: agent, generation: gen, addr: *addr };
        NET_ADDR6.get(Key::new(NET_ADDR_FIXED_BITS + 128, data)).copied()
    };
    let Some(addr_class) = addr_class else {
        return result;
    };
    result.addr_class = addr_class;
    let port_key = NetPortKey { agent_id, generation, port, _pad: 0 };
    // SAFETY: the value is a plain u16 copied out at once.
    let port_class = unsafe { NET_PORTS.get(&port_key) }.copied().unwrap_or(0);
    result.port_class = port_class;
    let key = NetVerdictKey { agent_id, generation, addr_class, port_class, event: hook, proto, _pad: 0 };
    // SAFETY: the value is a plain struct copied out at once.
    result.verdict = unsafe { NET_VERDICTS.get(&key) }.copied();
    result
}

/// Charges one use of limit `limit`; true when the limit is exhausted (or missing: fail closed).
/// The same rules as the userspace RateLimiter: an expired window resets, a live window
/// at `max` (or `max == 0`) is limited, else the count grows (opening the window).
#[inline(always)]
fn rate_limited(agent_id: u64, generation: u32, limit: u32) -> bool {
    // SAFETY: bpf_ktime_get_boot_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let key = NetLimitKey { agent_id, generation, limit };
    let Some(state) = NET_LIMITS.get_ptr_mut(&key) else {
        return true;
    };
    // SAFETY: `state` points at a live map value; its lock serialises the read-modify-write
    // against other CPUs, and no helper is called while it is held.
    unsafe {
        let lock = core::ptr::addr_of_mut!((*state).lock) as *mut aya_ebpf::bindings::bpf_spin_lock;
        spin_lock(lock);
        if (*state).count > 0 && (*state).period_ns != 0 && now > (*state).reset_at_ns {
            (*state).count = 0;
        }
        let limited = (*state).count >= (*state).max;
        if !limited {
            if (*state).count == 0 {
                (*state).reset_at_ns = now + (*state).period_ns;
            }
            (*state).count += 1;
        }
        spin_unlock(lock);
        limited
    }
}

#[inline(always)]
fn report(hook: u8, cgroup_id: u64, agent_id: u64, verdict: Verdict, mut event: NetEvent) {
    let kind = match hook {
        NET_HOOK_SENDMSG => EventKind::Sendmsg,
        NET_HOOK_BIND => EventKind::Bind,
        _ => EventKind::Connect,
    };
    event.header = header(kind as u32, verdict as u32, cgroup_id, agent_id);
    // The process facts userspace would otherwise read from /proc for every event.
    event.uid = bpf_get_current_uid_gid() as u32;
    event.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // SAFETY: bpf_get_current_task has no preconditions; the pointer is only read through
    // the probe helper.
    event.ppid = parent_tgid(unsafe { bpf_get_current_task() } as *const u8);
    event.exe = known_exe(event.header.pid);
    if verdict == Verdict::Allow {
        let Some(mut entry) = EVENTS.reserve::<NetEvent>(0) else {
            count_drop();
            return;
        };
        entry.write(event);
        entry.submit(0);
        return;
    }
    if let Some(mut entry) = PRIORITY_EVENTS.reserve::<NetEvent>(0) {
        entry.write(event);
        entry.submit(WAKE_AT_ONCE);
        return;
    }
    summarise(&mut event);
}

/// Counts a deny that did not fit into the priority ring under its record, with the fields
/// that differ between otherwise equal denies (thread id, time) zeroed.
#[inline(always)]
fn summarise(event: &mut NetEvent) {
    event.header.pid = 0;
    event.header.ktime_ns = 0;
    if add_one(event) {
        return;
    }
    // First of its kind; when another CPU inserted it meanwhile, NOEXIST fails and the
    // second lookup finds the entry (with this CPU's slot at 0).
    if DENY_SUMMARY.insert(&*event, &1, BPF_NOEXIST as u64).is_ok() || add_one(event) {
        return;
    }
    count_deny_drop();
}

#[inline(always)]
fn add_one(key: &NetEvent) -> bool {
    let Some(count) = DENY_SUMMARY.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: the pointer is this CPU's slot of a per-CPU map value; nothing else writes it
    // while this program runs (as for the drop counters).
    unsafe { *count += 1 };
    true
}

// The common crate's lock type must be layout-identical to the kernel's.
const _: () = assert!(core::mem::size_of::<bpf_spin_lock>() == 4);
