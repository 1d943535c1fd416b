//! `agt-jail doctor`: what this host's kernel offers and what each ring will and will
//! not enforce here. Every check is read-only, except that as root it tries to load the
//! BPF programs (and the BPF LSM program) to learn whether the kernel accepts them, and
//! builds (then removes) one agent's veth pair and NAT table to learn whether rings 1-2
//! can have their routed path out.
use std::{path::Path, process::ExitCode};

use agt_jail_ebpf_loader::{lsm::ExecLsm, AgentPrograms};
use agt_jail_jail::{
    cgroup::Placement, egress, egress::Egress, host, launch, seccomp, CgroupLayout, NetMode, Profile, WorkspaceMode,
};
use clap::Args;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Print the facts as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

struct Facts {
    kernel: String,
    landlock_abi: Option<u32>,
    seccomp: bool,
    userns: Result<(), String>,
    layout: Option<CgroupLayout>,
    lsm_list: Option<String>,
    btf: bool,
    bpf_programs: Result<(), String>,
    bpf_lsm: Result<(), String>,
    /// Whether an agent's veth pair and NAT rule can be made here (rings 1-2).
    egress: Result<(), String>,
    /// /proc/sys/net/ipv4/ip_forward as found.
    forwarding: Option<bool>,
    root: bool,
}

fn userns() -> Result<(), String> {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    if max.trim() == "0" {
        return Err("user.max_user_namespaces is 0".into());
    }
    if std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone").is_ok_and(|v| v.trim() == "0") {
        return Err("kernel.unprivileged_userns_clone is 0".into());
    }
    if std::fs::read_to_string("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").is_ok_and(|v| v.trim() == "1")
    {
        return Err("AppArmor restricts unprivileged user namespaces".into());
    }
    Ok(())
}

fn gather() -> Facts {
    let root = host::euid() == 0;
    let (bpf_programs, bpf_lsm) = if root {
        match AgentPrograms::load() {
            Ok(mut programs) => {
                let lsm = ExecLsm::load(&mut programs).map(|_| ()).map_err(|e| format!("{e}"));
                (Ok(()), lsm)
            }
            Err(e) => (Err(format!("{e}")), Err("the base programs did not load".into())),
        }
    } else {
        (Err("not checked (needs root)".into()), Err("not checked (needs root)".into()))
    };
    let egress = if root {
        Egress::create(Path::new("/proc"), Path::new("/sys/class/net"), false).map(drop).map_err(|e| e.to_string())
    } else {
        Err("not checked (needs root)".into())
    };
    Facts {
        egress,
        forwarding: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").ok().map(|v| v.trim() == "1"),
        kernel: host::kernel_release(),
        landlock_abi: host::landlock_abi(),
        seccomp: host::seccomp_available(),
        userns: userns(),
        layout: CgroupLayout::detect(Path::new("/proc/self/mountinfo")).ok(),
        lsm_list: std::fs::read_to_string("/sys/kernel/security/lsm").ok().map(|s| s.trim().to_string()),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        bpf_programs,
        bpf_lsm,
        root,
    }
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "no"
    }
}

/// What `ring` enforces on a host with these facts: (enforced, not enforced).
fn ring_report(facts: &Facts, ring: u8) -> (Vec<String>, Vec<String>) {
    let Ok(profile) = Profile::builtin(ring) else { return (vec![], vec!["profile does not load".into()]) };
    let mut on = Vec::new();
    let mut off = Vec::new();
    let abi = facts.landlock_abi.unwrap_or(0);
    match &facts.layout {
        Some(layout) => {
            on.push("own cgroup, killable as a whole (cgroup.kill)".into());
            for (controller, limit) in [
                ("memory", profile.limits.memory.is_some()),
                ("pids", profile.limits.pids.is_some()),
                ("cpu", profile.limits.cpu_millis.is_some()),
            ] {
                if !limit {
                    continue;
                }
                match layout.placement(controller) {
                    Placement::V2 => on.push(format!("{controller} limit (cgroup v2)")),
                    Placement::V1(root) => on.push(format!("{controller} limit (cgroup v1 at {})", root.display())),
                    Placement::Missing => off.push(format!("{controller} limit: no {controller} controller")),
                }
            }
        }
        None => off.push("cgroup: no cgroup2 hierarchy, exec cannot run".into()),
    }
    match &facts.bpf_programs {
        Ok(()) => on.push("exec/connect events and connect deny rules (BPF, cgroup-attached)".into()),
        Err(e) => off.push(format!("BPF programs: {e}")),
    }
    if !profile.confine {
        off.push("no namespaces, Landlock or seccomp (record mode)".into());
        return (on, off);
    }
    on.push("pid, mount, ipc, uts, cgroup namespaces; pivot_root view; private /tmp, /proc, /dev".into());
    match profile.net {
        NetMode::None => on.push("own network namespace with loopback only; host abstract unix sockets out of reach".into()),
        NetMode::Allowlist => match &facts.egress {
            Ok(()) => on.push(format!(
                "own network namespace: loopback, a veth with a /30 of {}/{} routed out through an nf_tables masquerade; \
                 host abstract unix sockets and host loopback out of reach",
                egress::RANGE.0,
                egress::RANGE.1
            )),
            Err(e) => off.push(format!("own network namespace with egress: {e}: ring refuses to start")),
        },
        NetMode::Host => {}
    }
    on.push("no capabilities (bounding, ambient, effective), securebits locked, no_new_privs".into());
    if facts.seccomp {
        on.push(format!(
            "seccomp deny-list ({} syscalls + namespace clone flags, clone3 -> ENOSYS, fileless execveat, foreign ABIs)",
            seccomp::NEVER.len() + seccomp::DOCKER_EXTRA.len()
        ));
    } else {
        off.push("seccomp: not available, ring refuses to start".into());
    }
    if abi == 0 {
        // What `exec` itself decides on this kernel: the mount view holds writes and exec
        // where the ring runs system binaries; where it runs only its entry command (ring
        // 3) the entry-only exec plane holds exec, and without seccomp user notification
        // the ring refuses.
        match launch::check_enforcement(&profile) {
            Err(e) => off.push(format!("{e}: ring refuses to start")),
            Ok(enforcement) => {
                let exec = if enforcement.entry_exec_plane {
                    "the entry command only (the entry-only exec plane: seccomp user notification lets the \
                     launcher's exec through and fails every later one with EACCES; --allow-exec is refused \
                     with it, and under --policy the policy's exec plane holds the same rule)"
                } else if profile.exec_workspace {
                    "system paths, the workspace and --rw paths"
                } else {
                    "system paths"
                };
                on.push(format!(
                    "no Landlock: writes only to the workspace, --rw paths and /tmp (read-only mounts elsewhere, \
                     /proc and /dev included), exec of {exec} (noexec mounts elsewhere)"
                ));
                off.extend(enforcement.unenforced);
            }
        }
    } else {
        let exec = match (profile.exec_system, profile.exec_workspace) {
            (true, true) => "system paths, the workspace and --rw paths",
            (true, false) => "system paths",
            (false, true) => "the workspace and --rw paths",
            (false, false) => "the entry command only",
        };
        on.push(format!("Landlock ABI {abi}: writes only to the workspace and /tmp, exec of {exec}"));
        if abi >= 6 {
            on.push("signals and abstract unix sockets scoped to the jail (Landlock ABI 6)".into());
        } else {
            off.push(format!(
                "signal scoping needs Landlock ABI 6 (have {abi}); the host's abstract unix sockets are out of reach anyway (own network namespace)"
            ));
        }
    }
    if profile.net == NetMode::Allowlist {
        on.push(
            "TCP connect only to allow-listed addresses and ports (BPF allow-list, any Landlock ABI), never to the host's own \
             addresses (the veth gateway included, but for its port 53: the agent's resolver) or metadata"
                .into(),
        );
        if facts.forwarding == Some(false) {
            off.push(
                "IPv4 forwarding is off: agt-jail turns it on (net.ipv4.ip_forward=1) at the first allowlist run"
                    .into(),
            );
        }
        off.push("egress is IPv4 only: the agent's namespace has no IPv6 route out".into());
        on.push(
            "names (--allow-connect NAME:PORT, *.SUFFIX:PORT): agt-jail's resolver on the gateway (port 53, UDP and TCP) \
             opens an allowed name's addresses for its TTL before the agent sees them, refuses other names and records both"
                .into(),
        );
        match std::fs::read_to_string("/etc/resolv.conf")
            .map_err(|e| e.to_string())
            .and_then(|text| agt_jail_dns::first_nameserver(&text, "/etc/resolv.conf").map_err(|e| e.to_string()))
        {
            Ok(upstream) => on.push(format!(
                "the agent's resolver asks {upstream} (the host's first nameserver; --dns-upstream overrides)"
            )),
            Err(e) => off.push(format!("the agent's resolver has no upstream ({e}): names need --dns-upstream ADDR")),
        }
        if profile.allow_udp {
            off.push("UDP egress is not filtered (network.allow_udp: true)".into());
        } else {
            on.push(
                "UDP only to the agent's resolver and allow-listed addresses and ports (BPF sendmsg); ICMP and other \
                 datagram sockets refused (seccomp)"
                    .into(),
            );
        }
    }
    if profile.workspace == WorkspaceMode::Scratch {
        on.push("scratch /workspace (tmpfs); a given --workspace is read-only".into());
    }
    match &facts.bpf_lsm {
        Ok(()) => on.push("Tier A: BPF LSM exec denial available".into()),
        Err(_) if abi == 0 => {
            off.push("Tier A (BPF LSM) hooks: exec is held by the mount view instead (noexec mounts)".into())
        }
        Err(_) => off.push("Tier A (BPF LSM) hooks: exec is enforced by Landlock instead (Tier B)".into()),
    }
    if !facts.root {
        off.push("as this non-root user: user namespace, no cgroup/limits, no BPF, --net none only".into());
    }
    (on, off)
}

/// Audited runs killed before closing their logs (`audit recover --list` names them), or
/// why they cannot be listed.
fn orphaned_runs() -> Result<Vec<crate::pinned_run::RunMeta>, String> {
    crate::pinned_run::orphaned().map_err(|e| format!("cannot list: {e:#}"))
}

pub fn run(args: DoctorArgs) -> ExitCode {
    let facts = gather();
    if args.json {
        let rings: Vec<_> = (0..4)
            .map(|r| {
                let (on, off) = ring_report(&facts, r);
                serde_json::json!({ "ring": r, "enforced": on, "not_enforced": off })
            })
            .collect();
        let json = serde_json::json!({
            "kernel": facts.kernel,
            "landlock_abi": facts.landlock_abi,
            "seccomp": facts.seccomp,
            "user_namespaces": facts.userns.clone().err().unwrap_or_else(|| "available".into()),
            "cgroup": facts.layout.as_ref().map(|l| serde_json::json!({
                "v2": l.v2, "hybrid": l.hybrid, "v2_controllers": l.v2_controllers(),
                "v1": l.v1.iter().map(|(c, p)| serde_json::json!({"controller": c, "mount": p})).collect::<Vec<_>>(),
            })),
            "lsm": facts.lsm_list,
            "btf": facts.btf,
            "bpf_programs": facts.bpf_programs.clone().err().unwrap_or_else(|| "load".into()),
            "bpf_lsm": facts.bpf_lsm.clone().err().unwrap_or_else(|| "loads".into()),
            "egress": facts.egress.clone().err().unwrap_or_else(|| "veth + nf_tables masquerade".into()),
            "ip_forward": facts.forwarding,
            "rings": rings,
            "orphaned_audit_runs": match orphaned_runs() {
                Ok(runs) => serde_json::json!(runs.iter().map(|r| serde_json::json!({
                    "run": r.id, "audit": r.audit, "pid": r.pid,
                })).collect::<Vec<_>>()),
                Err(e) => serde_json::json!(e),
            },
        });
        println!("{json}");
        return ExitCode::SUCCESS;
    }
    println!("kernel            {}", facts.kernel);
    println!("landlock          {}", facts.landlock_abi.map_or("not enforced".to_string(), |abi| format!("ABI {abi}")));
    println!("seccomp           {}", if facts.seccomp { "filters available" } else { "not available" });
    println!(
        "user namespaces   {}",
        match &facts.userns {
            Ok(()) => "available to unprivileged users".to_string(),
            Err(e) => e.clone(),
        }
    );
    match &facts.layout {
        Some(layout) => {
            let kind = if layout.hybrid { "hybrid (v1 controllers + cgroup2)" } else { "pure v2" };
            println!("cgroup            {kind}; cgroup2 at {}", layout.v2.display());
            let v2 = layout.v2_controllers();
            println!(
                "                  v2 controllers: {}",
                if v2.is_empty() { "none".to_string() } else { v2.join(" ") }
            );
            if !layout.v1.is_empty() {
                let v1: Vec<String> = layout.v1.iter().map(|(c, p)| format!("{c}={}", p.display())).collect();
                println!("                  v1: {}", v1.join(" "));
            }
        }
        None => println!("cgroup            no cgroup2 hierarchy mounted"),
    }
    println!(
        "active LSMs       {}",
        facts.lsm_list.clone().unwrap_or_else(|| "unknown (securityfs not mounted at /sys/kernel/security)".into())
    );
    println!("BTF               {}", yes(facts.btf));
    println!(
        "BPF programs      {}",
        match &facts.bpf_programs {
            Ok(()) => "load (connect hooks, exec events)".to_string(),
            Err(e) => e.clone(),
        }
    );
    println!(
        "BPF LSM           {}",
        match &facts.bpf_lsm {
            Ok(()) => "loads (Tier A)".to_string(),
            Err(e) => format!("refused or absent: Tier B ({e})"),
        }
    );
    println!(
        "agent egress      {}",
        match &facts.egress {
            Ok(()) => format!(
                "veth + nf_tables masquerade (one shared `table ip {}`, kept between runs), /30s from {}/{}",
                egress::NAT_TABLE,
                egress::RANGE.0,
                egress::RANGE.1
            ),
            Err(e) => e.clone(),
        }
    );
    println!(
        "audited runs      {}",
        match orphaned_runs() {
            Ok(runs) => crate::pinned_run::orphan_warning(&runs).unwrap_or_else(|| "none left unrecovered".into()),
            Err(e) => e,
        }
    );
    for ring in 0..4 {
        let (on, off) = ring_report(&facts, ring);
        println!("\nring {ring}");
        for line in on {
            println!("  + {line}");
        }
        for line in off {
            println!("  - {line}");
        }
    }
    ExitCode::SUCCESS
}
