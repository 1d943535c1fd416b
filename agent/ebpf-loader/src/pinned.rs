//! Enforcement that outlives the process that set it up (docs/adr/0013-pinned-enforcement.md).
//!
//! The cgroup programs stay attached as long as something holds their `bpf_link`: the
//! loader's descriptors, or a pin under bpffs. [`AgentPrograms::pin_enforcement`] pins the
//! links of every cgroup the programs were attached to, and the maps those programs decide
//! with, into a run's directory (beside the rings and counters of
//! [`AgentPrograms::pin_events`]). After the process dies, even by `kill -9`, the kernel keeps
//! denying; [`PinnedEnforcement::open`] adopts the pins (a restarted owner reads the deny
//! counters and can tighten the agent's flags) and [`PinnedEnforcement::unpin`] ends it.
use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupSockAddr,
    },
};

use crate::{AgentPrograms, LoaderError};

/// Pin names of the enforcement state in a run's directory.
pub mod enforcement_pins {
    /// The prefix of a link pin: `link-<cgroup id>-<program>`.
    pub const LINK_PREFIX: &str = "link-";
    /// The maps the cgroup programs decide with: (object's map name, pin name).
    pub const MAPS: [(&str, &str); 11] = [
        ("AGENT_CGROUPS", "agent_cgroups"),
        ("AGENT_FLAGS", "agent_flags"),
        ("HOST_NETNS", "host_netns"),
        ("CONNECT_DENY", "connect_deny"),
        ("CONNECT_ALLOW", "connect_allow"),
        ("NET_GENERATION", "net_generation"),
        ("NET_ADDR4", "net_addr4"),
        ("NET_ADDR6", "net_addr6"),
        ("NET_PORTS", "net_ports"),
        ("NET_VERDICTS", "net_verdicts"),
        ("NET_LIMITS", "net_limits"),
    ];
    /// The pin of the per-agent flags map (`AGENT_FLAG_*`).
    pub const AGENT_FLAGS: &str = "agent_flags";
}

/// One cgroup program attached to one cgroup, its link still owned by the object.
pub(crate) struct Attached {
    pub(crate) cgroup_id: u64,
    pub(crate) program: &'static str,
    pub(crate) link: aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
}

fn link_pin_name(cgroup_id: u64, program: &str) -> String {
    format!("{}{cgroup_id}-{program}", enforcement_pins::LINK_PREFIX)
}

/// The cgroup id (cgroup2 directory inode) of an open cgroup directory.
pub(crate) fn cgroup_id_of(dir: impl AsFd) -> Result<u64, LoaderError> {
    use std::os::unix::fs::MetadataExt;
    let error = |err: std::io::Error| LoaderError::Attach { program: "cgroup", message: err.to_string() };
    let file = std::fs::File::from(dir.as_fd().try_clone_to_owned().map_err(error)?);
    Ok(file.metadata().map_err(error)?.ino())
}

fn pin_error(path: &Path, err: impl std::fmt::Display) -> LoaderError {
    LoaderError::Pin { path: path.to_path_buf(), message: err.to_string() }
}

impl AgentPrograms {
    /// Pins, in `dir` (an existing directory on bpffs), the links of the network programs
    /// attached by [`AgentPrograms::attach_cgroup`] (`link-<cgroup id>-<program>`) and the
    /// maps they decide with ([`enforcement_pins::MAPS`]). From then on the agent's cgroup
    /// stays governed after this object is dropped or its process dies, until
    /// [`PinnedEnforcement::unpin`].
    ///
    /// Needs `bpf_link` (Linux 5.7); older kernels attach without a link, which cannot be
    /// pinned, and get [`LoaderError::Pin`] before anything is pinned. A link whose pin
    /// fails stays held by this object (never detached by the failure); pins already made
    /// stay for `unpin`. Call once per attachment: pinning again finds the map pins there.
    pub fn pin_enforcement(&mut self, dir: &Path) -> Result<(), LoaderError> {
        // aya attaches cgroup programs through a bpf_link from 5.7 on; before, the link
        // cannot be pinned and taking it out to try would detach it.
        let linked = aya::util::KernelVersion::current()
            .map_err(|err| pin_error(dir, format!("cannot read the kernel version: {err}")))?;
        if linked < aya::util::KernelVersion::new(5, 7, 0) {
            return Err(pin_error(
                dir,
                format!("kernel {linked:?} attaches cgroup programs without a bpf_link (Linux < 5.7)"),
            ));
        }
        for (name, pin) in enforcement_pins::MAPS {
            let map = self.bpf.map(name).ok_or(LoaderError::Missing { what: "map", name })?;
            let path = dir.join(pin);
            map.pin(&path).map_err(|err| pin_error(&path, err))?;
        }
        while let Some(attached) = self.attached.pop() {
            let program: &mut CgroupSockAddr = crate::programs::program(&mut self.bpf, attached.program)?;
            let link = program.take_link(attached.link).map_err(|err| LoaderError::Attach {
                program: attached.program,
                message: format!("cannot take the link: {err}"),
            })?;
            let path = dir.join(link_pin_name(attached.cgroup_id, attached.program));
            // From 5.7 on (checked above) every cgroup attachment is a bpf_link.
            let fd_link = FdLink::try_from(link).map_err(|err| pin_error(&path, err))?;
            // A second descriptor of the link, held by this object whatever happens to the
            // pin: a failed pin must not detach the agent's programs (fail closed).
            let keep = fd_link
                .info()
                .map(|info| info.id())
                .map_err(|err| err.to_string())
                .and_then(|id| crate::sys::link_fd_by_id(id).map_err(|err| err.to_string()));
            let keep = match keep {
                Ok(keep) => keep,
                Err(err) => {
                    // Dropping the link would detach it: its descriptor stays open (and the
                    // programs attached) until this process ends.
                    std::mem::forget(fd_link);
                    return Err(pin_error(&path, format!("cannot hold a second descriptor of the link: {err}")));
                }
            };
            self.held_links.push(keep);
            fd_link.pin(&path).map_err(|err| pin_error(&path, err))?;
        }
        Ok(())
    }
}

/// The enforcement a process pinned in a run's directory, adopted by another process.
pub struct PinnedEnforcement {
    dir: PathBuf,
    links: Vec<PinnedLink>,
}

impl PinnedEnforcement {
    /// Opens the pins [`AgentPrograms::pin_enforcement`] left in `dir`. Holding the
    /// result changes nothing in the kernel; dropping it neither.
    pub fn open(dir: &Path) -> Result<Self, LoaderError> {
        let entries = std::fs::read_dir(dir).map_err(|err| pin_error(dir, err))?;
        let mut links = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| pin_error(dir, err))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(enforcement_pins::LINK_PREFIX) {
                let path = entry.path();
                links.push(PinnedLink::from_pin(&path).map_err(|err| pin_error(&path, err))?);
            }
        }
        if links.is_empty() {
            return Err(pin_error(dir, "no pinned links: nothing is enforced from here"));
        }
        for (_, pin) in enforcement_pins::MAPS {
            let path = dir.join(pin);
            if !path.exists() {
                return Err(pin_error(&path, "missing pinned map"));
            }
        }
        Ok(Self { dir: dir.to_path_buf(), links })
    }

    /// How many program links are pinned.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Agent `agent_id`'s `AGENT_FLAG_*` bits in the pinned flags map (0 when none).
    pub fn agent_flags(&self, agent_id: u64) -> Result<u32, LoaderError> {
        match self.flags_map()?.get(&agent_id, 0) {
            Ok(flags) => Ok(flags),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(err) => Err(LoaderError::Map { map: enforcement_pins::AGENT_FLAGS, message: err.to_string() }),
        }
    }

    /// Sets `flags` (OR-ed into what is there) for agent `agent_id`, e.g.
    /// `AGENT_FLAG_NET_DENY_ALL` to cut a running agent off without its owner.
    pub fn add_agent_flags(&self, agent_id: u64, flags: u32) -> Result<(), LoaderError> {
        let current = self.agent_flags(agent_id)?;
        self.flags_map()?
            .insert(agent_id, current | flags, 0)
            .map_err(|err| LoaderError::Map { map: enforcement_pins::AGENT_FLAGS, message: err.to_string() })
    }

    fn flags_map(&self) -> Result<HashMap<MapData, u64, u32>, LoaderError> {
        let path = self.dir.join(enforcement_pins::AGENT_FLAGS);
        let data = MapData::from_pin(&path).map_err(|err| pin_error(&path, err))?;
        HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|err| LoaderError::Map { map: enforcement_pins::AGENT_FLAGS, message: err.to_string() })
    }

    /// Ends the pinned enforcement: removes the link pins (the programs detach once no
    /// process holds them either) and the map pins. The run's event pins stay for their
    /// reader ([`crate::EventReader::open_pinned`]).
    pub fn unpin(self) -> Result<(), LoaderError> {
        for link in self.links {
            // Dropping the returned descriptor is what detaches when nothing else holds it.
            drop(link.unpin().map_err(|err| pin_error(&self.dir, err))?);
        }
        unpin_maps(&self.dir)
    }
}

/// Removes the map pins of [`enforcement_pins::MAPS`] from `dir`; a missing pin is fine
/// (an earlier unpin got that far).
pub fn unpin_maps(dir: &Path) -> Result<(), LoaderError> {
    for (_, pin) in enforcement_pins::MAPS {
        let path = dir.join(pin);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(pin_error(&path, err)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_name_cgroup_and_program() {
        assert_eq!(link_pin_name(4242, "connect4"), "link-4242-connect4");
        let names: std::collections::HashSet<_> = enforcement_pins::MAPS.iter().map(|(_, pin)| *pin).collect();
        assert_eq!(names.len(), enforcement_pins::MAPS.len(), "pin names are unique");
        assert!(names.iter().all(|name| !name.starts_with(enforcement_pins::LINK_PREFIX)));
        for event_pin in [
            crate::pins::EVENTS,
            crate::pins::PRIORITY,
            crate::pins::DENY_SUMMARY,
            crate::pins::EVENT_DROPS,
            crate::pins::DENY_DROPS,
            crate::pins::DENY_SUMMARY_WRITTEN,
        ] {
            assert!(!names.contains(event_pin), "{event_pin} is the event layout's");
        }
    }

    #[test]
    fn adopting_an_empty_or_missing_directory_is_a_located_error() {
        let missing = Path::new("/nonexistent/agt-jail-pins");
        let err = PinnedEnforcement::open(missing).err().map(|err| err.to_string()).unwrap_or_default();
        assert!(err.contains("/nonexistent/agt-jail-pins"), "{err}");
        let dir = std::env::temp_dir().join(format!("agt-jail-pins-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let err = PinnedEnforcement::open(&dir).err().map(|err| err.to_string()).unwrap_or_default();
        let _ = std::fs::remove_dir(&dir);
        assert!(err.contains("no pinned links"), "{err}");
    }
}
