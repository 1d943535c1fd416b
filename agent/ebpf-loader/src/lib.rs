//! Userspace side of agt-jail's eBPF programs: load the committed object, attach it to
//! agent cgroups, fill its rule maps and decode its events.
//!
//! The object is built from `ebpf/agt-jail-ebpf` by `cargo xtask build-ebpf` and
//! committed, so this crate builds on stable without bpf-linker.

mod btf;
mod events;
pub mod lsm;
mod name_allow;
mod net;
mod pinned;
mod programs;
mod ring;
mod sys;

pub use btf::{KernelOffsets, OffsetError};
pub use events::{
    comm_string, decode, decode_summary, exe_key, pins, Caller, DecodeError, Event, EventReader, NetDetail, NetFamily,
    NetLayer, NetPlanHit, VerdictName,
};
pub use name_allow::{name_allows, pinned_hosts, KernelAllowMap, NameAllows};
pub use net::{NetAction, NetHook, NetLimitRow, NetPlanError, NetProto, NetTables, NetVerdictRow};
pub use pinned::{enforcement_pins, unpin_maps, PinnedEnforcement};
pub use programs::{pinned_counter, AgentPrograms, AllowRule, ConnectRule, LoaderError, TaskFactsMap};
pub use ring::Ring;

/// Whether the loader can tell its own network namespace from an agent's
/// (`SO_NETNS_COOKIE`, Linux 5.14); without it the deny-all layer refuses loopback in
/// every namespace.
pub fn netns_cookie_readable() -> bool {
    sys::own_netns_cookie().is_ok()
}

/// The eBPF object, embedded at build time. Aligned because aya parses it in place.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/agt-jail.bpf.o");
