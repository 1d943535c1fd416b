//! Tier A exec enforcement: the `lsm/bprm_check_security` program.
//!
//! The program denies an agent's exec of a file by its identity (device + inode of the
//! file the kernel opened to run), so renames and hard links do not evade a rule and
//! there is no path race. It exists only where the kernel accepts BPF LSM programs
//! (`bpf` in the active LSM list and BPF_PROG_TYPE_LSM allowed), so it is loaded on
//! demand: [`ExecLsm::load`] after [`AgentPrograms::load`], never as part of it. A kernel
//! that refuses it (Tier B) reports a [`LoaderError::Program`] and everything else keeps
//! running.
//!
//! Sequence: `ExecLsm::load` (fills the offsets the program reads, loads it) →
//! `attach` → `deny_exec` rules (effective from the next exec) → `detach`.
use std::{os::unix::fs::MetadataExt, path::Path};

use agt_jail_common::{ExecRuleKey, RULE_DENY};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{lsm::LsmLinkId, Lsm},
    Btf,
};

use crate::{btf::StructLookup, AgentPrograms, KernelOffsets, LoaderError, OffsetError};

/// The program's name in the object (its function name).
pub const EXEC_LSM_PROGRAM: &str = "bprm_check_security";
/// The LSM hook it attaches to.
pub const EXEC_LSM_HOOK: &str = "bprm_check_security";
const OFFSETS_MAP: &str = "LSM_OFFSETS";
const DENY_MAP: &str = "EXEC_DENY";

/// The kernel struct member offsets the program reads, in `LSM_OFFSETS` index order
/// (keep in step with `ebpf/agt-jail-ebpf/src/lsm.rs`).
const MEMBERS: [(&str, &str); 6] = [
    ("linux_binprm", "file"),
    ("linux_binprm", "filename"),
    ("file", "f_inode"),
    ("inode", "i_ino"),
    ("inode", "i_sb"),
    ("super_block", "s_dev"),
];

/// Byte offsets of [`MEMBERS`] in the running kernel, read from its BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LsmOffsets(pub [u64; MEMBERS.len()]);

impl LsmOffsets {
    pub fn from_btf_file(path: &Path) -> Result<Self, OffsetError> {
        let btf = btf_rs::Btf::from_file(path)
            .map_err(|err| OffsetError::Read { path: path.to_path_buf(), message: err.to_string() })?;
        let lookup = StructLookup { btf: &btf, path };
        let mut offsets = [0u64; MEMBERS.len()];
        for (slot, (strukt, member)) in offsets.iter_mut().zip(MEMBERS) {
            *slot = lookup.member_offset(strukt, member)?;
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
        Ok(Self { dev: kernel_dev(meta.dev()), ino: meta.ino() })
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

/// The loaded exec LSM program and, while attached, its link.
pub struct ExecLsm {
    link: Option<LsmLinkId>,
}

impl ExecLsm {
    /// Loads the program into the kernel with offsets from the running kernel's BTF.
    /// Fails with [`LoaderError::Program`] where the kernel refuses BPF LSM programs.
    pub fn load(programs: &mut AgentPrograms) -> Result<Self, LoaderError> {
        Self::load_with_btf(programs, Path::new(KernelOffsets::VMLINUX))
    }

    pub fn load_with_btf(programs: &mut AgentPrograms, vmlinux: &Path) -> Result<Self, LoaderError> {
        let offsets = LsmOffsets::from_btf_file(vmlinux)?;
        let btf = Btf::parse_file(vmlinux, aya::Endianness::default())
            .map_err(|err| LoaderError::KernelBtf(err.to_string()))?;
        let bpf = programs.ebpf_mut();
        {
            let map = bpf.map_mut(OFFSETS_MAP).ok_or(LoaderError::Missing { what: "map", name: OFFSETS_MAP })?;
            let mut array: Array<&mut MapData, u64> =
                Array::try_from(map).map_err(|err| map_error(OFFSETS_MAP, err))?;
            for (index, value) in (0u32..).zip(offsets.0) {
                array.set(index, value, 0).map_err(|err| map_error(OFFSETS_MAP, err))?;
            }
        }
        let program = lsm_program(programs)?;
        program.load(EXEC_LSM_HOOK, &btf).map_err(program_error)?;
        Ok(Self { link: None })
    }

    /// Attaches the program: from now on every exec of a registered agent is checked.
    /// Attaching twice is a no-op.
    pub fn attach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        if self.link.is_some() {
            return Ok(());
        }
        let link = lsm_program(programs)?
            .attach()
            .map_err(|err| LoaderError::Attach { program: EXEC_LSM_PROGRAM, message: err.to_string() })?;
        self.link = Some(link);
        Ok(())
    }

    /// Detaches the program (execs are no longer checked); the rules stay in the map.
    pub fn detach(&mut self, programs: &mut AgentPrograms) -> Result<(), LoaderError> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        lsm_program(programs)?
            .detach(link)
            .map_err(|err| LoaderError::Attach { program: EXEC_LSM_PROGRAM, message: err.to_string() })
    }

    pub fn is_attached(&self) -> bool {
        self.link.is_some()
    }

    /// Denies agent `agent_id` the exec of `file`, from its next exec on.
    pub fn deny_exec(programs: &mut AgentPrograms, agent_id: u64, file: ExecIdentity) -> Result<(), LoaderError> {
        deny_map(programs)?.insert(file.key(agent_id), RULE_DENY, 0).map_err(|err| map_error(DENY_MAP, err))
    }

    /// Removes a deny rule; removing one that does not exist is not an error.
    pub fn allow_exec(programs: &mut AgentPrograms, agent_id: u64, file: ExecIdentity) -> Result<(), LoaderError> {
        let mut map = deny_map(programs)?;
        match map.remove(&file.key(agent_id)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(map_error(DENY_MAP, err)),
        }
    }
}

fn lsm_program(programs: &mut AgentPrograms) -> Result<&mut Lsm, LoaderError> {
    let program = programs
        .ebpf_mut()
        .program_mut(EXEC_LSM_PROGRAM)
        .ok_or(LoaderError::Missing { what: "program", name: EXEC_LSM_PROGRAM })?;
    program.try_into().map_err(|_| LoaderError::Missing { what: "LSM program", name: EXEC_LSM_PROGRAM })
}

fn deny_map(programs: &mut AgentPrograms) -> Result<HashMap<&mut MapData, ExecRuleKey, u32>, LoaderError> {
    let map = programs.ebpf_mut().map_mut(DENY_MAP).ok_or(LoaderError::Missing { what: "map", name: DENY_MAP })?;
    HashMap::try_from(map).map_err(|err| map_error(DENY_MAP, err))
}

fn map_error(map: &'static str, err: impl std::fmt::Display) -> LoaderError {
    LoaderError::Map { map, message: err.to_string() }
}

fn program_error(err: impl std::fmt::Display) -> LoaderError {
    LoaderError::Program { program: EXEC_LSM_PROGRAM, message: err.to_string() }
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
    fn running_kernel_has_the_members_the_program_reads() {
        let path = Path::new(KernelOffsets::VMLINUX);
        if !path.exists() {
            eprintln!("SKIP: no kernel BTF on this machine");
            return;
        }
        let offsets = LsmOffsets::from_btf_file(path).unwrap();
        // linux_binprm.file and .filename are never the first member; file.f_inode neither.
        assert!(offsets.0[0] > 0 && offsets.0[1] > 0 && offsets.0[2] > 0, "{offsets:?}");
    }

    #[test]
    fn missing_btf_is_an_error() {
        assert!(LsmOffsets::from_btf_file(Path::new("/nonexistent/vmlinux")).is_err());
    }
}
