//! The network policy plane: per-agent tables the connect/sendmsg/bind programs consult.
//!
//! A compiled policy arrives as a [`NetTables`] (address classes, port classes, verdicts,
//! rate limits); [`AgentPrograms::install_net_plan`] writes it under a new plan
//! generation, switches the agent's generation with one map update and only then deletes
//! the previous generation's entries. A program reads the generation once per call, so
//! every lookup of one call sees one whole plan; a call that raced the switch can at worst
//! miss an entry that was just deleted, and every miss denies (fail closed) — no window
//! in which a missing verdict allows.
use std::net::{Ipv4Addr, Ipv6Addr};

use agt_jail_common::{
    bpf_spin_lock, NetAddr4Data, NetAddr6Data, NetLimitKey, NetLimitState, NetPortKey, NetVerdict, NetVerdictKey,
    AGENT_FLAG_NET_DENY_ALL, AGENT_FLAG_NET_POLICY, MAX_NET_ADDRS, MAX_NET_LIMITS, MAX_NET_PORTS, MAX_NET_VERDICTS,
    NET_ACTION_ALLOW, NET_ACTION_DENY, NET_ACTION_KILL, NET_ADDR_FIXED_BITS, NET_HOOK_BIND, NET_HOOK_CONNECT,
    NET_HOOK_SENDMSG, NET_PROTO_OTHER, NET_PROTO_TCP, NET_PROTO_UDP, NET_VERDICT_LOG,
};
use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, MapData,
};

use crate::{AgentPrograms, LoaderError};

/// The hook a verdict applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetHook {
    Connect,
    Sendmsg,
    Bind,
}

impl NetHook {
    fn raw(self) -> u8 {
        match self {
            NetHook::Connect => NET_HOOK_CONNECT,
            NetHook::Sendmsg => NET_HOOK_SENDMSG,
            NetHook::Bind => NET_HOOK_BIND,
        }
    }
}

/// The socket protocol a verdict applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetProto {
    Tcp,
    Udp,
    /// Any protocol other than TCP and UDP.
    Other,
}

impl NetProto {
    fn raw(self) -> u8 {
        match self {
            NetProto::Tcp => NET_PROTO_TCP,
            NetProto::Udp => NET_PROTO_UDP,
            NetProto::Other => NET_PROTO_OTHER,
        }
    }
}

/// What the kernel does with a matching call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetAction {
    Allow,
    Deny,
    /// Deny with EPERM and report a `kill` verdict (userspace ends the agent's cgroup).
    Kill,
}

impl NetAction {
    fn raw(self) -> u8 {
        match self {
            NetAction::Allow => NET_ACTION_ALLOW,
            NetAction::Deny => NET_ACTION_DENY,
            NetAction::Kill => NET_ACTION_KILL,
        }
    }
}

/// One verdict: the decision for (address class, port class, hook, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetVerdictRow {
    pub addr_class: u32,
    pub port_class: u16,
    pub hook: NetHook,
    pub proto: NetProto,
    pub action: NetAction,
    /// Log the event (the policy's `log`).
    pub log: bool,
    /// Index into the userspace rule table, `NET_RULE_DEFAULT` (0xffff) for the default.
    pub rule: u16,
    /// A [`NetLimitRow::id`], 0 for none. Charged only when every layer allows.
    pub limit: u32,
}

/// One rate limit: at most `max` uses per `period_ns` (0 = per session, never resets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetLimitRow {
    /// Non-zero, unique within the tables.
    pub id: u32,
    pub max: u64,
    pub period_ns: u64,
}

/// One agent's compiled network plan.
///
/// Address classes: `(network, prefix length, class)`, longest prefix wins; an address no
/// entry covers is denied (the compiler emits `0.0.0.0/0` and `::/0`). Ports not listed are
/// port class 0. A (class, class, hook, protocol) without a verdict is denied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetTables {
    pub v4: Vec<(Ipv4Addr, u8, u32)>,
    pub v6: Vec<(Ipv6Addr, u8, u32)>,
    pub ports: Vec<(u16, u16)>,
    pub verdicts: Vec<NetVerdictRow>,
    pub limits: Vec<NetLimitRow>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetPlanError {
    #[error("network plan: prefix /{prefix} of {addr} is longer than the address")]
    Prefix { addr: String, prefix: u8 },
    #[error("network plan: {addr}/{prefix} is listed twice")]
    DuplicateAddr { addr: String, prefix: u8 },
    #[error("network plan: port {0} is listed twice")]
    DuplicatePort(u16),
    #[error("network plan: two verdicts for address class {addr_class}, port class {port_class}, {hook:?}/{proto:?}")]
    DuplicateVerdict { addr_class: u32, port_class: u16, hook: NetHook, proto: NetProto },
    #[error("network plan: limit id 0 is reserved for \"no limit\"")]
    ZeroLimit,
    #[error("network plan: limit {0} is defined twice")]
    DuplicateLimit(u32),
    #[error("network plan: a verdict names limit {0}, which the plan does not define")]
    UnknownLimit(u32),
    #[error("network plan: {count} {table} entries exceed the kernel table's {max}")]
    TooMany { table: &'static str, count: usize, max: u32 },
}

/// The map entries that implement one [`NetTables`] for one agent and generation.
#[derive(Default)]
pub(crate) struct NetEntries {
    pub(crate) v4: Vec<(LpmKey<NetAddr4Data>, u32)>,
    pub(crate) v6: Vec<(LpmKey<NetAddr6Data>, u32)>,
    pub(crate) ports: Vec<(NetPortKey, u16)>,
    pub(crate) verdicts: Vec<(NetVerdictKey, NetVerdict)>,
    pub(crate) limits: Vec<(NetLimitKey, NetLimitState)>,
}

impl std::fmt::Debug for NetEntries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetEntries")
            .field("v4", &self.v4.len())
            .field("v6", &self.v6.len())
            .field("ports", &self.ports)
            .field("verdicts", &self.verdicts)
            .field("limits", &self.limits)
            .finish()
    }
}

fn masked<const N: usize>(mut octets: [u8; N], prefix: u32) -> [u8; N] {
    for (index, byte) in octets.iter_mut().enumerate() {
        let start = index as u32 * 8;
        if start >= prefix {
            *byte = 0;
        } else if prefix < start + 8 {
            *byte &= 0xffu8 << (8 - (prefix - start));
        }
    }
    octets
}

fn check_count(table: &'static str, count: usize, max: u32) -> Result<(), NetPlanError> {
    if count > max as usize {
        return Err(NetPlanError::TooMany { table, count, max });
    }
    Ok(())
}

impl NetTables {
    /// Builds (and validates) the map entries for `agent_id` under plan `generation`.
    pub(crate) fn entries(&self, agent_id: u64, generation: u32) -> Result<NetEntries, NetPlanError> {
        check_count("IPv4 address", self.v4.len(), MAX_NET_ADDRS)?;
        check_count("IPv6 address", self.v6.len(), MAX_NET_ADDRS)?;
        check_count("port", self.ports.len(), MAX_NET_PORTS)?;
        check_count("verdict", self.verdicts.len(), MAX_NET_VERDICTS)?;
        check_count("limit", self.limits.len(), MAX_NET_LIMITS)?;
        let agent = agent_id.to_be_bytes();
        let gen = generation.to_be_bytes();
        let mut out = NetEntries::default();
        let mut seen = std::collections::HashSet::new();
        for &(addr, prefix, class) in &self.v4 {
            if prefix > 32 {
                return Err(NetPlanError::Prefix { addr: addr.to_string(), prefix });
            }
            let data =
                NetAddr4Data { agent_id: agent, generation: gen, addr: masked(addr.octets(), u32::from(prefix)) };
            if !seen.insert((data.addr.to_vec(), prefix)) {
                return Err(NetPlanError::DuplicateAddr { addr: Ipv4Addr::from(data.addr).to_string(), prefix });
            }
            out.v4.push((LpmKey::new(NET_ADDR_FIXED_BITS + u32::from(prefix), data), class));
        }
        seen.clear();
        for &(addr, prefix, class) in &self.v6 {
            if prefix > 128 {
                return Err(NetPlanError::Prefix { addr: addr.to_string(), prefix });
            }
            let data =
                NetAddr6Data { agent_id: agent, generation: gen, addr: masked(addr.octets(), u32::from(prefix)) };
            if !seen.insert((data.addr.to_vec(), prefix)) {
                return Err(NetPlanError::DuplicateAddr { addr: Ipv6Addr::from(data.addr).to_string(), prefix });
            }
            out.v6.push((LpmKey::new(NET_ADDR_FIXED_BITS + u32::from(prefix), data), class));
        }
        let mut ports = std::collections::HashSet::new();
        for &(port, class) in &self.ports {
            if !ports.insert(port) {
                return Err(NetPlanError::DuplicatePort(port));
            }
            out.ports.push((NetPortKey { agent_id, generation, port, _pad: 0 }, class));
        }
        let mut limits = std::collections::HashSet::new();
        for limit in &self.limits {
            if limit.id == 0 {
                return Err(NetPlanError::ZeroLimit);
            }
            if !limits.insert(limit.id) {
                return Err(NetPlanError::DuplicateLimit(limit.id));
            }
            let state = NetLimitState {
                max: limit.max,
                period_ns: limit.period_ns,
                reset_at_ns: 0,
                count: 0,
                lock: bpf_spin_lock::default(),
                _pad: 0,
            };
            out.limits.push((NetLimitKey { agent_id, generation, limit: limit.id }, state));
        }
        let mut verdicts = std::collections::HashSet::new();
        for row in &self.verdicts {
            if row.limit != 0 && !limits.contains(&row.limit) {
                return Err(NetPlanError::UnknownLimit(row.limit));
            }
            let key = NetVerdictKey {
                agent_id,
                generation,
                addr_class: row.addr_class,
                port_class: row.port_class,
                event: row.hook.raw(),
                proto: row.proto.raw(),
                _pad: 0,
            };
            if !verdicts.insert(key) {
                return Err(NetPlanError::DuplicateVerdict {
                    addr_class: row.addr_class,
                    port_class: row.port_class,
                    hook: row.hook,
                    proto: row.proto,
                });
            }
            let verdict = NetVerdict {
                action: row.action.raw(),
                flags: if row.log { NET_VERDICT_LOG } else { 0 },
                rule: row.rule,
                limit: row.limit,
            };
            out.verdicts.push((key, verdict));
        }
        Ok(out)
    }
}

const GENERATION_MAP: &str = "NET_GENERATION";
const ADDR4_MAP: &str = "NET_ADDR4";
const ADDR6_MAP: &str = "NET_ADDR6";
const PORTS_MAP: &str = "NET_PORTS";
const VERDICTS_MAP: &str = "NET_VERDICTS";
const LIMITS_MAP: &str = "NET_LIMITS";
const FLAGS_MAP: &str = "AGENT_FLAGS";

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> LoaderError {
    move |err| LoaderError::Map { map, message: err.to_string() }
}

/// Which of an agent's plan entries to delete.
#[derive(Clone, Copy)]
enum Purge {
    /// Every generation but this one.
    AllBut(u32),
    /// Only this generation.
    Only(u32),
    /// Every generation.
    All,
}

impl Purge {
    fn hits(self, generation: u32) -> bool {
        match self {
            Purge::AllBut(keep) => generation != keep,
            Purge::Only(gen) => generation == gen,
            Purge::All => true,
        }
    }
}

impl AgentPrograms {
    /// Installs (or replaces) agent `agent_id`'s network plan and turns the plan layer on.
    ///
    /// Order: validate; write every entry under a new generation; switch the agent's
    /// generation; set `AGENT_FLAG_NET_POLICY`; delete the old generation. A rate limit
    /// whose id, max and period are unchanged keeps its window and count. On error the
    /// previous plan (if any) stays in force and the partial new entries are removed.
    pub fn install_net_plan(&mut self, agent_id: u64, tables: &NetTables) -> Result<(), LoaderError> {
        let current = {
            let generations: HashMap<&mut MapData, u64, u32> = self.map(GENERATION_MAP)?;
            generations.get(&agent_id, 0).ok()
        };
        let generation = current.map_or(1, |gen| gen.wrapping_add(1));
        let mut entries = tables.entries(agent_id, generation)?;
        if let Some(old) = current {
            self.carry_limits(agent_id, old, &mut entries)?;
        }
        // Leftovers of an earlier failed install under the same generation must not mix in.
        self.purge(agent_id, Purge::Only(generation))?;
        if let Err(err) = self.write_entries(&entries) {
            let _ = self.purge(agent_id, Purge::Only(generation));
            return Err(err);
        }
        let mut generations: HashMap<&mut MapData, u64, u32> = self.map(GENERATION_MAP)?;
        if let Err(err) = generations.insert(agent_id, generation, 0) {
            let _ = self.purge(agent_id, Purge::Only(generation));
            return Err(map_error(GENERATION_MAP)(err));
        }
        let flags = self.agent_flags(agent_id)?;
        self.set_agent_flags(agent_id, flags | AGENT_FLAG_NET_POLICY)?;
        self.purge(agent_id, Purge::AllBut(generation))
    }

    /// Turns agent `agent_id`'s plan layer off and deletes its tables (the profile layers
    /// and `AGENT_FLAG_NET_DENY_ALL` stay as they are).
    pub fn remove_net_plan(&mut self, agent_id: u64) -> Result<(), LoaderError> {
        let flags = self.agent_flags(agent_id)?;
        self.set_agent_flags(agent_id, flags & !AGENT_FLAG_NET_POLICY)?;
        let mut generations: HashMap<&mut MapData, u64, u32> = self.map(GENERATION_MAP)?;
        match generations.remove(&agent_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(err) => return Err(map_error(GENERATION_MAP)(err)),
        }
        self.purge(agent_id, Purge::All)
    }

    /// Live demotion to ring 3's network: from the next call on, every connect, sendmsg
    /// and bind of the agent is denied except loopback inside its own network namespace.
    pub fn deny_all_net(&mut self, agent_id: u64) -> Result<(), LoaderError> {
        let flags = self.agent_flags(agent_id)?;
        self.set_agent_flags(agent_id, flags | AGENT_FLAG_NET_DENY_ALL)
    }

    /// Agent `agent_id`'s `AGENT_FLAG_*` bits (0 when none are set).
    pub fn agent_flags(&mut self, agent_id: u64) -> Result<u32, LoaderError> {
        let flags: HashMap<&mut MapData, u64, u32> = self.map(FLAGS_MAP)?;
        match flags.get(&agent_id, 0) {
            Ok(value) => Ok(value),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(err) => Err(map_error(FLAGS_MAP)(err)),
        }
    }

    /// Replaces agent `agent_id`'s `AGENT_FLAG_*` bits.
    pub fn set_agent_flags(&mut self, agent_id: u64, value: u32) -> Result<(), LoaderError> {
        let mut flags: HashMap<&mut MapData, u64, u32> = self.map(FLAGS_MAP)?;
        flags.insert(agent_id, value, 0).map_err(map_error(FLAGS_MAP))
    }

    /// Keeps the window of each limit that the new plan defines the same way as the old.
    fn carry_limits(&mut self, agent_id: u64, old: u32, entries: &mut NetEntries) -> Result<(), LoaderError> {
        let limits: HashMap<&mut MapData, NetLimitKey, NetLimitState> = self.map(LIMITS_MAP)?;
        for (key, state) in &mut entries.limits {
            let old_key = NetLimitKey { agent_id, generation: old, limit: key.limit };
            if let Ok(previous) = limits.get(&old_key, 0) {
                if previous.max == state.max && previous.period_ns == state.period_ns {
                    state.count = previous.count;
                    state.reset_at_ns = previous.reset_at_ns;
                }
            }
        }
        Ok(())
    }

    fn write_entries(&mut self, entries: &NetEntries) -> Result<(), LoaderError> {
        {
            let mut limits: HashMap<&mut MapData, NetLimitKey, NetLimitState> = self.map(LIMITS_MAP)?;
            for (key, state) in &entries.limits {
                limits.insert(key, state, 0).map_err(map_error(LIMITS_MAP))?;
            }
        }
        {
            let mut ports: HashMap<&mut MapData, NetPortKey, u16> = self.map(PORTS_MAP)?;
            for (key, class) in &entries.ports {
                ports.insert(key, class, 0).map_err(map_error(PORTS_MAP))?;
            }
        }
        {
            let mut verdicts: HashMap<&mut MapData, NetVerdictKey, NetVerdict> = self.map(VERDICTS_MAP)?;
            for (key, verdict) in &entries.verdicts {
                verdicts.insert(key, verdict, 0).map_err(map_error(VERDICTS_MAP))?;
            }
        }
        {
            let mut v4: LpmTrie<&mut MapData, NetAddr4Data, u32> = self.trie(ADDR4_MAP)?;
            for (key, class) in &entries.v4 {
                v4.insert(key, class, 0).map_err(map_error(ADDR4_MAP))?;
            }
        }
        let mut v6: LpmTrie<&mut MapData, NetAddr6Data, u32> = self.trie(ADDR6_MAP)?;
        for (key, class) in &entries.v6 {
            v6.insert(key, class, 0).map_err(map_error(ADDR6_MAP))?;
        }
        Ok(())
    }

    /// Deletes the agent's plan entries that `which` selects. Keys are collected first:
    /// deleting while iterating a hash map can skip keys.
    fn purge(&mut self, agent_id: u64, which: Purge) -> Result<(), LoaderError> {
        let agent = agent_id.to_be_bytes();
        {
            let mut v4: LpmTrie<&mut MapData, NetAddr4Data, u32> = self.trie(ADDR4_MAP)?;
            let doomed: Vec<_> = v4
                .keys()
                .filter_map(Result::ok)
                .filter(|key| key.data().agent_id == agent && which.hits(u32::from_be_bytes(key.data().generation)))
                .collect();
            for key in doomed {
                remove_ok(v4.remove(&key), ADDR4_MAP)?;
            }
        }
        {
            let mut v6: LpmTrie<&mut MapData, NetAddr6Data, u32> = self.trie(ADDR6_MAP)?;
            let doomed: Vec<_> = v6
                .keys()
                .filter_map(Result::ok)
                .filter(|key| key.data().agent_id == agent && which.hits(u32::from_be_bytes(key.data().generation)))
                .collect();
            for key in doomed {
                remove_ok(v6.remove(&key), ADDR6_MAP)?;
            }
        }
        {
            let mut ports: HashMap<&mut MapData, NetPortKey, u16> = self.map(PORTS_MAP)?;
            let doomed: Vec<_> = ports
                .keys()
                .filter_map(Result::ok)
                .filter(|key| key.agent_id == agent_id && which.hits(key.generation))
                .collect();
            for key in doomed {
                remove_ok(ports.remove(&key), PORTS_MAP)?;
            }
        }
        {
            let mut verdicts: HashMap<&mut MapData, NetVerdictKey, NetVerdict> = self.map(VERDICTS_MAP)?;
            let doomed: Vec<_> = verdicts
                .keys()
                .filter_map(Result::ok)
                .filter(|key| key.agent_id == agent_id && which.hits(key.generation))
                .collect();
            for key in doomed {
                remove_ok(verdicts.remove(&key), VERDICTS_MAP)?;
            }
        }
        let mut limits: HashMap<&mut MapData, NetLimitKey, NetLimitState> = self.map(LIMITS_MAP)?;
        let doomed: Vec<_> = limits
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.agent_id == agent_id && which.hits(key.generation))
            .collect();
        for key in doomed {
            remove_ok(limits.remove(&key), LIMITS_MAP)?;
        }
        Ok(())
    }

    pub(crate) fn trie<K: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, u32>, LoaderError> {
        let map = self.ebpf_mut().map_mut(name).ok_or(LoaderError::Missing { what: "map", name })?;
        LpmTrie::try_from(map).map_err(map_error(name))
    }
}

pub(crate) fn remove_ok(result: Result<(), aya::maps::MapError>, map: &'static str) -> Result<(), LoaderError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(err) => Err(map_error(map)(err)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn verdict(addr_class: u32, port_class: u16, action: NetAction, limit: u32) -> NetVerdictRow {
        NetVerdictRow {
            addr_class,
            port_class,
            hook: NetHook::Connect,
            proto: NetProto::Tcp,
            action,
            log: false,
            rule: 3,
            limit,
        }
    }

    fn tables() -> NetTables {
        NetTables {
            v4: vec![(Ipv4Addr::UNSPECIFIED, 0, 0), ("10.1.2.3".parse().unwrap(), 12, 1)],
            v6: vec![(Ipv6Addr::UNSPECIFIED, 0, 0), ("2001:db8::1".parse().unwrap(), 32, 2)],
            ports: vec![(443, 1), (53, 2)],
            verdicts: vec![verdict(0, 0, NetAction::Deny, 0), verdict(1, 1, NetAction::Allow, 7)],
            limits: vec![NetLimitRow { id: 7, max: 5, period_ns: 1_000_000_000 }],
        }
    }

    #[test]
    fn entries_carry_agent_generation_and_masked_prefixes() {
        let entries = tables().entries(0x0102_0304_0506_0708, 9).unwrap();
        assert_eq!(entries.v4.len(), 2);
        let (key, class) = &entries.v4[1];
        assert_eq!(*class, 1);
        assert_eq!(key.prefix_len(), NET_ADDR_FIXED_BITS + 12);
        let data = key.data();
        assert_eq!(data.agent_id, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(data.generation, [0, 0, 0, 9]);
        assert_eq!(data.addr, [10, 0, 0, 0]);
        assert_eq!(entries.v4[0].0.prefix_len(), NET_ADDR_FIXED_BITS);
        let (v6, class) = &entries.v6[1];
        assert_eq!(*class, 2);
        assert_eq!(v6.prefix_len(), NET_ADDR_FIXED_BITS + 32);
        assert_eq!(v6.data().addr, "2001:db8::".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(
            entries.ports[0].0,
            NetPortKey { agent_id: 0x0102_0304_0506_0708, generation: 9, port: 443, _pad: 0 }
        );
        let (key, value) = entries.verdicts[1];
        assert_eq!(
            (key.addr_class, key.port_class, key.event, key.proto, key.generation),
            (1, 1, NET_HOOK_CONNECT, NET_PROTO_TCP, 9)
        );
        assert_eq!(value, NetVerdict { action: NET_ACTION_ALLOW, flags: 0, rule: 3, limit: 7 });
        let (key, state) = entries.limits[0];
        assert_eq!((key.limit, key.generation), (7, 9));
        assert_eq!((state.max, state.period_ns, state.count, state.reset_at_ns), (5, 1_000_000_000, 0, 0));
    }

    #[test]
    fn raw_numbers_match_the_contract() {
        assert_eq!(
            [NetHook::Connect.raw(), NetHook::Sendmsg.raw(), NetHook::Bind.raw()],
            [1, 2, 3],
            "event: 1 connect, 2 sendmsg, 3 bind"
        );
        assert_eq!([NetProto::Tcp.raw(), NetProto::Udp.raw(), NetProto::Other.raw()], [6, 17, 0]);
        assert_eq!([NetAction::Allow.raw(), NetAction::Deny.raw(), NetAction::Kill.raw()], [0, 1, 2]);
        let mut row = verdict(0, 0, NetAction::Kill, 0);
        row.log = true;
        let tables = NetTables { verdicts: vec![row], ..NetTables::default() };
        assert_eq!(tables.entries(1, 1).unwrap().verdicts[0].1.flags, NET_VERDICT_LOG);
    }

    #[test]
    fn bad_tables_are_refused_with_the_offending_value() {
        let mut bad = tables();
        bad.v4.push(("1.2.3.4".parse().unwrap(), 33, 1));
        assert_eq!(bad.entries(1, 1).unwrap_err(), NetPlanError::Prefix { addr: "1.2.3.4".into(), prefix: 33 });

        let mut bad = tables();
        bad.v4.push(("10.15.0.0".parse().unwrap(), 12, 4));
        assert!(matches!(bad.entries(1, 1), Err(NetPlanError::DuplicateAddr { prefix: 12, .. })));

        let mut bad = tables();
        bad.ports.push((443, 3));
        assert_eq!(bad.entries(1, 1).unwrap_err(), NetPlanError::DuplicatePort(443));

        let mut bad = tables();
        bad.verdicts.push(verdict(1, 1, NetAction::Deny, 0));
        assert!(matches!(bad.entries(1, 1), Err(NetPlanError::DuplicateVerdict { addr_class: 1, .. })));

        let mut bad = tables();
        bad.verdicts.push(verdict(2, 2, NetAction::Allow, 8));
        assert_eq!(bad.entries(1, 1).unwrap_err(), NetPlanError::UnknownLimit(8));

        let mut bad = tables();
        bad.limits.push(NetLimitRow { id: 0, max: 1, period_ns: 0 });
        assert_eq!(bad.entries(1, 1).unwrap_err(), NetPlanError::ZeroLimit);

        let mut bad = tables();
        bad.limits.push(NetLimitRow { id: 7, max: 1, period_ns: 0 });
        assert_eq!(bad.entries(1, 1).unwrap_err(), NetPlanError::DuplicateLimit(7));

        let big = NetTables { ports: (0..=u16::MAX).map(|port| (port, 1)).collect(), ..NetTables::default() };
        assert!(matches!(big.entries(1, 1), Err(NetPlanError::TooMany { table: "port", .. })));
    }

    #[test]
    fn purge_selects_generations() {
        assert!(Purge::AllBut(3).hits(2) && !Purge::AllBut(3).hits(3));
        assert!(Purge::Only(3).hits(3) && !Purge::Only(3).hits(4));
        assert!(Purge::All.hits(0));
    }
}
