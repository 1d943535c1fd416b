//! Per-agent deny hooks (Tier A), each switched on by an agent flag:
//! `ptrace_access_check` and `task_kill` (targets outside the agent: a task whose cgroup
//! is not registered to the same agent), `sb_mount` and `move_mount` (every mount; the new
//! mount API attaches through move_mount), `bpf` (every command), `kernel_read_file` and
//! `kernel_load_data` (module, kexec, firmware and policy loads), `socket_connect`
//! (abstract AF_UNIX addresses and families the cgroup connect hooks do not see).

use agt_jail_common::{
    EventKind, GuardEvent, GuardHook, Verdict, AF_INET, AF_INET6, AGENT_FLAG_DENY_BPF, AGENT_FLAG_DENY_FOREIGN_SIGNALS,
    AGENT_FLAG_DENY_FOREIGN_SOCKETS, AGENT_FLAG_DENY_KERNEL_LOAD, AGENT_FLAG_DENY_MOUNT, AGENT_FLAG_DENY_PTRACE,
};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use super::{agent_config, offset, read_at, task_cgroup_id, EPERM, OFF_TASK_TGID};
use crate::{count_deny_drop, current_agent, header, AGENT_CGROUPS, PRIORITY_EVENTS, WAKE_AT_ONCE};

const AF_UNSPEC: u16 = 0;
const AF_UNIX: u16 = 1;

/// The calling agent when it has `flag` set.
#[inline(always)]
fn guarded(flag: u32) -> Option<(u64, u64)> {
    let (cgroup_id, agent_id) = current_agent()?;
    if agent_config(agent_id).flags & flag == 0 {
        return None;
    }
    Some((cgroup_id, agent_id))
}

#[lsm(hook = "ptrace_access_check")]
pub fn ptrace_access_check(ctx: LsmContext) -> i32 {
    // int ptrace_access_check(struct task_struct *child, unsigned int mode)
    let mode: u64 = ctx.arg(1);
    task_target(&ctx, AGENT_FLAG_DENY_PTRACE, GuardHook::Ptrace, mode as u32)
}

#[lsm(hook = "task_kill")]
pub fn task_kill(ctx: LsmContext) -> i32 {
    // int task_kill(struct task_struct *p, struct kernel_siginfo *info, int sig, const struct cred *cred)
    let sig: u64 = ctx.arg(2);
    task_target(&ctx, AGENT_FLAG_DENY_FOREIGN_SIGNALS, GuardHook::Signal, sig as u32)
}

/// Denies an operation on a task (argument 0) outside the calling agent.
#[inline(always)]
fn task_target(ctx: &LsmContext, flag: u32, hook: GuardHook, detail: u32) -> i32 {
    let Some((cgroup_id, agent_id)) = guarded(flag) else {
        return 0;
    };
    let task: *const u8 = ctx.arg(0);
    let target_cgroup = task_cgroup_id(task).unwrap_or(0);
    // SAFETY: the value is copied out at once.
    let target_agent = unsafe { AGENT_CGROUPS.get(&target_cgroup) }.copied();
    if target_cgroup != 0 && target_agent == Some(agent_id) {
        return 0;
    }
    let target_pid: u32 = offset(OFF_TASK_TGID).and_then(|at| read_at(task, at)).unwrap_or(0);
    report(cgroup_id, agent_id, hook, detail, target_pid, target_cgroup);
    EPERM
}

#[lsm(hook = "sb_mount")]
pub fn sb_mount(ctx: LsmContext) -> i32 {
    // int sb_mount(const char *dev_name, const struct path *path, const char *type,
    //              unsigned long flags, void *data)
    let flags: u64 = ctx.arg(3);
    deny_all(AGENT_FLAG_DENY_MOUNT, GuardHook::Mount, flags as u32)
}

#[lsm(hook = "move_mount")]
pub fn move_mount(_ctx: LsmContext) -> i32 {
    // int move_mount(const struct path *from_path, const struct path *to_path)
    deny_all(AGENT_FLAG_DENY_MOUNT, GuardHook::Mount, 0)
}

#[lsm(hook = "bpf")]
pub fn bpf(ctx: LsmContext) -> i32 {
    // int bpf(int cmd, union bpf_attr *attr, unsigned int size)
    let cmd: u64 = ctx.arg(0);
    deny_all(AGENT_FLAG_DENY_BPF, GuardHook::Bpf, cmd as u32)
}

#[lsm(hook = "kernel_read_file")]
pub fn kernel_read_file(ctx: LsmContext) -> i32 {
    // int kernel_read_file(struct file *file, enum kernel_read_file_id id, bool contents)
    let id: u64 = ctx.arg(1);
    deny_all(AGENT_FLAG_DENY_KERNEL_LOAD, GuardHook::KernelLoad, id as u32)
}

#[lsm(hook = "kernel_load_data")]
pub fn kernel_load_data(ctx: LsmContext) -> i32 {
    // int kernel_load_data(enum kernel_load_data_id id, bool contents)
    let id: u64 = ctx.arg(0);
    deny_all(AGENT_FLAG_DENY_KERNEL_LOAD, GuardHook::KernelLoad, id as u32)
}

#[lsm(hook = "socket_connect")]
pub fn socket_connect(ctx: LsmContext) -> i32 {
    // int socket_connect(struct socket *sock, struct sockaddr *address, int addrlen)
    let Some((cgroup_id, agent_id)) = guarded(AGENT_FLAG_DENY_FOREIGN_SOCKETS) else {
        return 0;
    };
    let address: *const u8 = ctx.arg(1);
    let addrlen: u64 = ctx.arg(2);
    let Some(family) = read_at::<u16>(address, 0) else {
        report(cgroup_id, agent_id, GuardHook::SocketConnect, u32::MAX, 0, 0);
        return EPERM;
    };
    let denied = match family {
        AF_UNSPEC | AF_INET | AF_INET6 => false,
        // An abstract name (sun_path[0] == 0) is reachable across mount namespaces.
        AF_UNIX => (addrlen as u32) > 2 && read_at::<u8>(address, 2).unwrap_or(0) == 0,
        _ => true,
    };
    if !denied {
        return 0;
    }
    report(cgroup_id, agent_id, GuardHook::SocketConnect, u32::from(family), 0, 0);
    EPERM
}

#[inline(always)]
fn deny_all(flag: u32, hook: GuardHook, detail: u32) -> i32 {
    let Some((cgroup_id, agent_id)) = guarded(flag) else {
        return 0;
    };
    report(cgroup_id, agent_id, hook, detail, 0, 0);
    EPERM
}

#[inline(always)]
fn report(cgroup_id: u64, agent_id: u64, hook: GuardHook, detail: u32, target_pid: u32, target_cgroup: u64) {
    let Some(mut entry) = PRIORITY_EVENTS.reserve::<GuardEvent>(0) else {
        count_deny_drop();
        return;
    };
    entry.write(GuardEvent {
        header: header(EventKind::Guard as u32, Verdict::Deny as u32, cgroup_id, agent_id),
        hook: hook as u32,
        detail,
        target_pid,
        _pad: 0,
        target_cgroup,
    });
    entry.submit(WAKE_AT_ONCE);
}
