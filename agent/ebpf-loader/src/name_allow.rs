//! The kernel side of name-based egress (docs/dns-egress.md): the agent's DNS proxy
//! (`agt_jail_dns::DnsProxy`) writes an allowed name's addresses into the agent's
//! `CONNECT_ALLOW` trie through [`KernelAllowMap`], and [`NameAllows`] removes them when
//! the last name that allowed them lapses. [`NameAllows::names_of`] says which names an
//! address came from, for the records of connects to it.
use std::sync::{Arc, Mutex, MutexGuard};

use agt_jail_dns::{AllowMap, Dest, ExpiringAllows};

use crate::{AgentPrograms, AllowRule, LoaderError};

/// One agent's host entries in the connect allow-list (`addr/32` or `/128`, one port).
pub struct KernelAllowMap {
    programs: Arc<Mutex<AgentPrograms>>,
    agent_id: u64,
}

/// The allow sink the CLI hands the DNS proxy: kernel writes plus per-name expiry.
/// Its calls lock the shared [`AgentPrograms`] while they hold the `NameAllows` lock,
/// so nothing may lock a `NameAllows` while holding the programs' lock.
pub type NameAllows = ExpiringAllows<KernelAllowMap>;

impl KernelAllowMap {
    pub fn new(programs: Arc<Mutex<AgentPrograms>>, agent_id: u64) -> Self {
        Self { programs, agent_id }
    }

    fn programs(&self) -> Result<MutexGuard<'_, AgentPrograms>, LoaderError> {
        self.programs.lock().map_err(|_| LoaderError::Map {
            map: "CONNECT_ALLOW",
            message: "the loaded programs' lock is poisoned (a thread panicked while updating maps)".into(),
        })
    }
}

impl AllowMap for KernelAllowMap {
    type Error = LoaderError;

    fn insert(&mut self, (addr, port): Dest) -> Result<(), LoaderError> {
        self.programs()?.allow_connect(self.agent_id, AllowRule::host(addr, port))
    }

    fn remove(&mut self, (addr, port): Dest) -> Result<(), LoaderError> {
        self.programs()?.revoke_connect(self.agent_id, AllowRule::host(addr, port))
    }
}

/// The allow sink of agent `agent_id`. `pinned` are the profile's own allow-list entries:
/// those that name one host and one port are never removed by a name lapsing (wider
/// entries are other trie keys, which a name's removal does not touch anyway).
pub fn name_allows(programs: Arc<Mutex<AgentPrograms>>, agent_id: u64, pinned: &[AllowRule]) -> NameAllows {
    ExpiringAllows::new(KernelAllowMap::new(programs, agent_id), pinned_hosts(pinned))
}

/// The destinations of `pinned` that a name lapsing must never remove: the entries that
/// name one host and one port (the keys a name's allowance writes).
pub fn pinned_hosts(pinned: &[AllowRule]) -> impl Iterator<Item = Dest> + '_ {
    pinned.iter().filter(|rule| **rule == AllowRule::host(rule.addr, rule.port)).map(|rule| (rule.addr, rule.port))
}
