//! `cgroup/connect4` and `cgroup/connect6`: deny listed destinations with EPERM.
//!
//! Attached to each agent's cgroup, so they run only for agents' sockets. A connect
//! from a cgroup that is not registered (a nested cgroup the agent made) is denied:
//! the program only runs inside an agent's subtree, and unknown means unattributed.

use agt_jail_common::{
    ConnectAllowData, ConnectEvent, ConnectRuleKey, EventKind, Verdict, AF_INET, AF_INET6,
    AGENT_FLAG_CONNECT_ALLOWLIST, CONNECT_ALLOW_FIXED_BITS, MAX_AGENTS, MAX_CONNECT_ALLOW, MAX_CONNECT_RULES, RULE_ALLOW,
    RULE_DENY,
};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::bpf_get_current_cgroup_id,
    macros::{cgroup_sock_addr, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    programs::SockAddrContext,
};

use crate::{count_drop, header, AGENT_CGROUPS, EVENTS};

/// Denied destinations per agent; value is `RULE_DENY`. `port == 0` in a key means any port.
#[map]
static CONNECT_DENY: HashMap<ConnectRuleKey, u32> = HashMap::with_max_entries(MAX_CONNECT_RULES, 0);

/// Allowed destinations (CIDR + port) of agents in allow-list mode; value is `RULE_ALLOW`.
#[map]
static CONNECT_ALLOW: LpmTrie<ConnectAllowData, u32> = LpmTrie::with_max_entries(MAX_CONNECT_ALLOW, 0);

/// Per-agent flags (`AGENT_FLAG_*`).
#[map]
static AGENT_FLAGS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// Return values of cgroup sock_addr programs.
const REJECT: i32 = 0;
const PASS: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr to cgroup/connect4 programs.
    let sock_addr = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    let ip = sock_addr.user_ip4.to_ne_bytes();
    addr[0] = ip[0];
    addr[1] = ip[1];
    addr[2] = ip[2];
    addr[3] = ip[3];
    decide(sock_addr, AF_INET, addr)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr to cgroup/connect6 programs.
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
    decide(sock_addr, AF_INET6, addr)
}

#[inline(always)]
fn decide(sock_addr: &bpf_sock_addr, family: u16, addr: [u8; 16]) -> i32 {
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sock_addr.user_port as u16);
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is a plain u64 copied out at once.
    let agent = unsafe { AGENT_CGROUPS.get(&cgroup_id) }.copied();
    let verdict = match agent {
        Some(agent_id) => {
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
                Verdict::Deny
            } else if allowlisted_out(agent_id, family, port, addr) {
                Verdict::Deny
            } else {
                Verdict::Allow
            }
        }
        None => Verdict::Deny,
    };
    report(sock_addr, family, addr, port, cgroup_id, agent.unwrap_or(0), verdict);
    match verdict {
        Verdict::Allow => PASS,
        Verdict::Deny => REJECT,
    }
}

/// True when the agent is in allow-list mode and the destination is not listed.
#[inline(always)]
fn allowlisted_out(agent_id: u64, family: u16, port: u16, addr: [u8; 16]) -> bool {
    // SAFETY: the value is a plain u32 copied out at once.
    let flags = unsafe { AGENT_FLAGS.get(&agent_id) }.copied().unwrap_or(0);
    if flags & AGENT_FLAG_CONNECT_ALLOWLIST == 0 {
        return false;
    }
    let addr_bits = if family == AF_INET { 32 } else { 128 };
    let mut data = ConnectAllowData { agent_id, family, port, _pad: 0, addr };
    let exact = CONNECT_ALLOW.get(Key::new(CONNECT_ALLOW_FIXED_BITS + addr_bits, data)).copied().unwrap_or(0);
    data.port = 0;
    let any_port = CONNECT_ALLOW.get(Key::new(CONNECT_ALLOW_FIXED_BITS + addr_bits, data)).copied().unwrap_or(0);
    (exact | any_port) & RULE_ALLOW == 0
}

#[inline(always)]
fn report(
    sock_addr: &bpf_sock_addr,
    family: u16,
    addr: [u8; 16],
    port: u16,
    cgroup_id: u64,
    agent_id: u64,
    verdict: Verdict,
) {
    let Some(mut entry) = EVENTS.reserve::<ConnectEvent>(0) else {
        count_drop();
        return;
    };
    entry.write(ConnectEvent {
        header: header(EventKind::Connect as u32, verdict as u32, cgroup_id, agent_id),
        family,
        port,
        protocol: sock_addr.protocol,
        addr,
    });
    entry.submit(0);
}
