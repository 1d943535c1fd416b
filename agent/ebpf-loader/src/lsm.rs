//! Tier A enforcement: the BPF LSM programs.
//!
//! Three groups, each loaded on demand after [`AgentPrograms::load`] (never as part of
//! it), because they exist only where the kernel accepts BPF LSM programs (`bpf` in the
//! active LSM list and BPF_PROG_TYPE_LSM allowed). A kernel that refuses them (Tier B)
//! reports a [`LoaderError::Program`] and everything else keeps running.
//!
//! - [`ExecLsm`]: `bprm_check_security` + `bprm_creds_for_exec`. Deny rules by file
//!   identity ([`ExecLsm::deny_exec`]), fileless execs (always, for every agent), and for
//!   agents with exec verdicts ([`ExecLsm::enable_exec_verdicts`]) every exec that
//!   userspace did not approve for that thread and that exact file ([`ExecLsm::approve_exec`]).
//! - [`FileLsm`]: `file_open` and (where the kernel allows `bpf_d_path` there) `path_unlink`,
//!   `path_rename`, `path_mkdir`, matching per-agent [`FileRule`]s.
//! - [`GuardLsm`]: per-agent deny flags for ptrace, signals, mount, bpf, kernel loads and
//!   foreign socket families.
//!
//! Every group reads kernel struct offsets from the `LSM_OFFSETS` map, which the first
//! load fills from the running kernel's BTF and freezes (the verifier then treats the
//! offsets as constants).
use std::{collections::BTreeMap, os::fd::AsFd, os::unix::fs::MetadataExt, path::Path};

use agt_jail_common::{
    ExecApproval, ExecRuleKey, FileNameKey, FilePathData, FileRuleValue, LsmAgentConfig, AGENT_FLAG_DENY_BPF,
    AGENT_FLAG_DENY_FOREIGN_SIGNALS, AGENT_FLAG_DENY_FOREIGN_SOCKETS, AGENT_FLAG_DENY_KERNEL_LOAD,
    AGENT_FLAG_DENY_MOUNT, AGENT_FLAG_DENY_PTRACE, AGENT_FLAG_EXEC_VERDICT, AGENT_FLAG_FILE_RULES, FILE_ACCESS_BITS,
    FILE_PATH_FIXED_BITS, FILE_PATH_LEN, RULE_DENY,
};
pub use agt_jail_common::{
    FileRuleKind, FILE_ACCESS_CREATE, FILE_ACCESS_READ, FILE_ACCESS_RENAME, FILE_ACCESS_UNLINK, FILE_ACCESS_WRITE,
};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, MapData,
    },
    programs::{lsm::LsmLinkId, Lsm},
};

use crate::{btf::KernelBtf, AgentPrograms, KernelOffsets, LoaderError, OffsetError};

/// The exec program's name in the object (its function name).
pub const EXEC_LSM_PROGRAM: &str = "bprm_check_security";
/// The LSM hook it attaches to.
pub const EXEC_LSM_HOOK: &str = "bprm_check_security";
const EXEC_ROUNDS_PROGRAM: &str = "bprm_creds_for_exec";
const OFFSETS_MAP: &str = "LSM_OFFSETS";
const DENY_MAP: &str = "EXEC_DENY";
const APPROVED_MAP: &str = "EXEC_APPROVED";
const AGENTS_MAP: &str = "LSM_AGENTS";
const PATHS_MAP: &str = "FILE_PATHS";
const NAMES_MAP: &str = "FILE_NAMES";

/// The file hooks: `file_open` is required, the `path_*` hooks need `bpf_d_path` there.
pub const FILE_OPEN_HOOK: &str = "file_open";
pub const FILE_PATH_HOOKS: [&str; 3] = ["path_unlink", "path_rename", "path_mkdir"];
/// The guard hooks (program name = hook name).
pub const GUARD_HOOKS: [&str; 8] = [
    "ptrace_access_check",
    "task_kill",
    "sb_mount",
    "move_mount",
    "bpf",
    "kernel_read_file",
    "kernel_load_data",
    "socket_connect",
];

/// The kernel struct member offsets the programs read, in `LSM_OFFSETS` index order
/// (keep in step with `ebpf/agt-jail-ebpf/src/lsm.rs`).
const MEMBERS: [(&str, &str); 17] = [
    ("linux_binprm", "file"),
    ("linux_binprm", "filename"),
    ("file", "f_inode"),
    ("inode", "i_ino"),
    ("inode", "i_sb"),
    ("super_block", "s_dev"),
    ("inode", "i_nlink"),
    ("file", "f_path"),
    ("file", "f_mode"),
    ("file", "f_flags"),
    ("dentry", "d_name"),
    ("qstr", "name"),
    ("task_struct", "cgroups"),
    ("css_set", "dfl_cgrp"),
    ("cgroup", "kn"),
    ("kernfs_node", "id"),
    ("task_struct", "tgid"),
];

/// Byte offsets of [`MEMBERS`] in the running kernel, read from its BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LsmOffsets(pub [u64; MEMBERS.len()]);

impl LsmOffsets {
    pub fn from_btf_file(path: &Path) -> Result<Self, OffsetError> {
        Self::from_btf(&KernelBtf::read(path)?)
    }

    pub(crate) fn from_btf(btf: &KernelBtf) -> Result<Self, OffsetError> {
        let mut offsets = [0u64; MEMBERS.len()];
        for (slot, (strukt, member)) in offsets.iter_mut().zip(MEMBERS) {
            *slot = btf.member_offset(strukt, member)?;
        }
        Ok(Self(offsets))
    }
}

/// The identity of an executable file as the kernel sees it: `super_block.s_dev` in the
/// kernel's internal encoding and the inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecIdentity {
    pub dev: u64,
    pub ino: u64,
}

impl ExecIdentity {
    /// The identity of the file `path` names (following symlinks, as exec does).
    pub fn of_path(path: &Path) -> Result<Self, LoaderError> {
        let meta = std::fs::metadata(path).map_err(|err| LoaderError::Map {
            map: DENY_MAP,
            message: format!("cannot stat {}: {err}", path.display()),
        })?;
        Ok(Self::of_metadata(&meta))
    }

    /// The identity of an open file (e.g. the fd a supervisor was handed).
    pub fn of_metadata(meta: &std::fs::Metadata) -> Self {
        Self { dev: kernel_dev(meta.dev()), ino: meta.ino() }
    }

    fn key(self, agent_id: u64) -> ExecRuleKey {
        ExecRuleKey { agent_id, dev: self.dev, ino: self.ino }
    }
}

/// Userspace `dev_t` (glibc encoding) → the kernel's `MKDEV(major, minor)` =
/// `major << 20 | minor`, which is what `super_block.s_dev` holds.
pub fn kernel_dev(dev: u64) -> u64 {
    let major = u64::from(libc::major(dev));
    let minor = u64::from(libc::minor(dev));
    (major << 20) | (minor & 0xf_ffff)
}

/// Programs the kernel refused, with its reason.
type Unavailable = Vec<(&'static str, String)>;

/// Programs of one group, loaded, with their links while attached.
struct Group {
    programs: Vec<&'static str>,
    links: Vec<(&'static str, LsmLinkId)>,
}

impl Group {
    fn load(
        programs: &mut AgentPrograms,
        vmlinux: &Path,
        names: &[&'static str],
        optional: &[&'static str],
    ) -> Result<(Self, Unavailable), LoaderError> {
        let kernel = programs.kernel_facts(vmlinux)?;
        ensure_offsets(programs, kernel.lsm_offsets, vmlinux)?;
        let btf = &kernel.targets;
        let mut loaded = Vec::new();
        let mut unavailable = Vec::new();
        for &name in names.iter().chain(optional) {
            let program = lsm_program(programs, name)?;
            match program.load(name, btf) {
                Ok(()) => loaded.push(name),
                Err(err) if optional.contains(&name) => unavailable.push((name, one_line(&err.to_string()))),
                Err(err) => return Err(LoaderError::Program { program: name, message: one_line(&err.to_string()) }),
            }
        }
        Ok((Self { programs: loaded, links: Vec::new() }, unavailable))
    }

    fn attach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        for &name in &self.programs {
            if self.links.iter().any(|(linked, _)| *linked == name) {
                continue;
            }
            let link = lsm_program(programs, name)?
                .attach()
                .map_err(|err| LoaderError::Attach { program: name, message: err.to_string() })?;
            self.links.push((name, link));
        }
        Ok(())
    }

    fn detach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        while let Some((name, link)) = self.links.pop() {
            lsm_program(programs, name)?
                .detach(link)
                .map_err(|err| LoaderError::Attach { program: name, message: err.to_string() })?;
        }
        Ok(())
    }
}

/// The loaded exec LSM programs and, while attached, their links.
pub struct ExecLsm {
    group: Group,
}

impl ExecLsm {
    /// Loads the programs into the kernel with offsets from the running kernel's BTF.
    /// Fails with [`LoaderError::Program`] where the kernel refuses BPF LSM programs.
    pub fn load(programs: &mut AgentPrograms) -> Result<Self, LoaderError> {
        Self::load_with_btf(programs, Path::new(KernelOffsets::VMLINUX))
    }

    pub fn load_with_btf(programs: &mut AgentPrograms, vmlinux: &Path) -> Result<Self, LoaderError> {
        let (group, _) = Group::load(programs, vmlinux, &[EXEC_ROUNDS_PROGRAM, EXEC_LSM_PROGRAM], &[])?;
        Ok(Self { group })
    }

    /// Attaches the programs: from now on every exec of a registered agent is checked.
    /// Attaching twice is a no-op.
    pub fn attach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        self.group.attach(programs)
    }

    /// Detaches the programs (execs are no longer checked); the rules stay in the maps.
    pub fn detach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        self.group.detach(programs)
    }

    pub fn is_attached(&self) -> bool {
        !self.group.links.is_empty()
    }

    /// Denies agent `agent_id` the exec of `file`, from its next exec on.
    pub fn deny_exec(programs: &mut AgentPrograms, agent_id: u64, file: ExecIdentity) -> Result<(), LoaderError> {
        hash_map::<ExecRuleKey, u32>(programs, DENY_MAP)?
            .insert(file.key(agent_id), RULE_DENY, 0)
            .map_err(|err| map_error(DENY_MAP, err))
    }

    /// Removes a deny rule; removing one that does not exist is not an error.
    pub fn allow_exec(programs: &mut AgentPrograms, agent_id: u64, file: ExecIdentity) -> Result<(), LoaderError> {
        let mut map = hash_map::<ExecRuleKey, u32>(programs, DENY_MAP)?;
        match map.remove(&file.key(agent_id)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(map_error(DENY_MAP, err)),
        }
    }

    /// Puts agent `agent_id` under exec verdicts: from its next exec on, an exec runs only
    /// when [`ExecLsm::approve_exec`] approved that file for that thread.
    pub fn enable_exec_verdicts(programs: &mut AgentPrograms, agent_id: u64) -> Result<(), LoaderError> {
        add_agent_flags(programs, agent_id, AGENT_FLAG_EXEC_VERDICT, 0)
    }

    /// Approves the next exec of thread `tid` (as the initial pid namespace numbers it)
    /// for the file `file` only; the exec consumes the approval (used once, also when the
    /// kernel runs another file). Call right before letting the execve continue.
    pub fn approve_exec(programs: &mut AgentPrograms, tid: u32, file: ExecIdentity) -> Result<(), LoaderError> {
        hash_map::<u32, ExecApproval>(programs, APPROVED_MAP)?
            .insert(tid, ExecApproval { dev: file.dev, ino: file.ino }, 0)
            .map_err(|err| map_error(APPROVED_MAP, err))
    }

    /// Withdraws an approval that no exec used (the execve failed before the check).
    pub fn revoke_approval(programs: &mut AgentPrograms, tid: u32) -> Result<(), LoaderError> {
        match hash_map::<u32, ExecApproval>(programs, APPROVED_MAP)?.remove(&tid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(map_error(APPROVED_MAP, err)),
        }
    }

    /// Whether an approval for `tid` is still waiting to be used.
    pub fn approval_pending(programs: &mut AgentPrograms, tid: u32) -> Result<bool, LoaderError> {
        match hash_map::<u32, ExecApproval>(programs, APPROVED_MAP)?.get(&tid, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(err) => Err(map_error(APPROVED_MAP, err)),
        }
    }
}

/// One path rule of an agent. `text` is an absolute path for [`FileRuleKind::Exact`] and
/// [`FileRuleKind::Prefix`] (a directory: itself and everything below it), a single name
/// for the other kinds. `access_mask` holds `FILE_ACCESS_*` bits; the action is deny.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRule {
    pub kind: FileRuleKind,
    pub text: String,
    pub access_mask: u32,
    /// Reported in the File event of a denial (the caller's numbering, e.g. policy order).
    pub rule_index: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileRuleError {
    #[error("file rule {index} ({text:?}): {reason}")]
    Invalid { index: u32, text: String, reason: &'static str },
}

/// Rules compiled into map entries (without the agent id).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CompiledFileRules {
    /// Trie entries: path bytes (an exact path with its NUL, a directory with its `/`).
    pub paths: BTreeMap<Vec<u8>, FileRuleValue>,
    /// (kind, FNV-1a hash, length) → value.
    pub names: BTreeMap<(u32, u64, u32), FileRuleValue>,
    /// Bit N: some basename-prefix rule is N bytes long.
    pub basename_prefix_lens: u64,
}

fn merge(into: &mut FileRuleValue, from: &FileRuleValue) {
    for bit in 0..FILE_ACCESS_BITS {
        let flag = 1u32 << bit;
        if from.access_mask & flag == 0 {
            continue;
        }
        if into.access_mask & flag == 0 || from.rule_index[bit] < into.rule_index[bit] {
            into.rule_index[bit] = from.rule_index[bit];
            into.rule_kind[bit] = from.rule_kind[bit];
        }
        into.access_mask |= flag;
    }
}

fn rule_value(rule: &FileRule) -> FileRuleValue {
    let mut value = FileRuleValue { access_mask: rule.access_mask & 0x1f, ..FileRuleValue::default() };
    for bit in 0..FILE_ACCESS_BITS {
        value.rule_index[bit] = rule.rule_index;
        value.rule_kind[bit] = rule.kind as u8;
    }
    value
}

/// Compiles rules into map entries; checks every rule's shape and length.
pub fn compile_file_rules(rules: &[FileRule]) -> Result<CompiledFileRules, FileRuleError> {
    let mut out = CompiledFileRules::default();
    let mut dirs: Vec<Vec<u8>> = Vec::new();
    for rule in rules {
        let invalid = |reason| FileRuleError::Invalid { index: rule.rule_index, text: rule.text.clone(), reason };
        let text = rule.text.as_bytes();
        if text.contains(&0) {
            return Err(invalid("contains a NUL byte"));
        }
        if rule.access_mask & 0x1f == 0 {
            return Err(invalid("denies no access"));
        }
        let value = rule_value(rule);
        match rule.kind {
            FileRuleKind::Exact | FileRuleKind::Prefix => {
                if !text.starts_with(b"/") {
                    return Err(invalid("is not an absolute path"));
                }
                if text.split(|b| *b == b'/').any(|part| part == b"." || part == b"..")
                    || text.windows(2).any(|w| w == b"//")
                {
                    return Err(invalid("is not a normalized path"));
                }
                let trimmed = if text.len() > 1 { text.strip_suffix(b"/").unwrap_or(text) } else { text };
                let mut exact = trimmed.to_vec();
                exact.push(0);
                if exact.len() > FILE_PATH_LEN {
                    return Err(invalid("is longer than the kernel's path buffer"));
                }
                merge(out.paths.entry(exact).or_default(), &value);
                if rule.kind == FileRuleKind::Prefix {
                    let mut dir = trimmed.to_vec();
                    if dir != b"/" {
                        dir.push(b'/');
                    }
                    if dir.len() > FILE_PATH_LEN {
                        return Err(invalid("is longer than the kernel's path buffer"));
                    }
                    merge(out.paths.entry(dir.clone()).or_default(), &value);
                    dirs.push(dir);
                }
            }
            FileRuleKind::Component | FileRuleKind::Basename | FileRuleKind::BasenamePrefix => {
                if text.is_empty() || text.contains(&b'/') {
                    return Err(invalid("is not a single non-empty name"));
                }
                if text.len() >= FILE_PATH_LEN {
                    return Err(invalid("is longer than the kernel's path buffer"));
                }
                if rule.kind == FileRuleKind::BasenamePrefix {
                    if text.len() > 63 {
                        return Err(invalid("basename prefixes are at most 63 bytes"));
                    }
                    out.basename_prefix_lens |= 1u64 << text.len();
                }
                let key = (rule.kind as u32, agt_jail_common::name_hash(text), text.len() as u32);
                merge(out.names.entry(key).or_default(), &value);
            }
        }
    }
    // The trie returns only the longest match: fold every directory rule into the
    // entries below it, so that match carries every rule that applies.
    let snapshot: Vec<(Vec<u8>, FileRuleValue)> = out.paths.iter().map(|(k, v)| (k.clone(), *v)).collect();
    for (path, value) in out.paths.iter_mut() {
        for (dir, dir_value) in &snapshot {
            if dirs.contains(dir) && path.len() > dir.len() && path.starts_with(dir) {
                merge(value, dir_value);
            }
        }
    }
    Ok(out)
}

/// The loaded file LSM programs.
pub struct FileLsm {
    group: Group,
    unavailable: Unavailable,
}

impl FileLsm {
    pub fn load(programs: &mut AgentPrograms) -> Result<Self, LoaderError> {
        Self::load_with_btf(programs, Path::new(KernelOffsets::VMLINUX))
    }

    /// Loads the `file_open` and `path_*` hooks the kernel accepts; see
    /// [`FileLsm::unavailable`] for those it refused (no `bpf_d_path` for the `path_*` hooks
    /// on 6.1, nor for `file_open` on 5.10). The fanotify plane holds every file rule
    /// anyway; the hooks only deny earlier, so a refused one is reported, not fatal.
    pub fn load_with_btf(programs: &mut AgentPrograms, vmlinux: &Path) -> Result<Self, LoaderError> {
        let optional: Vec<&'static str> = std::iter::once(FILE_OPEN_HOOK).chain(FILE_PATH_HOOKS).collect();
        let (group, unavailable) = Group::load(programs, vmlinux, &[], &optional)?;
        Ok(Self { group, unavailable })
    }

    /// Hooks this kernel refused, with the kernel's reason: their operations (unlink,
    /// rename, mkdir) are not mediated by path rules here.
    pub fn unavailable(&self) -> &[(&'static str, String)] {
        &self.unavailable
    }

    pub fn attach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        self.group.attach(programs)
    }

    pub fn detach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        self.group.detach(programs)
    }

    /// Replaces agent `agent_id`'s path rules with `rules` and turns file rules on for it.
    pub fn install_file_rules(
        programs: &mut AgentPrograms,
        agent_id: u64,
        rules: &[FileRule],
    ) -> Result<(), LoaderError> {
        let compiled = compile_file_rules(rules).map_err(|err| map_error(PATHS_MAP, err))?;
        {
            let map =
                programs.ebpf_mut().map_mut(PATHS_MAP).ok_or(LoaderError::Missing { what: "map", name: PATHS_MAP })?;
            let mut trie: LpmTrie<&mut MapData, FilePathData, FileRuleValue> =
                LpmTrie::try_from(map).map_err(|err| map_error(PATHS_MAP, err))?;
            let stale: Vec<LpmKey<FilePathData>> =
                trie.keys().filter_map(Result::ok).filter(|key| key.data().agent_id == agent_id).collect();
            for key in stale {
                trie.remove(&key).map_err(|err| map_error(PATHS_MAP, err))?;
            }
            for (bytes, value) in &compiled.paths {
                let mut data = FilePathData { agent_id, path: [0; FILE_PATH_LEN] };
                data.path[..bytes.len()].copy_from_slice(bytes);
                let key = LpmKey::new(FILE_PATH_FIXED_BITS + 8 * bytes.len() as u32, data);
                trie.insert(&key, *value, 0).map_err(|err| map_error(PATHS_MAP, err))?;
            }
        }
        {
            let mut names = hash_map::<FileNameKey, FileRuleValue>(programs, NAMES_MAP)?;
            let stale: Vec<FileNameKey> =
                names.keys().filter_map(Result::ok).filter(|key| key.agent_id == agent_id).collect();
            for key in stale {
                names.remove(&key).map_err(|err| map_error(NAMES_MAP, err))?;
            }
            for (&(kind, hash, len), value) in &compiled.names {
                names
                    .insert(FileNameKey { agent_id, hash, len, kind }, *value, 0)
                    .map_err(|err| map_error(NAMES_MAP, err))?;
            }
        }
        add_agent_flags(programs, agent_id, AGENT_FLAG_FILE_RULES, compiled.basename_prefix_lens)
    }
}

/// Guard flags of [`GuardLsm::enable`].
pub mod guard {
    pub use agt_jail_common::{
        AGENT_FLAG_DENY_BPF as DENY_BPF, AGENT_FLAG_DENY_FOREIGN_SIGNALS as DENY_FOREIGN_SIGNALS,
        AGENT_FLAG_DENY_FOREIGN_SOCKETS as DENY_FOREIGN_SOCKETS, AGENT_FLAG_DENY_KERNEL_LOAD as DENY_KERNEL_LOAD,
        AGENT_FLAG_DENY_MOUNT as DENY_MOUNT, AGENT_FLAG_DENY_PTRACE as DENY_PTRACE,
    };
}

const GUARD_FLAGS: u32 = AGENT_FLAG_DENY_PTRACE
    | AGENT_FLAG_DENY_FOREIGN_SIGNALS
    | AGENT_FLAG_DENY_MOUNT
    | AGENT_FLAG_DENY_BPF
    | AGENT_FLAG_DENY_KERNEL_LOAD
    | AGENT_FLAG_DENY_FOREIGN_SOCKETS;

/// The loaded guard programs.
pub struct GuardLsm {
    group: Group,
}

impl GuardLsm {
    pub fn load(programs: &mut AgentPrograms) -> Result<Self, LoaderError> {
        Self::load_with_btf(programs, Path::new(KernelOffsets::VMLINUX))
    }

    pub fn load_with_btf(programs: &mut AgentPrograms, vmlinux: &Path) -> Result<Self, LoaderError> {
        let (group, _) = Group::load(programs, vmlinux, &GUARD_HOOKS, &[])?;
        Ok(Self { group })
    }

    pub fn attach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        self.group.attach(programs)
    }

    pub fn detach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        self.group.detach(programs)
    }

    /// Turns on `flags` (the [`guard`] constants, OR-ed) for agent `agent_id`.
    pub fn enable(programs: &mut AgentPrograms, agent_id: u64, flags: u32) -> Result<(), LoaderError> {
        if flags & !GUARD_FLAGS != 0 {
            return Err(map_error(AGENTS_MAP, format!("{flags:#x} holds bits that are not guard flags")));
        }
        add_agent_flags(programs, agent_id, flags, 0)
    }
}

fn add_agent_flags(
    programs: &mut AgentPrograms,
    agent_id: u64,
    flags: u32,
    prefix_lens: u64,
) -> Result<(), LoaderError> {
    let mut agents = hash_map::<u64, LsmAgentConfig>(programs, AGENTS_MAP)?;
    let mut config = agents.get(&agent_id, 0).unwrap_or_default();
    config.flags |= flags;
    if flags & AGENT_FLAG_FILE_RULES != 0 {
        config.basename_prefix_lens = prefix_lens;
    }
    agents.insert(agent_id, config, 0).map_err(|err| map_error(AGENTS_MAP, err))
}

/// Fills `LSM_OFFSETS` from the kernel's BTF and freezes it, once per loaded object.
fn ensure_offsets(
    programs: &mut AgentPrograms,
    offsets: Option<LsmOffsets>,
    vmlinux: &Path,
) -> Result<(), LoaderError> {
    let map =
        programs.ebpf_mut().map_mut(OFFSETS_MAP).ok_or(LoaderError::Missing { what: "map", name: OFFSETS_MAP })?;
    let mut array: Array<&mut MapData, [u64; MEMBERS.len()]> =
        Array::try_from(map).map_err(|err| map_error(OFFSETS_MAP, err))?;
    if array.get(&0, 0).map_err(|err| map_error(OFFSETS_MAP, err))?[0] != 0 {
        return Ok(());
    }
    let offsets = match offsets {
        Some(offsets) => offsets,
        // Read again for the located reason.
        None => LsmOffsets::from_btf_file(vmlinux)?,
    };
    array.set(0, offsets.0, 0).map_err(|err| map_error(OFFSETS_MAP, err))?;
    let map = programs.ebpf_mut().map(OFFSETS_MAP).ok_or(LoaderError::Missing { what: "map", name: OFFSETS_MAP })?;
    let aya::maps::Map::Array(data) = map else {
        return Err(LoaderError::Missing { what: "array map", name: OFFSETS_MAP });
    };
    crate::sys::freeze_map(data.fd().as_fd()).map_err(|err| map_error(OFFSETS_MAP, format!("cannot freeze: {err}")))
}

fn lsm_program<'a>(programs: &'a mut AgentPrograms, name: &'static str) -> Result<&'a mut Lsm, LoaderError> {
    let program = programs.ebpf_mut().program_mut(name).ok_or(LoaderError::Missing { what: "program", name })?;
    program.try_into().map_err(|_| LoaderError::Missing { what: "LSM program", name })
}

fn hash_map<'a, K: aya::Pod, V: aya::Pod>(
    programs: &'a mut AgentPrograms,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>, LoaderError> {
    let map = programs.ebpf_mut().map_mut(name).ok_or(LoaderError::Missing { what: "map", name })?;
    HashMap::try_from(map).map_err(|err| map_error(name, err))
}

fn map_error(map: &'static str, err: impl std::fmt::Display) -> LoaderError {
    LoaderError::Map { map, message: err.to_string() }
}

/// The verifier's log runs to hundreds of lines; keep its reason (the last lines that
/// are not statistics), on one line.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("verification time")
                && !line.starts_with("stack depth")
                && !line.starts_with("processed ")
        })
        .collect();
    let keep = lines.len().saturating_sub(3);
    lines[keep..].join(" / ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kernel_dev_encoding() {
        // makedev(8, 1) in glibc's encoding → MKDEV(8, 1) = 8 << 20 | 1.
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(0, 27)), 27);
        assert_eq!(kernel_dev(libc::makedev(259, 70000)), (259 << 20) | 70000);
    }

    #[test]
    fn running_kernel_has_the_members_the_programs_read() {
        let path = Path::new(KernelOffsets::VMLINUX);
        if !path.exists() {
            eprintln!("SKIP: no kernel BTF on this machine");
            return;
        }
        let offsets = LsmOffsets::from_btf_file(path).unwrap();
        // linux_binprm.file and .filename are never the first member; file.f_inode neither.
        assert!(offsets.0[0] > 0 && offsets.0[1] > 0 && offsets.0[2] > 0, "{offsets:?}");
        // Every offset fits the mask the programs apply.
        assert!(offsets.0.iter().all(|off| *off <= 0xffff), "{offsets:?}");
    }

    #[test]
    fn missing_btf_is_an_error() {
        assert!(LsmOffsets::from_btf_file(Path::new("/nonexistent/vmlinux")).is_err());
    }

    fn rule(kind: FileRuleKind, text: &str, access_mask: u32, rule_index: u32) -> FileRule {
        FileRule { kind, text: text.into(), access_mask, rule_index }
    }

    #[test]
    fn directory_rules_fold_into_entries_below_them() {
        let compiled = compile_file_rules(&[
            rule(FileRuleKind::Prefix, "/home/u/", FILE_ACCESS_UNLINK, 0),
            rule(FileRuleKind::Exact, "/home/u/notes", FILE_ACCESS_READ, 1),
            rule(FileRuleKind::Prefix, "/home/u/keys", FILE_ACCESS_READ | FILE_ACCESS_UNLINK, 2),
        ])
        .unwrap();
        let dir = &compiled.paths[&b"/home/u/".to_vec()];
        assert_eq!(dir.access_mask, FILE_ACCESS_UNLINK);
        let notes = &compiled.paths[&b"/home/u/notes\0".to_vec()];
        assert_eq!(notes.access_mask, FILE_ACCESS_READ | FILE_ACCESS_UNLINK);
        assert_eq!((notes.rule_index[0], notes.rule_index[2]), (1, 0));
        assert_eq!(notes.rule_kind[2], FileRuleKind::Prefix as u8);
        let keys = &compiled.paths[&b"/home/u/keys/".to_vec()];
        // Unlink: rule 0 comes first, though rule 2 is the longer match.
        assert_eq!((keys.rule_index[0], keys.rule_index[2]), (2, 0));
        assert!(compiled.paths.contains_key(b"/home/u/keys\0".as_slice()));
    }

    #[test]
    fn names_are_hashed_and_prefix_lengths_recorded() {
        let compiled = compile_file_rules(&[
            rule(FileRuleKind::Component, ".ssh", FILE_ACCESS_READ, 3),
            rule(FileRuleKind::BasenamePrefix, ".env.", FILE_ACCESS_READ | FILE_ACCESS_WRITE, 4),
            rule(FileRuleKind::Basename, "id_rsa", FILE_ACCESS_READ, 5),
        ])
        .unwrap();
        assert_eq!(compiled.basename_prefix_lens, 1 << 5);
        let key = (FileRuleKind::Component as u32, agt_jail_common::name_hash(b".ssh"), 4);
        assert_eq!(compiled.names[&key].rule_index[0], 3);
        assert_eq!(compiled.names.len(), 3);
    }

    #[test]
    fn bad_rules_are_refused_with_their_index() {
        for (kind, text, reason) in [
            (FileRuleKind::Exact, "relative/path", "absolute"),
            (FileRuleKind::Prefix, "/a/../b", "normalized"),
            (FileRuleKind::Component, "a/b", "single"),
            (FileRuleKind::Basename, "", "single"),
            (FileRuleKind::BasenamePrefix, &"x".repeat(64), "63"),
        ] {
            let err = compile_file_rules(&[rule(kind, text, FILE_ACCESS_READ, 9)]).unwrap_err();
            assert!(err.to_string().contains("rule 9") && err.to_string().contains(reason), "{err}");
        }
        let long = format!("/{}", "a".repeat(FILE_PATH_LEN));
        assert!(compile_file_rules(&[rule(FileRuleKind::Exact, &long, FILE_ACCESS_READ, 1)]).is_err());
        assert!(compile_file_rules(&[rule(FileRuleKind::Exact, "/a", 0, 1)]).is_err());
    }
}
