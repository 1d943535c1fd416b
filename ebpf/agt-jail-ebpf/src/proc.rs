//! `tp_btf/sched_process_fork`, `tp_btf/sched_process_exit` and `tp_btf/task_rename`:
//! process tracking for agents.
//!
//! A fork is attributed by the parent's cgroup (the child starts in it); an exit is
//! reported for thread-group leaders only (the process, not each of its threads).
//! `TASK_FACTS` keeps each agent thread's `comm` and executable for the exec plane: written
//! at fork and exec, renamed with the task, removed at the thread's exit (any thread's).

use agt_jail_common::{EventKind, ExeKey, ExitEvent, ForkEvent, TaskFacts, Verdict, MAX_TASK_FACTS, TASK_COMM_LEN};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};

use crate::{count_drop, current_agent, header, load_time_constant, process_ring};

/// Thread id (initial pid namespace) → the thread's `comm` and executable. LRU, so a
/// thread whose exit was not seen cannot fill it; userspace falls back to `/proc` for a
/// thread it does not find.
#[map]
static TASK_FACTS: LruHashMap<u32, TaskFacts> = LruHashMap::with_max_entries(MAX_TASK_FACTS, 0);

/// Member offsets on the way from a task to its executable
/// (`task->mm->exe_file->f_path.{mnt,dentry}`, `dentry->d_inode->i_ino`), from BTF.
#[no_mangle]
static TASK_MM_OFFSET: u64 = 0;
#[no_mangle]
static MM_EXE_FILE_OFFSET: u64 = 0;
#[no_mangle]
static FILE_PATH_OFFSET: u64 = 0;
#[no_mangle]
static PATH_MNT_OFFSET: u64 = 0;
#[no_mangle]
static PATH_DENTRY_OFFSET: u64 = 0;
#[no_mangle]
static DENTRY_INODE_OFFSET: u64 = 0;
#[no_mangle]
static INODE_INO_OFFSET: u64 = 0;

/// `task_struct` member offsets, read from the running kernel's BTF at load time.
#[no_mangle]
static TASK_PID_OFFSET: u64 = 0;
#[no_mangle]
static TASK_TGID_OFFSET: u64 = 0;
#[no_mangle]
static TASK_REAL_PARENT_OFFSET: u64 = 0;
#[no_mangle]
static TASK_EXIT_CODE_OFFSET: u64 = 0;

/// Reads a value of type `T` at `base + offset` in kernel memory.
#[inline(always)]
fn read_at<T>(base: *const u8, offset: u64) -> Option<T> {
    // SAFETY: a kernel read through the probe helper; a bad pointer yields an error, never
    // a fault. `wrapping_add` keeps the address computation itself defined.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }.ok()
}

/// `task->real_parent->tgid`, 0 when unreadable.
#[inline(always)]
pub(crate) fn parent_tgid(task: *const u8) -> u32 {
    let Some(parent) = read_at::<*const u8>(task, load_time_constant(&TASK_REAL_PARENT_OFFSET)) else {
        return 0;
    };
    read_at::<i32>(parent, load_time_constant(&TASK_TGID_OFFSET)).unwrap_or(0) as u32
}

/// The executable `task` runs; all zero when any step is unreadable (a kernel thread has
/// no `mm`).
#[inline(always)]
pub(crate) fn exe_key(task: *const u8) -> ExeKey {
    let unknown = ExeKey { mnt: 0, dentry: 0, ino: 0 };
    let Some(mm) = read_at::<*const u8>(task, load_time_constant(&TASK_MM_OFFSET)) else { return unknown };
    let Some(file) = read_at::<*const u8>(mm, load_time_constant(&MM_EXE_FILE_OFFSET)) else { return unknown };
    let path = file.wrapping_add(load_time_constant(&FILE_PATH_OFFSET) as usize);
    let Some(mnt) = read_at::<u64>(path, load_time_constant(&PATH_MNT_OFFSET)) else { return unknown };
    let Some(dentry) = read_at::<*const u8>(path, load_time_constant(&PATH_DENTRY_OFFSET)) else { return unknown };
    let Some(inode) = read_at::<*const u8>(dentry, load_time_constant(&DENTRY_INODE_OFFSET)) else { return unknown };
    let Some(ino) = read_at::<u64>(inode, load_time_constant(&INODE_INO_OFFSET)) else { return unknown };
    ExeKey { mnt, dentry: dentry as u64, ino }
}

/// Records what thread `tid` runs now (a failed insert leaves the exec plane to `/proc`).
#[inline(always)]
pub(crate) fn remember(tid: u32, exe: ExeKey, comm: [u8; TASK_COMM_LEN]) {
    let _ = TASK_FACTS.insert(&tid, &TaskFacts { exe, comm }, 0);
}

/// The executable thread `tid` runs, as `TASK_FACTS` has it (all zero when it has none).
#[inline(always)]
pub(crate) fn known_exe(tid: u32) -> ExeKey {
    // SAFETY: the value is copied out at once; an entry changing under the read yields a
    // torn key at worst, never a fault.
    unsafe { TASK_FACTS.get(&tid) }.map(|facts| facts.exe).unwrap_or(ExeKey { mnt: 0, dentry: 0, ino: 0 })
}

#[inline(always)]
pub(crate) fn forget(tid: u32) {
    let _ = TASK_FACTS.remove(&tid);
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let Some((cgroup_id, agent_id)) = current_agent() else {
        return 0;
    };
    // sched_process_fork(struct task_struct *parent, struct task_struct *child)
    let parent: *const u8 = ctx.arg(0);
    let child: *const u8 = ctx.arg(1);
    let pid_offset = load_time_constant(&TASK_PID_OFFSET);
    let tgid_offset = load_time_constant(&TASK_TGID_OFFSET);
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let child_pid = read_at::<i32>(child, pid_offset).unwrap_or(0) as u32;
    // The child (process or thread) runs the parent's executable under the forking
    // thread's name until it execs or renames itself.
    if child_pid != 0 {
        remember(child_pid, exe_key(parent), comm);
    }
    let event = ForkEvent {
        header: header(EventKind::Fork as u32, Verdict::Allow as u32, cgroup_id, agent_id),
        parent_pid: read_at::<i32>(parent, pid_offset).unwrap_or(0) as u32,
        parent_tgid: read_at::<i32>(parent, tgid_offset).unwrap_or(0) as u32,
        child_pid,
        child_tgid: read_at::<i32>(child, tgid_offset).unwrap_or(0) as u32,
        comm,
    };
    let (ring, submit_flags) = process_ring();
    let Some(mut entry) = ring.reserve::<ForkEvent>(0) else {
        count_drop();
        return 0;
    };
    entry.write(event);
    entry.submit(submit_flags);
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    // Every exiting thread's entry goes, an agent's or not: a thread that left its agent's
    // cgroup (a ring-0 agent may move itself) must not leave its facts to whoever gets its
    // id next. One more hash lookup per thread exit on the host.
    forget(bpf_get_current_pid_tgid() as u32);
    let Some((cgroup_id, agent_id)) = current_agent() else {
        return 0;
    };
    let header = header(EventKind::Exit as u32, Verdict::Allow as u32, cgroup_id, agent_id);
    if header.pid != header.tgid {
        return 0;
    }
    // sched_process_exit(struct task_struct *p, ...): p is the exiting (current) task.
    let task: *const u8 = ctx.arg(0);
    let exit_code = read_at::<i32>(task, load_time_constant(&TASK_EXIT_CODE_OFFSET)).unwrap_or(0) as u32;
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let (ring, submit_flags) = process_ring();
    let Some(mut entry) = ring.reserve::<ExitEvent>(0) else {
        count_drop();
        return 0;
    };
    entry.write(ExitEvent { header, exit_code, _pad: 0, comm });
    entry.submit(submit_flags);
    0
}

#[btf_tracepoint(function = "task_rename")]
pub fn task_rename(ctx: BtfTracePointContext) -> i32 {
    // A task renames itself or another thread of its process: same cgroup either way.
    if current_agent().is_none() {
        return 0;
    }
    // task_rename(struct task_struct *task, const char *comm), before the copy.
    let task: *const u8 = ctx.arg(0);
    let name: *const u8 = ctx.arg(1);
    let Some(tid) = read_at::<i32>(task, load_time_constant(&TASK_PID_OFFSET)) else { return 0 };
    let tid = tid as u32;
    // Only a thread already known is renamed (the map's value, valid for this run).
    let Some(facts) = TASK_FACTS.get_ptr_mut(&tid) else { return 0 };
    let mut comm = [0u8; TASK_COMM_LEN];
    // SAFETY: a kernel string read through the probe helper into a local buffer.
    if unsafe { bpf_probe_read_kernel_str_bytes(name, &mut comm) }.is_err() {
        // An unreadable name leaves the thread unknown (the exec plane reads /proc).
        forget(tid);
        return 0;
    }
    // SAFETY: `facts` points at the map value (see above); a concurrent update of the same
    // thread's entry is at worst a name torn between two renames of that thread.
    unsafe { (*facts).comm = comm };
    0
}
