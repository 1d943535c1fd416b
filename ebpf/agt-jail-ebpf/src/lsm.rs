//! BPF LSM programs (Tier A), scoped to agents by their cgroup (`AGENT_CGROUPS`); tasks
//! outside agents pay one hash lookup per hook.
//!
//! - `lsm/bprm_check_security`: deny an agent's exec of a file by its identity (device +
//!   inode of `bprm->file`, the file the kernel opened to run — no path race); deny
//!   fileless execs (a file without a name: memfd, O_TMPFILE, deleted); and for agents
//!   with [`AGENT_FLAG_EXEC_VERDICT`], allow an exec only when userspace approved exactly
//!   that file for that thread in `EXEC_APPROVED`. The approval is consumed by the first
//!   round of the exec; later rounds of the *same* execve (script → interpreter, binfmt_misc)
//!   are recognised by the `linux_binprm` pointer remembered per thread in `EXEC_ROUNDS`,
//!   which `lsm/bprm_creds_for_exec` clears at the start of every execve (so a later exec
//!   that reuses the same allocation cannot ride on it).
//! - [`file`]: path rules on open, unlink, rename and mkdir.
//! - [`guard`]: per-agent deny flags for ptrace, signals, mount, bpf, kernel loads and sockets.
//!
//! Loaded only where the kernel accepts BPF_PROG_TYPE_LSM; userspace loads these programs
//! on their own, so kernels that refuse them still run everything else. Every program
//! returns its own verdict only: a BPF LSM program runs only while the programs before it
//! on the same hook returned 0 (the trampoline stops at the first non-zero), so the
//! previous verdict is not re-read.

mod file;
mod guard;

use agt_jail_common::{
    EventKind, ExecApproval, ExecCheckEvent, ExecDenyReason, ExecRuleKey, LsmAgentConfig, Verdict,
    AGENT_FLAG_EXEC_VERDICT, EXEC_FILENAME_LEN, MAX_AGENTS, MAX_EXEC_APPROVALS, MAX_EXEC_RULES,
};
use aya_ebpf::{
    bindings::BPF_F_RDONLY_PROG,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{lsm, map},
    maps::{Array, HashMap, LruHashMap},
    programs::LsmContext,
};

use crate::{count_deny_drop, current_agent, header, PRIORITY_EVENTS, WAKE_AT_ONCE};

/// -EPERM, what a denied operation returns.
const EPERM: i32 = -1;

/// (agent, device, inode) → `RULE_DENY`. Written by userspace.
#[map]
static EXEC_DENY: HashMap<ExecRuleKey, u32> = HashMap::with_max_entries(MAX_EXEC_RULES, 0);

/// Agent id → its LSM configuration (flags, basename-prefix lengths). Written by userspace.
#[map]
static LSM_AGENTS: HashMap<u64, LsmAgentConfig> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// Thread id → the one file its next exec may run. Written by userspace (the exec
/// supervisor) right before it lets the execve continue; deleted here when used.
#[map]
static EXEC_APPROVED: HashMap<u32, ExecApproval> = HashMap::with_max_entries(MAX_EXEC_APPROVALS, 0);

/// Thread id → the `linux_binprm` of its approved execve in progress.
#[map]
static EXEC_ROUNDS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(MAX_EXEC_APPROVALS, 0);

/// Kernel struct member offsets (bytes), indexed by the `OFF_*` constants, in the one
/// element of this array. Userspace fills them from the running kernel's BTF and then
/// freezes the map; the map is read-only for programs and has a single element, so the
/// verifier reads the values as constants (which `bpf_d_path` on `&file->f_path` needs).
/// An unfilled map (offset of `file` still 0) makes the exec program leave rule-less
/// agents alone.
#[map]
static LSM_OFFSETS: Array<[u64; LSM_OFFSET_COUNT]> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);

/// `linux_binprm.file`
const OFF_BINPRM_FILE: u32 = 0;
/// `linux_binprm.filename`
const OFF_BINPRM_FILENAME: u32 = 1;
/// `file.f_inode`
const OFF_FILE_INODE: u32 = 2;
/// `inode.i_ino`
const OFF_INODE_INO: u32 = 3;
/// `inode.i_sb`
const OFF_INODE_SB: u32 = 4;
/// `super_block.s_dev`
const OFF_SB_DEV: u32 = 5;
/// `inode.i_nlink`
const OFF_INODE_NLINK: u32 = 6;
/// `file.f_path`
pub(crate) const OFF_FILE_PATH: u32 = 7;
/// `file.f_mode`
pub(crate) const OFF_FILE_MODE: u32 = 8;
/// `file.f_flags`
pub(crate) const OFF_FILE_FLAGS: u32 = 9;
/// `dentry.d_name`
pub(crate) const OFF_DENTRY_NAME: u32 = 10;
/// `qstr.name`
pub(crate) const OFF_QSTR_NAME: u32 = 11;
/// `task_struct.cgroups`
pub(crate) const OFF_TASK_CGROUPS: u32 = 12;
/// `css_set.dfl_cgrp`
pub(crate) const OFF_CSS_SET_DFL_CGRP: u32 = 13;
/// `cgroup.kn`
pub(crate) const OFF_CGROUP_KN: u32 = 14;
/// `kernfs_node.id`
pub(crate) const OFF_KERNFS_NODE_ID: u32 = 15;
/// `task_struct.tgid`
pub(crate) const OFF_TASK_TGID: u32 = 16;
const LSM_OFFSET_COUNT: usize = 17;

/// Struct member offsets are small; the mask bounds the value for the verifier even
/// before the map is frozen.
const OFFSET_MASK: u64 = 0xffff;

#[inline(always)]
pub(crate) fn offset(index: u32) -> Option<usize> {
    let offsets = LSM_OFFSETS.get(0)?;
    let index = index as usize;
    if index >= LSM_OFFSET_COUNT {
        return None;
    }
    Some((offsets[index] & OFFSET_MASK) as usize)
}

/// Reads a kernel value of type `T` at `base + offset`.
#[inline(always)]
pub(crate) fn read_at<T>(base: *const u8, offset: usize) -> Option<T> {
    // SAFETY: a kernel read through the probe helper; a bad pointer yields an error,
    // never a fault. `wrapping_add` keeps the address computation itself defined.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T) }.ok()
}

/// The LSM configuration of `agent_id` (all flags off when userspace wrote none).
#[inline(always)]
pub(crate) fn agent_config(agent_id: u64) -> LsmAgentConfig {
    // SAFETY: the value is copied out at once.
    unsafe { LSM_AGENTS.get(&agent_id) }.copied().unwrap_or_default()
}

/// The cgroup v2 id of `task` (`task->cgroups->dfl_cgrp->kn->id`).
#[inline(always)]
pub(crate) fn task_cgroup_id(task: *const u8) -> Option<u64> {
    let css_set: *const u8 = read_at(task, offset(OFF_TASK_CGROUPS)?)?;
    let cgroup: *const u8 = read_at(css_set, offset(OFF_CSS_SET_DFL_CGRP)?)?;
    let kn: *const u8 = read_at(cgroup, offset(OFF_CGROUP_KN)?)?;
    read_at(kn, offset(OFF_KERNFS_NODE_ID)?)
}

/// Identity of the file an exec round is about to run.
struct FileIdentity {
    dev: u64,
    ino: u64,
    nlink: u32,
}

#[lsm(hook = "bprm_creds_for_exec")]
pub fn bprm_creds_for_exec(_ctx: LsmContext) -> i32 {
    // Runs once per execve, before any bprm_check_security round: forget the previous
    // execve's rounds of this thread.
    if current_agent().is_some() {
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = EXEC_ROUNDS.remove(&tid);
    }
    0
}

#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    // int bprm_check_security(struct linux_binprm *bprm)
    let Some((cgroup_id, agent_id)) = current_agent() else {
        return 0;
    };
    let bprm: *const u8 = ctx.arg(0);
    let flags = agent_config(agent_id).flags;
    match exec_verdict(bprm, agent_id, flags) {
        Ok(()) => 0,
        Err((reason, dev, ino)) => {
            report_deny(bprm, cgroup_id, agent_id, reason, dev, ino);
            EPERM
        }
    }
}

#[inline(always)]
fn exec_verdict(bprm: *const u8, agent_id: u64, flags: u32) -> Result<(), (ExecDenyReason, u64, u64)> {
    let verdicts = flags & AGENT_FLAG_EXEC_VERDICT != 0;
    let Some(file) = file_identity(bprm) else {
        // Without exec verdicts the exec is left to the other planes, as before.
        return if verdicts { Err((ExecDenyReason::Unreadable, 0, 0)) } else { Ok(()) };
    };
    let (dev, ino) = (file.dev, file.ino);
    if file.nlink == 0 {
        return Err((ExecDenyReason::Fileless, dev, ino));
    }
    // SAFETY: the value is only tested for presence, never held across map updates.
    if unsafe { EXEC_DENY.get(ExecRuleKey { agent_id, dev, ino }) }.is_some() {
        return Err((ExecDenyReason::Rule, dev, ino));
    }
    if !verdicts {
        return Ok(());
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let bprm_id = bprm as u64;
    // SAFETY: the value is copied out at once.
    if unsafe { EXEC_ROUNDS.get(&tid) }.copied() == Some(bprm_id) {
        // A later round of an approved execve: the interpreter of an approved script.
        return Ok(());
    }
    // SAFETY: as above.
    let Some(approval) = (unsafe { EXEC_APPROVED.get(&tid) }).copied() else {
        return Err((ExecDenyReason::NotApproved, dev, ino));
    };
    // An approval is used once, whether or not it matches.
    let _ = EXEC_APPROVED.remove(&tid);
    if approval.dev != dev || approval.ino != ino {
        return Err((ExecDenyReason::WrongFile, dev, ino));
    }
    if EXEC_ROUNDS.insert(&tid, &bprm_id, 0).is_err() {
        // Without the record a script's interpreter round would be denied; say so now.
        return Err((ExecDenyReason::Unreadable, dev, ino));
    }
    Ok(())
}

/// The identity of the file `bprm` opened; `None` when it cannot be read.
#[inline(always)]
fn file_identity(bprm: *const u8) -> Option<FileIdentity> {
    let file_offset = offset(OFF_BINPRM_FILE)?;
    if file_offset == 0 {
        return None;
    }
    let file: *const u8 = read_at(bprm, file_offset)?;
    let inode: *const u8 = read_at(file, offset(OFF_FILE_INODE)?)?;
    let ino: u64 = read_at(inode, offset(OFF_INODE_INO)?)?;
    let nlink: u32 = read_at(inode, offset(OFF_INODE_NLINK)?)?;
    let sb: *const u8 = read_at(inode, offset(OFF_INODE_SB)?)?;
    let dev: u32 = read_at(sb, offset(OFF_SB_DEV)?)?;
    Some(FileIdentity { dev: u64::from(dev), ino, nlink })
}

#[inline(always)]
fn report_deny(bprm: *const u8, cgroup_id: u64, agent_id: u64, reason: ExecDenyReason, dev: u64, ino: u64) {
    let filename: *const u8 = offset(OFF_BINPRM_FILENAME).and_then(|at| read_at(bprm, at)).unwrap_or(core::ptr::null());
    let Some(mut entry) = PRIORITY_EVENTS.reserve::<ExecCheckEvent>(0) else {
        count_deny_drop();
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at reserved ring-buffer memory of the right size, owned by
    // this program until submit; every field is written before submit.
    unsafe {
        (*event).header = header(EventKind::ExecCheck as u32, Verdict::Deny as u32, cgroup_id, agent_id);
        (*event).reason = reason as u32;
        (*event).dev = dev;
        (*event).ino = ino;
        (*event).filename[0] = 0;
        let len = if filename.is_null() {
            0
        } else {
            match bpf_probe_read_kernel_str_bytes(filename, &mut (*event).filename) {
                Ok(bytes) => bytes.len(),
                Err(_) => 0,
            }
        };
        (*event).filename_len = if len > EXEC_FILENAME_LEN { EXEC_FILENAME_LEN as u32 } else { len as u32 };
    }
    entry.submit(WAKE_AT_ONCE);
}
