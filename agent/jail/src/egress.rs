//! The routed path out of an allowlist agent's own network namespace: a veth pair per
//! agent, a /30 from [`RANGE`], a default route inside, and a masquerade rule on the host
//! (docs/adr/0009). The cgroup connect/sendmsg programs still decide every destination.
//!
//! The agent's namespace is made here, before the jail exists, with its end of the pair
//! created right in it and configured; the jail's init joins it. Names carry the slot,
//! so state a killed agt-jail left behind never blocks the next run: a slot whose /30 is
//! routed is taken (its veth still exists, or the host uses the range), the veth name is
//! the reservation (creating it fails with EEXIST when another run won the race). One
//! masquerade table serves every agent and stays, as container engines' rules do: a run
//! adds it only when it is missing, so a run's start and end change no nf_tables state.
//! When the agent's namespace goes, the kernel deletes the pair with it.
use std::{
    ffi::CString,
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    path::Path,
    thread::JoinHandle,
};

use crate::{
    netlink::{Message, Socket, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL},
    sys,
};

/// The private range the agents' /30s come from (documented default).
pub const RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 213, 0, 0), 16);
/// The interface name inside the agent's namespace.
pub const INSIDE_NAME: &str = "eth0";
const HOST_PREFIX: &str = "agtj";

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("no free /30 in {0}/{1}: every slot is in use or the host routes overlap the range")]
    NoSlot(Ipv4Addr, u8),
    #[error("cannot read the host's routes ({path}): {source}")]
    Routes { path: String, source: io::Error },
    #[error("cannot {step}: {source}")]
    Netlink { step: String, source: io::Error },
}

fn netlink_err(step: impl Into<String>) -> impl FnOnce(io::Error) -> EgressError {
    let step = step.into();
    move |source| EgressError::Netlink { step, source }
}

/// One agent's /30: network, host end (the gateway), agent end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub network: Ipv4Addr,
}

impl Slot {
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
    pub fn agent(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 2)
    }
    pub fn host_name(self) -> String {
        format!("{HOST_PREFIX}{}", self.index)
    }
}

/// The nf_tables table (family ip) that masquerades every agent's traffic.
pub const NAT_TABLE: &str = "agt-jail";

/// IPv4 routes of `/proc/net/route` as (network, prefix length); default routes left out
/// (they overlap everything and say nothing about the range).
pub fn parse_routes(text: &str) -> Vec<(Ipv4Addr, u8)> {
    let hex = |field: &str| u32::from_str_radix(field, 16).ok().map(|v| Ipv4Addr::from(v.to_ne_bytes()));
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (dest, mask) = (hex(fields.get(1)?)?, hex(fields.get(7)?)?);
            let prefix = u32::from(mask).leading_ones() as u8;
            (prefix > 0).then_some((dest, prefix))
        })
        .collect()
}

const ALIAS_PREFIX: &str = "agt-jail owner ";

fn owner_alias(owner: u32) -> String {
    format!("{ALIAS_PREFIX}{owner}")
}

/// The slot of a host-end name (`agtj12` → 12); peers and other names are not slots.
pub fn slot_of(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(HOST_PREFIX)?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// The owner a host end's alias names (`/sys/class/net/NAME/ifalias`).
pub fn owner_of(alias: &str) -> Option<u32> {
    alias.trim().strip_prefix(ALIAS_PREFIX)?.parse().ok()
}

/// Host ends whose owner (the agt-jail that made them) is gone: `(name, slot)`. A run
/// killed before its jail took the peer leaves a pair no namespace teardown removes.
pub fn stale_links(sys_net: &Path, proc_root: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(sys_net) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let slot = slot_of(&name)?;
            let owner = owner_of(&std::fs::read_to_string(entry.path().join("ifalias")).ok()?)?;
            (!proc_root.join(owner.to_string()).exists()).then_some((name, slot))
        })
        .collect()
}

fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let shorter = a.1.min(b.1);
    let mask = if shorter == 0 { 0 } else { u32::MAX << (32 - u32::from(shorter)) };
    u32::from(a.0) & mask == u32::from(b.0) & mask
}

/// The free slots of `range` (in order), given the routes and addresses the host has.
pub fn free_slots<'a>(
    range: (Ipv4Addr, u8),
    routes: &'a [(Ipv4Addr, u8)],
    addresses: &'a [IpAddr],
) -> impl Iterator<Item = Slot> + 'a {
    let count = 1u32 << (30 - u32::from(range.1.min(30)));
    let base = u32::from(range.0) & (u32::MAX.checked_shl(32 - u32::from(range.1)).unwrap_or(0));
    (0..count).map(move |index| Slot { index, network: Ipv4Addr::from(base + index * 4) }).filter(move |slot| {
        let net = (slot.network, 30);
        !routes.iter().any(|r| overlaps(*r, net))
            && !addresses.iter().any(|a| matches!(a, IpAddr::V4(v4) if overlaps((*v4, 32), net)))
    })
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0] = libc::AF_UNSPEC as u8;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_IFALIAS: u16 = 20;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_GATEWAY: u16 = 5;

/// RTM_NEWLINK: the veth pair `host` (in the caller's namespace) / `peer` (created right
/// in the namespace `peer_netns` refers to: no move, which would wait for an RCU grace
/// period); fails with EEXIST when `host` exists (the name is the slot's reservation).
pub fn new_veth(host: &str, peer: &str, peer_netns: RawFd) -> Message {
    let mut msg = Message::new(libc::RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &ifinfomsg(0, 0, 0));
    msg.attr_str(IFLA_IFNAME, host).begin(IFLA_LINKINFO).attr_str(IFLA_INFO_KIND, "veth");
    msg.begin(IFLA_INFO_DATA).begin(VETH_INFO_PEER).raw(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, peer);
    msg.attr_u32(IFLA_NET_NS_FD, peer_netns as u32);
    msg.end().end().end();
    msg
}

/// RTM_NEWLINK: interface `index` up, with `alias` (the host end names its owner; a new
/// link takes an alias only this way).
pub fn link_up(index: u32, alias: Option<&str>) -> Message {
    let up = libc::IFF_UP as u32;
    let mut msg = Message::new(libc::RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(index, up, up));
    if let Some(alias) = alias {
        msg.attr(IFLA_IFALIAS, alias.as_bytes());
    }
    msg
}

/// RTM_DELLINK of interface `name` (a veth takes its peer with it).
pub fn del_link(name: &str) -> Message {
    let mut msg = Message::new(libc::RTM_DELLINK, NLM_F_ACK, &ifinfomsg(0, 0, 0));
    msg.attr_str(IFLA_IFNAME, name);
    msg
}

/// RTM_NEWADDR: `addr/prefix` on interface `index`.
pub fn new_addr(index: u32, addr: Ipv4Addr, prefix: u8) -> Message {
    let mut header = [0u8; 8];
    header[0] = libc::AF_INET as u8;
    header[1] = prefix;
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    let mut msg = Message::new(libc::RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &header);
    msg.attr(IFA_LOCAL, &addr.octets()).attr(IFA_ADDRESS, &addr.octets());
    msg
}

/// RTM_NEWROUTE: the default route via `gateway` (the kernel finds the interface from the
/// gateway's connected route).
pub fn default_route(gateway: Ipv4Addr) -> Message {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut header = [0u8; 12];
    header[0] = libc::AF_INET as u8;
    header[4] = libc::RT_TABLE_MAIN;
    header[5] = libc::RTPROT_BOOT;
    header[6] = libc::RT_SCOPE_UNIVERSE;
    header[7] = libc::RTN_UNICAST;
    let mut msg = Message::new(libc::RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &header);
    msg.attr(RTA_GATEWAY, &gateway.octets());
    msg
}

/// nf_tables messages for the masquerade rule.
pub mod nft {
    use super::*;

    const SUBSYS: u16 = 10; // NFNL_SUBSYS_NFTABLES
    const BATCH_BEGIN: u16 = 0x10;
    const BATCH_END: u16 = 0x11;
    const NEWTABLE: u16 = 0;
    const GETTABLE: u16 = 1;
    const DELTABLE: u16 = 2;
    const NEWCHAIN: u16 = 3;
    const NEWRULE: u16 = 6;
    const NFT_META_IIFNAME: u32 = 6;
    const NFPROTO_IPV4: u8 = 2;
    const NF_INET_POST_ROUTING: u32 = 4;
    const NF_IP_PRI_NAT_SRC: u32 = 100;
    const CHAIN: &str = "postrouting";

    fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
        let id = res_id.to_be_bytes();
        [family, 0, id[0], id[1]]
    }

    fn msg(kind: u16, flags: u16) -> Message {
        Message::new((SUBSYS << 8) | kind, flags, &nfgenmsg(NFPROTO_IPV4, 0))
    }

    /// A batch: nf_tables applies it whole or not at all.
    fn batch(body: Vec<Message>) -> Vec<Message> {
        let mut all = vec![Message::new(BATCH_BEGIN, 0, &nfgenmsg(libc::AF_UNSPEC as u8, SUBSYS))];
        all.extend(body);
        all.push(Message::new(BATCH_END, 0, &nfgenmsg(libc::AF_UNSPEC as u8, SUBSYS)));
        all
    }

    fn table(kind: u16, flags: u16, name: &str) -> Message {
        let mut m = msg(kind, flags);
        m.attr_str(1, name); // NFTA_TABLE_NAME
        m
    }

    /// `table ip NAME { chain postrouting { type nat hook postrouting priority srcnat;
    /// iifname "agtj*" ip saddr RANGE masquerade } }` in one batch whose table is added
    /// with NLM_F_EXCL: when the table exists the whole batch fails with EEXIST and changes
    /// nothing, so every run can send it and only the first one on a host adds the table.
    /// Nothing is ever destroyed on a run's path (destroying nf_tables objects makes the
    /// socket's close wait for an RCU grace period, ~10 ms). The input interface keeps
    /// addresses the host itself may have in the range out of the rule.
    pub fn masquerade(name: &str, range: (Ipv4Addr, u8)) -> Vec<Message> {
        let mut chain = msg(NEWCHAIN, NLM_F_ACK | NLM_F_CREATE);
        chain.attr_str(1, name).attr_str(3, CHAIN); // NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME
        chain.begin(4).attr_be32(1, NF_INET_POST_ROUTING).attr_be32(2, NF_IP_PRI_NAT_SRC).end(); // NFTA_CHAIN_HOOK
        chain.attr_str(7, "nat"); // NFTA_CHAIN_TYPE

        let (network, prefix) = range;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
        let mut rule = msg(NEWRULE, NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND);
        rule.attr_str(1, name).attr_str(2, CHAIN); // NFTA_RULE_TABLE, NFTA_RULE_CHAIN
        rule.begin(4); // NFTA_RULE_EXPRESSIONS
                       // meta: reg1 = the input interface's name (NFT_META_IIFNAME).
        rule.begin(1).attr_str(1, "meta").begin(2).attr_be32(1, 1).attr_be32(2, NFT_META_IIFNAME).end().end();
        // cmp: its first bytes are the host ends' prefix (nft's `iifname "agtj*"`).
        rule.begin(1).attr_str(1, "cmp").begin(2);
        rule.attr_be32(1, 1).attr_be32(2, 0).begin(3).attr(1, HOST_PREFIX.as_bytes()).end();
        rule.end().end();
        // payload: reg1 = network header bytes 12..16 (the source address).
        rule.begin(1).attr_str(1, "payload").begin(2);
        rule.attr_be32(1, 1).attr_be32(2, 1).attr_be32(3, 12).attr_be32(4, 4).end().end();
        // bitwise: reg1 &= mask.
        rule.begin(1).attr_str(1, "bitwise").begin(2);
        rule.attr_be32(1, 1).attr_be32(2, 1).attr_be32(3, 4);
        rule.begin(4).attr(1, &mask.to_be_bytes()).end().begin(5).attr(1, &[0; 4]).end();
        rule.end().end();
        // cmp: reg1 == network.
        rule.begin(1).attr_str(1, "cmp").begin(2);
        rule.attr_be32(1, 1).attr_be32(2, 0).begin(3).attr(1, &network.octets()).end();
        rule.end().end();
        rule.begin(1).attr_str(1, "masq").end();
        rule.end();

        batch(vec![table(NEWTABLE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, name), chain, rule])
    }

    /// Asks for table `name`: acknowledged when it exists, ENOENT when not.
    pub fn get_table(name: &str) -> Message {
        table(GETTABLE, NLM_F_ACK, name)
    }

    /// Deletes table `name` with everything in it (tests and uninstall; never a run).
    pub fn delete(name: &str) -> Vec<Message> {
        batch(vec![table(DELTABLE, NLM_F_ACK, name)])
    }
}

/// What the jail needs: the namespace to join, with its end of the pair already in it.
#[derive(Clone, Copy, Debug)]
pub struct EgressPlan {
    pub slot: Slot,
    /// The agent's network namespace (owned by [`Egress`]); the jail's init joins it
    /// with setns(2) instead of making a new one.
    pub netns: RawFd,
}

/// One agent's routed path, held for the agent's life. Nothing to undo by hand: the pair
/// goes with the agent's namespace, which the kernel tears down once this descriptor and
/// the jail are gone, and the NAT table is shared by every agent.
#[derive(Debug)]
pub struct Egress {
    slot: Slot,
    /// The agent's namespace: it holds the agent's end of the pair, so closing it (and the
    /// jail's end) makes the kernel delete the pair.
    netns: OwnedFd,
    /// A probe (`doctor`) that had to add the shared NAT table takes it away again, so
    /// asking what the host can do changes nothing on it.
    probe_made_nat: bool,
}

/// Runs `work` on a thread of its own that entered `netns` (or a new namespace when
/// None): only that thread changes namespace, and its sockets stay there when it ends.
fn in_namespace<T: Send>(
    netns: Option<BorrowedFd<'_>>,
    work: impl FnOnce() -> Result<T, EgressError> + Send,
) -> Result<T, EgressError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                match netns {
                    Some(fd) => sys::setns_net(fd).map_err(netlink_err("enter the agent's network namespace"))?,
                    None => sys::unshare(libc::CLONE_NEWNET).map_err(netlink_err("create a network namespace"))?,
                }
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(netlink_err("set up the agent's network namespace")(io::ErrorKind::Other.into())))
    })
}

/// Makes sure the shared masquerade table exists: one request when it does (every run
/// but a host's first); the table is added only when it is missing, and a run that lost
/// that race to another finds it made. Returns whether this call added it.
fn ensure_nat() -> Result<bool, EgressError> {
    let mut nf = Socket::open(libc::NETLINK_NETFILTER).map_err(netlink_err("open a netfilter netlink socket"))?;
    match nf.transact(&[nft::get_table(NAT_TABLE)]) {
        Ok(()) => return Ok(false),
        Err((_, e)) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err((_, e)) => return Err(netlink_err(format!("look up the nf_tables table ip {NAT_TABLE}"))(e)),
    }
    match nf.transact(&nft::masquerade(NAT_TABLE, RANGE)) {
        Ok(()) => Ok(true),
        Err((_, e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err((_, e)) => Err(netlink_err("add the nf_tables masquerade rule (is nf_tables NAT available?)")(e)),
    }
}

fn index_of(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::if_index(&c)
}

impl Egress {
    /// Creates the agent's namespace and the pair (its end inside, named eth0, with its
    /// address and default route; the host end with the gateway address), forwarding
    /// and the shared NAT table when it is missing. Without `forward` this is `doctor`'s
    /// probe: the host's forwarding switch is left as it is, and a NAT table the probe had
    /// to add goes when the guard does. `proc_root` is /proc (the host's routes, the forwarding switch), `sys_net`
    /// /sys/class/net (the sweep).
    pub fn create(proc_root: &Path, sys_net: &Path, forward: bool) -> Result<Self, EgressError> {
        let mut route = Socket::open(libc::NETLINK_ROUTE).map_err(netlink_err("open a route netlink socket"))?;
        for (name, _slot) in stale_links(sys_net, proc_root) {
            let _ = route.transact(&[del_link(&name)]);
        }
        let routes_path = proc_root.join("net/route");
        let routes = std::fs::read_to_string(&routes_path)
            .map_err(|source| EgressError::Routes { path: routes_path.display().to_string(), source })?;
        let routes = parse_routes(&routes);
        let addresses = sys::interface_addresses().map_err(netlink_err("list the host's addresses"))?;
        let netns: OwnedFd = in_namespace(None, || {
            std::fs::File::open("/proc/thread-self/ns/net")
                .map(OwnedFd::from)
                .map_err(netlink_err("open the new network namespace"))
        })?;
        let mut reserved = None;
        for slot in free_slots(RANGE, &routes, &addresses) {
            match route.transact(&[new_veth(&slot.host_name(), INSIDE_NAME, netns.as_raw_fd())]) {
                Ok(()) => {
                    reserved = Some(slot);
                    break;
                }
                Err((_, e)) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err((_, e)) => return Err(netlink_err("create a veth pair (is veth available?)")(e)),
            }
        }
        let slot = reserved.ok_or(EgressError::NoSlot(RANGE.0, RANGE.1))?;
        // From here a failed step drops the namespace, and the kernel deletes the pair.
        let mut egress = Self { slot, netns, probe_made_nat: false };
        let host = index_of(&slot.host_name()).map_err(netlink_err(format!("find {}", slot.host_name())))?;
        route
            .transact(&[link_up(host, Some(&owner_alias(std::process::id()))), new_addr(host, slot.gateway(), 30)])
            .map_err(|(_, e)| netlink_err(format!("configure {}", slot.host_name()))(e))?;
        in_namespace(Some(egress.netns.as_fd()), || {
            let inside = index_of(INSIDE_NAME).map_err(netlink_err("find eth0 in the agent's namespace"))?;
            let mut socket = Socket::open(libc::NETLINK_ROUTE).map_err(netlink_err("open a route netlink socket"))?;
            socket
                .transact(&[new_addr(inside, slot.agent(), 30), link_up(inside, None), default_route(slot.gateway())])
                .map_err(|(_, e)| netlink_err("configure eth0 in the agent's namespace")(e))
        })?;
        if forward {
            std::fs::write(proc_root.join("sys/net/ipv4/ip_forward"), "1")
                .map_err(netlink_err("turn on IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)"))?;
        }
        egress.probe_made_nat = ensure_nat()? && !forward;
        Ok(egress)
    }

    pub fn plan(&self) -> EgressPlan {
        EgressPlan { slot: self.slot, netns: self.netns.as_raw_fd() }
    }

    /// The host end's address: the agent's gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.slot.gateway()
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        if self.probe_made_nat {
            if let Ok(mut nf) = Socket::open(libc::NETLINK_NETFILTER) {
                let _ = nf.transact(&nft::delete(NAT_TABLE));
            }
        }
    }
}

/// An [`Egress`] being made on a thread of its own ([`PendingEgress::start`]), so the
/// launch goes on meanwhile (the agent's cgroup, the BPF programs). The run joins it
/// before the agent exists: the jail needs the namespace it makes, so no agent runs
/// without its network, and a failure is the run's failure. Dropped unjoined (a launch
/// step failed first), it waits for the thread and the guard undoes what it made.
#[derive(Debug)]
pub struct PendingEgress {
    thread: Option<JoinHandle<Result<Egress, EgressError>>>,
    done: Option<Result<Egress, EgressError>>,
}

fn setup_thread_failed() -> EgressError {
    netlink_err("set up the agent's network (the setup thread ended without an answer)")(io::ErrorKind::Other.into())
}

impl PendingEgress {
    /// Starts [`Egress::create`] with the same arguments on a new thread.
    pub fn start(proc_root: &Path, sys_net: &Path, forward: bool) -> Result<Self, EgressError> {
        let (proc_root, sys_net) = (proc_root.to_path_buf(), sys_net.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("agent-network".into())
            .spawn(move || Egress::create(&proc_root, &sys_net, forward))
            .map_err(netlink_err("start the agent's network setup"))?;
        Ok(Self { thread: Some(thread), done: None })
    }

    fn join(&mut self) -> &Result<Egress, EgressError> {
        if let Some(thread) = self.thread.take() {
            self.done = Some(thread.join().unwrap_or_else(|_| Err(setup_thread_failed())));
        }
        self.done.get_or_insert_with(|| Err(setup_thread_failed()))
    }

    /// The agent's gateway (the host end's address), waiting for the setup; None when it
    /// failed, whose error [`PendingEgress::finish`] returns.
    pub fn gateway(&mut self) -> Option<Ipv4Addr> {
        self.join().as_ref().ok().map(Egress::gateway)
    }

    /// Waits for the setup: the finished path, or why there is none.
    pub fn finish(mut self) -> Result<Egress, EgressError> {
        self.join();
        self.done.take().unwrap_or_else(|| Err(setup_thread_failed()))
    }
}

impl Drop for PendingEgress {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        agtj0\t0000D50A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";

    #[test]
    fn routes_are_read_without_the_default_route() {
        let routes = parse_routes(ROUTES);
        assert_eq!(routes, vec![(Ipv4Addr::new(192, 0, 2, 0), 24), (Ipv4Addr::new(10, 213, 0, 0), 30)]);
        assert!(parse_routes("header\ngarbage line\n\n").is_empty());
    }

    #[test]
    fn slots_skip_routed_and_addressed_subnets() {
        let routes = parse_routes(ROUTES);
        let addresses = [IpAddr::V4(Ipv4Addr::new(10, 213, 0, 5))];
        let slots: Vec<Slot> = free_slots(RANGE, &routes, &addresses).take(2).collect();
        assert_eq!(slots[0], Slot { index: 2, network: Ipv4Addr::new(10, 213, 0, 8) });
        assert_eq!(
            (slots[0].gateway(), slots[0].agent()),
            (Ipv4Addr::new(10, 213, 0, 9), Ipv4Addr::new(10, 213, 0, 10))
        );
        assert_eq!(slots[1].index, 3);
        assert_eq!(free_slots(RANGE, &[], &[]).count(), 16384);
        // A host route over the whole range leaves nothing.
        assert_eq!(free_slots(RANGE, &[(Ipv4Addr::new(10, 0, 0, 0), 8)], &[]).count(), 0);
        assert_eq!(slots[0].host_name(), "agtj2");
    }

    #[test]
    fn the_veth_request_names_both_ends_and_the_kind() {
        let bytes = new_veth("agtj3", "eth0", 7).bytes(1);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("agtj3\0") && text.contains("eth0\0") && text.contains("veth\0"));
        // IFLA_NET_NS_FD (28) = 7 inside the peer's part.
        assert!(bytes.windows(8).any(|w| w == [8, 0, 28, 0, 7, 0, 0, 0]));
        let up = link_up(9, Some(&owner_alias(4242))).bytes(1);
        assert!(String::from_utf8_lossy(&up).contains("agt-jail owner 4242"), "the owner is named for the sweep");
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), libc::RTM_NEWLINK);
        let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
        assert_ne!(flags & NLM_F_EXCL, 0, "the name is the reservation: an existing one must fail");
    }

    #[test]
    fn links_of_dead_owners_are_stale_and_only_those() {
        let root = tempfile::tempdir().unwrap();
        let (net, proc_root) = (root.path().join("net"), root.path().join("proc"));
        for (name, alias) in
            [("agtj0", "agt-jail owner 10\n"), ("agtj1", "agt-jail owner 11\n"), ("agtj1p", ""), ("eth0", "")]
        {
            std::fs::create_dir_all(net.join(name)).unwrap();
            std::fs::write(net.join(name).join("ifalias"), alias).unwrap();
        }
        std::fs::create_dir_all(proc_root.join("11")).unwrap();
        assert_eq!(stale_links(&net, &proc_root), vec![("agtj0".to_string(), 0)]);
        assert_eq!(
            (slot_of("agtj12"), slot_of("agtj12p"), slot_of("agtj"), slot_of("eth0")),
            (Some(12), None, None, None)
        );
        assert_eq!((owner_of("agt-jail owner 7\n"), owner_of("something else")), (Some(7), None));
        assert!(stale_links(&root.path().join("missing"), &proc_root).is_empty());
    }

    #[test]
    fn the_nat_batch_adds_the_table_only_when_missing_and_masquerades_the_range_from_agents() {
        let batch = nft::masquerade(NAT_TABLE, RANGE);
        let header = |m: &Message| {
            let b = m.bytes(0);
            (u16::from_ne_bytes([b[4], b[5]]), u16::from_ne_bytes([b[6], b[7]]))
        };
        let kinds: Vec<u16> = batch.iter().map(|m| header(m).0).collect();
        assert_eq!(kinds, vec![0x10, 0xa00, 0xa03, 0xa06, 0x11], "begin, table, chain, rule, end: nothing deleted");
        assert_ne!(header(&batch[1]).1 & NLM_F_EXCL, 0, "an existing table must fail the whole batch");
        let rule = batch[3].bytes(0);
        let text = String::from_utf8_lossy(&rule);
        for needle in ["meta\0", "agtj", "payload\0", "bitwise\0", "cmp\0", "masq\0", "postrouting\0"] {
            assert!(text.contains(needle), "{needle}");
        }
        // NFTA_META_KEY = NFT_META_IIFNAME (6), big-endian.
        assert!(rule.windows(8).any(|w| w == [8, 0, 2, 0, 0, 0, 0, 6]), "the input interface's name is matched");
        assert!(rule.windows(4).any(|w| w == [10, 213, 0, 0]) && rule.windows(4).any(|w| w == [255, 255, 0, 0]));
        assert_eq!(header(&nft::get_table(NAT_TABLE)).0, 0xa01);
        assert_eq!(nft::delete(NAT_TABLE).len(), 3);
    }

    #[test]
    fn the_agent_side_has_an_address_and_a_default_route() {
        let addr = new_addr(2, Ipv4Addr::new(10, 213, 0, 10), 30).bytes(0);
        assert_eq!(addr[17], 30, "prefix length in ifaddrmsg");
        assert!(addr.windows(4).any(|w| w == [10, 213, 0, 10]));
        let route = default_route(Ipv4Addr::new(10, 213, 0, 9)).bytes(0);
        assert_eq!(route[17], 0, "dst_len 0: the default route");
        assert!(route.windows(4).any(|w| w == [10, 213, 0, 9]));
    }
}
