//! The agent's resolver: a DNS proxy that answers only for allowed names.
//!
//! Over UDP, one receiving thread parses each query, refuses what is not allowed and
//! what exceeds the bounds, and queues the rest for a fixed pool of workers; over TCP
//! (where an agent retries an answer that was too long for UDP) each connection is a
//! thread of its own, at most [`Limits::tcp_connections`]. Either way the upstream is
//! asked, the answer vetted ([`crate::vet`]), its addresses written through the
//! [`AllowSink`], and only then is it sent. Every failure on the way answers SERVFAIL:
//! nothing is opened that the agent was not told, and nothing is told that was not opened.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::RecordType,
};

use crate::{
    answer::{check_query, encode_for_udp, reply, vet, TtlPolicy},
    limit::TokenBucket,
    pattern::{normalize, AllowSet},
    upstream::exchange,
    AllowSink, SinkError,
};

/// Bounds on what one agent can make the proxy do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A larger query is dropped unanswered (a query with EDNS options is ~100 bytes).
    pub max_query_bytes: usize,
    /// Allowed UDP queries waiting for a worker; more answer SERVFAIL.
    pub queued: usize,
    /// UDP workers, so upstream queries at once over UDP.
    pub workers: usize,
    /// TCP connections at once (each asks one query at a time); more are closed.
    pub tcp_connections: usize,
    /// Queries per second over both transports (refused ones count too) and the burst
    /// above it; more answer SERVFAIL.
    pub per_second: u32,
    pub burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_query_bytes: 1232, queued: 64, workers: 4, tcp_connections: 8, per_second: 100, burst: 200 }
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Where allowed queries are resolved (see [`crate::first_nameserver`]).
    pub upstream: SocketAddr,
    pub allow: AllowSet,
    /// The agent this proxy serves (carried into every observation).
    pub agent: String,
    /// How long an upstream may take to answer.
    pub timeout: Duration,
    pub ttl: TtlPolicy,
    pub limits: Limits,
}

impl ProxyConfig {
    pub fn new(upstream: SocketAddr, allow: AllowSet, agent: impl Into<String>) -> Self {
        Self {
            upstream,
            allow,
            agent: agent.into(),
            timeout: Duration::from_secs(2),
            ttl: TtlPolicy::default(),
            limits: Limits::default(),
        }
    }
}

/// What became of one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The name is not allowed: REFUSED.
    Refused,
    /// Answered from upstream; `addrs` were opened for `ports` before the answer left.
    /// `dropped` are addresses left out (not destinations); `rcode` is the upstream's.
    Answered { rcode: String, addrs: Vec<IpAddr>, ports: Vec<u16>, dropped: Vec<IpAddr> },
    /// Answered with no records and without asking upstream (HTTPS/SVCB queries, whose
    /// address hints would bypass the allow map; clients fall back to A/AAAA).
    Empty,
    /// SERVFAIL (upstream timeout or error, a bad upstream answer, a sink failure,
    /// overload), or another error code for a malformed query (`rcode` empty when the
    /// query was dropped unanswered).
    Failed { rcode: String, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub agent: String,
    /// Normalised query name (empty when the query could not be parsed).
    pub name: String,
    pub qtype: String,
    pub outcome: Outcome,
}

/// Where observations go (records); called on the proxy's threads, so it should be quick.
pub trait Observer: Send + Sync {
    fn observe(&self, observation: Observation);
}

/// A running proxy; stopped (threads joined) by [`DnsProxy::stop`] or on drop.
pub struct DnsProxy {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    local: SocketAddr,
    tcp: Option<SocketAddr>,
}

pub(crate) struct Shared<S> {
    pub(crate) config: ProxyConfig,
    socket: UdpSocket,
    sink: Arc<Mutex<S>>,
    observer: Arc<dyn Observer>,
    bucket: Mutex<TokenBucket>,
}

/// An allowed query that needs the upstream.
pub(crate) struct Job {
    pub(crate) query: Message,
    name: String,
    ports: Vec<u16>,
}

/// What [`admit`] made of a query.
pub(crate) enum Admitted {
    /// Too broken to answer (no id); already observed.
    Drop,
    /// Answered without the upstream; already observed.
    Reply(Message),
    Job(Job),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// How often the receiving threads look at the stop flag.
pub(crate) const POLL: Duration = Duration::from_millis(50);

impl DnsProxy {
    /// Serves queries arriving on `udp` and, when given, connections on `tcp` (both
    /// already bound, e.g. to the agent's gateway address) until stopped.
    pub fn start<S: AllowSink + 'static>(
        udp: UdpSocket,
        tcp: Option<TcpListener>,
        config: ProxyConfig,
        sink: Arc<Mutex<S>>,
        observer: Arc<dyn Observer>,
    ) -> io::Result<Self> {
        udp.set_read_timeout(Some(POLL))?;
        let local = udp.local_addr()?;
        let tcp_addr = tcp.as_ref().map(TcpListener::local_addr).transpose()?;
        let stop = Arc::new(AtomicBool::new(false));
        let limits = config.limits;
        let bucket = Mutex::new(TokenBucket::new(limits.per_second, limits.burst, Instant::now()));
        let shared = Arc::new(Shared { config, socket: udp, sink, observer, bucket });
        let mut proxy = Self { stop, threads: Vec::new(), local, tcp: tcp_addr };
        // Declared after `proxy`, so dropped before it when a spawn fails: the workers'
        // queue then closes and dropping `proxy` can join them.
        let (tx, rx) = mpsc::sync_channel::<(Job, SocketAddr)>(limits.queued);
        let rx = Arc::new(Mutex::new(rx));
        for index in 0..limits.workers.max(1) {
            let (shared, rx) = (Arc::clone(&shared), Arc::clone(&rx));
            proxy.spawn(format!("dns-worker-{index}"), move || work(&shared, &rx))?;
        }
        if let Some(listener) = tcp {
            let (shared, flag) = (Arc::clone(&shared), Arc::clone(&proxy.stop));
            proxy.spawn("dns-tcp".into(), move || crate::tcp::serve(&shared, &listener, &flag))?;
        }
        let flag = Arc::clone(&proxy.stop);
        proxy.spawn("dns-receive".into(), move || receive(&shared, &tx, &flag))?;
        Ok(proxy)
    }

    /// A thread that a failed start still stops and joins (through drop).
    fn spawn(&mut self, name: String, body: impl FnOnce() + Send + 'static) -> io::Result<()> {
        self.threads.push(thread::Builder::new().name(name).spawn(body)?);
        Ok(())
    }

    /// The UDP address served.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The TCP address served, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Stops receiving, lets the workers finish what is queued, and joins every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Stopped already (`stop` and then the drop): nothing left to wake or join.
        if self.threads.is_empty() {
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        // Wake the receiving thread now rather than at its next timeout (an agent's run
        // ends waiting for this): an empty datagram, which it drops once it sees the flag.
        let target = crate::tcp::reachable(self.local);
        let unspecified: SocketAddr =
            if target.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
        if let Ok(socket) = UdpSocket::bind(unspecified) {
            let _ = socket.send_to(&[], target);
        }
        if let Some(addr) = self.tcp {
            crate::tcp::wake(addr);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for DnsProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn receive<S: AllowSink>(shared: &Shared<S>, tx: &SyncSender<(Job, SocketAddr)>, stop: &AtomicBool) {
    let max = shared.config.limits.max_query_bytes;
    let mut buf = vec![0u8; max + 1];
    while !stop.load(Ordering::SeqCst) {
        let (len, peer) = match shared.socket.recv_from(&mut buf) {
            Ok(got) => got,
            // Timeouts let the stop flag be read; an ICMP error of an earlier send also
            // surfaces here and leaves the socket usable.
            Err(_) => continue,
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if len > max {
            shared.observe(String::new(), String::new(), dropped_oversized(max));
            continue;
        }
        match admit(shared, &buf[..len]) {
            Admitted::Drop => {}
            Admitted::Reply(message) => shared.send(&message, peer),
            Admitted::Job(job) => {
                if let Err(TrySendError::Full((job, peer)) | TrySendError::Disconnected((job, peer))) =
                    tx.try_send((job, peer))
                {
                    shared.send(&reply(&job.query, ResponseCode::ServFail), peer);
                    let reason = "too many queries in flight".to_string();
                    shared.observe(job.name, qtype_of(&job.query), failed(ResponseCode::ServFail, reason));
                }
            }
        }
    }
}

pub(crate) fn dropped_oversized(max: usize) -> Outcome {
    Outcome::Failed { rcode: String::new(), reason: format!("query larger than {max} bytes, dropped") }
}

/// Decides everything that needs no upstream (malformed, over the rate, not allowed,
/// ANY, HTTPS/SVCB) and observes it; returns the job for the upstream otherwise.
pub(crate) fn admit<S>(shared: &Shared<S>, bytes: &[u8]) -> Admitted {
    let rate_ok = shared.bucket.lock().is_ok_and(|mut bucket| bucket.take(Instant::now()));
    let query = match Message::from_vec(bytes) {
        Ok(query) => query,
        Err(err) => {
            let reason = format!("malformed query: {err}");
            let Some(id) = bytes.get(..2).map(|id| u16::from_be_bytes([id[0], id[1]])) else {
                shared.observe(String::new(), String::new(), Outcome::Failed { rcode: String::new(), reason });
                return Admitted::Drop;
            };
            shared.observe(String::new(), String::new(), failed(ResponseCode::FormErr, reason));
            let mut formerr = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            formerr.metadata.message_type = MessageType::Response;
            return Admitted::Reply(formerr);
        }
    };
    let (name, qtype) = match query.queries.first() {
        Some(q) => (normalize(&q.name().to_ascii()), q.query_type()),
        None => (String::new(), RecordType::Unknown(0)),
    };
    let finish = |code: ResponseCode, outcome: Outcome| {
        shared.observe(name.clone(), qtype.to_string(), outcome);
        Admitted::Reply(reply(&query, code))
    };
    if let Err(code) = check_query(&query) {
        return finish(code, failed(code, "not a standard query with one question".into()));
    }
    if !rate_ok {
        return finish(ResponseCode::ServFail, failed(ResponseCode::ServFail, "query rate exceeded".into()));
    }
    let ports = shared.config.allow.ports_for(&name);
    if ports.is_empty() {
        return finish(ResponseCode::Refused, Outcome::Refused);
    }
    match qtype {
        RecordType::ANY => {
            finish(ResponseCode::NotImp, failed(ResponseCode::NotImp, "ANY queries are not answered".into()))
        }
        RecordType::HTTPS | RecordType::SVCB => finish(ResponseCode::NoError, Outcome::Empty),
        _ => Admitted::Job(Job { query, name, ports }),
    }
}

fn work<S: AllowSink>(shared: &Shared<S>, rx: &Mutex<Receiver<(Job, SocketAddr)>>) {
    loop {
        // The lock is held only while waiting; a poisoned lock (a worker panicked while
        // waiting, which recv does not do) ends the worker.
        let next = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        // Disconnected: the receiving thread ended and the queue is empty.
        let Ok((job, peer)) = next else { return };
        let bytes = answer(shared, job, Transport::Udp);
        if let Err(err) = shared.socket.send_to(&bytes, peer) {
            let reason = format!("cannot answer {peer}: {err}");
            shared.observe(String::new(), String::new(), Outcome::Failed { rcode: String::new(), reason });
        }
    }
}

/// The bytes that answer `job` (SERVFAIL on any failure), after every address in them
/// was written through the sink; observes the outcome.
pub(crate) fn answer<S: AllowSink>(shared: &Shared<S>, job: Job, transport: Transport) -> Vec<u8> {
    let qtype = qtype_of(&job.query);
    let (bytes, outcome) = match resolve(shared, &job, transport) {
        Ok(done) => done,
        Err(reason) => {
            let servfail = reply(&job.query, ResponseCode::ServFail).to_vec().unwrap_or_default();
            (servfail, failed(ResponseCode::ServFail, reason))
        }
    };
    shared.observe(job.name, qtype, outcome);
    bytes
}

/// Upstream, vet, open. An error means nothing may be sent but SERVFAIL; addresses
/// written before a later write failed stay until they expire, unseen by the agent.
fn resolve<S: AllowSink>(shared: &Shared<S>, job: &Job, transport: Transport) -> Result<(Vec<u8>, Outcome), String> {
    let config = &shared.config;
    let upstream = exchange(config.upstream, &job.query, config.timeout)?;
    let vetted = vet(&job.query, &upstream, &config.ttl).map_err(|err| err.to_string())?;
    let (bytes, whole) = match transport {
        Transport::Udp => encode_for_udp(&job.query, &vetted.response).ok_or("cannot encode the answer")?,
        Transport::Tcp => {
            let bytes = vetted.response.to_vec().map_err(|err| format!("cannot encode the answer: {err}"))?;
            if bytes.len() > usize::from(u16::MAX) {
                return Err("the answer is longer than a DNS message can be".into());
            }
            (bytes, true)
        }
    };
    let addrs: Vec<(IpAddr, u32)> = if whole { vetted.addrs } else { Vec::new() };
    if !addrs.is_empty() {
        let mut sink = shared.sink.lock().map_err(|_| "the allow sink failed earlier (poisoned lock)".to_string())?;
        let now = Instant::now();
        for (addr, ttl) in &addrs {
            let expires = now + config.ttl.open_for(*ttl);
            for port in &job.ports {
                sink.allow(*addr, *port, expires, &job.name).map_err(|SinkError(reason)| reason)?;
            }
        }
    }
    let outcome = Outcome::Answered {
        rcode: vetted.response.metadata.response_code.to_string(),
        addrs: addrs.into_iter().map(|(addr, _)| addr).collect(),
        ports: job.ports.clone(),
        dropped: vetted.dropped,
    };
    Ok((bytes, outcome))
}

impl<S> Shared<S> {
    fn send(&self, message: &Message, peer: SocketAddr) {
        // A reply that cannot be sent leaves the agent to time out: never an allow.
        if let Ok(bytes) = message.to_vec() {
            let _ = self.socket.send_to(&bytes, peer);
        }
    }

    pub(crate) fn observe(&self, name: String, qtype: String, outcome: Outcome) {
        self.observer.observe(Observation { agent: self.config.agent.clone(), name, qtype, outcome });
    }
}

fn qtype_of(query: &Message) -> String {
    query.queries.first().map(|q| q.query_type().to_string()).unwrap_or_default()
}

fn failed(code: ResponseCode, reason: String) -> Outcome {
    Outcome::Failed { rcode: code.to_string(), reason }
}
