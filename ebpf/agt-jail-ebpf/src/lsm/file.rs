//! Path rules on file access (Tier A): `lsm/file_open` (read/write/create intent from
//! `f_mode`/`f_flags`) and `lsm/path_unlink`, `lsm/path_rename`, `lsm/path_mkdir`.
//!
//! The path comes from `bpf_d_path`, which the kernel allows only in some hooks: on every
//! kernel with BPF LSM in `file_open` (on `&file->f_path`), and in the `path_*` hooks only
//! where the kernel lists them as sleepable-compatible (6.8 and later, e.g. 6.12, not 6.1).
//! Userspace loads each program on its own and reports those the kernel refuses.
//!
//! Rules (compiled by userspace, per agent): exact paths and directory prefixes live in
//! one LPM trie (`FILE_PATHS`: an exact rule ends in its NUL, a directory rule in `/`;
//! userspace folds every enclosing directory rule into the entries below it, so the one
//! longest match carries every rule that applies); component, basename and basename-prefix
//! names live in a hash map keyed by the name's FNV-1a hash and length (`FILE_NAMES`),
//! looked up in one bounded pass over the path. A path that does not fit the fixed
//! buffer ([`FILE_PATH_LEN`] bytes with its NUL) or cannot be read is denied: the rules
//! cannot be checked on it, and deny is the safe side.

use agt_jail_common::{
    EventKind, FileEvent, FileNameKey, FileOp, FilePathData, FileRuleKind, FileRuleValue, Verdict,
    AGENT_FLAG_FILE_RULES, FILE_ACCESS_CREATE, FILE_ACCESS_READ, FILE_ACCESS_RENAME, FILE_ACCESS_UNLINK,
    FILE_ACCESS_WRITE, FILE_DENY_PATH_TOO_LONG, FILE_DENY_PATH_UNREADABLE, FILE_PATH_FIXED_BITS, FILE_PATH_LEN,
    MAX_FILE_RULES, NAME_HASH_OFFSET, NAME_HASH_PRIME,
};
use aya_ebpf::{
    bindings::path,
    helpers::{bpf_d_path, bpf_probe_read_kernel_buf, bpf_probe_read_kernel_str_bytes},
    macros::{lsm, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuArray},
    programs::LsmContext,
};

use super::{
    agent_config, offset, read_at, EPERM, OFF_DENTRY_NAME, OFF_FILE_FLAGS, OFF_FILE_MODE, OFF_FILE_PATH, OFF_QSTR_NAME,
};
use crate::{count_deny_drop, current_agent, header, PRIORITY_EVENTS, WAKE_AT_ONCE};

/// Exact and directory-prefix rules: (agent, path bytes) → denied accesses.
#[map]
static FILE_PATHS: LpmTrie<FilePathData, FileRuleValue> = LpmTrie::with_max_entries(MAX_FILE_RULES, 1);

/// Component, basename and basename-prefix rules.
#[map]
static FILE_NAMES: HashMap<FileNameKey, FileRuleValue> = HashMap::with_max_entries(MAX_FILE_RULES, 0);

/// Per-CPU buffer: the trie key (its path is where `bpf_d_path` writes) and slack, so
/// that appending a name at a bounded offset stays inside the value.
#[repr(C)]
pub struct PathScratch {
    key: Key<FilePathData>,
    slack: [u8; 268],
}

#[map]
static PATH_SCRATCH: PerCpuArray<PathScratch> = PerCpuArray::with_max_entries(1, 0);

/// Byte offset of the path inside [`PathScratch`] (after the trie's prefix length and the agent id).
const PATH_AT: usize = 4 + 8;

const FMODE_READ: u32 = 1;
const FMODE_WRITE: u32 = 2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;

/// What a check found: a rule (index, kind) that denies, or nothing.
type Hit = Option<(u32, u32)>;

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // int file_open(struct file *file)
    let Some((cgroup_id, agent_id)) = current_agent() else {
        return 0;
    };
    let config = agent_config(agent_id);
    if config.flags & AGENT_FLAG_FILE_RULES == 0 {
        return 0;
    }
    let file: *const u8 = ctx.arg(0);
    let mode: u32 = offset(OFF_FILE_MODE).and_then(|at| read_at(file, at)).unwrap_or(FMODE_READ | FMODE_WRITE);
    let flags: u32 = offset(OFF_FILE_FLAGS).and_then(|at| read_at(file, at)).unwrap_or(O_CREAT);
    let mut access = 0;
    if mode & FMODE_READ != 0 {
        access |= FILE_ACCESS_READ;
    }
    if mode & FMODE_WRITE != 0 || flags & O_TRUNC != 0 {
        access |= FILE_ACCESS_WRITE;
    }
    if flags & O_CREAT != 0 {
        access |= FILE_ACCESS_CREATE;
    }
    let Some(scratch) = PATH_SCRATCH.get_ptr_mut(0) else {
        return EPERM;
    };
    let Some(f_path) = offset(OFF_FILE_PATH) else {
        return EPERM;
    };
    let buf = path_buf(scratch);
    // SAFETY: `file` is the hook's struct file; `f_path` its member offset from BTF (a
    // verifier-known constant: the offsets map is frozen and read-only for programs), so
    // the helper receives the file's own struct path. `buf` holds FILE_PATH_LEN bytes.
    let len = unsafe { bpf_d_path(file.wrapping_add(f_path) as *mut path, buf as *mut _, FILE_PATH_LEN as u32) };
    decide(scratch, len, cgroup_id, agent_id, config.basename_prefix_lens, access, FileOp::Open)
}

#[lsm(hook = "path_unlink")]
pub fn path_unlink(ctx: LsmContext) -> i32 {
    // int path_unlink(const struct path *dir, struct dentry *dentry)
    path_hook(&ctx, 0, 1, FILE_ACCESS_UNLINK, FileOp::Unlink)
}

#[lsm(hook = "path_mkdir")]
pub fn path_mkdir(ctx: LsmContext) -> i32 {
    // int path_mkdir(const struct path *dir, struct dentry *dentry, umode_t mode)
    path_hook(&ctx, 0, 1, FILE_ACCESS_CREATE, FileOp::Mkdir)
}

#[lsm(hook = "path_rename")]
pub fn path_rename(ctx: LsmContext) -> i32 {
    // int path_rename(const struct path *old_dir, struct dentry *old_dentry,
    //                 const struct path *new_dir, struct dentry *new_dentry)
    let verdict = path_hook(&ctx, 0, 1, FILE_ACCESS_RENAME, FileOp::RenameFrom);
    if verdict != 0 {
        return verdict;
    }
    path_hook(&ctx, 2, 3, FILE_ACCESS_RENAME | FILE_ACCESS_CREATE, FileOp::RenameTo)
}

/// A `path_*` hook: the path is `d_path(dir)` + "/" + the dentry's name.
#[inline(always)]
fn path_hook(ctx: &LsmContext, dir_arg: usize, dentry_arg: usize, access: u32, op: FileOp) -> i32 {
    let Some((cgroup_id, agent_id)) = current_agent() else {
        return 0;
    };
    let config = agent_config(agent_id);
    if config.flags & AGENT_FLAG_FILE_RULES == 0 {
        return 0;
    }
    let dir: *const u8 = ctx.arg(dir_arg);
    let dentry: *const u8 = ctx.arg(dentry_arg);
    let Some(scratch) = PATH_SCRATCH.get_ptr_mut(0) else {
        return EPERM;
    };
    let buf = path_buf(scratch);
    // SAFETY: `dir` is the hook's own struct path argument; `buf` holds FILE_PATH_LEN bytes.
    let dir_len = unsafe { bpf_d_path(dir as *mut path, buf as *mut _, FILE_PATH_LEN as u32) };
    let len = if dir_len <= 0 { dir_len } else { append_name(buf, dir_len as usize, dentry) };
    decide(scratch, len, cgroup_id, agent_id, config.basename_prefix_lens, access, op)
}

/// Appends "/" and the dentry's name to the directory path of `dir_len` bytes (NUL
/// counted) in `buf`; returns the new length with its NUL, or a negative error.
#[inline(always)]
fn append_name(buf: *mut u8, dir_len: usize, dentry: *const u8) -> i64 {
    let Some(name): Option<*const u8> = offset(OFF_DENTRY_NAME)
        .and_then(|d_name| offset(OFF_QSTR_NAME).map(|name| d_name + name))
        .and_then(|at| read_at(dentry, at))
    else {
        return -1;
    };
    // Position of the directory path's NUL; the root "/" needs no second slash.
    let mut at = (dir_len - 1) & 0xff;
    if at != 1 {
        // SAFETY: `at` < 256 and `buf` is followed by the scratch's slack (>= 256 bytes).
        unsafe { *buf.add(at) = b'/' };
        at = (at + 1) & 0xff;
    }
    // SAFETY: `buf + at` with `at` < 256 leaves at least 256 bytes of scratch for the name.
    let dest = unsafe { core::slice::from_raw_parts_mut(buf.add(at), 256) };
    match unsafe { bpf_probe_read_kernel_str_bytes(name, dest) } {
        // `bytes` excludes the NUL the helper wrote.
        Ok(bytes) => (at + bytes.len() + 1) as i64,
        Err(_) => -1,
    }
}

#[inline(always)]
fn path_buf(scratch: *mut PathScratch) -> *mut u8 {
    (scratch as *mut u8).wrapping_add(PATH_AT)
}

/// Matches the path in `scratch` (of `len` bytes with NUL, or a negative d_path error)
/// and returns the hook's verdict, reporting a denial.
#[inline(always)]
fn decide(
    scratch: *mut PathScratch,
    len: i64,
    cgroup_id: u64,
    agent_id: u64,
    prefix_lens: u64,
    access: u32,
    op: FileOp,
) -> i32 {
    let hit = if len <= 0 {
        Some((u32::MAX, FILE_DENY_PATH_UNREADABLE))
    } else if len as usize > FILE_PATH_LEN {
        Some((u32::MAX, FILE_DENY_PATH_TOO_LONG))
    } else {
        match_path(scratch, agent_id, prefix_lens, access)
    };
    let Some((rule_index, rule_kind)) = hit else {
        return 0;
    };
    report(scratch, len, cgroup_id, agent_id, access, op, rule_index, rule_kind);
    EPERM
}

/// The first rule of `agent_id` that denies `access` to the NUL-terminated path in `scratch`.
#[inline(always)]
fn match_path(scratch: *mut PathScratch, agent_id: u64, prefix_lens: u64, access: u32) -> Hit {
    // SAFETY: `scratch` is this CPU's slot of the per-CPU array; the writes stay inside it.
    unsafe {
        core::ptr::write_unaligned(
            core::ptr::addr_of_mut!((*scratch).key.prefix_len),
            FILE_PATH_FIXED_BITS + 8 * FILE_PATH_LEN as u32,
        );
        core::ptr::write_unaligned(core::ptr::addr_of_mut!((*scratch).key.data.agent_id), agent_id);
    }
    // SAFETY: as above; the key is read by the map lookup only.
    if let Some(value) = FILE_PATHS.get(unsafe { &(*scratch).key }) {
        let hit = denies(value, access);
        if hit.is_some() {
            return hit;
        }
    }
    let path = path_buf(scratch) as *const u8;
    let mut hash = NAME_HASH_OFFSET;
    let mut len: u32 = 0;
    let mut pending: Hit = None;
    let mut i = 0;
    while i < FILE_PATH_LEN {
        // SAFETY: `i` < FILE_PATH_LEN, inside the scratch's path.
        let c = unsafe { *path.add(i) };
        if c == b'/' || c == 0 {
            // No branch depends on `len` (nor on anything else the verifier knows
            // exactly), so that the states of one iteration prune each other. An empty
            // name (a leading or doubled slash) is looked up too and never found:
            // userspace refuses empty names.
            let hit = lookup(agent_id, FileRuleKind::Component, hash, len, access);
            if hit.is_some() {
                return hit;
            }
            if c == 0 {
                let hit = lookup(agent_id, FileRuleKind::Basename, hash, len, access);
                if hit.is_some() {
                    return hit;
                }
                return pending;
            }
            hash = NAME_HASH_OFFSET;
            len = 0;
            pending = None;
        } else {
            hash = (hash ^ u64::from(c)).wrapping_mul(NAME_HASH_PRIME);
            len += 1;
            // Lengths past 63 wrap in the mask; their keys never match (prefix rules are
            // at most 63 bytes), so a spurious lookup is harmless.
            if pending.is_none() && (prefix_lens >> (len & 63)) & 1 != 0 {
                pending = lookup(agent_id, FileRuleKind::BasenamePrefix, hash, len, access);
            }
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn lookup(agent_id: u64, kind: FileRuleKind, hash: u64, len: u32, access: u32) -> Hit {
    let key = FileNameKey { agent_id, hash, len, kind: kind as u32 };
    // SAFETY: the value is read at once, never held across map updates.
    let value = unsafe { FILE_NAMES.get(&key) }?;
    denies(value, access)
}

/// The rule of `value` that denies the lowest bit of `access`, if any.
#[inline(always)]
fn denies(value: &FileRuleValue, access: u32) -> Hit {
    let hit = value.access_mask & access;
    if hit == 0 {
        return None;
    }
    let (index, kind) = if hit & FILE_ACCESS_READ != 0 {
        (value.rule_index[0], value.rule_kind[0])
    } else if hit & FILE_ACCESS_WRITE != 0 {
        (value.rule_index[1], value.rule_kind[1])
    } else if hit & FILE_ACCESS_UNLINK != 0 {
        (value.rule_index[2], value.rule_kind[2])
    } else if hit & FILE_ACCESS_RENAME != 0 {
        (value.rule_index[3], value.rule_kind[3])
    } else {
        (value.rule_index[4], value.rule_kind[4])
    };
    Some((index, u32::from(kind)))
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn report(
    scratch: *mut PathScratch,
    len: i64,
    cgroup_id: u64,
    agent_id: u64,
    access: u32,
    op: FileOp,
    rule_index: u32,
    rule_kind: u32,
) {
    let Some(mut entry) = PRIORITY_EVENTS.reserve::<FileEvent>(0) else {
        count_deny_drop();
        return;
    };
    let event = entry.as_mut_ptr();
    let path_len = if len <= 1 {
        0
    } else if len as usize > FILE_PATH_LEN {
        FILE_PATH_LEN as u32
    } else {
        len as u32 - 1
    };
    // SAFETY: `event` points at reserved ring-buffer memory of the right size, owned by
    // this program until submit; every field is written before submit.
    unsafe {
        (*event).header = header(EventKind::File as u32, Verdict::Deny as u32, cgroup_id, agent_id);
        (*event).op = op as u32;
        (*event).access = access;
        (*event).rule_index = rule_index;
        (*event).rule_kind = rule_kind;
        (*event).path_len = path_len;
        (*event)._pad = 0;
        if bpf_probe_read_kernel_buf(path_buf(scratch) as *const u8, &mut (*event).path).is_err() {
            (*event).path[0] = 0;
            (*event).path_len = 0;
        }
    }
    entry.submit(WAKE_AT_ONCE);
}
