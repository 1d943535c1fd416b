//! Ring profiles (`profiles/ring0.yaml` .. `ring3.yaml`): what a jail looks like.
//!
//! Loading is strict: unknown keys, wrong types and impossible combinations are errors
//! located as `file:line:col: message`. The built-in profiles are compiled in, so a
//! jail never depends on files an agent could have changed.
use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use agt_jail_dns::NamePattern;

use crate::{
    seccomp::{self, SeccompPolicy},
    yaml::{self, Kind, Node, Pos},
};

/// The built-in profiles, ring 0 to 3.
pub const BUILTIN: [(&str, &str); 4] = [
    ("profiles/ring0.yaml", include_str!("../../../profiles/ring0.yaml")),
    ("profiles/ring1.yaml", include_str!("../../../profiles/ring1.yaml")),
    ("profiles/ring2.yaml", include_str!("../../../profiles/ring2.yaml")),
    ("profiles/ring3.yaml", include_str!("../../../profiles/ring3.yaml")),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileError {
    pub file: String,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.pos.line, self.pos.col, self.message)
    }
}

impl std::error::Error for ProfileError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// Own network namespace with only loopback.
    None,
    /// Own network namespace with loopback and a routed path out (veth + NAT on the
    /// host); every connect and datagram is decided by the cgroup BPF programs: only
    /// allow-listed destinations, never the host's own addresses or the metadata service.
    Allowlist,
    /// Host network, unrestricted.
    Host,
}

impl NetMode {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "none" => Some(NetMode::None),
            "allowlist" => Some(NetMode::Allowlist),
            "host" => Some(NetMode::Host),
            _ => None,
        }
    }

    /// The name used in profiles and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            NetMode::None => "none",
            NetMode::Allowlist => "allowlist",
            NetMode::Host => "host",
        }
    }

    /// Whether the jail gets a network namespace of its own. There the namespace is the
    /// boundary (its loopback is the agent's own, nothing else is reachable but what
    /// is routed into it), so Landlock's TCP port rules are not used.
    pub fn own_namespace(self) -> bool {
        self != NetMode::Host
    }

    /// The modes a ring may have: never a network wider than the ring stands for
    /// (0 host; 1-2 allow-listed egress, or none; 3 none at all).
    pub fn allowed_in(ring: u8) -> &'static [NetMode] {
        match ring {
            0 => &[NetMode::Host],
            1 | 2 => &[NetMode::Allowlist, NetMode::None],
            _ => &[NetMode::None],
        }
    }
}

/// Ordered by how much of the network a mode opens (none < allowlist < host): a flag
/// may only lower it.
impl PartialOrd for NetMode {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NetMode {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let openness = |mode: &NetMode| match mode {
            NetMode::None => 0,
            NetMode::Allowlist => 1,
            NetMode::Host => 2,
        };
        openness(self).cmp(&openness(other))
    }
}

/// The names of `modes`, for messages ("allowlist or none").
pub fn mode_names(modes: &[NetMode]) -> String {
    modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(" or ")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkspaceMode {
    /// The workspace directory, writable.
    Rw,
    /// The workspace directory, read-only.
    Ro,
    /// A fresh empty tmpfs at /workspace (the directory given, if any, is mounted read-only beside it).
    Scratch,
}

/// One `allow_connect` entry: an address (or network) and port, or a host name (or
/// `*.suffix`) and port that the agent's DNS proxy opens as it answers for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowEntry {
    Addr(Dest),
    Name(NamePattern, u16),
}

impl AllowEntry {
    /// `ADDR:PORT`, `CIDR:PORT`, `[V6]:PORT`, `NAME:PORT` or `*.SUFFIX:PORT`. Text that is
    /// no address and has a letter or `*` in its host part (and no `[`, `/` or `:`) is a name.
    pub fn parse(text: &str) -> Result<Self, String> {
        let addr_err = match Dest::parse(text) {
            Ok(dest) => return Ok(Self::Addr(dest)),
            Err(err) => err,
        };
        let Some((host, port)) = text.rsplit_once(':') else { return Err(addr_err) };
        let name_like = host.bytes().any(|b| b.is_ascii_alphabetic() || b == b'*')
            && !host.contains(['[', ']', '/', ':'])
            && host.parse::<IpAddr>().is_err();
        if !name_like {
            return Err(addr_err);
        }
        let pattern = NamePattern::parse(host).map_err(|err| err.to_string())?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("'{text}': bad port (1-65535); expected NAME:PORT, e.g. api.example.com:443"))?;
        Ok(Self::Name(pattern, port))
    }
}

/// An egress destination: address (or network) and TCP port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dest {
    pub addr: IpAddr,
    pub prefix: u8,
    pub port: u16,
}

impl Dest {
    /// Parses `ADDR:PORT`, `CIDR:PORT`, `[V6]:PORT` or `[V6/N]:PORT`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let expected = "expected ADDR:PORT or CIDR:PORT, e.g. 10.0.0.5:443 or 10.0.0.0/8:443";
        let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("'{text}': {expected}"))?;
        let port: u16 = port.parse().map_err(|_| format!("'{text}': bad port; {expected}"))?;
        if port == 0 {
            return Err(format!("'{text}': port 0 is not a destination; {expected}"));
        }
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let (addr, prefix) = match host.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (host, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("'{text}': '{addr}' is not an IP address; {expected}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{text}': bad prefix length; {expected}"))?,
        };
        Ok(Self { addr, prefix, port })
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Bytes.
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    /// CPU in millicores (1000 = one CPU).
    pub cpu_millis: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub ring: u8,
    /// False for ring 0: own cgroup, observed, no namespaces or sandboxing.
    pub confine: bool,
    pub pid_ns: bool,
    pub ipc_ns: bool,
    pub uts_ns: bool,
    pub cgroup_ns: bool,
    pub net: NetMode,
    pub allow_connect: Vec<Dest>,
    /// Names (`NAME:PORT`, `*.SUFFIX:PORT`) in allowlist mode: the agent's DNS proxy opens
    /// the addresses it answers for them, for their TTL (docs/dns-egress.md).
    pub allow_names: Vec<(NamePattern, u16)>,
    /// In allowlist mode: whether IPv4/IPv6 datagram sockets (UDP, so DNS) are allowed.
    /// They bypass the TCP-only allow-list, so the default is no.
    pub allow_udp: bool,
    /// System paths mounted read-only.
    pub system: Vec<String>,
    pub workspace: WorkspaceMode,
    /// Extra paths shown writable / read-only (bytes: a path given on the command line need
    /// not be UTF-8).
    pub rw: Vec<PathBuf>,
    pub ro: Vec<PathBuf>,
    /// Paths (globs with `*`, `~` for the invoking user's home) never visible inside.
    pub hide: Vec<String>,
    /// Exec of anything under the system paths.
    pub exec_system: bool,
    /// Exec of what the agent builds: anything in the workspace and the writable extra
    /// paths (`filesystem.rw`, `--rw`). Rings 1-2 only (default on there); every exec
    /// still passes the policy's exec plane.
    pub exec_workspace: bool,
    /// Extra executables (files or directories).
    pub exec_allow: Vec<String>,
    /// Refuse to start where the kernel lacks Landlock, even when the mount view holds
    /// the ring's guarantee there (`landlock.required`; default false).
    pub landlock_required: bool,
    pub scope_ipc: bool,
    /// None: no seccomp filter (ring 0).
    pub seccomp: Option<SeccompPolicy>,
    pub limits: Limits,
}

/// The largest profile file read (the built-in ones are about 1.5 KiB).
const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// Reads a profile: a regular file of at most [`MAX_PROFILE_BYTES`]. Opened without
/// blocking, so a FIFO is refused instead of waiting for a writer, and a device such as
/// /dev/zero is refused instead of read until memory runs out.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(MAX_PROFILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_PROFILE_BYTES {
        return Err(format!("larger than {MAX_PROFILE_BYTES} bytes"));
    }
    Ok(bytes)
}

/// Parses a memory limit: a size (see [`parse_bytes`]) of at least 1M.
pub fn parse_size(text: &str) -> Result<Option<u64>, String> {
    let bytes = parse_bytes(text)?;
    if bytes.is_some_and(|b| b < (1 << 20)) {
        return Err(format!("memory limit '{text}' is below 1M; the jail could not start"));
    }
    Ok(bytes)
}

/// Parses a size: bytes, or with K/M/G/T suffix (powers of 1024), or "max"/null for none.
pub fn parse_bytes(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("max") {
        return Ok(None);
    }
    if t.is_empty() {
        return Err("an empty size is not a limit (expected e.g. 512M, 2G, bytes, or max for none)".into());
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("'{text}' is not a size (expected e.g. 512M, 2G or bytes)")),
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("'{text}' is not a size (expected e.g. 512M, 2G or bytes)"))?;
    let bytes = n.checked_mul(mult).filter(|b| *b <= MAX_MEMORY).ok_or_else(|| {
        format!("'{text}' is larger than the kernel takes (at most {MAX_MEMORY} bytes; max for none)")
    })?;
    Ok(Some(bytes))
}

/// Parses CPUs as a decimal number of cores ("0.5", "2") into millicores.
pub fn parse_cpu(text: &str) -> Result<Option<u64>, String> {
    if text.trim().eq_ignore_ascii_case("max") {
        return Ok(None);
    }
    let cores: f64 =
        text.trim().parse().map_err(|_| format!("'{text}' is not a CPU count (expected e.g. 0.5 or 2)"))?;
    if !cores.is_finite() || !(0.01..=1024.0).contains(&cores) {
        return Err(format!("cpu '{text}' must be between 0.01 and 1024"));
    }
    Ok(Some((cores * 1000.0).round() as u64))
}

/// Parses a pids limit.
pub fn parse_pids(text: &str) -> Result<Option<u64>, String> {
    if text.trim().eq_ignore_ascii_case("max") {
        return Ok(None);
    }
    match text.trim().parse::<u64>() {
        Ok(n) if (2..=MAX_PIDS).contains(&n) => Ok(Some(n)),
        Ok(n) if n > MAX_PIDS => {
            Err(format!("pids '{text}' is more than the kernel has ({MAX_PIDS}, PID_MAX_LIMIT); use max for none"))
        }
        _ => Err(format!("pids '{text}' must be a number of at least 2 (the jail's init and the command), or max")),
    }
}

/// The largest memory limit cgroups take (v1 memory.limit_in_bytes is a signed 64-bit
/// number of bytes, rounded up to a page).
const MAX_MEMORY: u64 = (i64::MAX as u64) & !0xfff;
/// The kernel's largest pid count (PID_MAX_LIMIT on 64-bit).
const MAX_PIDS: u64 = 4 * 1024 * 1024;

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, pos: Pos, message: impl Into<String>) -> ProfileError {
        ProfileError { file: self.file.to_string(), pos, message: message.into() }
    }

    fn map<'n>(&self, node: &'n Node, what: &str, keys: &[&str]) -> Result<&'n [(String, Pos, Node)], ProfileError> {
        let Kind::Map(entries) = &node.kind else {
            return Err(self.err(node.pos, format!("{what} must be a mapping, found {}", node.type_name())));
        };
        for (key, pos, _) in entries {
            if !keys.contains(&key.as_str()) {
                return Err(
                    self.err(*pos, format!("unknown key '{key}' in {what} (expected one of: {})", keys.join(", ")))
                );
            }
        }
        Ok(entries)
    }

    fn bool(&self, node: &Node, what: &str) -> Result<bool, ProfileError> {
        match node.kind {
            Kind::Bool(b) => Ok(b),
            _ => Err(self.err(node.pos, format!("{what} must be true or false, found {}", node.type_name()))),
        }
    }

    fn string(&self, node: &Node, what: &str) -> Result<String, ProfileError> {
        match &node.kind {
            Kind::Str(s) => Ok(s.clone()),
            Kind::Int(i) => Ok(i.to_string()),
            Kind::Float(f) => Ok(f.to_string()),
            _ => Err(self.err(node.pos, format!("{what} must be a string, found {}", node.type_name()))),
        }
    }

    fn strings(&self, node: &Node, what: &str) -> Result<Vec<(String, Pos)>, ProfileError> {
        match &node.kind {
            Kind::Null => Ok(Vec::new()),
            Kind::Seq(items) => items.iter().map(|n| self.string(n, what).map(|s| (s, n.pos))).collect(),
            _ => Err(self.err(node.pos, format!("{what} must be a list, found {}", node.type_name()))),
        }
    }

    fn paths(&self, node: &Node, what: &str) -> Result<Vec<String>, ProfileError> {
        self.strings(node, what)?
            .into_iter()
            .map(|(p, pos)| check_path(&p).map(|()| p).map_err(|m| self.err(pos, format!("{what}: {m}"))))
            .collect()
    }
}

/// Profile paths are absolute (or start with `~/` for hide lists) and have no `..`.
pub fn check_path(path: &str) -> Result<(), String> {
    if !(path.starts_with('/') || path.starts_with("~/")) {
        return Err(format!("'{path}' must be an absolute path"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("'{path}' must not contain '..'"));
    }
    if path.contains('\0') || path.contains('\n') {
        return Err(format!("'{path}' contains a control character"));
    }
    Ok(())
}

const TOP_KEYS: &[&str] = &[
    "ring",
    "description",
    "confine",
    "namespaces",
    "network",
    "filesystem",
    "exec",
    "landlock",
    "seccomp",
    "capabilities",
    "limits",
];

impl Profile {
    /// The built-in profile for `ring`.
    pub fn builtin(ring: u8) -> Result<Self, ProfileError> {
        let (file, text) = BUILTIN.get(usize::from(ring)).ok_or_else(|| ProfileError {
            file: "--ring".into(),
            pos: Pos { line: 1, col: 1 },
            message: format!("there is no ring {ring} (rings are 0 to 3)"),
        })?;
        Self::parse(text, file)
    }

    /// Loads a profile file.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let file = path.display().to_string();
        let bytes = read_bounded(path).map_err(|message| ProfileError {
            file: file.clone(),
            pos: Pos { line: 1, col: 1 },
            message: format!("cannot read profile: {message}"),
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| ProfileError {
            file: file.clone(),
            pos: Pos { line: 1, col: 1 },
            message: format!("profile is not UTF-8 text (invalid byte at offset {})", e.valid_up_to()),
        })?;
        Self::parse(text, &file)
    }

    /// Parses and validates profile text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ProfileError> {
        let cx = Ctx { file };
        let root = yaml::parse(text).map_err(|e| cx.err(e.pos, e.message))?;
        let top = cx.map(&root, "the profile", TOP_KEYS)?;
        let get = |key: &str| top.iter().find(|(k, _, _)| k == key).map(|(_, _, n)| n);

        let ring_node = get("ring").ok_or_else(|| cx.err(root.pos, "missing key 'ring' (0 to 3)"))?;
        let ring = match ring_node.kind {
            Kind::Int(r @ 0..=3) => r as u8,
            _ => return Err(cx.err(ring_node.pos, "ring must be 0, 1, 2 or 3")),
        };
        let confine = match get("confine") {
            Some(n) => cx.bool(n, "confine")?,
            None => ring != 0,
        };
        if ring != 0 && !confine {
            return Err(cx.err(get("confine").map_or(root.pos, |n| n.pos), "only ring 0 may set confine: false"));
        }

        let mut p = Profile {
            ring,
            confine,
            pid_ns: confine,
            ipc_ns: confine,
            uts_ns: confine,
            cgroup_ns: confine,
            net: if confine { NetMode::None } else { NetMode::Host },
            allow_connect: Vec::new(),
            allow_names: Vec::new(),
            allow_udp: false,
            system: Vec::new(),
            workspace: if ring == 3 { WorkspaceMode::Scratch } else { WorkspaceMode::Rw },
            rw: Vec::new(),
            ro: Vec::new(),
            hide: Vec::new(),
            exec_system: ring != 3,
            exec_workspace: confine && ring != 3,
            exec_allow: Vec::new(),
            // Landlock where the kernel has it; where it does not, the ring runs on the
            // planes that give its guarantee or refuses (launch::check_enforcement).
            landlock_required: false,
            scope_ipc: confine,
            seccomp: confine.then(SeccompPolicy::default),
            limits: Limits::default(),
        };

        let mut net_ns_listed = None;
        if let Some(node) = get("namespaces") {
            p.pid_ns = false;
            p.ipc_ns = false;
            p.uts_ns = false;
            p.cgroup_ns = false;
            let mut mount = false;
            for (ns, pos) in cx.strings(node, "namespaces")? {
                match ns.as_str() {
                    "pid" => p.pid_ns = true,
                    "mount" => mount = true,
                    "ipc" => p.ipc_ns = true,
                    "uts" => p.uts_ns = true,
                    "cgroup" => p.cgroup_ns = true,
                    "net" => net_ns_listed = Some(pos),
                    // The user namespace is used when not root; as root the jail keeps
                    // uid 0 without any capability (see docs/threat-model.md).
                    "user" => {}
                    other => {
                        return Err(cx.err(
                            pos,
                            format!("unknown namespace '{other}' (expected pid, mount, net, ipc, uts, cgroup, user)"),
                        ))
                    }
                }
            }
            if confine && !(p.pid_ns && mount) {
                return Err(cx.err(node.pos, "a confined ring needs at least the pid and mount namespaces"));
            }
            if !confine && (p.pid_ns || mount || p.ipc_ns || p.uts_ns || p.cgroup_ns) {
                return Err(cx.err(node.pos, "ring 0 (confine: false) takes no namespaces"));
            }
        }

        if let Some(node) = get("network") {
            let entries = cx.map(node, "network", &["mode", "allow_connect", "allow_bind", "allow_udp"])?;
            for (key, _, value) in entries {
                match key.as_str() {
                    "mode" => {
                        let text = cx.string(value, "network.mode")?;
                        p.net = NetMode::parse(&text).ok_or_else(|| {
                            cx.err(value.pos, format!("network.mode '{text}' is not one of none, allowlist, host"))
                        })?;
                    }
                    "allow_udp" => p.allow_udp = cx.bool(value, "network.allow_udp")?,
                    "allow_connect" => {
                        for (d, pos) in cx.strings(value, "network.allow_connect")? {
                            match AllowEntry::parse(&d).map_err(|m| cx.err(pos, m))? {
                                AllowEntry::Addr(dest) => p.allow_connect.push(dest),
                                AllowEntry::Name(name, port) => p.allow_names.push((name, port)),
                            }
                        }
                    }
                    // Refused, not ignored: the port rules it held were Landlock's, and a
                    // confined agent now binds in a network namespace of its own.
                    _ => {
                        return Err(cx.err(
                            value.pos,
                            "network.allow_bind is no longer a setting: a confined agent binds any port in its own \
                             network namespace (docs/adr/0009-agent-network-veth-nat.md)",
                        ))
                    }
                }
            }
        }
        if !confine && p.net != NetMode::Host {
            return Err(cx.err(
                get("network").map_or(root.pos, |n| n.pos),
                "ring 0 (confine: false) only supports network.mode host",
            ));
        }
        if !p.allow_names.is_empty() && p.net != NetMode::Allowlist {
            return Err(cx.err(
                get("network").map_or(root.pos, |n| n.pos),
                format!(
                    "network.allow_connect names ({}) need network.mode allowlist, where agt-jail serves the agent's \
                     resolver; this profile's mode is {}",
                    p.allow_names[0].0,
                    p.net.name()
                ),
            ));
        }
        if confine && !NetMode::allowed_in(ring).contains(&p.net) {
            return Err(cx.err(
                get("network").map_or(root.pos, |n| n.pos),
                format!(
                    "ring {ring} cannot have network.mode {}; ring {ring} allows {}",
                    p.net.name(),
                    mode_names(NetMode::allowed_in(ring))
                ),
            ));
        }
        if let Some(pos) = net_ns_listed {
            if p.net != NetMode::None {
                return Err(cx.err(
                    pos,
                    "the net namespace comes with network.mode none; allowlist and host use the host network",
                ));
            }
        }

        if let Some(node) = get("filesystem") {
            let entries = cx.map(node, "filesystem", &["system", "workspace", "rw", "ro", "hide"])?;
            for (key, _, value) in entries {
                match key.as_str() {
                    "system" => p.system = cx.paths(value, "filesystem.system")?,
                    "workspace" => {
                        let text = cx.string(value, "filesystem.workspace")?;
                        p.workspace = match text.as_str() {
                            "rw" => WorkspaceMode::Rw,
                            "ro" => WorkspaceMode::Ro,
                            "scratch" => WorkspaceMode::Scratch,
                            _ => {
                                return Err(cx.err(
                                    value.pos,
                                    format!("filesystem.workspace '{text}' is not one of rw, ro, scratch"),
                                ))
                            }
                        };
                    }
                    "rw" => p.rw = cx.paths(value, "filesystem.rw")?.into_iter().map(PathBuf::from).collect(),
                    "ro" => p.ro = cx.paths(value, "filesystem.ro")?.into_iter().map(PathBuf::from).collect(),
                    _ => p.hide = cx.paths(value, "filesystem.hide")?,
                }
            }
        }
        if ring == 3 && (!p.rw.is_empty() || p.workspace == WorkspaceMode::Rw) {
            return Err(cx.err(
                get("filesystem").map_or(root.pos, |n| n.pos),
                "ring 3 has nothing writable but its scratch /workspace: filesystem.rw must be empty and \
                 filesystem.workspace scratch or ro",
            ));
        }
        let extra = p.rw.iter().chain(&p.ro).map(|path| path.to_string_lossy().into_owned());
        for path in p.system.iter().cloned().chain(extra) {
            if path.starts_with('~') || path.contains('*') {
                return Err(cx.err(
                    get("filesystem").map_or(root.pos, |n| n.pos),
                    format!("'{path}': only filesystem.hide takes '~' and '*'"),
                ));
            }
        }

        if let Some(node) = get("exec") {
            for (key, _, value) in cx.map(node, "exec", &["system", "workspace", "allow"])? {
                match key.as_str() {
                    "system" => p.exec_system = exec_switch(&cx, ring, confine, "exec.system", value)?,
                    "workspace" => p.exec_workspace = exec_switch(&cx, ring, confine, "exec.workspace", value)?,
                    _ if !confine => {
                        return Err(
                            cx.err(value.pos, "exec.allow is for rings 1-3; ring 0 (confine: false) confines no exec")
                        )
                    }
                    _ => p.exec_allow = cx.paths(value, "exec.allow")?,
                }
            }
        }

        if let Some(node) = get("landlock") {
            for (key, _, value) in cx.map(node, "landlock", &["required", "scope_ipc"])? {
                match key.as_str() {
                    "required" => p.landlock_required = cx.bool(value, "landlock.required")?,
                    _ => p.scope_ipc = cx.bool(value, "landlock.scope_ipc")?,
                }
            }
        }

        if let Some(node) = get("seccomp") {
            let mut enabled = confine;
            let mut policy = SeccompPolicy::default();
            for (key, _, value) in cx.map(node, "seccomp", &["enabled", "deny", "allow"])? {
                match key.as_str() {
                    "enabled" => enabled = cx.bool(value, "seccomp.enabled")?,
                    // `cx.map` admitted only enabled, deny and allow.
                    _ => {
                        for (name, pos) in cx.strings(value, &format!("seccomp.{key}"))? {
                            if !seccomp::known(&name) {
                                return Err(cx.err(pos, format!("unknown syscall '{name}' in seccomp.{key}")));
                            }
                            if key == "allow" && seccomp::NEVER.contains(&name.as_str()) {
                                return Err(cx.err(pos, format!("syscall '{name}' can never be allowed inside a jail")));
                            }
                            if key == "deny" {
                                policy.deny.push(name)
                            } else {
                                policy.allow.push(name)
                            }
                        }
                    }
                }
            }
            if confine && !enabled {
                return Err(
                    cx.err(node.pos, "rings 1-3 always run under seccomp; seccomp.enabled: false is only for ring 0")
                );
            }
            p.seccomp = enabled.then_some(policy);
        }

        if let Some(node) = get("capabilities") {
            let caps = cx.strings(node, "capabilities")?;
            if let Some((cap, pos)) = caps.first() {
                if confine {
                    return Err(cx.err(*pos, format!("rings 1-3 keep no capabilities ('{cap}' given)")));
                }
                return Err(cx.err(*pos, "ring 0 runs with the caller's capabilities; list none"));
            }
        }

        if let Some(node) = get("limits") {
            for (key, _, value) in cx.map(node, "limits", &["memory", "pids", "cpu"])? {
                if value.kind == Kind::Null {
                    continue;
                }
                let text = cx.string(value, &format!("limits.{key}"))?;
                let parsed = match key.as_str() {
                    "memory" => parse_size(&text).map(|v| p.limits.memory = v),
                    "pids" => parse_pids(&text).map(|v| p.limits.pids = v),
                    _ => parse_cpu(&text).map(|v| p.limits.cpu_millis = v),
                };
                parsed.map_err(|m| cx.err(value.pos, m))?;
            }
        }
        Ok(p)
    }
}

/// `exec.system` / `exec.workspace`: rings 1-2 may turn them off; ring 3 runs only its
/// entry command (and `exec.allow`), and an unconfined ring 0 confines no exec at all, so
/// neither takes them (a switch that changes nothing would be ignored silently).
fn exec_switch(cx: &Ctx<'_>, ring: u8, confine: bool, what: &str, value: &Node) -> Result<bool, ProfileError> {
    let on = cx.bool(value, what)?;
    if !confine {
        return Err(cx.err(value.pos, format!("{what} is for rings 1-2; ring 0 (confine: false) confines no exec")));
    }
    if ring == 3 && on {
        return Err(cx.err(
            value.pos,
            format!("ring 3 runs only its entry command (and exec.allow): {what} must be false there"),
        ));
    }
    Ok(on)
}

/// Expands a hide pattern (`~/` = `home`, `*` matches one path component) against the
/// host filesystem; returns the existing paths it names.
pub fn expand_hide(pattern: &str, home: Option<&Path>) -> Vec<PathBuf> {
    let path = match (pattern.strip_prefix("~/"), home) {
        (Some(rest), Some(home)) => home.join(rest),
        (Some(_), None) => return Vec::new(),
        (None, _) => PathBuf::from(pattern),
    };
    let mut found = vec![PathBuf::from("/")];
    for component in path.components().skip(1) {
        let part = component.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for base in &found {
            if part.contains('*') {
                let Ok(entries) = std::fs::read_dir(base) else { continue };
                for entry in entries.flatten() {
                    if glob_match(&part, &entry.file_name().to_string_lossy()) {
                        next.push(entry.path());
                    }
                }
            } else {
                next.push(base.join(&*part));
            }
        }
        found = next;
    }
    found.retain(|p| p.symlink_metadata().is_ok());
    found.sort();
    found
}

/// `*` matches any run of characters within one component.
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            let Some(rest) = name.strip_prefix(head) else { return false };
            (0..=rest.len()).any(|i| rest.is_char_boundary(i) && glob_match(tail, &rest[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn builtin_profiles_load() {
        for ring in 0..4 {
            let p = Profile::builtin(ring).unwrap();
            assert_eq!(p.ring, ring);
            assert_eq!(p.confine, ring != 0);
        }
        let r3 = Profile::builtin(3).unwrap();
        assert_eq!(r3.net, NetMode::None);
        assert_eq!(r3.workspace, WorkspaceMode::Scratch);
        assert!(!r3.exec_system);
        let r2 = Profile::builtin(2).unwrap();
        assert_eq!(r2.net, NetMode::Allowlist);
        assert!(r2.exec_system && r2.seccomp.is_some() && !r2.landlock_required);
        assert!(r2.hide.iter().any(|h| h == "/etc/shadow"));
        assert!(r2.limits.memory.is_some() && r2.limits.pids.is_some());
        let r0 = Profile::builtin(0).unwrap();
        assert!(r0.seccomp.is_none() && r0.net == NetMode::Host);
        assert!(Profile::builtin(4).is_err());
    }

    fn err(text: &str) -> String {
        Profile::parse(text, "p.yaml").unwrap_err().to_string()
    }

    #[test]
    fn errors_are_located() {
        assert_eq!(err("ring: 2\nbogus: 1\n"), "p.yaml:2:1: unknown key 'bogus' in the profile (expected one of: ring, description, confine, namespaces, network, filesystem, exec, landlock, seccomp, capabilities, limits)");
        assert_eq!(err("ring: 7\n"), "p.yaml:1:7: ring must be 0, 1, 2 or 3");
        assert_eq!(
            err("ring: 2\nnetwork:\n  mode: wide\n"),
            "p.yaml:3:9: network.mode 'wide' is not one of none, allowlist, host"
        );
        assert!(err("ring: 2\nseccomp:\n  allow: [bpf]\n").starts_with("p.yaml:3:11: syscall 'bpf' can never"));
        assert!(
            err("ring: 2\ncapabilities: [CAP_SYS_ADMIN]\n").starts_with("p.yaml:2:16: rings 1-3 keep no capabilities")
        );
        assert!(err("ring: 2\nlimits:\n  memory: 12Q\n").starts_with("p.yaml:3:11: '12Q' is not a size"));
        assert!(err("ring: 2\nfilesystem:\n  rw: [relative]\n")
            .starts_with("p.yaml:3:8: filesystem.rw: 'relative' must be an absolute path"));
        assert!(err("ring: 2\nnetwork:\n  allow_connect: ['10.0.0.300:443']\n").contains("is not an IP address"));
        assert!(err("ring: 2\nnetwork:\n  allow_connect: ['exa mple.com:443']\n").starts_with("p.yaml:3:19: "));
        assert!(err("ring: 2\nnetwork:\n  allow_connect: ['*:443']\n").contains("every name"));
        assert!(err("ring: 0\nconfine: false\nnetwork:\n  allow_connect: ['api.example.com:443']\n")
            .contains("need network.mode allowlist"));
        assert!(err("ring: 2\nnetwork:\n  mode: none\n  allow_connect: ['*.example.com:443']\n")
            .contains("(*.example.com) need network.mode allowlist"));
        let named = Profile::parse(
            "ring: 2\nnetwork:\n  mode: allowlist\n  allow_connect: ['API.example.com:443', '*.pypi.org:443', '10.0.0.0/8:80']\n",
            "p.yaml",
        )
        .unwrap();
        assert_eq!(named.allow_connect.len(), 1);
        let names: Vec<String> = named.allow_names.iter().map(|(n, p)| format!("{n}:{p}")).collect();
        assert_eq!(names, vec!["api.example.com:443", "*.pypi.org:443"]);
        assert!(err("ring: 1\nconfine: false\n").contains("only ring 0"));
        assert!(err("ring: 2\nnamespaces: [mount]\n").contains("pid and mount"));
        assert!(err("ring: 2\nnetwork: {mode: allowlist}\nnamespaces: [pid, mount, net]\n").contains("net namespace"));
        assert!(err("ring: [\n").starts_with("p.yaml:"));
        assert!(err("").contains("must be a mapping"));
    }

    #[test]
    fn allow_bind_is_refused_with_its_location_not_ignored() {
        let err = Profile::parse("ring: 2\nnetwork:\n  mode: allowlist\n  allow_bind: [8080]\n", "p.yaml").unwrap_err();
        assert_eq!(err.pos.line, 4, "{err}");
        assert!(err.message.contains("network.allow_bind is no longer a setting"), "{err}");
    }

    #[test]
    fn never_panics_on_odd_input() {
        for text in [
            "ring: 2\nlimits: 3",
            "ring: 2\nexec: {allow: 3}",
            "ring: 2\nlimits: {cpu: -1}",
            "ring: 2\nlimits: {pids: 1}",
            "ring: 2\n? [a]\n: b",
            "- 1",
        ] {
            assert!(Profile::parse(text, "x").is_err(), "{text}");
        }
    }

    #[test]
    fn sizes_and_destinations() {
        assert_eq!(parse_size("512M").unwrap(), Some(512 << 20));
        assert_eq!(parse_size("2g").unwrap(), Some(2 << 30));
        assert_eq!(parse_size("max").unwrap(), None);
        assert!(parse_size("10").is_err());
        assert_eq!(parse_cpu("0.5").unwrap(), Some(500));
        assert_eq!(
            Dest::parse("10.0.0.0/8:443").unwrap(),
            Dest { addr: "10.0.0.0".parse().unwrap(), prefix: 8, port: 443 }
        );
        assert_eq!(Dest::parse("[::1]:80").unwrap().prefix, 128);
        assert!(Dest::parse("1.2.3.4").is_err());
        assert!(Dest::parse("1.2.3.4/33:1").is_err());
    }

    #[test]
    fn a_ring_never_has_a_wider_network_or_ring_3_a_writable_path() {
        assert_eq!(
            err("ring: 3\nnetwork: {mode: host}\n"),
            "p.yaml:2:10: ring 3 cannot have network.mode host; ring 3 allows none"
        );
        assert!(err("ring: 3\nnetwork: {mode: allowlist}\n").contains("ring 3 allows none"));
        assert!(err("ring: 2\nnetwork: {mode: host}\n").contains("ring 2 allows allowlist or none"));
        assert!(err("ring: 1\nnetwork: {mode: host}\n").contains("ring 1 allows allowlist or none"));
        assert!(err("ring: 3\nfilesystem: {rw: [/tmp]}\n").contains("ring 3 has nothing writable"));
        assert!(err("ring: 3\nfilesystem: {workspace: rw}\n").contains("ring 3 has nothing writable"));
        assert_eq!(Profile::parse("ring: 3\n", "p.yaml").unwrap().workspace, WorkspaceMode::Scratch);
        assert_eq!(Profile::parse("ring: 2\nnetwork: {mode: none}\n", "p.yaml").unwrap().net, NetMode::None);
    }

    #[test]
    fn workspace_exec_is_on_in_rings_1_and_2_can_be_turned_off_and_never_reaches_ring_3() {
        let ring = |r| Profile::builtin(r).unwrap().exec_workspace;
        assert!(ring(1) && ring(2) && !ring(3) && !ring(0));
        assert!(Profile::parse("ring: 2\n", "p.yaml").unwrap().exec_workspace);
        assert!(Profile::parse("ring: 1\nexec: {system: true}\n", "p.yaml").unwrap().exec_workspace);
        let off = Profile::parse("ring: 2\nexec:\n  workspace: false\n", "p.yaml").unwrap();
        assert!(!off.exec_workspace && off.exec_system);
        assert!(!Profile::parse("ring: 3\nexec: {workspace: false}\n", "p.yaml").unwrap().exec_workspace);
        let bare3 = Profile::parse("ring: 3\n", "p.yaml").unwrap();
        assert!(!bare3.exec_system && !bare3.exec_workspace, "ring 3 runs only its entry command by default");
        assert!(err("ring: 3\nexec: {system: true}\n").contains(":2:16: ring 3 runs only its entry command"));
        assert!(err("ring: 0\nexec: {system: true}\n").contains(":2:16: exec.system is for rings 1-2"));
        assert_eq!(
            err("ring: 0\nexec: {allow: [/usr/bin/env]}\n"),
            "p.yaml:2:15: exec.allow is for rings 1-3; ring 0 (confine: false) confines no exec"
        );
        assert_eq!(
            err("ring: 3\nexec:\n  workspace: true\n"),
            "p.yaml:3:14: ring 3 runs only its entry command (and exec.allow): exec.workspace must be false there"
        );
        assert_eq!(
            err("ring: 0\nexec: {workspace: false}\n"),
            "p.yaml:2:19: exec.workspace is for rings 1-2; ring 0 (confine: false) confines no exec"
        );
        assert_eq!(
            err("ring: 2\nexec: {workspace: yes}\n"),
            "p.yaml:2:19: exec.workspace must be true or false, found a string"
        );
        assert_eq!(
            err("ring: 2\nexec: {workspaces: true}\n"),
            "p.yaml:2:8: unknown key 'workspaces' in exec (expected one of: system, workspace, allow)"
        );
    }

    #[test]
    fn limits_refuse_empty_zero_garbage_and_overflow() {
        for bad in [
            "",
            " ",
            "0",
            "0M",
            "-1",
            "-1M",
            "1.5G",
            "12Q",
            "M",
            "512MB",
            "99999999999T",
            "18446744073709551615",
            "9223372036854775807",
            "\u{0}",
            "５１２M",
        ] {
            let message = parse_size(bad).unwrap_err();
            assert!(!message.is_empty(), "{bad:?}");
        }
        assert_eq!(parse_size(" max ").unwrap(), None);
        assert_eq!(parse_size("1M").unwrap(), Some(1 << 20));
        for bad in ["", "0", "1", "-2", "x", "2.5", "4194305", "18446744073709551616"] {
            assert!(parse_pids(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_pids("4194304").unwrap(), Some(4 << 20));
        assert_eq!(parse_pids(" max").unwrap(), None);
        for bad in ["", "0", "-1", "0.001", "nan", "inf", "1025", "1e400", "x"] {
            assert!(parse_cpu(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cpu(" max ").unwrap(), None);
    }

    #[test]
    fn profile_files_are_bounded_regular_files() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let big = tmp.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; (MAX_PROFILE_BYTES + 1) as usize]).unwrap();
        for (path, needle) in [
            (fifo.as_path(), "not a regular file"),
            (Path::new("/dev/zero"), "not a regular file"),
            (tmp.path(), "not a regular file"),
            (big.as_path(), "larger than 1048576 bytes"),
        ] {
            let err = Profile::load(path).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains(":1:1: cannot read profile"), "{err}");
        }
    }

    #[test]
    fn hide_patterns_expand() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("home/a/.ssh")).unwrap();
        std::fs::create_dir_all(tmp.path().join("home/b")).unwrap();
        let pattern = format!("{}/home/*/.ssh", tmp.path().display());
        assert_eq!(expand_hide(&pattern, None), vec![tmp.path().join("home/a/.ssh")]);
        assert_eq!(expand_hide("~/.ssh", Some(&tmp.path().join("home/a"))), vec![tmp.path().join("home/a/.ssh")]);
        assert!(expand_hide("~/.ssh", None).is_empty());
        assert!(glob_match("*.key", "id.key") && !glob_match("*.key", "id.pub"));
    }
}
