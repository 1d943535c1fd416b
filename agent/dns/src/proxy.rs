//! The agent's resolver: a UDP DNS proxy that answers only for allowed names.
//!
//! One receiving thread parses each query, refuses what is not allowed and what exceeds
//! the bounds, and queues the rest for a fixed pool of workers; a worker asks the
//! upstream, vets the answer ([`crate::vet`]), writes its addresses through the
//! [`AllowSink`] and only then sends it. Every failure on the way answers SERVFAIL:
//! nothing is opened that the agent was not told, and nothing is told that was not opened.
use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::RecordType,
};

use crate::{
    answer::{check_query, encode_for_udp, reply, vet, TtlPolicy, EDNS_PAYLOAD},
    expiry::{AllowMap, Dest, ExpiringAllows},
    limit::TokenBucket,
    pattern::{normalize, AllowSet},
    AllowSink, SinkError,
};

/// Bounds on what one agent can make the proxy do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A larger datagram is dropped unanswered (a query with EDNS options is ~100 bytes).
    pub max_query_bytes: usize,
    /// Allowed queries waiting for a worker; more answer SERVFAIL.
    pub queued: usize,
    /// Workers, so upstream queries at once.
    pub workers: usize,
    /// Queries per second (every query counts, refused ones too) and the burst above it;
    /// more answer SERVFAIL.
    pub per_second: u32,
    pub burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_query_bytes: 1232, queued: 64, workers: 4, per_second: 100, burst: 200 }
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
    /// overload), or another error code for a malformed query.
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
}

struct Shared<S> {
    config: ProxyConfig,
    socket: UdpSocket,
    sink: Arc<Mutex<S>>,
    observer: Arc<dyn Observer>,
}

struct Job {
    query: Message,
    peer: SocketAddr,
    name: String,
    ports: Vec<u16>,
}

/// How often the receiving thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

impl DnsProxy {
    /// Serves queries arriving on `socket` (already bound, e.g. to the agent's gateway
    /// address) until stopped.
    pub fn start<S: AllowSink + 'static>(
        socket: UdpSocket,
        config: ProxyConfig,
        sink: Arc<Mutex<S>>,
        observer: Arc<dyn Observer>,
    ) -> io::Result<Self> {
        socket.set_read_timeout(Some(POLL))?;
        let local = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (workers, queued) = (config.limits.workers.max(1), config.limits.queued);
        let shared = Arc::new(Shared { config, socket, sink, observer });
        let (tx, rx) = mpsc::sync_channel::<Job>(queued);
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for index in 0..workers {
            let (shared, rx) = (Arc::clone(&shared), Arc::clone(&rx));
            threads.push(thread::Builder::new().name(format!("dns-worker-{index}")).spawn(move || work(&shared, &rx))?);
        }
        let (shared, flag) = (Arc::clone(&shared), Arc::clone(&stop));
        threads.push(thread::Builder::new().name("dns-receive".into()).spawn(move || receive(&shared, &tx, &flag))?);
        Ok(Self { stop, threads, local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops receiving, lets the workers finish what is queued, and joins every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
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

fn receive<S: AllowSink>(shared: &Shared<S>, tx: &SyncSender<Job>, stop: &AtomicBool) {
    let limits = shared.config.limits;
    let mut bucket = TokenBucket::new(limits.per_second, limits.burst, Instant::now());
    let mut buf = vec![0u8; limits.max_query_bytes + 1];
    while !stop.load(Ordering::SeqCst) {
        let (len, peer) = match shared.socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            // An ICMP error of an earlier send surfaces here; the socket is still usable.
            Err(_) => continue,
        };
        let rate_ok = bucket.take(Instant::now());
        if len > limits.max_query_bytes {
            let reason = format!("query larger than {} bytes, dropped", limits.max_query_bytes);
            shared.observe(String::new(), String::new(), failed(ResponseCode::FormErr, reason));
            continue;
        }
        if let Some(job) = admit(shared, &buf[..len], peer, rate_ok) {
            if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = tx.try_send(job) {
                shared.answer(&job.query, job.peer, ResponseCode::ServFail);
                let qtype = qtype_of(&job.query);
                shared.observe(job.name, qtype, failed(ResponseCode::ServFail, "too many queries in flight".into()));
            }
        }
    }
}

/// Decides what needs no upstream; returns the job for a worker otherwise.
fn admit<S: AllowSink>(shared: &Shared<S>, bytes: &[u8], peer: SocketAddr, rate_ok: bool) -> Option<Job> {
    let query = match Message::from_vec(bytes) {
        Ok(query) => query,
        Err(err) => {
            if let [high, low, ..] = *bytes {
                let mut formerr =
                    Message::error_msg(u16::from_be_bytes([high, low]), OpCode::Query, ResponseCode::FormErr);
                formerr.metadata.message_type = MessageType::Response;
                shared.send(&formerr, peer);
            }
            shared.observe(
                String::new(),
                String::new(),
                failed(ResponseCode::FormErr, format!("malformed query: {err}")),
            );
            return None;
        }
    };
    let (name, qtype) = match query.queries.first() {
        Some(q) => (normalize(&q.name().to_ascii()), q.query_type()),
        None => (String::new(), RecordType::Unknown(0)),
    };
    let finish = |code: ResponseCode, outcome: Outcome| {
        shared.answer(&query, peer, code);
        shared.observe(name.clone(), qtype.to_string(), outcome);
        None
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
        _ => Some(Job { query, peer, name, ports }),
    }
}

fn work<S: AllowSink>(shared: &Shared<S>, rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting; a poisoned lock (a worker panicked while
        // waiting, which recv does not do) ends the worker.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let qtype = qtype_of(&job.query);
        let outcome = match resolve(shared, &job) {
            Ok(outcome) => outcome,
            Err(reason) => {
                shared.answer(&job.query, job.peer, ResponseCode::ServFail);
                failed(ResponseCode::ServFail, reason)
            }
        };
        shared.observe(job.name, qtype, outcome);
    }
}

/// Upstream, vet, open, answer. An error means nothing was sent yet (the caller sends
/// SERVFAIL); addresses written before a later write failed stay until they expire,
/// unseen by the agent.
fn resolve<S: AllowSink>(shared: &Shared<S>, job: &Job) -> Result<Outcome, String> {
    let config = &shared.config;
    let upstream = exchange(config.upstream, &job.query, config.timeout)?;
    let vetted = vet(&job.query, &upstream, &config.ttl).map_err(|err| err.to_string())?;
    let (bytes, whole) = encode_for_udp(&job.query, &vetted.response).ok_or("cannot encode the answer")?;
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
    shared.socket.send_to(&bytes, job.peer).map_err(|err| format!("cannot answer {}: {err}", job.peer))?;
    Ok(Outcome::Answered {
        rcode: vetted.response.metadata.response_code.to_string(),
        addrs: addrs.into_iter().map(|(addr, _)| addr).collect(),
        ports: job.ports.clone(),
        dropped: vetted.dropped,
    })
}

/// Asks `upstream` the question of `query` with a fresh random id over UDP (over TCP
/// when the UDP answer is truncated), within `timeout` in all.
fn exchange(upstream: SocketAddr, query: &Message, timeout: Duration) -> Result<Message, String> {
    let deadline = Instant::now() + timeout;
    let id = Message::query().metadata.id;
    let mut ask = Message::new(id, MessageType::Query, OpCode::Query);
    ask.metadata.recursion_desired = true;
    ask.queries = query.queries.clone();
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    ask.set_edns(edns);
    let bytes = ask.to_vec().map_err(|err| format!("cannot encode the upstream query: {err}"))?;
    let answer = exchange_udp(upstream, &bytes, id, deadline)?;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    exchange_tcp(upstream, &bytes, id, deadline)
}

fn remaining(upstream: SocketAddr, deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(format!("no answer from {upstream} in time"));
    }
    Ok(left)
}

fn exchange_udp(upstream: SocketAddr, bytes: &[u8], id: u16, deadline: Instant) -> Result<Message, String> {
    let io_err = |err: io::Error| format!("upstream {upstream}: {err}");
    let local: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local).map_err(io_err)?;
    socket.connect(upstream).map_err(io_err)?;
    socket.send(bytes).map_err(io_err)?;
    let mut buf = vec![0u8; 65_535];
    loop {
        socket.set_read_timeout(Some(remaining(upstream, deadline)?)).map_err(io_err)?;
        let len = match socket.recv(&mut buf) {
            Ok(len) => len,
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(err) => return Err(io_err(err)),
        };
        // Anything else on this connected socket (a late answer, garbage) is skipped.
        if let Ok(answer) = Message::from_vec(&buf[..len]) {
            if answer.metadata.id == id && answer.metadata.message_type == MessageType::Response {
                return Ok(answer);
            }
        }
    }
}

fn exchange_tcp(upstream: SocketAddr, bytes: &[u8], id: u16, deadline: Instant) -> Result<Message, String> {
    use std::io::{Read, Write};
    let io_err = |err: io::Error| format!("upstream {upstream} (tcp): {err}");
    let mut stream = TcpStream::connect_timeout(&upstream, remaining(upstream, deadline)?).map_err(io_err)?;
    let len = u16::try_from(bytes.len()).map_err(|_| "upstream query too long".to_string())?;
    stream.set_write_timeout(Some(remaining(upstream, deadline)?)).map_err(io_err)?;
    stream.write_all(&[&len.to_be_bytes()[..], bytes].concat()).map_err(io_err)?;
    let mut read = |buf: &mut [u8]| -> Result<(), String> {
        stream.set_read_timeout(Some(remaining(upstream, deadline)?)).map_err(io_err)?;
        stream.read_exact(buf).map_err(io_err)
    };
    let mut head = [0u8; 2];
    read(&mut head)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(head))];
    read(&mut body)?;
    let answer = Message::from_vec(&body).map_err(|err| format!("upstream {upstream} (tcp): bad answer: {err}"))?;
    if answer.metadata.id != id {
        return Err(format!("upstream {upstream} (tcp): answer to another query"));
    }
    Ok(answer)
}

impl<S> Shared<S> {
    fn answer(&self, query: &Message, peer: SocketAddr, code: ResponseCode) {
        self.send(&reply(query, code), peer);
    }

    fn send(&self, message: &Message, peer: SocketAddr) {
        // A reply that cannot be sent leaves the agent to time out: never an allow.
        if let Ok(bytes) = message.to_vec() {
            let _ = self.socket.send_to(&bytes, peer);
        }
    }

    fn observe(&self, name: String, qtype: String, outcome: Outcome) {
        self.observer.observe(Observation { agent: self.config.agent.clone(), name, qtype, outcome });
    }
}

fn qtype_of(query: &Message) -> String {
    query.queries.first().map(|q| q.query_type().to_string()).unwrap_or_default()
}

fn failed(code: ResponseCode, reason: String) -> Outcome {
    Outcome::Failed { rcode: code.to_string(), reason }
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
            thread::sleep(POLL.min(period));
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
