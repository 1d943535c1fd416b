//! The agent's resolver in allowlist mode (docs/dns-egress.md): agt-jail's DNS proxy on
//! the host end of the agent's veth (its gateway), port 53 over UDP and TCP, started
//! before the agent. Names the agent may reach are answered from the upstream, and their
//! addresses are written into the agent's kernel allow-list before the answer leaves;
//! every other name is REFUSED. Every query and every expiry is a record (`event: dns`)
//! in the events file and the audit log, written before the answer is sent.
use std::{
    fs::OpenOptions,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use agt_jail_dns::{
    first_nameserver, normalize, spawn_expiry, AllowMap, AllowSet, AllowSink, Dest, DnsProxy, ExpiringAllows,
    NamePattern, Observation, Observer, Outcome, ProxyConfig, SinkError,
};
use agt_jail_ebpf_loader::{AgentPrograms, AllowRule, KernelAllowMap, LoaderError};
use agt_jail_policy::plan::Resolved;
use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::govern::lock;

/// The resolver's port on the gateway.
pub const DNS_PORT: u16 = 53;

/// How often lapsed names are looked for.
const EXPIRY_PERIOD: Duration = Duration::from_secs(1);

/// The agent's kernel allow-list as the proxy's expiry table writes it, refusing the
/// addresses an answer must never open: the host's own (the gateway, whose other ports
/// are the host's services) and the metadata service. A name that resolves to one gets
/// SERVFAIL (the proxy's fail-closed answer to a sink that refuses).
pub struct GuardedMap {
    kernel: KernelAllowMap,
    never: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("{0} is the host's or the metadata service's address, never a destination of a name")]
    Never(IpAddr),
    #[error(transparent)]
    Kernel(#[from] LoaderError),
}

impl AllowMap for GuardedMap {
    type Error = GuardError;

    fn insert(&mut self, dest: Dest) -> Result<(), GuardError> {
        if self.never.contains(&dest.0.to_canonical()) {
            return Err(GuardError::Never(dest.0));
        }
        Ok(self.kernel.insert(dest)?)
    }

    fn remove(&mut self, dest: Dest) -> Result<(), GuardError> {
        Ok(self.kernel.remove(dest)?)
    }
}

/// Which names allow which addresses now (shared by the proxy, the expiry timer and the
/// records of connects).
pub type Names = Arc<Mutex<ExpiringAllows<GuardedMap>>>;

/// The names that currently allow `addr`, joined with `,` (None when none does).
pub fn names_of(names: &Names, addr: IpAddr) -> Option<String> {
    let found = lock(names).names_of(addr);
    (!found.is_empty()).then(|| found.join(","))
}

/// Where `event: dns` records go: written (and flushed) before the answer they describe
/// is sent.
pub type RecordFn = Arc<dyn Fn(&Value) + Send + Sync>;

/// The upstream the proxy asks: `--dns-upstream`, else the host's first nameserver.
pub fn upstream(flag: Option<SocketAddr>) -> Result<SocketAddr> {
    if let Some(addr) = flag {
        return Ok(addr);
    }
    let path = "/etc/resolv.conf";
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("cannot read {path} for the agent's resolver's upstream (give one with --dns-upstream ADDR)")
    })?;
    first_nameserver(&text, path).map_err(|err| anyhow::anyhow!("{err} (give one with --dns-upstream ADDR)"))
}

/// The allow set of the profile's names, and of the policy's domains on every port (port
/// 0: the policy's plan decides the port and everything else of each connect).
pub fn allow_set(names: &[(NamePattern, u16)], policy_domains: &[String]) -> AllowSet {
    let mut set = AllowSet::new();
    for (pattern, port) in names {
        set.add(pattern.clone(), *port);
    }
    for domain in policy_domains {
        match NamePattern::parse(domain) {
            Ok(NamePattern::Exact(name)) => set.add(NamePattern::Exact(name), 0),
            // A policy compares net.domain with whole names; one that is no host name
            // matches no answer.
            _ => agt_jail_jail::stderr_line!(
                "agt-jail: warning: the policy's domain '{domain}' is not a host name; the agent's resolver refuses it"
            ),
        }
    }
    set
}

/// Under a policy: the addresses the resolver opens for the policy's domains become the
/// plan's `net.domain` classes, re-installed before the answer leaves.
pub struct Feed {
    /// (normalised, as the policy writes it) for every domain the policy compares
    /// `net.domain` with.
    pub domains: Vec<(String, String)>,
    /// What the plan's compiler reads (see `govern::DomainResolver`).
    pub learned: Arc<Mutex<Resolved>>,
    /// Re-installs the network plan from `learned`.
    pub replan: Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>,
}

impl Feed {
    /// `learned` starts with every domain and no address (see [`initial`]).
    pub fn new(
        domains: &[String],
        learned: Arc<Mutex<Resolved>>,
        replan: Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>,
    ) -> Self {
        Self { domains: domains.iter().map(|d| (normalize(d), d.clone())).collect(), learned, replan }
    }

    /// The policy's spelling of a query name, when the policy names it.
    fn policy_name(&self, name: &str) -> Option<&str> {
        self.domains.iter().find(|(normal, _)| normal == name).map(|(_, written)| written.as_str())
    }

    /// Records that `name` now opens `addr` and re-plans when that is new to the plan.
    fn learn(&self, name: &str, addr: IpAddr) -> Result<(), SinkError> {
        let Some(written) = self.policy_name(name) else { return Ok(()) };
        let addr = addr.to_canonical();
        let new = {
            let mut learned = lock(&self.learned);
            let addrs = learned.entry(written.to_string()).or_default();
            let new = !addrs.contains(&addr);
            if new {
                addrs.push(addr);
                addrs.sort();
            }
            new
        };
        if new {
            if let Err(err) = (self.replan)() {
                // Forgotten again, so that the next answer tries again.
                lock(&self.learned).entry(written.to_string()).or_default().retain(|a| *a != addr);
                return Err(SinkError(format!("cannot re-install the policy's network tables for {name}: {err}")));
            }
        }
        Ok(())
    }

    /// After an expiry: the policy's domains keep only the addresses still open.
    fn forget_lapsed(&self, names: &Names) -> Result<(), SinkError> {
        let now: Vec<(String, Vec<IpAddr>)> = {
            let names = lock(names);
            self.domains.iter().map(|(normal, written)| (written.clone(), names.addrs_of(normal))).collect()
        };
        let changed = {
            let mut learned = lock(&self.learned);
            let mut changed = false;
            for (written, addrs) in now {
                let entry = learned.entry(written).or_default();
                if *entry != addrs {
                    *entry = addrs;
                    changed = true;
                }
            }
            changed
        };
        if changed {
            (self.replan)()
                .map_err(|err| SinkError(format!("cannot re-install the policy's network tables: {err}")))?;
        }
        Ok(())
    }
}

/// What the plan knows of the policy's domains before the agent asked for any.
pub fn initial(domains: &[String]) -> Resolved {
    domains.iter().map(|d| (d.clone(), Vec::new())).collect()
}

/// The proxy's sink: the names' table (kernel allow-list writes), then the policy's plan.
struct Sink {
    names: Names,
    feed: Option<Arc<Feed>>,
}

impl AllowSink for Sink {
    fn allow(&mut self, addr: IpAddr, port: u16, expires: std::time::Instant, name: &str) -> Result<(), SinkError> {
        lock(&self.names).allow(addr, port, expires, name)?;
        match &self.feed {
            Some(feed) => feed.learn(name, addr),
            None => Ok(()),
        }
    }
}

/// The running resolver of one agent.
pub struct Resolver {
    proxy: Option<DnsProxy>,
    names: Names,
    stop: Arc<AtomicBool>,
    expiry: Option<JoinHandle<()>>,
    resolv_conf: PathBuf,
}

pub struct ResolverSetup<'a> {
    pub programs: Arc<Mutex<AgentPrograms>>,
    pub agent_id: u64,
    pub agent: String,
    pub gateway: Ipv4Addr,
    pub upstream: SocketAddr,
    pub allow: AllowSet,
    /// The profile's own host entries: a name lapsing never takes them away.
    pub pinned: &'a [AllowRule],
    /// Addresses no answer may open.
    pub never: Vec<IpAddr>,
    pub record: RecordFn,
    /// Print refused names on stderr.
    pub show_denials: bool,
    pub feed: Option<Feed>,
}

impl Resolver {
    /// Binds gateway:53 (UDP and TCP), writes the agent's resolv.conf and starts the proxy
    /// and its expiry timer.
    pub fn start(setup: ResolverSetup<'_>) -> Result<Self> {
        let bind = SocketAddr::new(IpAddr::V4(setup.gateway), DNS_PORT);
        let udp = UdpSocket::bind(bind).with_context(|| format!("cannot serve the agent's resolver on udp {bind}"))?;
        let tcp =
            TcpListener::bind(bind).with_context(|| format!("cannot serve the agent's resolver on tcp {bind}"))?;
        let resolv_conf = write_resolv_conf(setup.gateway)?;
        let hosts = agt_jail_ebpf_loader::pinned_hosts(setup.pinned);
        let map = GuardedMap {
            kernel: KernelAllowMap::new(setup.programs, setup.agent_id),
            never: setup.never.iter().map(|a| a.to_canonical()).collect(),
        };
        let names: Names = Arc::new(Mutex::new(ExpiringAllows::new(map, hosts)));
        let mut resolver = Self {
            proxy: None,
            names: Arc::clone(&names),
            stop: Arc::new(AtomicBool::new(false)),
            expiry: None,
            resolv_conf,
        };
        let record = Arc::clone(&setup.record);
        let feed = setup.feed.map(Arc::new);
        let (expiry_feed, expiry_names) = (feed.clone(), Arc::clone(&names));
        resolver.expiry = Some(
            spawn_expiry(Arc::clone(&names), EXPIRY_PERIOD, Arc::clone(&resolver.stop), move |result| {
                record(&expiry_record(result));
                if let Some(Err(SinkError(reason))) = expiry_feed.as_ref().map(|f| f.forget_lapsed(&expiry_names)) {
                    record(&json!({ "event": "dns", "time": now(), "outcome": "expiry_failed", "reason": reason }));
                }
            })
            .context("cannot start the resolver's expiry timer")?,
        );
        let config = ProxyConfig::new(setup.upstream, setup.allow, setup.agent);
        let observer = Arc::new(Records { record: setup.record, show_denials: setup.show_denials });
        let sink = Arc::new(Mutex::new(Sink { names, feed }));
        resolver.proxy =
            Some(DnsProxy::start(udp, Some(tcp), config, sink, observer).context("cannot start the agent's resolver")?);
        Ok(resolver)
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The generated resolv.conf (shown over the agent's /etc/resolv.conf).
    pub fn resolv_conf(&self) -> &Path {
        &self.resolv_conf
    }

    /// Stops answering and expiring; the agent's allow-list goes with its programs.
    pub fn stop(&mut self) {
        // The expiry timer first, so that it winds down while the proxy's threads do.
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.expiry.as_ref() {
            thread.thread().unpark();
        }
        if let Some(proxy) = self.proxy.take() {
            proxy.stop();
        }
        if let Some(thread) = self.expiry.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.resolv_conf);
    }
}

/// `nameserver GATEWAY` and nothing else, in a new file only root can write.
fn write_resolv_conf(gateway: Ipv4Addr) -> Result<PathBuf> {
    let dir = Path::new("/run/agt-jail");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    sweep_stale(dir, Path::new("/proc"));
    let path = dir.join(format!("resolv-{}-{gateway}.conf", std::process::id()));
    // A file a dead run left under the same name is replaced (create_new would refuse it).
    let _ = std::fs::remove_file(&path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(format!("# agt-jail: the agent's resolver (docs/dns-egress.md)\nnameserver {gateway}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Removes the resolv.conf files of runs that are gone (a killed agt-jail leaves its own).
fn sweep_stale(dir: &Path, proc_root: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(|n| n.strip_prefix("resolv-")).and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if owner.parse::<u32>().is_ok() && !proc_root.join(owner).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// The record of one query.
pub fn query_record(observation: &Observation) -> Value {
    let mut value = json!({
        "event": "dns",
        "time": now(),
        "agent": observation.agent,
        "name": observation.name,
        "qtype": observation.qtype,
    });
    let fields = match &observation.outcome {
        Outcome::Refused => json!({ "outcome": "refused", "rcode": "REFUSED", "verdict": "deny" }),
        Outcome::Answered { rcode, addrs, ports, dropped } => json!({
            "outcome": "answered",
            "rcode": rcode,
            "verdict": "allow",
            "addresses": addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
            "ports": ports,
            "dropped": dropped.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
        }),
        Outcome::Empty => json!({ "outcome": "empty", "rcode": "NOERROR", "verdict": "allow" }),
        Outcome::Failed { rcode, reason } => {
            json!({ "outcome": "failed", "rcode": rcode, "verdict": "deny", "reason": reason })
        }
    };
    if let (Value::Object(map), Value::Object(extra)) = (&mut value, fields) {
        map.extend(extra);
    }
    value
}

/// The record of one expiry tick that removed something (or failed to).
fn expiry_record(result: Result<Vec<Dest>, SinkError>) -> Value {
    match result {
        Ok(removed) => json!({
            "event": "dns",
            "time": now(),
            "outcome": "expired",
            "closed": removed.iter().map(|(addr, port)| SocketAddr::new(*addr, *port).to_string()).collect::<Vec<_>>(),
        }),
        Err(SinkError(reason)) => json!({
            "event": "dns", "time": now(), "outcome": "expiry_failed", "reason": reason,
        }),
    }
}

struct Records {
    record: RecordFn,
    show_denials: bool,
}

impl Observer for Records {
    fn observe(&self, observation: Observation) {
        if self.show_denials && observation.outcome == Outcome::Refused {
            agt_jail_jail::stderr_line!(
                "agt-jail: refused DNS query for {} ({}): not an allowed name",
                observation.name,
                observation.qtype
            );
        }
        (self.record)(&query_record(&observation));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn query_records_say_what_was_opened_and_what_was_refused() {
        let observation =
            |outcome| Observation { agent: "a1".into(), name: "api.example.com".into(), qtype: "A".into(), outcome };
        let refused = query_record(&observation(Outcome::Refused));
        assert_eq!((refused["event"].as_str(), refused["outcome"].as_str()), (Some("dns"), Some("refused")));
        assert_eq!(refused["verdict"], "deny");
        let answered = query_record(&observation(Outcome::Answered {
            rcode: "NOERROR".into(),
            addrs: vec!["192.0.2.7".parse().unwrap()],
            ports: vec![443],
            dropped: vec!["127.0.0.1".parse().unwrap()],
        }));
        assert_eq!(answered["addresses"], json!(["192.0.2.7"]));
        assert_eq!(answered["ports"], json!([443]));
        assert_eq!(answered["dropped"], json!(["127.0.0.1"]));
        assert_eq!(answered["name"], "api.example.com");
        let expired = expiry_record(Ok(vec![("192.0.2.7".parse().unwrap(), 443)]));
        assert_eq!(expired["closed"], json!(["192.0.2.7:443"]));
    }

    #[test]
    fn only_the_files_of_runs_that_are_gone_are_swept() {
        let root = tempfile::tempdir().unwrap();
        let (dir, proc_root) = (root.path().join("run"), root.path().join("proc"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(proc_root.join("11")).unwrap();
        for name in ["resolv-10-10.213.0.1.conf", "resolv-11-10.213.0.5.conf", "other.conf"] {
            std::fs::write(dir.join(name), "nameserver 10.213.0.1\n").unwrap();
        }
        sweep_stale(&dir, &proc_root);
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["other.conf", "resolv-11-10.213.0.5.conf"]);
    }

    #[test]
    fn the_upstream_flag_wins_over_the_host_resolver() {
        let flag: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        assert_eq!(upstream(Some(flag)).unwrap(), flag);
    }
}
