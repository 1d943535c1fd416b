//! Loading the object and wiring it to agents.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::Path,
};

use agt_jail_common::{ConnectRuleKey, AF_INET, AF_INET6, RULE_DENY};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSockAddr},
    Btf, Ebpf, EbpfLoader,
};

use crate::{btf::KernelOffsets, events::EventReader, OffsetError, EBPF_OBJECT};

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Offsets(#[from] OffsetError),
    #[error("cannot read kernel BTF for attaching tracing programs: {0}")]
    KernelBtf(String),
    #[error("cannot load the eBPF object: {0}")]
    Load(String),
    #[error("eBPF object has no {what} named {name} (object and loader out of step)")]
    Missing { what: &'static str, name: &'static str },
    #[error("the kernel refused program {program}: {message}")]
    Program { program: &'static str, message: String },
    #[error("cannot attach {program} to the agent's cgroup: {message}")]
    Attach { program: &'static str, message: String },
    #[error("cannot update map {map}: {message}")]
    Map { map: &'static str, message: String },
}

/// A connect destination to deny. `port == 0` denies every port of `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRule {
    pub addr: IpAddr,
    pub port: u16,
}

impl ConnectRule {
    pub fn new(addr: IpAddr, port: u16) -> Self {
        Self { addr, port }
    }

    fn key(&self, agent_id: u64) -> ConnectRuleKey {
        let mut addr = [0u8; 16];
        let family = match self.addr {
            IpAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                AF_INET
            }
            IpAddr::V6(v6) => {
                // An IPv4-mapped address (::ffff:a.b.c.d) reaches connect4 when used on
                // a dual-stack socket, so the mapped rule must also exist there.
                addr = v6.octets();
                AF_INET6
            }
        };
        ConnectRuleKey { agent_id, addr, family, port: self.port, _pad: 0 }
    }

    /// The keys that enforce this rule: an IPv4 rule also covers its IPv4-mapped IPv6
    /// form, because a dual-stack socket connecting to ::ffff:a.b.c.d goes through connect6.
    fn keys(&self, agent_id: u64) -> Vec<ConnectRuleKey> {
        let mut keys = vec![self.key(agent_id)];
        match self.addr {
            IpAddr::V4(v4) => keys.push(ConnectRule::new(IpAddr::V6(v4.to_ipv6_mapped()), self.port).key(agent_id)),
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    keys.push(ConnectRule::new(IpAddr::V4(v4), self.port).key(agent_id));
                }
            }
        }
        keys
    }
}

impl From<SocketAddr> for ConnectRule {
    fn from(addr: SocketAddr) -> Self {
        Self::new(addr.ip(), addr.port())
    }
}

const CONNECT4: &str = "connect4";
const CONNECT6: &str = "connect6";
const EXEC_TRACE: &str = "sched_process_exec";

/// The loaded object with its always-on programs (exec tracing, connect hooks).
pub struct AgentPrograms {
    bpf: Ebpf,
    reader: Option<EventReader>,
}

impl AgentPrograms {
    /// Loads the object with offsets from the running kernel's BTF, loads the connect
    /// programs and attaches the exec tracepoint (it filters by agent cgroup itself).
    pub fn load() -> Result<Self, LoaderError> {
        Self::load_with_btf(Path::new(KernelOffsets::VMLINUX))
    }

    pub fn load_with_btf(vmlinux: &Path) -> Result<Self, LoaderError> {
        let offsets = KernelOffsets::from_btf_file(vmlinux)?;
        let btf = Btf::parse_file(vmlinux, aya::Endianness::default())
            .map_err(|err| LoaderError::KernelBtf(err.to_string()))?;
        let mut bpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("BINPRM_FILENAME_OFFSET", &offsets.binprm_filename, true)
            .load(EBPF_OBJECT)
            .map_err(|err| LoaderError::Load(err.to_string()))?;

        for name in [CONNECT4, CONNECT6] {
            let program: &mut CgroupSockAddr = program(&mut bpf, name)?;
            program.load().map_err(|err| program_error(name, err))?;
        }
        let exec: &mut BtfTracePoint = program(&mut bpf, EXEC_TRACE)?;
        exec.load(EXEC_TRACE, &btf).map_err(|err| program_error(EXEC_TRACE, err))?;
        exec.attach().map_err(|err| program_error(EXEC_TRACE, err))?;

        let ring = bpf.take_map("EVENTS").ok_or(LoaderError::Missing { what: "map", name: "EVENTS" })?;
        let ring = RingBuf::try_from(ring).map_err(|err| LoaderError::Load(err.to_string()))?;
        Ok(Self { bpf, reader: Some(EventReader::new(ring)) })
    }

    /// Attaches the connect programs to an agent's cgroup v2 directory. Must happen
    /// before any of the agent's processes join it.
    pub fn attach_cgroup(&mut self, cgroup_dir: impl AsFd + Copy) -> Result<(), LoaderError> {
        for name in [CONNECT4, CONNECT6] {
            let program: &mut CgroupSockAddr = program(&mut self.bpf, name)?;
            program
                .attach(cgroup_dir, CgroupAttachMode::Single)
                .map_err(|err| LoaderError::Attach { program: name, message: err.to_string() })?;
        }
        Ok(())
    }

    /// Tells the programs that tasks in cgroup `cgroup_id` belong to agent `agent_id`.
    pub fn register_agent(&mut self, cgroup_id: u64, agent_id: u64) -> Result<(), LoaderError> {
        let mut agents: HashMap<&mut MapData, u64, u64> = self.map("AGENT_CGROUPS")?;
        agents
            .insert(cgroup_id, agent_id, 0)
            .map_err(|err| LoaderError::Map { map: "AGENT_CGROUPS", message: err.to_string() })
    }

    /// Denies connects of agent `agent_id` to `rule`, from the next connect on.
    pub fn deny_connect(&mut self, agent_id: u64, rule: ConnectRule) -> Result<(), LoaderError> {
        let mut deny: HashMap<&mut MapData, ConnectRuleKey, u32> = self.map("CONNECT_DENY")?;
        for key in rule.keys(agent_id) {
            deny.insert(key, RULE_DENY, 0)
                .map_err(|err| LoaderError::Map { map: "CONNECT_DENY", message: err.to_string() })?;
        }
        Ok(())
    }

    /// The event reader; `None` after it was taken once.
    pub fn take_events(&mut self) -> Option<EventReader> {
        self.reader.take()
    }

    /// Events the kernel side could not queue because the ring buffer was full.
    pub fn dropped_events(&self) -> Result<u64, LoaderError> {
        let map = self.bpf.map("EVENT_DROPS").ok_or(LoaderError::Missing { what: "map", name: "EVENT_DROPS" })?;
        let drops: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)
            .map_err(|err| LoaderError::Map { map: "EVENT_DROPS", message: err.to_string() })?;
        let per_cpu =
            drops.get(&0, 0).map_err(|err| LoaderError::Map { map: "EVENT_DROPS", message: err.to_string() })?;
        Ok(per_cpu.iter().sum())
    }

    /// The underlying object, for programs that other modules load on demand.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.bpf
    }

    fn map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, LoaderError> {
        let map = self.bpf.map_mut(name).ok_or(LoaderError::Missing { what: "map", name })?;
        HashMap::try_from(map).map_err(|err| LoaderError::Map { map: name, message: err.to_string() })
    }
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoaderError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let program = bpf.program_mut(name).ok_or(LoaderError::Missing { what: "program", name })?;
    program.try_into().map_err(|_| LoaderError::Missing { what: "program of the expected type", name })
}

fn program_error(program: &'static str, err: impl std::fmt::Display) -> LoaderError {
    LoaderError::Program { program, message: summarize_verifier_log(&err.to_string()) }
}

/// The kernel's verifier log runs to hundreds of lines; an operator needs the reason,
/// which is its last lines. Keeps the message one line.
fn summarize_verifier_log(message: &str) -> String {
    const MARKER: &str = "Verifier output:";
    let Some(at) = message.find(MARKER) else {
        return message.replace('\n', " ");
    };
    let (head, log) = message.split_at(at);
    let tail: Vec<&str> = log[MARKER.len()..]
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("verification time")
                && !line.starts_with("stack depth")
                && !line.starts_with("processed ")
        })
        .collect();
    let reason = tail.iter().rev().take(2).rev().copied().collect::<Vec<_>>().join(" / ");
    format!("{}verifier: {reason}", head.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ipv4_rule_also_covers_its_mapped_ipv6_form() {
        let keys = ConnectRule::new("10.1.2.3".parse().unwrap(), 443).keys(9);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].family, AF_INET);
        assert_eq!(&keys[0].addr[..4], &[10, 1, 2, 3]);
        assert_eq!(&keys[0].addr[4..], &[0; 12]);
        assert_eq!(keys[1].family, AF_INET6);
        assert_eq!(keys[1].addr, "::ffff:10.1.2.3".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert!(keys.iter().all(|k| k.port == 443 && k.agent_id == 9));
    }

    #[test]
    fn verifier_logs_are_cut_to_their_reason() {
        let message = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx()\n1: (7b) r1 = 2\n59: (4f) r8 |= r0\nR8 pointer |= pointer prohibited\nverification time 555 usec\nstack depth 96+0\nprocessed 120 insns\n";
        let short = summarize_verifier_log(message);
        assert!(!short.contains('\n'));
        assert!(short.ends_with("verifier: 59: (4f) r8 |= r0 / R8 pointer |= pointer prohibited"), "{short}");
        assert_eq!(summarize_verifier_log("plain\nerror"), "plain error");
    }

    #[test]
    fn plain_ipv6_rule_is_one_key() {
        let keys = ConnectRule::new("::1".parse().unwrap(), 0).keys(1);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].family, AF_INET6);
        assert_eq!(keys[0].port, 0);
    }
}
