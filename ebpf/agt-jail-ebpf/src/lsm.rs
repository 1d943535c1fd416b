//! `lsm/bprm_check_security` (Tier A): deny an agent's exec of a file by its identity.
//!
//! The kernel calls the hook once the file to run is open, so the identity checked
//! (device + inode of `bprm->file`) is the file that will run — no path race. A hit in
//! `EXEC_DENY` for the agent returns -EPERM from execve(2) and reports an `ExecCheck`
//! event with a `Deny` verdict. Tasks outside agents pay one hash lookup.
//!
//! Loaded only where the kernel accepts BPF_PROG_TYPE_LSM; userspace loads this
//! program on its own, so kernels that refuse it still run everything else.

use agt_jail_common::{EventKind, ExecEvent, ExecRuleKey, Verdict, EXEC_FILENAME_LEN, MAX_EXEC_RULES};
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{lsm, map},
    maps::{Array, HashMap},
    programs::LsmContext,
};

use crate::{count_drop, current_agent, header, EVENTS};

/// -EPERM, what a denied execve(2) returns.
const EPERM: i32 = -1;

/// (agent, device, inode) → `RULE_DENY`. Written by userspace.
#[map]
static EXEC_DENY: HashMap<ExecRuleKey, u32> = HashMap::with_max_entries(MAX_EXEC_RULES, 0);

/// Kernel struct member offsets (bytes), indexed by the `OFF_*` constants. Userspace
/// fills them from the running kernel's BTF after loading the object and before attaching
/// this program (Rust eBPF has no CO-RE relocations). A map rather than load-time globals
/// so that this on-demand program needs nothing from the object's common load step; an
/// unfilled map (offset of `file` still 0) makes the program allow everything.
#[map]
static LSM_OFFSETS: Array<u64> = Array::with_max_entries(LSM_OFFSET_COUNT, 0);

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
const LSM_OFFSET_COUNT: u32 = 6;

/// Struct member offsets are small; the mask gives the verifier the bounds it needs to
/// accept `bprm + offset` (`bprm` is a typed BTF pointer, the offset a map value).
const OFFSET_MASK: u64 = 0xffff;

#[inline(always)]
fn offset(index: u32) -> Option<usize> {
    LSM_OFFSETS.get(index).map(|value| (*value & OFFSET_MASK) as usize)
}

/// Reads a kernel value of type `T` at `base + offset`.
#[inline(always)]
fn read_at<T>(base: *const u8, offset: usize) -> Option<T> {
    // SAFETY: a kernel read through the probe helper; a bad pointer yields an error,
    // never a fault. `wrapping_add` keeps the address computation itself defined.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T) }.ok()
}

#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    // int bprm_check_security(struct linux_binprm *bprm), then the previous LSM's verdict.
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return retval;
    }
    let Some((cgroup_id, agent_id)) = current_agent() else {
        return 0;
    };
    let bprm: *const u8 = ctx.arg(0);
    match exec_denied(bprm, agent_id) {
        Some(true) => {
            report_deny(bprm, cgroup_id, agent_id);
            EPERM
        }
        _ => 0,
    }
}

/// Whether the agent may not run the file `bprm` opened; `None` when the file's identity
/// cannot be read (then the exec is left to the other planes).
#[inline(always)]
fn exec_denied(bprm: *const u8, agent_id: u64) -> Option<bool> {
    let file_offset = offset(OFF_BINPRM_FILE)?;
    if file_offset == 0 {
        return None;
    }
    let file: *const u8 = read_at(bprm, file_offset)?;
    let inode: *const u8 = read_at(file, offset(OFF_FILE_INODE)?)?;
    let ino: u64 = read_at(inode, offset(OFF_INODE_INO)?)?;
    let sb: *const u8 = read_at(inode, offset(OFF_INODE_SB)?)?;
    let dev: u32 = read_at(sb, offset(OFF_SB_DEV)?)?;
    let key = ExecRuleKey { agent_id, dev: u64::from(dev), ino };
    // SAFETY: the value is only tested for presence, never held across map updates.
    Some(unsafe { EXEC_DENY.get(key) }.is_some())
}

#[inline(always)]
fn report_deny(bprm: *const u8, cgroup_id: u64, agent_id: u64) {
    let filename: *const u8 = offset(OFF_BINPRM_FILENAME).and_then(|at| read_at(bprm, at)).unwrap_or(core::ptr::null());
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_drop();
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at reserved ring-buffer memory of the right size, owned by
    // this program until submit; every field is written before submit.
    unsafe {
        (*event).header = header(EventKind::ExecCheck as u32, Verdict::Deny as u32, cgroup_id, agent_id);
        (*event)._pad = 0;
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
    entry.submit(0);
}
