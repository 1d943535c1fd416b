//! Helpers every agt-jail test uses to say what it needs from the kernel.
//!
//! A test may skip only when the kernel lacks a feature. It then prints why and
//! appends the reason to `$AGT_JAIL_SKIP_LOG`, so `cargo xtask test` reports how many
//! skipped. Inside the test VM (`AGT_JAIL_IN_VM=1`) every requirement the VM provides
//! on all its kernels must hold (see [`Need::vm_provides`]): a missing one there is a
//! failure, never a skip, so the VM proves what the host cannot. A requirement that
//! depends on the kernel version is a counted skip with its reason, reported per kernel by
//! `cargo xtask vm-test`.
//!
//! A debug build of agt-jail takes a lower Landlock ABI than the kernel's from
//! `AGT_JAIL_TEST_LANDLOCK_ABI` (tests only; `0`: as on a kernel without Landlock), so the
//! paths of older kernels run on a newer one; the needs below ask the kernel itself.
pub mod daemon;

use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
};

/// What a test needs from the machine it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Effective uid 0 (CI runs as root).
    Root,
    /// A cgroup v2 hierarchy is mounted (pure or hybrid layout).
    CgroupV2,
    /// BPF LSM programs can be loaded (Tier A): `bpf` in the active LSM list and the
    /// kernel accepts BPF_PROG_TYPE_LSM.
    BpfLsm,
    /// Kernel BTF at /sys/kernel/btf/vmlinux (tp_btf programs and struct offsets).
    Btf,
    /// The kernel can run rings 1 and 2 with their built-in profiles: what `agt-jail exec`
    /// itself checks before it starts one (`launch::check_enforcement`). They run with
    /// Landlock at any ABI and without it (the mount view then holds writes and exec), so
    /// this holds on every kernel of the VM matrix.
    Landlock,
    /// The kernel can run ring 3 with its built-in profile: ring 3 runs only its entry
    /// command, held by Landlock where the kernel has it and otherwise by the entry-only
    /// exec plane (seccomp user notification, Linux 5.0; its CONTINUE answer 5.5), so
    /// this holds on every kernel of the VM matrix (5.10 included).
    Ring3,
    /// Unprivileged users may create user namespaces.
    UserNamespaces,
}

impl Need {
    /// Why the need is not met on this machine, or `None` when it is.
    pub fn missing(self) -> Option<String> {
        match self {
            Need::Root => {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let euid = unsafe { libc::geteuid() };
                (euid != 0).then(|| format!("needs root (euid is {euid})"))
            }
            Need::CgroupV2 => {
                let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
                (!mounts.lines().any(|l| l.contains(" - cgroup2 "))).then(|| "no cgroup2 hierarchy mounted".to_string())
            }
            Need::Btf => (!Path::new("/sys/kernel/btf/vmlinux").exists())
                .then(|| "kernel has no BTF at /sys/kernel/btf/vmlinux".to_string()),
            Need::BpfLsm => bpf_lsm_missing(),
            Need::Landlock => confined_rings_missing(1..=2),
            Need::Ring3 => confined_rings_missing(3..=3),
            Need::UserNamespaces => {
                let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
                let clone = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone").unwrap_or("1".into());
                (max.trim() == "0" || clone.trim() == "0")
                    .then(|| "unprivileged user namespaces are disabled".to_string())
            }
        }
    }
}

impl Need {
    /// Whether the test VM provides this need on every kernel of its matrix (Debian 6.1
    /// and 6.12 booted with `lsm=...,bpf`, and 5.10, pure cgroup v2, as root). In the VM a missing
    /// need of this kind is a failure; a missing need that only newer kernels have is a
    /// skip with its reason (`VM-SKIP` line, counted by the VM runner).
    pub fn vm_provides(self) -> bool {
        match self {
            Need::Root | Need::CgroupV2 | Need::BpfLsm | Need::Btf | Need::UserNamespaces => true,
            Need::Landlock | Need::Ring3 => true,
        }
    }
}

/// Why one of `rings` cannot start on this kernel, if one cannot.
fn confined_rings_missing(rings: std::ops::RangeInclusive<u8>) -> Option<String> {
    rings.into_iter().find_map(|ring| {
        let profile = match agt_jail_jail::Profile::builtin(ring) {
            Ok(profile) => profile,
            Err(e) => return Some(format!("ring {ring}'s built-in profile does not load: {e}")),
        };
        agt_jail_jail::launch::check_enforcement(&profile).err().map(|e| e.to_string())
    })
}

fn bpf_lsm_missing() -> Option<String> {
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if !lsm.split(',').any(|name| name.trim() == "bpf") {
        return Some(format!(
            "BPF LSM is not active (/sys/kernel/security/lsm: {:?}; mount securityfs or boot with lsm=...,bpf)",
            lsm.trim()
        ));
    }
    // `bpf` listed is not enough: some vendor kernels list it and refuse the program
    // type. AGT_JAIL_BPF_LSM_LOADS is set by the test binary's own probe.
    match std::env::var("AGT_JAIL_BPF_LSM_LOADS").as_deref() {
        Ok("0") => Some("the kernel lists bpf but refuses BPF_PROG_TYPE_LSM programs".to_string()),
        _ => None,
    }
}

/// True when running inside agt-jail's test VM.
pub fn in_vm() -> bool {
    std::env::var("AGT_JAIL_IN_VM").as_deref() == Ok("1")
}

/// Checks every need. Returns true when the test can run. When one is missing, outside
/// the VM it records a skip and returns false; inside the VM it panics (a failure) unless
/// every missing need is one the VM's kernel version cannot have (then it prints a
/// `VM-SKIP` line, which the VM runner reports as a skip with the reason).
pub fn require(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<(Need, String)> =
        needs.iter().filter_map(|need| need.missing().map(|reason| (*need, reason))).collect();
    if missing.is_empty() {
        return true;
    }
    let reason = missing.iter().map(|(_, reason)| reason.as_str()).collect::<Vec<_>>().join("; ");
    if in_vm() && missing.iter().all(|(need, _)| !need.vm_provides()) {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        eprintln!("VM-SKIP {test}: {reason} (kernel {})", kernel.trim());
        return false;
    }
    unmet(test, &reason);
    false
}

/// Records that `test` cannot run here because of `reason` (a kernel feature found
/// missing only by trying, e.g. a program the kernel refuses to load). Outside the VM it
/// logs a skip; inside the VM it panics (a failure). The caller returns right after.
pub fn unmet(test: &str, reason: &str) {
    if in_vm() {
        panic!("{test}: required in the test VM but missing: {reason}");
    }
    log_skip(test, reason);
}

/// Records that `test` cannot run because this machine lacks a program it drives (a
/// compiler, `make`, `tmux`, a Rust toolchain): not a kernel matter, so unlike [`unmet`]
/// the test VM, whose minimal userspace has none of them, skips too, with a counted
/// `VM-SKIP` line and the reason. The caller returns right after.
pub fn program_missing(test: &str, reason: &str) {
    if in_vm() {
        eprintln!("VM-SKIP {test}: {reason}");
        return;
    }
    log_skip(test, reason);
}

/// Prints `SKIP test: reason` and appends the reason to `$AGT_JAIL_SKIP_LOG`.
fn log_skip(test: &str, reason: &str) {
    eprintln!("SKIP {test}: {reason}");
    if let Ok(log) = std::env::var("AGT_JAIL_SKIP_LOG") {
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(log) {
            // One write per line: tests skip in parallel, and an appended write is whole
            // only when it is a single one (writeln! writes piece by piece).
            let _ = file.write_all(format!("{test}: {reason}\n").as_bytes());
        }
    }
}

/// The running test's name: libtest names each test's thread after the test.
pub fn current_test_name(fallback: &str) -> String {
    std::thread::current().name().filter(|name| *name != "main").map_or_else(|| fallback.to_string(), str::to_owned)
}

/// `require!(Need::Root, Need::Btf)` at the top of a test: returns early (skip) when a need is missing.
#[macro_export]
macro_rules! require {
    ($($need:expr),+ $(,)?) => {
        if !$crate::require(
            &$crate::current_test_name(concat!(module_path!(), ":", line!())),
            &[$($need),+],
        ) {
            return;
        }
    };
}

/// Asserts the contract for bad input: exit status `code`, exactly one line on stderr,
/// containing `needle`, and no panic. Warnings about what this kernel cannot enforce
/// (`agt-jail: warning: ...`, printed at start on older kernels) are not that line.
pub fn assert_one_line_error(output: &std::process::Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    let lines = err.trim_end().lines().filter(|line| !line.starts_with("agt-jail: warning: ")).count();
    assert_eq!(lines, 1, "expected one line, got: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The absolute path of a system command (test guests have no `PATH` to search).
pub fn which(name: &str) -> PathBuf {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("no {name} in /usr/bin, /bin, /usr/sbin, /sbin"))
}

/// A host in a network namespace of its own behind a veth, as a remote server is to an
/// agent: the agent's traffic reaches it only through the host's forwarding and NAT (it
/// has no route back to the agents' range). It has two addresses, [`RemoteHost::LISTED`]
/// and [`RemoteHost::UNLISTED`], and one TCP server on both that greets and closes.
/// Removed on drop. Built with `ip` (iproute2), which only the tests use.
pub struct RemoteHost {
    name: String,
    server: std::process::Child,
    pub port: u16,
}

impl RemoteHost {
    /// The host's end of the link (a host address, never reachable from an agent).
    pub const GATEWAY: &'static str = "203.0.113.1";
    pub const LISTED: &'static str = "203.0.113.2";
    pub const UNLISTED: &'static str = "203.0.113.3";

    /// `tag` keeps concurrent fixtures of different tests apart (at most 5 characters).
    pub fn start(tag: &str) -> Self {
        use std::{
            io::BufRead,
            process::{Command, Stdio},
        };
        let name = format!("agtt{tag}{}", std::process::id() % 100_000);
        let ip_cmd = which("ip");
        let ip = |args: &[&str]| {
            let status = Command::new(&ip_cmd).args(args).status().unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
            assert!(status.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let host_end = format!("{name}h");
        ip(&["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &name]);
        ip(&["addr", "add", &format!("{}/29", Self::GATEWAY), "dev", &host_end]);
        ip(&["link", "set", &host_end, "up"]);
        for addr in [Self::LISTED, Self::UNLISTED] {
            ip(&["-n", &name, "addr", "add", &format!("{addr}/29"), "dev", "eth0"]);
        }
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        let script = "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 0))\ns.listen(64)\n\
                      print(s.getsockname()[1], flush=True)\nwhile True:\n    c, a = s.accept()\n    \
                      c.sendall(b'hello')\n    c.close()\n";
        let mut server = Command::new(&ip_cmd)
            .args(["netns", "exec", &name])
            .arg(which("python3"))
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the remote server: {e}"));
        let mut line = String::new();
        if let Some(out) = server.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let port = line.trim().parse().unwrap_or_else(|_| panic!("the remote server gave no port: {line:?}"));
        Self { name, server, port }
    }
}

impl Drop for RemoteHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // The host end first: deleting the link takes both ends and the host's address with
        // it at once, while a deleted namespace is torn down later by the kernel (a slow guest
        // showed the next test a host address that vanished under it).
        let ip = which("ip");
        let _ = std::process::Command::new(&ip).args(["link", "del", &format!("{}h", self.name)]).status();
        let _ = std::process::Command::new(&ip).args(["netns", "del", &self.name]).status();
    }
}

/// An upstream resolver for the agent's resolver to ask, on the host's loopback (UDP,
/// a port of its own): answers A queries for its names with their address (TTL 60),
/// AAAA queries for them with no records, and NXDOMAIN for everything else. Counts the
/// queries it got. Stopped on drop.
pub struct TestResolver {
    pub addr: std::net::SocketAddr,
    queries: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestResolver {
    pub fn start(names: &[(&str, std::net::Ipv4Addr)]) -> Self {
        Self::start_on("127.0.0.1:0", names)
    }

    /// The same on `bind` (e.g. `127.0.0.153:53`, where a resolv.conf can name it).
    pub fn start_on(bind: &str, names: &[(&str, std::net::Ipv4Addr)]) -> Self {
        use std::sync::{atomic::Ordering, Arc};

        use hickory_proto::{
            op::{Message, OpCode, ResponseCode},
            rr::{rdata::A, RData, Record, RecordType},
        };
        let socket =
            std::net::UdpSocket::bind(bind).unwrap_or_else(|e| panic!("cannot bind the test resolver on {bind}: {e}"));
        socket.set_read_timeout(Some(std::time::Duration::from_millis(50))).expect("read timeout");
        let addr = socket.local_addr().expect("the test resolver's address");
        let table: Vec<(String, std::net::Ipv4Addr)> =
            names.iter().map(|(name, ip)| (name.trim_end_matches('.').to_ascii_lowercase(), *ip)).collect();
        let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, flag) = (Arc::clone(&queries), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::SeqCst) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else { continue };
                let Ok(query) = Message::from_vec(&buf[..len]) else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut response = Message::response(query.metadata.id, OpCode::Query);
                response.queries = query.queries.clone();
                if let Some(q) = query.queries.first() {
                    let asked = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
                    match table.iter().find(|(name, _)| *name == asked) {
                        Some((_, ip)) if q.query_type() == RecordType::A => {
                            response.answers = vec![Record::from_rdata(q.name().clone(), 60, RData::A(A(*ip)))];
                        }
                        Some(_) => {}
                        None => response.metadata.response_code = ResponseCode::NXDomain,
                    }
                }
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, peer);
                }
            }
        });
        Self { addr, queries, stop, thread: Some(thread) }
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
