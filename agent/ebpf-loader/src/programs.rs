//! Loading the object and wiring it to agents.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::Path,
};

use agt_jail_common::{
    ConnectAllowData, ConnectRuleKey, ExeKey, TaskFacts, AF_INET, AF_INET6, AGENT_FLAG_CONNECT_ALLOWLIST,
    CONNECT_ALLOW_FIXED_BITS, RULE_ALLOW, RULE_DENY,
};
use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, HashMap, MapData, PerCpuArray},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSockAddr},
    Ebpf, EbpfLoader,
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
    #[error(transparent)]
    NetPlan(#[from] crate::net::NetPlanError),
    #[error("cannot pin at {path}: {message}")]
    Pin { path: std::path::PathBuf, message: String },
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

/// A destination an allow-list-mode agent may connect to: `addr/prefix`, one port or
/// (`port == 0`) every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowRule {
    pub addr: IpAddr,
    pub prefix: u8,
    pub port: u16,
}

impl AllowRule {
    /// One address (`/32` or `/128`) on one port (0: every port).
    pub fn host(addr: IpAddr, port: u16) -> Self {
        Self { addr, prefix: if addr.is_ipv4() { 32 } else { 128 }, port }
    }

    /// The trie entries that enforce this rule: an IPv4 network is also allowed in its
    /// IPv4-mapped IPv6 form (`::ffff:a.b.c.d/96+N`), which dual-stack sockets use.
    /// Host bits past the prefix are cleared, as the trie compares only the prefix.
    fn keys(&self, agent_id: u64) -> Vec<LpmKey<ConnectAllowData>> {
        let entry = |family: u16, octets: &[u8], prefix: u32| {
            let mut addr = [0u8; 16];
            addr[..octets.len()].copy_from_slice(octets);
            clear_host_bits(&mut addr, prefix);
            let data = ConnectAllowData { agent_id, family, port: self.port, _pad: 0, addr };
            LpmKey::new(CONNECT_ALLOW_FIXED_BITS + prefix, data)
        };
        match self.addr {
            IpAddr::V4(v4) => {
                let prefix = u32::from(self.prefix.min(32));
                vec![entry(AF_INET, &v4.octets(), prefix), entry(AF_INET6, &v4.to_ipv6_mapped().octets(), 96 + prefix)]
            }
            IpAddr::V6(v6) => vec![entry(AF_INET6, &v6.octets(), u32::from(self.prefix.min(128)))],
        }
    }
}

fn clear_host_bits(addr: &mut [u8; 16], prefix: u32) {
    for (index, byte) in addr.iter_mut().enumerate() {
        let start = index as u32 * 8;
        if start >= prefix {
            *byte = 0;
        } else if prefix < start + 8 {
            *byte &= 0xffu8 << (8 - (prefix - start));
        }
    }
}

impl From<SocketAddr> for ConnectRule {
    fn from(addr: SocketAddr) -> Self {
        Self::new(addr.ip(), addr.port())
    }
}

/// The cgroup programs attached to every agent's cgroup (connect, UDP sendmsg, bind).
const SOCK_ADDR_PROGRAMS: [&str; 6] = ["connect4", "connect6", "sendmsg4", "sendmsg6", "bind4", "bind6"];
/// The process-tracking tracepoints (they filter by agent cgroup themselves).
const TRACEPOINTS: [&str; 4] = ["sched_process_exec", "sched_process_fork", "sched_process_exit", "task_rename"];

/// The loaded object with its always-on programs (process tracking, network hooks).
pub struct AgentPrograms {
    pub(crate) bpf: Ebpf,
    reader: Option<EventReader>,
    task_facts: Option<TaskFactsMap>,
    /// Cgroup attachments whose links the object still owns (until pinned).
    pub(crate) attached: Vec<crate::pinned::Attached>,
    /// Descriptors of pinned links: they keep the programs attached while this object
    /// lives, whatever became of the pins.
    pub(crate) held_links: Vec<std::os::fd::OwnedFd>,
    /// The kernel BTF read at load (and its path), for the programs loaded on demand.
    kernel: Option<(std::path::PathBuf, std::sync::Arc<KernelFacts>)>,
}

/// What is kept of the kernel BTF after loading: the attach targets of every program
/// (tracepoints and LSM hooks) and the LSM programs' struct offsets (`None` when this
/// kernel lacks one of their members: loading those programs then fails with the reason).
pub(crate) struct KernelFacts {
    pub(crate) targets: aya::Btf,
    pub(crate) lsm_offsets: Option<crate::lsm::LsmOffsets>,
}

impl KernelFacts {
    fn of(btf: &crate::btf::KernelBtf) -> Result<Self, LoaderError> {
        Ok(Self { targets: btf.attach_targets()?, lsm_offsets: crate::lsm::LsmOffsets::from_btf(btf).ok() })
    }
}

/// The kernel's per-thread record of agents' `comm` and executable (`TASK_FACTS`, kept by
/// the fork, exec, rename and exit tracepoints), for lookups from any thread.
pub struct TaskFactsMap {
    map: HashMap<MapData, u32, TaskFacts>,
}

impl TaskFactsMap {
    /// What the kernel knows of thread `tid` (host thread id); None for a thread it has
    /// not seen fork or exec as an agent's, or whose executable it could not read.
    pub fn get(&self, tid: u32) -> Option<TaskFacts> {
        self.map.get(&tid, 0).ok().filter(|facts| facts.exe != ExeKey::default())
    }
}

impl AgentPrograms {
    /// Loads the object with offsets from the running kernel's BTF, loads the network
    /// programs and attaches the exec/fork/exit tracepoints (they filter by agent cgroup
    /// themselves).
    pub fn load() -> Result<Self, LoaderError> {
        Self::load_with_btf(Path::new(KernelOffsets::VMLINUX))
    }

    pub fn load_with_btf(vmlinux: &Path) -> Result<Self, LoaderError> {
        // aya's loader parses the whole kernel BTF when it is made (for CO-RE, which this
        // object does not use); dropping it before anything else is read keeps the peak low.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let (offsets, kernel) = {
            // The BTF itself (its file) is dropped at the end of this block: what the
            // programs loaded later need of it is kept, and is small.
            let btf = crate::btf::KernelBtf::read(vmlinux)?;
            (KernelOffsets::from_btf(&btf)?, std::sync::Arc::new(KernelFacts::of(&btf)?))
        };
        let btf = &kernel.targets;
        let mut bpf = loader
            .override_global("BINPRM_FILENAME_OFFSET", &offsets.binprm_filename, true)
            .override_global("TASK_PID_OFFSET", &offsets.task_pid, true)
            .override_global("TASK_TGID_OFFSET", &offsets.task_tgid, true)
            .override_global("TASK_REAL_PARENT_OFFSET", &offsets.task_real_parent, true)
            .override_global("TASK_EXIT_CODE_OFFSET", &offsets.task_exit_code, true)
            .override_global("TASK_MM_OFFSET", &offsets.task_mm, true)
            .override_global("MM_EXE_FILE_OFFSET", &offsets.mm_exe_file, true)
            .override_global("FILE_PATH_OFFSET", &offsets.file_path, true)
            .override_global("PATH_MNT_OFFSET", &offsets.path_mnt, true)
            .override_global("PATH_DENTRY_OFFSET", &offsets.path_dentry, true)
            .override_global("DENTRY_INODE_OFFSET", &offsets.dentry_inode, true)
            .override_global("INODE_INO_OFFSET", &offsets.inode_ino, true)
            .load(EBPF_OBJECT)
            .map_err(|err| LoaderError::Load(err.to_string()))?;

        // Loopback passes the deny-all layer only in a network namespace other than ours.
        // Kernels before 5.14 cannot say which namespace is ours (no SO_NETNS_COOKIE): the
        // cookie stays 0, and the layer then denies loopback in every namespace (closed).
        let cookie = match crate::sys::own_netns_cookie() {
            Ok(cookie) => cookie,
            Err(err) if err.raw_os_error() == Some(libc::ENOPROTOOPT) => 0,
            Err(err) => return Err(LoaderError::Load(format!("cannot read this process's netns cookie: {err}"))),
        };
        {
            let map = bpf.map_mut("HOST_NETNS").ok_or(LoaderError::Missing { what: "map", name: "HOST_NETNS" })?;
            let mut host: Array<&mut MapData, u64> =
                Array::try_from(map).map_err(|err| LoaderError::Map { map: "HOST_NETNS", message: err.to_string() })?;
            host.set(0, cookie, 0).map_err(|err| LoaderError::Map { map: "HOST_NETNS", message: err.to_string() })?;
        }

        for name in SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program(&mut bpf, name)?;
            program.load().map_err(|err| program_error(name, err))?;
        }
        for name in TRACEPOINTS {
            let tracepoint: &mut BtfTracePoint = program(&mut bpf, name)?;
            tracepoint.load(name, btf).map_err(|err| program_error(name, err))?;
            tracepoint.attach().map_err(|err| program_error(name, err))?;
        }

        let mut take = |name: &'static str| bpf.take_map(name).ok_or(LoaderError::Missing { what: "map", name });
        let (events, priority, summary) = (take("EVENTS")?, take("PRIORITY_EVENTS")?, take("DENY_SUMMARY")?);
        let data = |map: aya::maps::Map, name: &'static str| match map {
            aya::maps::Map::RingBuf(data) | aya::maps::Map::PerCpuHashMap(data) => Ok(data),
            _ => Err(LoaderError::Map { map: name, message: "not of the expected map type".into() }),
        };
        let reader = EventReader::new(
            data(events, "EVENTS")?,
            data(priority, "PRIORITY_EVENTS")?,
            data(summary, "DENY_SUMMARY")?,
        )?;
        let task_facts = HashMap::try_from(take("TASK_FACTS")?)
            .map_err(|err| LoaderError::Map { map: "TASK_FACTS", message: err.to_string() })?;
        Ok(Self {
            bpf,
            reader: Some(reader),
            task_facts: Some(TaskFactsMap { map: task_facts }),
            attached: Vec::new(),
            held_links: Vec::new(),
            kernel: Some((vmlinux.to_path_buf(), kernel)),
        })
    }

    /// Attaches the network programs (connect, UDP sendmsg, bind; IPv4 and IPv6) to an
    /// agent's cgroup v2 directory. Must happen before any of the agent's processes join it.
    pub fn attach_cgroup(&mut self, cgroup_dir: impl AsFd + Copy) -> Result<(), LoaderError> {
        let cgroup_id = crate::pinned::cgroup_id_of(cgroup_dir)?;
        for name in SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program(&mut self.bpf, name)?;
            let link = program
                .attach(cgroup_dir, CgroupAttachMode::Single)
                .map_err(|err| LoaderError::Attach { program: name, message: err.to_string() })?;
            self.attached.push(crate::pinned::Attached { cgroup_id, program: name, link });
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

    /// Puts agent `agent_id` in allow-list mode: from the next connect on, only
    /// destinations added with [`AgentPrograms::allow_connect`] pass (deny rules still win).
    pub fn enable_connect_allowlist(&mut self, agent_id: u64) -> Result<(), LoaderError> {
        let mut flags: HashMap<&mut MapData, u64, u32> = self.map("AGENT_FLAGS")?;
        let current = flags.get(&agent_id, 0).unwrap_or(0);
        flags
            .insert(agent_id, current | AGENT_FLAG_CONNECT_ALLOWLIST, 0)
            .map_err(|err| LoaderError::Map { map: "AGENT_FLAGS", message: err.to_string() })
    }

    /// Allows agent `agent_id` to connect to `rule` in allow-list mode.
    pub fn allow_connect(&mut self, agent_id: u64, rule: AllowRule) -> Result<(), LoaderError> {
        let mut allow = self.trie::<ConnectAllowData>("CONNECT_ALLOW")?;
        for key in rule.keys(agent_id) {
            allow
                .insert(&key, RULE_ALLOW, 0)
                .map_err(|err| LoaderError::Map { map: "CONNECT_ALLOW", message: err.to_string() })?;
        }
        Ok(())
    }

    /// Takes back what [`AgentPrograms::allow_connect`] allowed with the same `rule`:
    /// removes exactly its trie entries (both forms of an IPv4 rule). Another rule that
    /// covers the same destination (a wider network, port 0) stays, as does a connection
    /// already made. Removing an entry that is not there is not an error.
    pub fn revoke_connect(&mut self, agent_id: u64, rule: AllowRule) -> Result<(), LoaderError> {
        let mut allow = self.trie::<ConnectAllowData>("CONNECT_ALLOW")?;
        for key in rule.keys(agent_id) {
            crate::net::remove_ok(allow.remove(&key), "CONNECT_ALLOW")?;
        }
        Ok(())
    }

    /// The kernel's per-thread `comm` and executable of agents; `None` after it was taken once.
    pub fn take_task_facts(&mut self) -> Option<TaskFactsMap> {
        self.task_facts.take()
    }

    /// The event reader; `None` after it was taken once.
    pub fn take_events(&mut self) -> Option<EventReader> {
        self.reader.take()
    }

    /// Pins the run's event rings, deny summary and drop counters in `dir` (an existing
    /// directory on bpffs; names in [`crate::pins`]), so that what the kernel queued or
    /// counted outlives this process. Must come before [`AgentPrograms::take_events`].
    pub fn pin_events(&mut self, dir: &Path) -> Result<(), LoaderError> {
        let reader = self.reader.as_mut().ok_or(LoaderError::Missing { what: "event reader", name: "EVENTS" })?;
        reader.pin(dir)?;
        for (name, pin) in [("EVENT_DROPS", crate::pins::EVENT_DROPS), ("DENY_DROPS", crate::pins::DENY_DROPS)] {
            let map = self.bpf.map(name).ok_or(LoaderError::Missing { what: "map", name })?;
            let data = match map {
                aya::maps::Map::PerCpuArray(data) => data,
                _ => return Err(LoaderError::Map { map: name, message: "not a per-CPU array".into() }),
            };
            data.pin(dir.join(pin)).map_err(|err| LoaderError::Map {
                map: name,
                message: format!("cannot pin at {}: {err}", dir.join(pin).display()),
            })?;
        }
        Ok(())
    }

    /// Allowed events the kernel side could not queue because the event ring buffer was full.
    pub fn dropped_events(&self) -> Result<u64, LoaderError> {
        self.counter("EVENT_DROPS")
    }

    /// Denies the kernel side could neither queue (priority ring full) nor count in the deny
    /// summary (summary map full): denied calls without a record.
    pub fn dropped_denies(&self) -> Result<u64, LoaderError> {
        self.counter("DENY_DROPS")
    }

    fn counter(&self, name: &'static str) -> Result<u64, LoaderError> {
        let map = self.bpf.map(name).ok_or(LoaderError::Missing { what: "map", name })?;
        let drops: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|err| LoaderError::Map { map: name, message: err.to_string() })?;
        let per_cpu = drops.get(&0, 0).map_err(|err| LoaderError::Map { map: name, message: err.to_string() })?;
        Ok(per_cpu.iter().sum())
    }

    /// What the programs loaded on demand need of the kernel BTF at `vmlinux`: kept from
    /// the load when it is the same file, else read now.
    pub(crate) fn kernel_facts(&mut self, vmlinux: &Path) -> Result<std::sync::Arc<KernelFacts>, LoaderError> {
        if let Some((path, facts)) = &self.kernel {
            if path == vmlinux {
                return Ok(std::sync::Arc::clone(facts));
            }
        }
        let facts = std::sync::Arc::new(KernelFacts::of(&crate::btf::KernelBtf::read(vmlinux)?)?);
        self.kernel = Some((vmlinux.to_path_buf(), std::sync::Arc::clone(&facts)));
        Ok(facts)
    }

    /// The underlying object, for programs that other modules load on demand.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.bpf
    }

    pub(crate) fn map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, LoaderError> {
        let map = self.bpf.map_mut(name).ok_or(LoaderError::Missing { what: "map", name })?;
        HashMap::try_from(map).map_err(|err| LoaderError::Map { map: name, message: err.to_string() })
    }
}

/// A drop counter a run pinned in `dir` (`pin`: [`crate::pins::EVENT_DROPS`] or
/// [`crate::pins::DENY_DROPS`]), summed over CPUs.
pub fn pinned_counter(dir: &Path, pin: &'static str) -> Result<u64, LoaderError> {
    let error = |message: String| LoaderError::Map { map: pin, message };
    let data = MapData::from_pin(dir.join(pin)).map_err(|err| error(format!("{}: {err}", dir.display())))?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|err| error(err.to_string()))?;
    let per_cpu = counters.get(&0, 0).map_err(|err| error(err.to_string()))?;
    Ok(per_cpu.iter().sum())
}

pub(crate) fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoaderError>
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
    fn allow_rules_clear_host_bits_and_cover_mapped_ipv4() {
        let keys = AllowRule { addr: "10.1.2.3".parse().unwrap(), prefix: 12, port: 443 }.keys(7);
        assert_eq!(keys.len(), 2);
        let v4 = keys[0].data();
        assert_eq!(keys[0].prefix_len(), CONNECT_ALLOW_FIXED_BITS + 12);
        assert_eq!(&v4.addr[..4], &[10, 0, 0, 0]);
        assert_eq!((v4.agent_id, v4.family, v4.port), (7, AF_INET, 443));
        let mapped = keys[1].data();
        assert_eq!(keys[1].prefix_len(), CONNECT_ALLOW_FIXED_BITS + 96 + 12);
        assert_eq!(mapped.family, AF_INET6);
        assert_eq!(&mapped.addr[10..13], &[0xff, 0xff, 10]);
        assert_eq!(mapped.addr[13], 0);

        let host = AllowRule { addr: "2001:db8::1".parse().unwrap(), prefix: 128, port: 0 }.keys(1);
        assert_eq!(host.len(), 1);
        assert_eq!(host[0].data().addr, "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        let odd = AllowRule { addr: "255.255.255.255".parse().unwrap(), prefix: 20, port: 1 }.keys(1);
        assert_eq!(&odd[0].data().addr[..4], &[255, 255, 240, 0]);
    }

    #[test]
    fn plain_ipv6_rule_is_one_key() {
        let keys = ConnectRule::new("::1".parse().unwrap(), 0).keys(1);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].family, AF_INET6);
        assert_eq!(keys[0].port, 0);
    }
}
