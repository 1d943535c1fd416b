//! agt-jail's eBPF programs.
//!
//! Every program is scoped to agents: the first thing each does is look the current
//! cgroup up in `AGENT_CGROUPS`, so tasks that are not agents pay one hash lookup.
//! Allowed events go to one shared ring buffer; a full buffer increments `EVENT_DROPS`
//! (never silently lost: userspace reports the counter), and never changes a verdict.
//! Deny and kill records have a ring buffer of their own (`PRIORITY_EVENTS`), so a flood of
//! allowed events cannot crowd them out; a network deny that does not fit there either is
//! counted in `DENY_SUMMARY` (its record with a count), which userspace turns into records.
//! Only a deny that fits neither lands in `DENY_DROPS`. Process records (fork, exec, exit)
//! share the priority ring while it is less than half full: userspace reads that ring first,
//! and a deny must not be read before the exec that says what made it.
#![no_std]
#![no_main]

mod exec;
mod lsm;
mod net;
mod proc;

use agt_jail_common::{EventHeader, NetEvent, EVENT_RING_BYTES, MAX_AGENTS, MAX_DENY_SUMMARIES, PRIORITY_RING_BYTES};
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

/// cgroup v2 id → agent id. Written by userspace before the agent's first process joins.
#[map]
static AGENT_CGROUPS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// All events, in order per CPU.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Events that did not fit into `EVENTS` (index 0), summed over CPUs by userspace.
#[map]
static EVENT_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Deny and kill records, and process records while there is room (see [`process_ring`]).
#[map]
static PRIORITY_EVENTS: RingBuf = RingBuf::with_byte_size(PRIORITY_RING_BYTES, 0);

/// Submit flag of deny and kill records: the reader sleeps on the priority ring and must
/// wake at once, also behind process records it has not read yet (the default wakes it only
/// when it has read everything before).
const WAKE_AT_ONCE: u64 = BPF_RB_FORCE_WAKEUP as u64;

/// The ring a process record (fork, exec, exit) goes to and its submit flag: the priority
/// ring while it is less than half full, without waking the reader (it takes process records
/// in batches, with the next deny or after its period); otherwise the event ring, where the
/// record may be read after a deny of the same process, rather than crowd out denies.
#[inline(always)]
fn process_ring() -> (&'static RingBuf, u64) {
    if PRIORITY_EVENTS.query(BPF_RB_AVAIL_DATA as u64) < u64::from(PRIORITY_RING_BYTES / 2) {
        (&PRIORITY_EVENTS, BPF_RB_NO_WAKEUP as u64)
    } else {
        (&EVENTS, 0)
    }
}

/// Network denies that did not fit into `PRIORITY_EVENTS`: the record (thread id and time
/// zeroed) → how many such denies happened on each CPU. Userspace sums the CPUs and writes
/// the increments since it last looked.
#[map]
static DENY_SUMMARY: PerCpuHashMap<NetEvent, u64> = PerCpuHashMap::with_max_entries(MAX_DENY_SUMMARIES, 0);

/// Denies that fit neither `PRIORITY_EVENTS` nor `DENY_SUMMARY` (index 0), summed over CPUs.
#[map]
static DENY_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The agent the current task belongs to, or `None` for tasks outside agents.
#[inline(always)]
fn current_agent() -> Option<(u64, u64)> {
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is a plain u64 copied out before the map can change it.
    let agent_id = unsafe { AGENT_CGROUPS.get(&cgroup_id) }.copied()?;
    Some((cgroup_id, agent_id))
}

#[inline(always)]
fn header(kind: u32, verdict: u32, cgroup_id: u64, agent_id: u64) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: as above.
    let ktime_ns = unsafe { bpf_ktime_get_boot_ns() };
    EventHeader { kind, verdict, pid: pid_tgid as u32, tgid: (pid_tgid >> 32) as u32, cgroup_id, agent_id, ktime_ns }
}

#[inline(always)]
fn count_drop() {
    count_in(&EVENT_DROPS);
}

#[inline(always)]
fn count_deny_drop() {
    count_in(&DENY_DROPS);
}

#[inline(always)]
fn count_in(counters: &PerCpuArray<u64>) {
    if let Some(counter) = counters.get_ptr_mut(0) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; nothing else writes it
        // while this program runs (programs do not preempt each other on one CPU here).
        unsafe { *counter += 1 };
    }
}

/// Reads a u64 load-time constant that userspace sets with `EbpfLoader::set_global`.
/// The volatile read keeps the compiler from folding the default value in.
#[inline(always)]
fn load_time_constant(value: &u64) -> u64 {
    // SAFETY: `value` is a valid reference to a static.
    unsafe { core::ptr::read_volatile(value) }
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
