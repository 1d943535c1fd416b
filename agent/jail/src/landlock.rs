//! The Landlock ruleset as data: which accesses are handled for this kernel's ABI and
//! which paths/ports get which rights. [`LandlockPlan::for_abi`] is pure and tested;
//! the launcher applies the plan in the child (opening each path inside the new root).
use std::path::{Path, PathBuf};

/// Filesystem access rights (linux/landlock.h).
pub mod fs {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    pub const REMOVE_DIR: u64 = 1 << 4;
    pub const REMOVE_FILE: u64 = 1 << 5;
    pub const MAKE_CHAR: u64 = 1 << 6;
    pub const MAKE_DIR: u64 = 1 << 7;
    pub const MAKE_REG: u64 = 1 << 8;
    pub const MAKE_SOCK: u64 = 1 << 9;
    pub const MAKE_FIFO: u64 = 1 << 10;
    pub const MAKE_BLOCK: u64 = 1 << 11;
    pub const MAKE_SYM: u64 = 1 << 12;
    /// ABI 2.
    pub const REFER: u64 = 1 << 13;
    /// ABI 3.
    pub const TRUNCATE: u64 = 1 << 14;
    /// ABI 5.
    pub const IOCTL_DEV: u64 = 1 << 15;

    pub const READ: u64 = READ_FILE | READ_DIR;
    pub const WRITE: u64 = WRITE_FILE
        | REMOVE_DIR
        | REMOVE_FILE
        | MAKE_CHAR
        | MAKE_DIR
        | MAKE_REG
        | MAKE_SOCK
        | MAKE_FIFO
        | MAKE_BLOCK
        | MAKE_SYM
        | REFER
        | TRUNCATE;
    /// Rights that make sense on a non-directory (others make add_rule fail with EINVAL).
    pub const FILE_ONLY: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;
}

/// TCP rights (ABI 4).
pub mod net {
    pub const BIND_TCP: u64 = 1 << 0;
    pub const CONNECT_TCP: u64 = 1 << 1;
}

/// IPC scopes (ABI 6).
pub mod scope {
    pub const ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    pub const SIGNAL: u64 = 1 << 1;
}

/// Every filesystem right the given ABI knows.
pub fn fs_rights_for_abi(abi: u32) -> u64 {
    let mut rights = (1 << 13) - 1;
    if abi >= 2 {
        rights |= fs::REFER;
    }
    if abi >= 3 {
        rights |= fs::TRUNCATE;
    }
    if abi >= 5 {
        rights |= fs::IOCTL_DEV;
    }
    rights
}

/// What a ring asks of Landlock (from its profile), before the kernel's ABI is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LandlockRequest {
    /// Paths (inside the jail's root) with read rights.
    pub read: Vec<PathBuf>,
    /// Paths with read and write rights.
    pub write: Vec<PathBuf>,
    /// Paths (files or directories) whose files may be executed.
    pub execute: Vec<PathBuf>,
    /// Handle TCP connect and allow only these ports (None: do not restrict connect).
    pub connect_ports: Option<Vec<u16>>,
    /// Handle TCP bind and allow only these ports (None: do not restrict bind).
    pub bind_ports: Option<Vec<u16>>,
    /// Scope abstract unix sockets and signals to the jail.
    pub scope_ipc: bool,
}

/// One path rule: `access` beneath `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    pub path: PathBuf,
    pub access: u64,
}

/// The ruleset to create on a kernel with a given ABI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LandlockPlan {
    pub abi: u32,
    pub handled_fs: u64,
    pub handled_net: u64,
    pub scoped: u64,
    pub paths: Vec<PathRule>,
    pub ports: Vec<(u64, u16)>,
    /// Parts of the request this ABI cannot enforce (reported by doctor and exec).
    pub unenforced: Vec<&'static str>,
}

impl LandlockPlan {
    /// Plans the ruleset for `abi` (0 = no Landlock: an empty plan that enforces nothing).
    pub fn for_abi(req: &LandlockRequest, abi: u32) -> Self {
        let mut unenforced = Vec::new();
        if abi == 0 {
            return Self {
                abi,
                handled_fs: 0,
                handled_net: 0,
                scoped: 0,
                paths: Vec::new(),
                ports: Vec::new(),
                unenforced: vec!["filesystem", "exec", "tcp", "ipc scopes"],
            };
        }
        let handled_fs = fs_rights_for_abi(abi);
        let mut paths: Vec<PathRule> = Vec::new();
        let mut add = |path: &Path, access: u64| {
            let access = access & handled_fs;
            match paths.iter_mut().find(|r| r.path == path) {
                Some(rule) => rule.access |= access,
                None => paths.push(PathRule { path: path.to_path_buf(), access }),
            }
        };
        for p in &req.read {
            add(p, fs::READ);
        }
        for p in &req.write {
            add(p, fs::READ | fs::WRITE | fs::IOCTL_DEV);
        }
        for p in &req.execute {
            add(p, fs::READ_FILE | fs::EXECUTE);
        }
        let mut handled_net = 0;
        let mut ports = Vec::new();
        if abi >= 4 {
            if let Some(list) = &req.connect_ports {
                handled_net |= net::CONNECT_TCP;
                ports.extend(list.iter().map(|p| (net::CONNECT_TCP, *p)));
            }
            if let Some(list) = &req.bind_ports {
                handled_net |= net::BIND_TCP;
                ports.extend(list.iter().map(|p| (net::BIND_TCP, *p)));
            }
        } else if req.connect_ports.is_some() || req.bind_ports.is_some() {
            unenforced.push("tcp");
        }
        let scoped = if req.scope_ipc && abi >= 6 {
            scope::ABSTRACT_UNIX_SOCKET | scope::SIGNAL
        } else {
            if req.scope_ipc {
                unenforced.push("ipc scopes");
            }
            0
        };
        if abi < 3 {
            unenforced.push("truncate");
        }
        Self { abi, handled_fs, handled_net, scoped, paths, ports, unenforced }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request() -> LandlockRequest {
        LandlockRequest {
            read: vec!["/".into()],
            write: vec!["/work".into(), "/tmp".into()],
            execute: vec!["/usr".into()],
            connect_ports: Some(vec![443]),
            bind_ports: Some(vec![]),
            scope_ipc: true,
        }
    }

    #[test]
    fn abi7_enforces_everything() {
        let plan = LandlockPlan::for_abi(&request(), 7);
        assert!(plan.unenforced.is_empty(), "{:?}", plan.unenforced);
        assert_eq!(plan.handled_net, net::CONNECT_TCP | net::BIND_TCP);
        assert_eq!(plan.scoped, scope::SIGNAL | scope::ABSTRACT_UNIX_SOCKET);
        assert_eq!(plan.ports, vec![(net::CONNECT_TCP, 443)]);
        let work = plan.paths.iter().find(|r| r.path == Path::new("/work")).unwrap();
        assert!(work.access & fs::WRITE_FILE != 0 && work.access & fs::EXECUTE == 0);
        let usr = plan.paths.iter().find(|r| r.path == Path::new("/usr")).unwrap();
        assert!(usr.access & fs::EXECUTE != 0 && usr.access & fs::WRITE_FILE == 0);
        let root = plan.paths.iter().find(|r| r.path == Path::new("/")).unwrap();
        assert_eq!(root.access, fs::READ);
    }

    #[test]
    fn older_abis_report_what_they_cannot_enforce() {
        let plan = LandlockPlan::for_abi(&request(), 1);
        assert_eq!(plan.handled_fs & (fs::REFER | fs::TRUNCATE | fs::IOCTL_DEV), 0);
        assert!(plan.unenforced.contains(&"tcp") && plan.unenforced.contains(&"ipc scopes"));
        assert!(plan.paths.iter().all(|r| r.access & !plan.handled_fs == 0));
        let none = LandlockPlan::for_abi(&request(), 0);
        assert!(none.paths.is_empty() && none.unenforced.contains(&"filesystem"));
    }

    #[test]
    fn rights_merge_per_path() {
        let req = LandlockRequest { read: vec!["/a".into()], execute: vec!["/a".into()], ..Default::default() };
        let plan = LandlockPlan::for_abi(&req, 7);
        assert_eq!(plan.paths.len(), 1);
        assert_eq!(plan.paths[0].access, fs::READ | fs::EXECUTE);
        assert_eq!(plan.handled_net, 0);
    }
}
