//! Kernel struct offsets read from BTF at load time.
//!
//! Rust eBPF has no CO-RE field relocations, so the programs receive the offsets they
//! need as load-time constants; this module finds them in the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), so one object works across kernel versions.
use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("cannot read kernel BTF {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("kernel BTF {path} has no struct {name}")]
    NoStruct { path: PathBuf, name: String },
    #[error("kernel BTF {path}: struct {name} has no member {member}")]
    NoMember { path: PathBuf, name: String, member: String },
    #[error("kernel BTF {path}: {name}.{member} is a bitfield, not a byte-addressable field")]
    Bitfield { path: PathBuf, name: String, member: String },
}

/// The byte offsets the eBPF programs read through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct linux_binprm` → `filename` (const char *).
    pub binprm_filename: u64,
    /// `struct task_struct` → `pid`, `tgid`, `real_parent`, `exit_code`.
    pub task_pid: u64,
    pub task_tgid: u64,
    pub task_real_parent: u64,
    pub task_exit_code: u64,
    /// The way from a task to its executable: `task_struct.mm`, `mm_struct.exe_file`,
    /// `file.f_path`, `path.mnt`, `path.dentry`, `dentry.d_inode`, `inode.i_ino`.
    pub task_mm: u64,
    pub mm_exe_file: u64,
    pub file_path: u64,
    pub path_mnt: u64,
    pub path_dentry: u64,
    pub dentry_inode: u64,
    pub inode_ino: u64,
}

impl KernelOffsets {
    /// The running kernel's BTF.
    pub const VMLINUX: &'static str = "/sys/kernel/btf/vmlinux";

    pub fn from_btf_file(path: &Path) -> Result<Self, OffsetError> {
        let btf = Btf::from_file(path)
            .map_err(|err| OffsetError::Read { path: path.to_path_buf(), message: err.to_string() })?;
        let lookup = StructLookup { btf: &btf, path };
        Ok(Self {
            binprm_filename: lookup.member_offset("linux_binprm", "filename")?,
            task_pid: lookup.member_offset("task_struct", "pid")?,
            task_tgid: lookup.member_offset("task_struct", "tgid")?,
            task_real_parent: lookup.member_offset("task_struct", "real_parent")?,
            task_exit_code: lookup.member_offset("task_struct", "exit_code")?,
            task_mm: lookup.member_offset("task_struct", "mm")?,
            mm_exe_file: lookup.member_offset("mm_struct", "exe_file")?,
            file_path: lookup.member_offset("file", "f_path")?,
            path_mnt: lookup.member_offset("path", "mnt")?,
            path_dentry: lookup.member_offset("path", "dentry")?,
            dentry_inode: lookup.member_offset("dentry", "d_inode")?,
            inode_ino: lookup.member_offset("inode", "i_ino")?,
        })
    }
}

/// Finds struct member offsets in one parsed BTF file (shared by every program's loader).
pub(crate) struct StructLookup<'a> {
    pub(crate) btf: &'a Btf,
    pub(crate) path: &'a Path,
}

impl StructLookup<'_> {
    /// Byte offset of `member` in `struct name`, looking through anonymous structs and unions.
    pub(crate) fn member_offset(&self, name: &str, member: &str) -> Result<u64, OffsetError> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        let strukt = types
            .into_iter()
            .find_map(|ty| match ty {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| OffsetError::NoStruct { path: self.path.to_path_buf(), name: name.to_string() })?;
        let bits = self.find_member_bits(&strukt, member, 0).ok_or_else(|| OffsetError::NoMember {
            path: self.path.to_path_buf(),
            name: name.to_string(),
            member: member.to_string(),
        })?;
        if bits % 8 != 0 {
            return Err(OffsetError::Bitfield {
                path: self.path.to_path_buf(),
                name: name.to_string(),
                member: member.to_string(),
            });
        }
        Ok(bits / 8)
    }

    fn find_member_bits(&self, strukt: &btf_rs::Struct, member: &str, base: u64) -> Option<u64> {
        for candidate in &strukt.members {
            let offset = base + u64::from(candidate.bit_offset());
            let name = self.btf.resolve_name(candidate).unwrap_or_default();
            if name == member {
                return Some(offset);
            }
            if name.is_empty() {
                // An anonymous struct or union: its members belong to the outer struct.
                if let Ok(Type::Struct(inner) | Type::Union(inner)) = self.btf.resolve_chained_type(candidate) {
                    if let Some(found) = self.find_member_bits(&inner, member, offset) {
                        return Some(found);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn missing_btf_file_is_a_located_error() {
        let err = KernelOffsets::from_btf_file(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn garbage_btf_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("agt-jail-btf-{}", std::process::id()));
        std::fs::write(&dir, b"not btf at all").unwrap();
        let result = KernelOffsets::from_btf_file(&dir);
        let _ = std::fs::remove_file(&dir);
        assert!(result.is_err());
    }

    #[test]
    fn running_kernel_has_binprm_filename() {
        let path = Path::new(KernelOffsets::VMLINUX);
        if !path.exists() {
            eprintln!("SKIP: no kernel BTF on this machine");
            return;
        }
        let offsets = KernelOffsets::from_btf_file(path).unwrap();
        // linux_binprm starts with other fields; filename is never first.
        assert!(offsets.binprm_filename > 0);
        // Four distinct task_struct members, none at the start (thread_info/state come first).
        let task = [offsets.task_pid, offsets.task_tgid, offsets.task_real_parent, offsets.task_exit_code];
        assert!(task.iter().all(|&offset| offset > 0), "{offsets:?}");
        assert_eq!(offsets.task_tgid, offsets.task_pid + 4, "pid and tgid are adjacent pid_t fields");
        // struct path is { mnt, dentry }; the rest of the way to the executable is past
        // each struct's first member.
        assert_eq!((offsets.path_mnt, offsets.path_dentry), (0, 8));
        assert!([offsets.task_mm, offsets.mm_exe_file, offsets.file_path, offsets.dentry_inode, offsets.inode_ino]
            .iter()
            .all(|&offset| offset > 0));
    }
}
