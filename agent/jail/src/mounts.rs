//! The jail's filesystem view as a list of mount operations (pure; tested), carried
//! out by the launcher in the child's private mount namespace.
//!
//! Layout while building: the old root is at `/oldroot`, the new one at `/newroot`
//! (both inside a scratch tmpfs that becomes the root for a moment, as bubblewrap
//! does). Sources are read through `/oldroot`, so a workspace under the host's /tmp
//! still resolves after the jail's own /tmp is mounted.
use std::path::{Path, PathBuf};

/// Where the view is built and where the old root is parked.
pub const NEWROOT: &str = "/newroot";
pub const OLDROOT: &str = "/oldroot";
/// The empty, mode-000 file bound over hidden files.
pub const EMPTY_FILE: &str = "/.agt-jail-empty";
/// The scratch workspace mount point in ring 3.
pub const SCRATCH: &str = "/workspace";
/// The host daemon's directory (its control socket, the agents' control sockets): never
/// reachable from inside, whatever the profile's `hide` list says.
pub const DAEMON_DIR: &str = "/run/agt-jail";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountOp {
    /// mkdir (one level; the plan lists parents first).
    Mkdir(PathBuf),
    /// Create an empty file as a bind target.
    Touch(PathBuf),
    /// Recursive bind `src` (under /oldroot) onto `dst` (under /newroot).
    Bind {
        src: PathBuf,
        dst: PathBuf,
    },
    /// Make the bind at `dst` read-only (keeping the source's nosuid/nodev/noexec locks), plus nosuid and nodev.
    RemountRo {
        dst: PathBuf,
    },
    /// Make the mount at `dst` non-executable (keeping its other flags), plus nosuid and
    /// nodev, and read-only when `readonly`: where Landlock is absent, what must not run is
    /// on a noexec mount.
    RemountNoexec {
        dst: PathBuf,
        readonly: bool,
    },
    /// tmpfs with options at `dst`.
    Tmpfs {
        dst: PathBuf,
        options: String,
        flags: u64,
    },
    /// A fresh procfs for the jail's pid namespace.
    Proc {
        dst: PathBuf,
    },
    /// A private devpts instance.
    Devpts {
        dst: PathBuf,
    },
    Symlink {
        target: PathBuf,
        link: PathBuf,
    },
    /// Bind the empty file over a hidden file.
    HideFile {
        dst: PathBuf,
    },
    /// Mount an empty read-only tmpfs over a hidden directory.
    HideDir {
        dst: PathBuf,
    },
}

/// How a step is named in a setup error ("jail setup failed at mount step ...").
impl std::fmt::Display for MountOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountOp::Mkdir(path) => write!(f, "mkdir {}", path.display()),
            MountOp::Touch(path) => write!(f, "create {}", path.display()),
            MountOp::Bind { src, dst } => write!(f, "bind {} on {}", src.display(), dst.display()),
            MountOp::RemountRo { dst } => write!(f, "remount {} read-only", dst.display()),
            MountOp::RemountNoexec { dst, readonly: true } => {
                write!(f, "remount {} read-only and noexec", dst.display())
            }
            MountOp::RemountNoexec { dst, readonly: false } => write!(f, "remount {} noexec", dst.display()),
            MountOp::Tmpfs { dst, .. } => write!(f, "tmpfs on {}", dst.display()),
            MountOp::Proc { dst } => write!(f, "proc on {}", dst.display()),
            MountOp::Devpts { dst } => write!(f, "devpts on {}", dst.display()),
            MountOp::Symlink { target, link } => write!(f, "symlink {} -> {}", link.display(), target.display()),
            MountOp::HideFile { dst } => write!(f, "hide file {}", dst.display()),
            MountOp::HideDir { dst } => write!(f, "hide directory {}", dst.display()),
        }
    }
}

/// One host path to show inside, at the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
    pub is_dir: bool,
    /// Mounted noexec: nothing in it may run (used where Landlock is absent, whose
    /// EXECUTE rules otherwise say what runs).
    pub noexec: bool,
}

/// What the view contains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewSpec {
    /// Host paths shown at the same path inside (system ro, workspace, --rw/--ro).
    pub binds: Vec<Bind>,
    /// A writable tmpfs at [`SCRATCH`].
    pub scratch: bool,
    /// Existing host paths hidden inside (directories get an empty tmpfs, files the empty file).
    pub hide: Vec<(PathBuf, bool)>,
    /// Device nodes bound from the host's /dev.
    pub devices: Vec<&'static str>,
    /// Whether the private /dev/pts and /dev/ptmx are created.
    pub devpts: bool,
    /// Host symlinks reproduced inside (merged-/usr systems: /bin -> usr/bin).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    /// The agent's terminal (a host pty slave), shown as /dev/console so ttyname() finds it.
    pub console: Option<PathBuf>,
    /// Host files shown read-only at another path inside, `(source, destination)`: the
    /// generated resolv.conf. The destination must not be a symlink inside the view (the
    /// launcher resolves `/etc/resolv.conf` to its final target first).
    pub files: Vec<(PathBuf, PathBuf)>,
    /// The private /tmp is mounted noexec (where Landlock is absent: written files never run).
    pub tmp_noexec: bool,
    /// The scratch workspace is mounted noexec (where Landlock is absent and the ring does
    /// not run what is in its workspace).
    pub scratch_noexec: bool,
}

pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// `path` (absolute) below `root`, as bytes: a path need not be UTF-8.
fn under(root: &str, path: &Path) -> PathBuf {
    let mut joined = std::ffi::OsString::from(root);
    joined.push(path.as_os_str());
    PathBuf::from(joined)
}

/// Pushes Mkdir for every component of `path` below `/newroot` (idempotent at run time).
fn mkdirs(ops: &mut Vec<MountOp>, path: &Path) {
    let mut cur = PathBuf::from("/");
    for c in path.components().skip(1) {
        cur.push(c);
        let op = MountOp::Mkdir(under(NEWROOT, &cur));
        if !ops.contains(&op) {
            ops.push(op);
        }
    }
}

impl ViewSpec {
    /// The ordered operations. Binds are sorted by depth so a parent is mounted before
    /// what is mounted inside it.
    pub fn plan(&self) -> Vec<MountOp> {
        let mut ops = Vec::new();
        // Private /tmp and minimal /dev first: a workspace under the host's /tmp is
        // then bound on top of the private one, not hidden by it.
        for (dir, options) in [("/tmp", "mode=1777,size=256m"), ("/dev", "mode=0755,size=64k")] {
            ops.push(MountOp::Mkdir(under(NEWROOT, Path::new(dir))));
            let flags = match dir {
                "/dev" => libc::MS_NOSUID | libc::MS_NOEXEC,
                _ if self.tmp_noexec => libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                _ => libc::MS_NOSUID | libc::MS_NODEV,
            };
            ops.push(MountOp::Tmpfs { dst: under(NEWROOT, Path::new(dir)), options: options.into(), flags });
        }
        let mut binds = self.binds.clone();
        binds.sort_by_key(|b| b.path.components().count());
        // The daemon's directory, where a bind of it or of a parent shows it: an empty
        // tmpfs goes over it before the binds inside it (the agent's own identity socket)
        // are made, and turns read-only after them.
        let daemon_depth = Path::new(DAEMON_DIR).components().count();
        let mut cover_daemon_dir = daemon_dir_exposed(&self.binds, &self.hide) && Path::new(DAEMON_DIR).is_dir();
        let daemon_dir_covered = cover_daemon_dir;
        for bind in &binds {
            if cover_daemon_dir && bind.path.components().count() > daemon_depth {
                ops.push(daemon_dir_cover());
                cover_daemon_dir = false;
            }
            match bind.path.parent() {
                Some(parent) if bind.is_dir => {
                    mkdirs(&mut ops, parent);
                    ops.push(MountOp::Mkdir(under(NEWROOT, &bind.path)));
                }
                Some(parent) => {
                    mkdirs(&mut ops, parent);
                    ops.push(MountOp::Touch(under(NEWROOT, &bind.path)));
                }
                None => {}
            }
            let dst = under(NEWROOT, &bind.path);
            ops.push(MountOp::Bind { src: under(OLDROOT, &bind.path), dst: dst.clone() });
            if bind.noexec {
                ops.push(MountOp::RemountNoexec { dst, readonly: !bind.writable });
            } else if !bind.writable {
                ops.push(MountOp::RemountRo { dst });
            }
        }
        if cover_daemon_dir {
            ops.push(daemon_dir_cover());
        }
        if daemon_dir_covered {
            ops.push(MountOp::RemountRo { dst: under(NEWROOT, Path::new(DAEMON_DIR)) });
        }
        for (link, target) in &self.symlinks {
            if let Some(parent) = link.parent() {
                mkdirs(&mut ops, parent);
            }
            ops.push(MountOp::Symlink { target: target.clone(), link: under(NEWROOT, link) });
        }
        for (src, dst) in &self.files {
            if let Some(parent) = dst.parent() {
                mkdirs(&mut ops, parent);
            }
            let dst = under(NEWROOT, dst);
            ops.push(MountOp::Touch(dst.clone()));
            ops.push(MountOp::Bind { src: under(OLDROOT, src), dst: dst.clone() });
            ops.push(MountOp::RemountRo { dst });
        }
        if self.scratch {
            mkdirs(&mut ops, Path::new(SCRATCH));
            ops.push(MountOp::Tmpfs {
                dst: under(NEWROOT, Path::new(SCRATCH)),
                options: "mode=0755,size=256m".into(),
                flags: libc::MS_NOSUID | libc::MS_NODEV | if self.scratch_noexec { libc::MS_NOEXEC } else { 0 },
            });
        }
        for dev in &self.devices {
            let dst = under(NEWROOT, &Path::new("/dev").join(dev));
            ops.push(MountOp::Touch(dst.clone()));
            ops.push(MountOp::Bind { src: under(OLDROOT, &Path::new("/dev").join(dev)), dst });
        }
        if let Some(console) = &self.console {
            let dst = under(NEWROOT, Path::new("/dev/console"));
            ops.push(MountOp::Touch(dst.clone()));
            ops.push(MountOp::Bind { src: under(OLDROOT, console), dst });
        }
        if self.devpts {
            ops.push(MountOp::Mkdir(under(NEWROOT, Path::new("/dev/pts"))));
            ops.push(MountOp::Devpts { dst: under(NEWROOT, Path::new("/dev/pts")) });
            ops.push(MountOp::Symlink { target: "pts/ptmx".into(), link: under(NEWROOT, Path::new("/dev/ptmx")) });
        }
        ops.push(MountOp::Mkdir(under(NEWROOT, Path::new("/dev/shm"))));
        ops.push(MountOp::Tmpfs {
            dst: under(NEWROOT, Path::new("/dev/shm")),
            options: "mode=1777,size=64m".into(),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        });
        for (target, link) in [
            ("/proc/self/fd", "fd"),
            ("/proc/self/fd/0", "stdin"),
            ("/proc/self/fd/1", "stdout"),
            ("/proc/self/fd/2", "stderr"),
        ] {
            ops.push(MountOp::Symlink { target: target.into(), link: under(NEWROOT, &Path::new("/dev").join(link)) });
        }
        // /dev itself read-only once complete: nothing new appears beside the devices
        // (its devices, /dev/pts and /dev/shm are mounts of their own and keep their flags).
        ops.push(MountOp::RemountRo { dst: under(NEWROOT, Path::new("/dev")) });
        ops.push(MountOp::Mkdir(under(NEWROOT, Path::new("/proc"))));
        ops.push(MountOp::Proc { dst: under(NEWROOT, Path::new("/proc")) });
        // /proc/sys read-only (global sysctls); Landlock refuses the writes as well.
        ops.push(MountOp::Bind {
            src: under(NEWROOT, Path::new("/proc/sys")),
            dst: under(NEWROOT, Path::new("/proc/sys")),
        });
        ops.push(MountOp::RemountRo { dst: under(NEWROOT, Path::new("/proc/sys")) });
        // All of /proc read-only: the agent writes no proc file (Landlock refuses those
        // writes as well; without Landlock this mount is what refuses them, e.g.
        // /proc/sysrq-trigger, which uid 0 without capabilities could otherwise write).
        // Reopening /proc/self/fd/N reaches the file's own mount, not this one.
        ops.push(MountOp::RemountRo { dst: under(NEWROOT, Path::new("/proc")) });
        for (path, is_dir) in &self.hide {
            let dst = under(NEWROOT, path);
            if *is_dir {
                ops.push(MountOp::HideDir { dst });
            } else {
                // The empty file is the agent's uid's to chmod: read-only and noexec, so
                // it never becomes a place to write to or run from.
                ops.push(MountOp::HideFile { dst: dst.clone() });
                ops.push(MountOp::RemountNoexec { dst, readonly: true });
            }
        }
        ops
    }
}

/// Whether a bind shows [`DAEMON_DIR`] (a bind of it or of a parent) and no hidden entry
/// covers it. A bind of a path inside it shows only that path.
fn daemon_dir_exposed(binds: &[Bind], hide: &[(PathBuf, bool)]) -> bool {
    let dir = Path::new(DAEMON_DIR);
    binds.iter().any(|b| dir.starts_with(&b.path)) && !hide.iter().any(|(h, _)| dir.starts_with(h))
}

/// The writable-while-building tmpfs over [`DAEMON_DIR`] (remounted read-only once the
/// binds inside it are made).
fn daemon_dir_cover() -> MountOp {
    MountOp::Tmpfs {
        dst: under(NEWROOT, Path::new(DAEMON_DIR)),
        options: "mode=0755,size=64k".into(),
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> ViewSpec {
        ViewSpec {
            binds: vec![
                Bind { path: "/home/u/work/sub".into(), writable: true, is_dir: true, noexec: false },
                Bind { path: "/usr".into(), writable: false, is_dir: true, noexec: false },
                Bind { path: "/home/u/work".into(), writable: true, is_dir: true, noexec: false },
            ],
            scratch: false,
            hide: vec![("/home/u/work/.ssh".into(), true), ("/etc/shadow".into(), false)],
            devices: DEVICES.to_vec(),
            devpts: true,
            symlinks: vec![("/bin".into(), "usr/bin".into())],
            console: Some("/dev/pts/3".into()),
            files: Vec::new(),
            tmp_noexec: false,
            scratch_noexec: false,
        }
    }

    #[test]
    fn the_daemon_directory_is_hidden_wherever_a_bind_shows_it() {
        let bind = |path: &str| Bind { path: path.into(), writable: false, is_dir: true, noexec: false };
        assert!(!daemon_dir_exposed(&[bind("/usr"), bind("/etc")], &[]));
        assert!(daemon_dir_exposed(&[bind("/usr"), bind("/run")], &[]));
        assert!(daemon_dir_exposed(&[bind("/")], &[]));
        assert!(daemon_dir_exposed(&[bind("/run/agt-jail")], &[]));
        assert!(!daemon_dir_exposed(&[bind("/run/agt-jail/identity/a")], &[]), "only that path is shown");
        assert!(!daemon_dir_exposed(&[bind("/run/agt-jailx")], &[]));
        assert!(!daemon_dir_exposed(&[bind("/run")], &[("/run/agt-jail".into(), true)]));
        assert!(!daemon_dir_exposed(&[bind("/run")], &[("/run".into(), true)]));
        // The plan (where this host has the directory): the cover goes on after the bind
        // that shows it and before a bind inside it, and is made read-only after that.
        if Path::new(DAEMON_DIR).is_dir() {
            let spec = ViewSpec { binds: vec![bind("/run/agt-jail/identity/a"), bind("/run")], ..Default::default() };
            let ops = spec.plan();
            let at = |want: &dyn Fn(&MountOp) -> bool| ops.iter().position(want).unwrap();
            let run = at(&|o| matches!(o, MountOp::Bind { dst, .. } if dst == Path::new("/newroot/run")));
            let cover = at(&|o| matches!(o, MountOp::Tmpfs { dst, .. } if dst == Path::new("/newroot/run/agt-jail")));
            let inner =
                at(&|o| matches!(o, MountOp::Bind { dst, .. } if dst == Path::new("/newroot/run/agt-jail/identity/a")));
            let ro = at(&|o| matches!(o, MountOp::RemountRo { dst } if dst == Path::new("/newroot/run/agt-jail")));
            assert!(run < cover && cover < inner && inner < ro, "{ops:?}");
        }
    }

    #[test]
    fn parents_mount_before_children_and_ro_is_remounted() {
        let ops = spec().plan();
        let pos = |op: &MountOp| ops.iter().position(|o| o == op).unwrap();
        let work = pos(&MountOp::Bind { src: "/oldroot/home/u/work".into(), dst: "/newroot/home/u/work".into() });
        let sub =
            pos(&MountOp::Bind { src: "/oldroot/home/u/work/sub".into(), dst: "/newroot/home/u/work/sub".into() });
        assert!(work < sub);
        let usr = pos(&MountOp::Bind { src: "/oldroot/usr".into(), dst: "/newroot/usr".into() });
        assert_eq!(ops[usr + 1], MountOp::RemountRo { dst: "/newroot/usr".into() });
        assert!(!ops.contains(&MountOp::RemountRo { dst: "/newroot/home/u/work".into() }));
        assert!(pos(&MountOp::Mkdir("/newroot/home".into())) < pos(&MountOp::Mkdir("/newroot/home/u".into())));
    }

    #[test]
    fn generated_files_are_bound_read_only_after_the_system_binds() {
        let mut spec = spec();
        spec.files.push(("/tmp/agt-jail-resolv-1".into(), "/run/systemd/resolve/stub-resolv.conf".into()));
        let ops = spec.plan();
        let dst = PathBuf::from("/newroot/run/systemd/resolve/stub-resolv.conf");
        let bind = ops
            .iter()
            .position(|o| *o == MountOp::Bind { src: "/oldroot/tmp/agt-jail-resolv-1".into(), dst: dst.clone() })
            .unwrap();
        assert_eq!(ops[bind - 1], MountOp::Touch(dst.clone()));
        assert_eq!(ops[bind + 1], MountOp::RemountRo { dst });
        assert!(ops[..bind].contains(&MountOp::Mkdir("/newroot/run/systemd/resolve".into())));
        let usr = ops.iter().position(|o| matches!(o, MountOp::Bind { src, .. } if src.starts_with("/oldroot/usr")));
        assert!(usr.unwrap() < bind);
    }

    #[test]
    fn paths_are_bytes_not_text() {
        use std::{ffi::OsStr, os::unix::ffi::OsStrExt};
        let odd = Path::new(OsStr::from_bytes(b"/srv/caf\xe9"));
        let spec =
            ViewSpec { binds: vec![Bind { path: odd.into(), writable: true, is_dir: true, noexec: false }], ..spec() };
        let src = Path::new(OsStr::from_bytes(b"/oldroot/srv/caf\xe9")).to_path_buf();
        let dst = Path::new(OsStr::from_bytes(b"/newroot/srv/caf\xe9")).to_path_buf();
        assert!(spec.plan().contains(&MountOp::Bind { src, dst }));
    }

    #[test]
    fn secrets_are_hidden_after_the_binds() {
        let ops = spec().plan();
        let last_bind = ops.iter().rposition(|o| matches!(o, MountOp::Bind { .. })).unwrap();
        let hide_dir =
            ops.iter().position(|o| *o == MountOp::HideDir { dst: "/newroot/home/u/work/.ssh".into() }).unwrap();
        let hide_file = ops.iter().position(|o| *o == MountOp::HideFile { dst: "/newroot/etc/shadow".into() }).unwrap();
        assert!(hide_dir > last_bind && hide_file > last_bind);
    }

    #[test]
    fn a_workspace_under_tmp_is_mounted_over_the_private_tmp() {
        let spec = ViewSpec {
            binds: vec![Bind { path: "/tmp/ws".into(), writable: true, is_dir: true, noexec: false }],
            ..spec()
        };
        let ops = spec.plan();
        let tmp = ops
            .iter()
            .position(|o| matches!(o, MountOp::Tmpfs { dst, .. } if dst == Path::new("/newroot/tmp")))
            .unwrap();
        let ws = ops
            .iter()
            .position(|o| matches!(o, MountOp::Bind { dst, .. } if dst == Path::new("/newroot/tmp/ws")))
            .unwrap();
        assert!(tmp < ws);
    }

    #[test]
    fn private_tmp_proc_and_dev() {
        let ops = spec().plan();
        assert!(ops.iter().any(|o| matches!(o, MountOp::Tmpfs { dst, .. } if dst == Path::new("/newroot/tmp"))));
        assert!(ops.contains(&MountOp::Proc { dst: "/newroot/proc".into() }));
        assert!(ops.contains(&MountOp::RemountRo { dst: "/newroot/proc/sys".into() }));
        assert!(ops.contains(&MountOp::Bind { src: "/oldroot/dev/null".into(), dst: "/newroot/dev/null".into() }));
        assert!(ops.contains(&MountOp::Devpts { dst: "/newroot/dev/pts".into() }));
        assert!(ops.contains(&MountOp::Bind { src: "/oldroot/dev/pts/3".into(), dst: "/newroot/dev/console".into() }));
        assert!(ops.contains(&MountOp::Symlink { target: "usr/bin".into(), link: "/newroot/bin".into() }));
        let scratch = ViewSpec { scratch: true, ..spec() }.plan();
        assert!(scratch
            .iter()
            .any(|o| matches!(o, MountOp::Tmpfs { dst, .. } if dst == Path::new("/newroot/workspace"))));
    }
}
