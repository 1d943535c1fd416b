//! Kernel struct offsets read from BTF at load time.
//!
//! Rust eBPF has no CO-RE field relocations, so the programs receive the offsets they
//! need as load-time constants; this module finds them in the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), so one object works across kernel versions.
use std::path::{Path, PathBuf};

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
        Self::from_btf(&KernelBtf::read(path)?)
    }

    pub(crate) fn from_btf(btf: &KernelBtf) -> Result<Self, OffsetError> {
        Ok(Self {
            binprm_filename: btf.member_offset("linux_binprm", "filename")?,
            task_pid: btf.member_offset("task_struct", "pid")?,
            task_tgid: btf.member_offset("task_struct", "tgid")?,
            task_real_parent: btf.member_offset("task_struct", "real_parent")?,
            task_exit_code: btf.member_offset("task_struct", "exit_code")?,
            task_mm: btf.member_offset("task_struct", "mm")?,
            mm_exe_file: btf.member_offset("mm_struct", "exe_file")?,
            file_path: btf.member_offset("file", "f_path")?,
            path_mnt: btf.member_offset("path", "mnt")?,
            path_dentry: btf.member_offset("path", "dentry")?,
            dentry_inode: btf.member_offset("dentry", "d_inode")?,
            inode_ino: btf.member_offset("inode", "i_ino")?,
        })
    }
}

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_BYTES: usize = 24;
const TYPE_BYTES: usize = 12;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
const KIND_PTR: u32 = 2;
/// Chains of typedef/const/volatile longer than this are corrupt (the kernel's own limit is 32).
const MAX_CHAIN: usize = 32;

/// The kernel's BTF, read once and walked in place.
///
/// The loader needs a dozen struct member offsets and the ids of the functions and
/// typedefs its programs attach by: an index of where each type starts (4 bytes per type)
/// is all it keeps besides the file, instead of a parsed object graph of ~150,000 types
/// (which was most of the loader's start-up time and memory).
pub(crate) struct KernelBtf {
    path: PathBuf,
    data: Vec<u8>,
    /// Byte position (in `data`) of each type; index 0 stands for `void`.
    types: Vec<u32>,
    strings: std::ops::Range<usize>,
    /// The first struct with members of each name (declarations have none).
    structs: std::collections::HashMap<Vec<u8>, u32>,
}

/// One type's fixed part.
#[derive(Clone, Copy)]
struct TypeHead {
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_type: u32,
    /// Where the kind-specific part starts.
    rest: usize,
}

impl KernelBtf {
    pub(crate) fn read(path: &Path) -> Result<Self, OffsetError> {
        let data = std::fs::read(path)
            .map_err(|err| OffsetError::Read { path: path.to_path_buf(), message: err.to_string() })?;
        Self::parse(path, data)
    }

    fn parse(path: &Path, data: Vec<u8>) -> Result<Self, OffsetError> {
        let bad = |message: &str| OffsetError::Read { path: path.to_path_buf(), message: message.to_string() };
        if data.len() < HEADER_BYTES || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err(bad("not little-endian BTF (bad magic)"));
        }
        let word = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let (hdr_len, type_off, type_len, str_off, str_len) = (word(4), word(8), word(12), word(16), word(20));
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or_else(|| bad("section offset overflows"))?;
            let end = start.checked_add(len).filter(|&end| end <= data.len());
            end.map(|end| start..end).ok_or_else(|| bad("section past the end of the file"))
        };
        let type_range = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut types = vec![0u32];
        let mut at = type_range.start;
        while at < type_range.end {
            if at + TYPE_BYTES > type_range.end {
                return Err(bad("truncated type"));
            }
            let info = word(at + 4) as u32;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_PTR | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC | 16
                | KIND_TYPE_TAG => 0,
                _ => return Err(bad(&format!("unknown type kind {kind}"))),
            };
            types.push(u32::try_from(at).map_err(|_| bad("file too large"))?);
            at += TYPE_BYTES + extra;
        }
        if at != type_range.end {
            return Err(bad("type section ends inside a type"));
        }
        let mut btf = Self { path: path.to_path_buf(), data, types, strings, structs: Default::default() };
        let mut structs = std::collections::HashMap::new();
        for id in 1..btf.types.len() as u32 {
            if let Some(head) = btf.head(id).filter(|head| head.kind == KIND_STRUCT && head.vlen > 0) {
                structs.entry(btf.name(head.name).to_vec()).or_insert(id);
            }
        }
        btf.structs = structs;
        Ok(btf)
    }

    fn word(&self, at: usize) -> u32 {
        u32::from_le_bytes([self.data[at], self.data[at + 1], self.data[at + 2], self.data[at + 3]])
    }

    fn head(&self, id: u32) -> Option<TypeHead> {
        let at = *self.types.get(id as usize)? as usize;
        if id == 0 {
            return None;
        }
        let info = self.word(at + 4);
        Some(TypeHead {
            name: self.word(at),
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_type: self.word(at + 8),
            rest: at + TYPE_BYTES,
        })
    }

    /// The name at `offset` of the string section ("" when out of range or unterminated).
    fn name(&self, offset: u32) -> &[u8] {
        let start = self.strings.start.saturating_add(offset as usize);
        if start >= self.strings.end {
            return b"";
        }
        let tail = &self.data[start..self.strings.end];
        tail.iter().position(|&b| b == 0).map_or(b"", |end| &tail[..end])
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs and unions.
    pub(crate) fn member_offset(&self, name: &str, member: &str) -> Result<u64, OffsetError> {
        let strukt = self
            .structs
            .get(name.as_bytes())
            .and_then(|&id| self.head(id))
            .ok_or_else(|| OffsetError::NoStruct { path: self.path.clone(), name: name.to_string() })?;
        let bits = self.find_member_bits(strukt, member, 0, 0).ok_or_else(|| OffsetError::NoMember {
            path: self.path.clone(),
            name: name.to_string(),
            member: member.to_string(),
        })?;
        if bits % 8 != 0 {
            return Err(OffsetError::Bitfield {
                path: self.path.clone(),
                name: name.to_string(),
                member: member.to_string(),
            });
        }
        Ok(bits / 8)
    }

    fn find_member_bits(&self, strukt: TypeHead, member: &str, base: u64, depth: usize) -> Option<u64> {
        if depth > MAX_CHAIN {
            return None;
        }
        for index in 0..strukt.vlen {
            let at = strukt.rest + 12 * index;
            let (name, ty, raw_offset) = (self.word(at), self.word(at + 4), self.word(at + 8));
            // With kind_flag the top 8 bits are the bitfield size; the rest the bit offset.
            let bit_offset = if strukt.kind_flag { raw_offset & 0x00ff_ffff } else { raw_offset };
            let offset = base + u64::from(bit_offset);
            let name = self.name(name);
            if name == member.as_bytes() {
                return Some(offset);
            }
            if name.is_empty() {
                // An anonymous struct or union: its members belong to the outer struct.
                if let Some(inner) = self.resolve(ty).filter(|h| matches!(h.kind, KIND_STRUCT | KIND_UNION)) {
                    if let Some(found) = self.find_member_bits(inner, member, offset, depth + 1) {
                        return Some(found);
                    }
                }
            }
        }
        None
    }

    /// The type `id` names once typedefs and qualifiers are looked through.
    fn resolve(&self, mut id: u32) -> Option<TypeHead> {
        for _ in 0..MAX_CHAIN {
            let head = self.head(id)?;
            match head.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = head.size_type,
                _ => return Some(head),
            }
        }
        None
    }

    /// A BTF object for aya to take attach ids from: the typedefs `btf_trace_*` (tracing
    /// programs) and functions `bpf_lsm_*` (LSM programs) at their ids in the kernel's BTF,
    /// every other id a placeholder (`void *`). aya only looks these up by name and kind,
    /// so parsing the kernel's whole BTF into aya's types is not needed.
    pub(crate) fn attach_targets(&self) -> Result<aya::Btf, crate::LoaderError> {
        let wanted = |head: &TypeHead| {
            let name = self.name(head.name);
            (head.kind == KIND_TYPEDEF && name.starts_with(b"btf_trace_"))
                || (head.kind == KIND_FUNC && name.starts_with(b"bpf_lsm_"))
        };
        let mut strings = vec![0u8];
        let mut types = Vec::with_capacity(self.types.len() * TYPE_BYTES);
        let last =
            (1..self.types.len() as u32).rev().find(|&id| self.head(id).is_some_and(|head| wanted(&head))).unwrap_or(0);
        for id in 1..=last {
            let head = self.head(id).ok_or(crate::LoaderError::KernelBtf(format!("type {id} missing")))?;
            let (name, info) = if wanted(&head) {
                let offset = u32::try_from(strings.len())
                    .map_err(|_| crate::LoaderError::KernelBtf("string section too large".into()))?;
                strings.extend_from_slice(self.name(head.name));
                strings.push(0);
                (offset, head.kind << 24)
            } else {
                (0, KIND_PTR << 24)
            };
            // The referenced type is not looked at by aya's lookups: void.
            for word in [name, info, 0] {
                types.extend_from_slice(&word.to_le_bytes());
            }
        }
        let mut blob = Vec::with_capacity(HEADER_BYTES + types.len() + strings.len());
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for word in [HEADER_BYTES, 0, types.len(), types.len(), strings.len()] {
            let word = u32::try_from(word).map_err(|_| crate::LoaderError::KernelBtf("BTF too large".into()))?;
            blob.extend_from_slice(&word.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        aya::Btf::parse(&blob, aya::Endianness::default()).map_err(|err| crate::LoaderError::KernelBtf(err.to_string()))
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

    /// A BTF blob from (name, info, size/type, extra words) types and their names.
    fn blob(types: &[(&str, u32, u32, &[u32])]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name_of = |name: &str| {
            if name.is_empty() {
                return 0;
            }
            let offset = strings.len() as u32;
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
            offset
        };
        let mut section = Vec::new();
        for (name, info, size_type, extra) in types {
            for word in [name_of(name), *info, *size_type].iter().chain(extra.iter()) {
                section.extend_from_slice(&word.to_le_bytes());
            }
        }
        let mut out = vec![0x9f, 0xeb, 1, 0];
        for word in [24, 0, section.len() as u32, section.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&section);
        out.extend_from_slice(&strings);
        out
    }

    /// A struct declaration before the definition, an anonymous union behind a typedef,
    /// bitfields (kind_flag), and attach targets.
    fn synthetic() -> KernelBtf {
        // Members reuse the names of earlier types: "pid" at 6, "flags" at 10, "bits" at 16.
        let kind = |kind: u32, vlen: u32, flag: bool| (kind << 24) | vlen | if flag { 1 << 31 } else { 0 };
        let data = blob(&[
            ("task", kind(KIND_STRUCT, 0, false), 0, &[]), // 1: declaration
            ("pid", kind(KIND_INT, 0, false), 4, &[32]),   // 2
            ("flags", kind(KIND_INT, 0, false), 4, &[32]), // 3
            ("bits", kind(KIND_INT, 0, false), 4, &[32]),  // 4
            // 5: union { int flags; int pid; }
            ("", kind(KIND_UNION, 2, false), 4, &[10, 2, 0, 6, 2, 0]),
            ("union_t", kind(KIND_CONST, 0, false), 5, &[]), // 6: const -> 5
            // 7: struct task { flags:3; union_t; bits:5 at bit 3 } (kind_flag offsets).
            ("task", kind(KIND_STRUCT, 3, true), 16, &[10, 3, 3 << 24, 0, 6, 64, 16, 4, (5 << 24) | 3]),
            ("btf_trace_x", kind(KIND_TYPEDEF, 0, false), 0, &[]), // 8
            ("bpf_lsm_y", kind(KIND_FUNC, 0, false), 0, &[]),      // 9
            ("other", kind(KIND_TYPEDEF, 0, false), 0, &[]),       // 10
        ]);
        KernelBtf::parse(Path::new("synthetic"), data).unwrap()
    }

    #[test]
    fn member_offsets_look_through_anonymous_members_and_refuse_bitfields() {
        let btf = synthetic();
        assert_eq!(btf.member_offset("task", "flags").unwrap(), 0);
        assert_eq!(btf.member_offset("task", "pid").unwrap(), 8, "inside the anonymous union at bit 64");
        assert!(matches!(btf.member_offset("task", "bits"), Err(OffsetError::Bitfield { .. })));
        assert!(matches!(btf.member_offset("task", "nope"), Err(OffsetError::NoMember { .. })));
        assert!(matches!(btf.member_offset("mm_struct", "mm"), Err(OffsetError::NoStruct { .. })));
    }

    #[test]
    fn attach_targets_keep_the_kernel_ids_of_trace_typedefs_and_lsm_functions() {
        let btf = synthetic();
        let targets = btf.attach_targets().unwrap();
        let again = KernelBtf::parse(Path::new("targets"), targets.to_bytes()).unwrap();
        assert_eq!(again.types.len(), 10, "ids up to the last target (9), and void");
        let named = |id: u32| {
            let head = again.head(id).unwrap();
            (head.kind, String::from_utf8_lossy(again.name(head.name)).into_owned())
        };
        assert_eq!(named(8), (KIND_TYPEDEF, "btf_trace_x".to_string()));
        assert_eq!(named(9), (KIND_FUNC, "bpf_lsm_y".to_string()));
        assert_eq!(named(7), (KIND_PTR, String::new()), "everything else is a placeholder");
    }

    #[test]
    fn truncated_or_corrupt_btf_is_an_error() {
        let short = blob(&[("t", (KIND_STRUCT << 24) | 2, 8, &[0, 0, 0])]);
        assert!(KernelBtf::parse(Path::new("short"), short).is_err(), "a member is missing");
        let mut data = blob(&[("t", KIND_STRUCT << 24, 8, &[])]);
        assert!(KernelBtf::parse(Path::new("fine"), data.clone()).is_ok());
        data[24 + 7] = 31; // kind 31: unknown
        assert!(KernelBtf::parse(Path::new("kind"), data).is_err());
        assert!(KernelBtf::parse(Path::new("empty"), Vec::new()).is_err());
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
