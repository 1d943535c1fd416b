//! `tp_btf/sched_process_fork` and `tp_btf/sched_process_exit`: process tracking for agents.
//!
//! A fork is attributed by the parent's cgroup (the child starts in it); an exit is
//! reported for thread-group leaders only (the process, not each of its threads).

use agt_jail_common::{EventKind, ExitEvent, ForkEvent, Verdict};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{count_drop, current_agent, header, load_time_constant, EVENTS};

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
    let event = ForkEvent {
        header: header(EventKind::Fork as u32, Verdict::Allow as u32, cgroup_id, agent_id),
        parent_pid: read_at::<i32>(parent, pid_offset).unwrap_or(0) as u32,
        parent_tgid: read_at::<i32>(parent, tgid_offset).unwrap_or(0) as u32,
        child_pid: read_at::<i32>(child, pid_offset).unwrap_or(0) as u32,
        child_tgid: read_at::<i32>(child, tgid_offset).unwrap_or(0) as u32,
        comm,
    };
    let Some(mut entry) = EVENTS.reserve::<ForkEvent>(0) else {
        count_drop();
        return 0;
    };
    entry.write(event);
    entry.submit(0);
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
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
    let Some(mut entry) = EVENTS.reserve::<ExitEvent>(0) else {
        count_drop();
        return 0;
    };
    entry.write(ExitEvent { header, exit_code, _pad: 0, comm });
    entry.submit(0);
    0
}
