//! Allowed destinations and when they lapse.
//!
//! One address can be allowed under several names (two names behind one CDN address):
//! the destination stays open until the last of them expires. The clock is passed in.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt, io,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{AllowSink, SinkError};

/// An allowed destination. Addresses are kept canonical (an IPv4-mapped IPv6 address is
/// its IPv4 address), as the kernel map covers both forms with one entry.
pub type Dest = (IpAddr, u16);

/// (address, port) → (name → expiry).
#[derive(Debug, Default)]
pub struct ExpiryTable {
    entries: HashMap<Dest, BTreeMap<String, Instant>>,
}

impl ExpiryTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `name` allows `dest` until `expires` (a later expiry of the same name
    /// extends it, an earlier one does not shorten it). True when `dest` was not allowed
    /// before.
    pub fn insert(&mut self, dest: Dest, name: &str, expires: Instant) -> bool {
        let dest = canonical(dest);
        let new = !self.entries.contains_key(&dest);
        let names = self.entries.entry(dest).or_default();
        let at = names.entry(name.to_string()).or_insert(expires);
        *at = (*at).max(expires);
        new
    }

    /// Forgets every name whose expiry is at or before `now` and returns the destinations
    /// no name allows any more, in a stable order.
    pub fn due(&mut self, now: Instant) -> Vec<Dest> {
        let mut gone = Vec::new();
        self.entries.retain(|dest, names| {
            names.retain(|_, at| *at > now);
            if names.is_empty() {
                gone.push(*dest);
            }
            !names.is_empty()
        });
        gone.sort();
        gone
    }

    /// The names that currently allow `addr` (any port), sorted.
    pub fn names_of(&self, addr: IpAddr) -> Vec<String> {
        let addr = addr.to_canonical();
        let mut names: Vec<String> =
            self.entries.iter().filter(|((a, _), _)| *a == addr).flat_map(|(_, names)| names.keys().cloned()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The addresses `name` currently allows (any port), sorted: what a policy's
    /// `net.domain` classes are fed from.
    pub fn addrs_of(&self, name: &str) -> Vec<IpAddr> {
        let mut addrs: Vec<IpAddr> =
            self.entries.iter().filter(|(_, names)| names.contains_key(name)).map(|((addr, _), _)| *addr).collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// When the next name lapses.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries.values().flat_map(|names| names.values().copied()).min()
    }

    pub fn contains(&self, dest: Dest) -> bool {
        self.entries.contains_key(&canonical(dest))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn canonical((addr, port): Dest) -> Dest {
    (addr.to_canonical(), port)
}

/// The kernel's allow map of one agent, as the expiry needs it: one host entry per
/// destination. Both calls must be idempotent.
pub trait AllowMap {
    type Error: fmt::Display;
    fn insert(&mut self, dest: Dest) -> Result<(), Self::Error>;
    fn remove(&mut self, dest: Dest) -> Result<(), Self::Error>;
}

/// An [`AllowSink`] over an [`AllowMap`]: writes a destination the first time a name
/// allows it and removes it when the last name lapses. Destinations `pinned` (the
/// profile's own host entries) are never written nor removed, so a name expiring cannot
/// take away an address the operator listed.
pub struct ExpiringAllows<M> {
    map: M,
    table: ExpiryTable,
    pinned: HashSet<Dest>,
    /// Lapsed destinations the map refused to remove: retried at the next expiry.
    failed: Vec<Dest>,
}

impl<M: AllowMap> ExpiringAllows<M> {
    pub fn new(map: M, pinned: impl IntoIterator<Item = Dest>) -> Self {
        Self { map, table: ExpiryTable::new(), pinned: pinned.into_iter().map(canonical).collect(), failed: Vec::new() }
    }

    /// Removes what lapsed by `now` from the map and returns the destinations removed. A
    /// removal the map refuses is retried at the next call (unless a name allowed the
    /// destination again meanwhile); the first error is returned after every other
    /// removal was tried.
    pub fn expire(&mut self, now: Instant) -> Result<Vec<Dest>, SinkError> {
        let mut lapsed = std::mem::take(&mut self.failed);
        lapsed.retain(|dest| !self.table.contains(*dest));
        lapsed.extend(self.table.due(now));
        let mut removed = Vec::new();
        let mut first_error = None;
        for dest in lapsed {
            if self.pinned.contains(&dest) {
                continue;
            }
            match self.map.remove(dest) {
                Ok(()) => removed.push(dest),
                Err(err) => {
                    first_error.get_or_insert_with(|| SinkError(format!("cannot remove {}:{}: {err}", dest.0, dest.1)));
                    self.failed.push(dest);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(removed),
        }
    }

    /// The names that currently allow `addr`: what a connect record to `addr` came from.
    pub fn names_of(&self, addr: IpAddr) -> Vec<String> {
        self.table.names_of(addr)
    }

    /// The addresses `name` currently allows.
    pub fn addrs_of(&self, name: &str) -> Vec<IpAddr> {
        self.table.addrs_of(name)
    }

    /// When [`ExpiringAllows::expire`] next has something to do.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.table.next_expiry()
    }

    pub fn map(&self) -> &M {
        &self.map
    }
}

impl<M: AllowMap + Send> AllowSink for ExpiringAllows<M> {
    fn allow(&mut self, addr: IpAddr, port: u16, expires: Instant, name: &str) -> Result<(), SinkError> {
        let dest = canonical((addr, port));
        // The kernel entry first: a name is recorded only for a destination that is open.
        if !self.table.contains(dest) && !self.pinned.contains(&dest) {
            self.map.insert(dest).map_err(|err| SinkError(format!("cannot allow {addr}:{port} ({name}): {err}")))?;
        }
        self.table.insert(dest, name, expires);
        Ok(())
    }
}

/// Calls [`ExpiringAllows::expire`] every `period` until `stop` is set, handing each
/// result (destinations removed, or the error) to `report`.
pub fn spawn_expiry<M: AllowMap + Send + 'static>(
    allows: Arc<Mutex<ExpiringAllows<M>>>,
    period: Duration,
    stop: Arc<AtomicBool>,
    mut report: impl FnMut(Result<Vec<Dest>, SinkError>) + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name("dns-expiry".into()).spawn(move || {
        let mut next = Instant::now() + period;
        while !stop.load(Ordering::SeqCst) {
            // Parked rather than asleep, so that whoever sets `stop` can unpark it at once.
            thread::park_timeout(Duration::from_millis(50).min(period));
            let now = Instant::now();
            if now < next {
                continue;
            }
            next = now + period;
            let result = match allows.lock() {
                Ok(mut allows) => allows.expire(now),
                Err(_) => Err(SinkError("the allow map's lock is poisoned".into())),
            };
            if !matches!(&result, Ok(removed) if removed.is_empty()) {
                report(result);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(base: Instant, secs: u64) -> Instant {
        base + Duration::from_secs(secs)
    }

    fn dest(text: &str, port: u16) -> Dest {
        (text.parse().unwrap(), port)
    }

    #[test]
    fn the_addresses_of_a_name_are_those_it_still_allows() {
        let t = Instant::now();
        let mut table = ExpiryTable::new();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        table.insert(dest("192.0.2.1", 443), "a.example.com", at(t, 10));
        table.insert(dest("192.0.2.1", 80), "a.example.com", at(t, 10));
        table.insert(dest("192.0.2.9", 443), "b.example.com", at(t, 30));
        table.insert(dest("192.0.2.1", 443), "b.example.com", at(t, 30));
        assert_eq!(table.addrs_of("a.example.com"), vec![ip("192.0.2.1")], "one address, whatever its ports");
        assert_eq!(table.addrs_of("b.example.com"), vec![ip("192.0.2.1"), ip("192.0.2.9")]);
        assert!(table.addrs_of("c.example.com").is_empty());
        table.due(at(t, 10));
        assert!(table.addrs_of("a.example.com").is_empty(), "lapsed");
        assert_eq!(table.addrs_of("b.example.com").len(), 2);
    }

    #[test]
    fn a_destination_lapses_with_its_last_name() {
        let t = Instant::now();
        let mut table = ExpiryTable::new();
        assert!(table.insert(dest("192.0.2.1", 443), "a.example.com", at(t, 10)));
        assert!(!table.insert(dest("192.0.2.1", 443), "b.example.com", at(t, 30)));
        assert!(table.insert(dest("192.0.2.1", 80), "a.example.com", at(t, 10)));
        assert_eq!(table.names_of("192.0.2.1".parse().unwrap()), vec!["a.example.com", "b.example.com"]);
        assert_eq!(table.next_expiry(), Some(at(t, 10)));
        assert!(table.due(at(t, 9)).is_empty());
        assert_eq!(table.due(at(t, 10)), vec![dest("192.0.2.1", 80)], "expiry at exactly now is past");
        assert_eq!(table.names_of("192.0.2.1".parse().unwrap()), vec!["b.example.com"]);
        assert!(table.due(at(t, 29)).is_empty());
        assert_eq!(table.due(at(t, 31)), vec![dest("192.0.2.1", 443)]);
        assert!(table.is_empty());
        assert_eq!(table.next_expiry(), None);
    }

    #[test]
    fn a_later_answer_extends_and_an_earlier_one_does_not_shorten() {
        let t = Instant::now();
        let mut table = ExpiryTable::new();
        table.insert(dest("2001:db8::1", 443), "a.example.com", at(t, 20));
        table.insert(dest("2001:db8::1", 443), "a.example.com", at(t, 5));
        assert!(table.due(at(t, 10)).is_empty());
        table.insert(dest("2001:db8::1", 443), "a.example.com", at(t, 40));
        assert!(table.due(at(t, 30)).is_empty());
        assert_eq!(table.due(at(t, 40)).len(), 1);
    }

    #[test]
    fn mapped_ipv4_is_the_same_destination() {
        let t = Instant::now();
        let mut table = ExpiryTable::new();
        table.insert(dest("192.0.2.7", 443), "a", at(t, 5));
        assert!(!table.insert(dest("::ffff:192.0.2.7", 443), "b", at(t, 5)));
        assert_eq!(table.names_of("::ffff:192.0.2.7".parse().unwrap()), vec!["a", "b"]);
    }

    #[derive(Default)]
    struct FakeMap {
        entries: HashSet<Dest>,
        log: Vec<String>,
        fail_insert: bool,
        fail_remove: bool,
    }

    impl AllowMap for FakeMap {
        type Error = String;
        fn insert(&mut self, dest: Dest) -> Result<(), String> {
            if self.fail_insert {
                return Err("map full".into());
            }
            self.log.push(format!("+{}:{}", dest.0, dest.1));
            self.entries.insert(dest);
            Ok(())
        }
        fn remove(&mut self, dest: Dest) -> Result<(), String> {
            if self.fail_remove {
                return Err("busy".into());
            }
            self.log.push(format!("-{}:{}", dest.0, dest.1));
            self.entries.remove(&dest);
            Ok(())
        }
    }

    #[test]
    fn the_map_is_written_once_and_cleared_when_the_last_name_lapses() {
        let t = Instant::now();
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let mut allows = ExpiringAllows::new(FakeMap::default(), []);
        allows.allow(addr, 443, at(t, 10), "a.example.com").unwrap();
        allows.allow(addr, 443, at(t, 20), "b.example.com").unwrap();
        assert_eq!(allows.map().log, vec!["+192.0.2.1:443"]);
        assert!(allows.expire(at(t, 15)).unwrap().is_empty());
        assert_eq!(allows.names_of(addr), vec!["b.example.com"]);
        assert_eq!(allows.expire(at(t, 20)).unwrap(), vec![(addr, 443)]);
        assert_eq!(allows.map().log, vec!["+192.0.2.1:443", "-192.0.2.1:443"]);
        assert!(allows.map().entries.is_empty());
        assert!(allows.names_of(addr).is_empty());
    }

    #[test]
    fn pinned_destinations_are_never_written_nor_removed() {
        let t = Instant::now();
        let mut allows = ExpiringAllows::new(FakeMap::default(), [dest("::ffff:192.0.2.9", 443)]);
        allows.allow("192.0.2.9".parse().unwrap(), 443, at(t, 1), "pinned.example.com").unwrap();
        assert_eq!(allows.names_of("192.0.2.9".parse().unwrap()), vec!["pinned.example.com"]);
        assert!(allows.expire(at(t, 2)).unwrap().is_empty());
        assert!(allows.map().log.is_empty());
    }

    #[test]
    fn a_refused_write_records_nothing_and_a_refused_removal_is_retried() {
        let t = Instant::now();
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let mut allows = ExpiringAllows::new(FakeMap { fail_insert: true, ..FakeMap::default() }, []);
        let err = allows.allow(addr, 443, at(t, 10), "a.example.com").unwrap_err();
        assert!(err.to_string().contains("map full"), "{err}");
        assert!(allows.names_of(addr).is_empty());
        allows.map.fail_insert = false;
        allows.allow(addr, 443, at(t, 10), "a.example.com").unwrap();
        allows.map.fail_remove = true;
        assert!(allows.expire(at(t, 10)).unwrap_err().to_string().contains("busy"));
        assert!(allows.names_of(addr).is_empty());
        allows.map.fail_remove = false;
        assert_eq!(allows.expire(at(t, 11)).unwrap(), vec![(addr, 443)]);
        assert!(allows.map().entries.is_empty());
    }

    #[test]
    fn a_destination_allowed_again_before_a_retried_removal_stays() {
        let t = Instant::now();
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let mut allows = ExpiringAllows::new(FakeMap::default(), []);
        allows.allow(addr, 443, at(t, 10), "a").unwrap();
        allows.map.fail_remove = true;
        assert!(allows.expire(at(t, 10)).is_err());
        allows.map.fail_remove = false;
        allows.allow(addr, 443, at(t, 50), "a").unwrap();
        assert!(allows.expire(at(t, 11)).unwrap().is_empty());
        assert!(allows.map().entries.contains(&(addr, 443)));
    }

    #[test]
    fn the_timer_removes_what_lapsed_and_reports_it() {
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let allows = Arc::new(Mutex::new(ExpiringAllows::new(FakeMap::default(), [])));
        allows.lock().unwrap().allow(addr, 443, Instant::now(), "a").unwrap();
        allows.lock().unwrap().allow(addr, 80, Instant::now() + Duration::from_secs(600), "a").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let timer = spawn_expiry(Arc::clone(&allows), Duration::from_millis(10), Arc::clone(&stop), move |result| {
            tx.send(result).unwrap();
        })
        .unwrap();
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(first, Ok(vec![(addr, 443)]));
        stop.store(true, Ordering::SeqCst);
        timer.join().unwrap();
        assert!(rx.try_recv().is_err(), "nothing else lapsed, nothing else reported");
        assert_eq!(allows.lock().unwrap().map().entries.iter().collect::<Vec<_>>(), vec![&(addr, 80)]);
    }
}
