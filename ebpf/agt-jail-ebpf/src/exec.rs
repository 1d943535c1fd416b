//! `tp_btf/sched_process_exec`: report every completed exec of an agent's process.

use agt_jail_common::{EventKind, ExecTraceEvent, Verdict, EXEC_FILENAME_LEN};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    count_drop, current_agent, header, load_time_constant,
    proc::{exe_key, forget, parent_tgid, remember},
    process_ring,
};

/// Offset of `filename` in `struct linux_binprm`, read from the running kernel's BTF
/// at load time (Rust eBPF has no CO-RE relocations).
#[no_mangle]
static BINPRM_FILENAME_OFFSET: u64 = 0;

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let Some((cgroup_id, agent_id)) = current_agent() else {
        return 0;
    };
    // sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
    let task: *const u8 = ctx.arg(0);
    let bprm: *const u8 = ctx.arg(2);
    let offset = load_time_constant(&BINPRM_FILENAME_OFFSET) as usize;
    // SAFETY: a kernel read through the probe helper; a bad pointer yields an error, not a fault.
    let filename: *const u8 = match unsafe { bpf_probe_read_kernel(bprm.wrapping_add(offset) as *const *const u8) } {
        Ok(ptr) => ptr,
        Err(_) => return 0,
    };
    let ppid = parent_tgid(task);
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // The task runs a new executable under a new name; a thread that exec'd took its
    // leader's id (old_pid was its own).
    let header = header(EventKind::Exec as u32, Verdict::Allow as u32, cgroup_id, agent_id);
    let old_pid: i32 = ctx.arg(1);
    if old_pid as u32 != header.pid {
        forget(old_pid as u32);
    }
    let exe = exe_key(task);
    remember(header.pid, exe, comm);
    let (ring, submit_flags) = process_ring();
    let Some(mut entry) = ring.reserve::<ExecTraceEvent>(0) else {
        count_drop();
        return 0;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at reserved ring-buffer memory of the right size, owned by
    // this program until submit; every field is written before submit.
    unsafe {
        (*event).header = header;
        (*event).ppid = ppid;
        (*event).comm = comm;
        (*event).exe = exe;
        let len = match bpf_probe_read_kernel_str_bytes(filename, &mut (*event).filename) {
            Ok(bytes) => bytes.len(),
            Err(_) => 0,
        };
        (*event).filename_len = if len > EXEC_FILENAME_LEN { EXEC_FILENAME_LEN as u32 } else { len as u32 };
    }
    entry.submit(submit_flags);
    0
}
