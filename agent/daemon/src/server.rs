//! The daemon: one tokio runtime serving the control socket, one watcher per agent's
//! supervisor. Log lines go to stderr, one per event, no colour (journald stores them).
use std::{
    collections::BTreeMap,
    ffi::OsString,
    io,
    net::SocketAddr,
    os::{
        fd::{AsFd, OwnedFd},
        unix::{ffi::OsStringExt, fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use agt_jail_supervisor::control;
use prost::Message;
use tokio::{
    io::{unix::AsyncFd, AsyncWriteExt, Interest},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    auth,
    metrics::{self, AgentSample, DaemonCounts, MetricsError},
    proto::{self, request::Op, response::Body, AgentInfo, Response},
    record::{self, Record},
    sys::{self, Ended},
    wire,
};

/// What the launch options say, read by the command-line code (which owns their parser).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Describe {
    /// `--agent NAME`, if given.
    pub agent: Option<String>,
    pub ring: u32,
    pub policy: bool,
    /// `--events FILE` (as given; `-` is stdout and is not followed).
    pub events: Option<PathBuf>,
    pub command: Vec<OsString>,
}

/// Reads `agt-jail exec`'s arguments (after `exec`); an error is the line shown to the client.
pub type DescribeFn = fn(&[OsString]) -> Result<Describe, String>;

pub struct Config {
    /// The socket and `agents/` with the records (`/run/agt-jail`).
    pub run_dir: PathBuf,
    /// Where the supervisors' control sockets are (`/run/agt-jail/agents`).
    pub control_dir: PathBuf,
    pub proc_root: PathBuf,
    /// `/etc/group`: where the agt-jail group's gid is read.
    pub group_file: PathBuf,
    /// The executable started as `SUPERVISOR exec --standalone ARGS`.
    pub supervisor: PathBuf,
    pub describe: DescribeFn,
    /// `--metrics-listen`: where `GET /metrics` is served (loopback only); none by default.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("another daemon answers on {0}")]
    Running(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// One line in the journal.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

struct Agent {
    record: Record,
    pidfd: Arc<OwnedFd>,
    adopted: bool,
    exit: watch::Receiver<Option<Ended>>,
    /// Where following the events file starts for a stream opened after the launch.
    events_from: u64,
}

#[derive(Default)]
struct Counters {
    launched: AtomicU64,
    adopted: AtomicU64,
    exited: AtomicU64,
    killed: AtomicU64,
    refused_peers: AtomicU64,
    requests: AtomicU64,
    events_streamed: AtomicU64,
    scrape_errors: AtomicU64,
}

struct State {
    config: Config,
    group: Option<u32>,
    agents: Mutex<BTreeMap<String, Arc<Agent>>>,
    counters: Counters,
    /// Daemon starts on this runtime directory, this one included.
    starts: u64,
}

impl State {
    fn agents_dir(&self) -> PathBuf {
        self.config.run_dir.join("agents")
    }

    fn agent(&self, id: &str) -> Option<Arc<Agent>> {
        self.agents.lock().ok()?.get(id).cloned()
    }

    fn all(&self) -> Vec<Arc<Agent>> {
        self.agents.lock().map(|a| a.values().cloned().collect()).unwrap_or_default()
    }
}

fn error(message: impl Into<String>, exit_code: u32) -> Response {
    Response { body: Some(Body::Error(proto::Error { message: message.into(), exit_code })) }
}

fn done(message: impl Into<String>) -> Response {
    Response { body: Some(Body::Done(proto::Done { message: message.into() })) }
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Runs the daemon until SIGTERM or SIGINT. Agents keep running when it returns.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), DaemonError> {
    let agents_dir = config.run_dir.join("agents");
    for dir in [&config.run_dir, &agents_dir] {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Create { path: dir.clone(), source })?;
    }
    let socket = config.run_dir.join(crate::SOCKET_NAME);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(DaemonError::Running(socket));
    }
    // A socket left by a daemon that was killed answers nobody: replace it.
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).map_err(|source| DaemonError::Listen { path: socket.clone(), source })?;
    let group = std::fs::read_to_string(&config.group_file).ok().and_then(|text| auth::group_gid(&text, crate::GROUP));
    let listen_err = |source| DaemonError::Listen { path: socket.clone(), source };
    match group {
        Some(gid) => {
            sys::chown(&socket, 0, gid).map_err(listen_err)?;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).map_err(listen_err)?;
            log!("listening on {} (root:{} 0660)", socket.display(), crate::GROUP);
        }
        None => {
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
            log!(
                "listening on {} (root only, 0600): the group {} does not exist in {} (create it to let its members \
                 use the daemon)",
                socket.display(),
                crate::GROUP,
                config.group_file.display()
            );
        }
    }
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(metrics::listen(addr).await?),
        None => None,
    };
    let starts = metrics::count_start(&config.run_dir)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let state = Arc::new(State { config, group, agents: Mutex::default(), counters: Counters::default(), starts });
    adopt(&state);
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            log!("metrics on http://{addr}/metrics");
        }
        tokio::spawn(serve_metrics(Arc::clone(&state), listener));
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    log!("ready: {} agents adopted", state.all().len());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move { connection(state, stream).await });
                }
                Err(err) => log!("accept failed: {err}"),
            },
            _ = term.recv() => { log!("SIGTERM: stopping; {} agents keep running under their supervisors", state.all().len()); break; }
            _ = hup.recv() => {
                let state = Arc::clone(&state);
                tokio::spawn(async move { reload_on_sighup(&state).await });
            }
            _ = int.recv() => { log!("SIGINT: stopping; {} agents keep running under their supervisors", state.all().len()); break; }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Takes back the agents a previous daemon started, from their records.
fn adopt(state: &Arc<State>) {
    let dir = state.agents_dir();
    for loaded in Record::load_all(&dir) {
        let rec = match loaded {
            Ok(rec) => rec,
            Err(err) => {
                log!("record skipped: {err}");
                continue;
            }
        };
        let gone = |why: &str| {
            log!("agent {} dropped: {why}", rec.agent);
            let _ = std::fs::remove_file(record::path(&dir, &rec.agent));
        };
        let pidfd = match sys::pidfd_open(rec.pid) {
            Ok(fd) => fd,
            Err(err) => {
                gone(&format!("its supervisor (pid {}) is gone ({err})", rec.pid));
                continue;
            }
        };
        if record::process_start(&state.config.proc_root, rec.pid) != Some(rec.start_ticks) {
            gone(&format!("pid {} now belongs to another process", rec.pid));
            continue;
        }
        log!("agent {} adopted (supervisor pid {})", rec.agent, rec.pid);
        state.counters.adopted.fetch_add(1, Ordering::Relaxed);
        let events_from = rec.events.as_deref().and_then(|f| std::fs::metadata(f).ok()).map_or(0, |m| m.len());
        insert(state, rec, pidfd, true, events_from);
    }
}

/// Registers a running supervisor and starts watching for its end.
fn insert(state: &Arc<State>, record: Record, pidfd: OwnedFd, adopted: bool, events_from: u64) -> Arc<Agent> {
    let (tx, rx) = watch::channel(None);
    let pidfd = Arc::new(pidfd);
    let agent = Arc::new(Agent { record, pidfd: Arc::clone(&pidfd), adopted, exit: rx, events_from });
    if let Ok(mut agents) = state.agents.lock() {
        agents.insert(agent.record.agent.clone(), Arc::clone(&agent));
    }
    let state = Arc::clone(state);
    let id = agent.record.agent.clone();
    tokio::spawn(async move {
        let ended = wait_end(&pidfd).await;
        let _ = std::fs::remove_file(record::path(&state.agents_dir(), &id));
        if let Ok(mut agents) = state.agents.lock() {
            agents.remove(&id);
        }
        state.counters.exited.fetch_add(1, Ordering::Relaxed);
        match ended {
            Ended::Status(code) => log!("agent {id} ended with status {code}"),
            Ended::Unknown => log!("agent {id} ended (adopted: its exit status went to the daemon that started it)"),
        }
        let _ = tx.send(Some(ended));
    });
    agent
}

async fn wait_end(pidfd: &Arc<OwnedFd>) -> Ended {
    let fd = match pidfd.try_clone() {
        Ok(fd) => fd,
        Err(_) => return poll_end(pidfd).await,
    };
    // SAFETY: `fd` is an open OwnedFd moved into the AsyncFd, which owns it from here
    // until it is dropped, so its raw descriptor stays the same open pidfd.
    let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
    let Ok(async_fd) = registered else { return poll_end(pidfd).await };
    loop {
        let Ok(mut guard) = async_fd.readable().await else { return poll_end(pidfd).await };
        match sys::wait_pidfd(async_fd.get_ref().as_fd()) {
            Ok(ended) => return ended,
            Err(_) => guard.clear_ready(),
        }
    }
}

/// Without an epoll registration: asks every 100 ms.
async fn poll_end(pidfd: &Arc<OwnedFd>) -> Ended {
    loop {
        if let Ok(ended) = sys::wait_pidfd(pidfd.as_fd()) {
            return ended;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    stream.write_all(&wire::frame(response)).await
}

/// Reads the one request of a connection and the descriptors that came with it.
async fn read_request(stream: &UnixStream) -> Result<(proto::Request, Vec<OwnedFd>), wire::WireError> {
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        if let Some(range) = wire::complete(&buf)? {
            return Ok((proto::Request::decode(&buf[range])?, fds));
        }
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || sys::recv_with_fds(stream.as_fd(), &mut chunk)) {
            Ok((0, _)) => return Err(wire::WireError::Closed),
            Ok((n, got)) => {
                buf.extend_from_slice(&chunk[..n]);
                fds.extend(got);
                if fds.len() > sys::MAX_FDS {
                    return Err(wire::WireError::Io(io::Error::other("more descriptors than a request may carry")));
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

async fn connection(state: Arc<State>, mut stream: UnixStream) {
    let peer = match sys::peer_cred(stream.as_fd()) {
        Ok(peer) => peer,
        Err(err) => {
            log!("peer credentials unavailable: {err}");
            return;
        }
    };
    if !auth::allowed(&state.config.proc_root, peer, state.group) {
        state.counters.refused_peers.fetch_add(1, Ordering::Relaxed);
        log!("refused pid {} uid {}: not root and not in group {}", peer.0, peer.1, crate::GROUP);
        let _ = send(&mut stream, &error(auth::refusal(peer.1), 125)).await;
        return;
    }
    let (request, fds) = match read_request(&stream).await {
        Ok(got) => got,
        Err(wire::WireError::Closed) => return,
        Err(err) => {
            let _ = send(&mut stream, &error(format!("bad request: {err}"), 125)).await;
            return;
        }
    };
    state.counters.requests.fetch_add(1, Ordering::Relaxed);
    let Some(op) = request.op else {
        let _ = send(&mut stream, &error("bad request: no operation", 125)).await;
        return;
    };
    let reply = match op {
        // The supervisor runs as root and so does a ring 0 command: a launch for another
        // uid would make the group root-equivalent.
        Op::Launch(_) if peer.1 != 0 => {
            log!("launch refused for uid {}: only root may launch", peer.1);
            error(
                format!(
                    "permission denied: uid {} may not launch agents through the daemon (agents run with root's \
                     authority; members of {} may list, inspect, follow and control them)",
                    peer.1,
                    crate::GROUP
                ),
                125,
            )
        }
        Op::Launch(launch) => return launch_agent(&state, stream, launch, fds, peer).await,
        Op::Events(events) => return stream_events(&state, stream, events).await,
        Op::List(_) => {
            let mut agents = Vec::new();
            for agent in state.all() {
                agents.push(info(&state, &agent).await);
            }
            Response { body: Some(Body::Agents(proto::AgentList { agents })) }
        }
        Op::Inspect(r) => match state.agent(&r.agent) {
            Some(agent) => Response { body: Some(Body::Agent(info(&state, &agent).await)) },
            None => no_agent(&r.agent),
        },
        Op::Kill(r) => kill(&state, &r.agent).await,
        Op::Signal(s) => signal_agent(&state, &s.agent, s.signal),
        Op::Demote(d) => {
            let line = format!("demote {}", d.ring);
            forward(&state, &d.agent, line, format!("agent {} is now in ring {}", d.agent, d.ring)).await
        }
        Op::Approve(d) => {
            forward(&state, &d.agent, format!("approve {}", d.request), format!("approved request {}", d.request)).await
        }
        Op::Deny(d) => {
            forward(&state, &d.agent, format!("deny {}", d.request), format!("denied request {}", d.request)).await
        }
        Op::Reload(r) => reload(&state, &r.agent).await,
        Op::Metrics(_) => {
            let (counts, agents) = scrape(&state).await;
            Response {
                body: Some(Body::Metrics(proto::MetricsReply {
                    agents_running: agents.len() as u64,
                    launched: counts.launched,
                    adopted: counts.adopted,
                    exited: counts.exited,
                    killed: counts.killed,
                    refused_peers: counts.refused_peers,
                    requests: counts.requests,
                    events_streamed: counts.events_streamed,
                    daemon_starts: counts.starts,
                    scrape_errors: counts.scrape_errors,
                    exposition: metrics::render(&counts, &agents),
                })),
            }
        }
    };
    let _ = send(&mut stream, &reply).await;
}

/// Serves `GET /metrics` until the daemon stops.
async fn serve_metrics(state: Arc<State>, listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let body = async {
                        let (counts, agents) = scrape(&state).await;
                        metrics::render(&counts, &agents)
                    };
                    if let Err(err) = metrics::http(stream, body).await {
                        log!("metrics client: {err}");
                    }
                });
            }
            Err(err) => {
                log!("metrics accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The daemon's counters and every running agent, each agent under --policy asked for its
/// evaluator's counters at once; one whose socket takes the request but gives no valid
/// answer in time is a scrape error.
async fn scrape(state: &Arc<State>) -> (DaemonCounts, Vec<AgentSample>) {
    let mut asked = Vec::new();
    for agent in state.all() {
        let rec = &agent.record;
        let plain = AgentSample { agent: rec.agent.clone(), ring: rec.ring, tier: "none".into(), metrics: None };
        if !rec.policy {
            asked.push((plain, None));
            continue;
        }
        let (dir, id) = (state.config.control_dir.clone(), rec.agent.clone());
        // A supervisor still starting has no control socket yet: not an error, no sample.
        let task = tokio::task::spawn_blocking(move || {
            match control::request_within(&dir, &id, "metrics", metrics::AGENT_TIMEOUT) {
                Ok(answer) => metrics::sample_from_answer(&id, &answer).ok_or(()).map(Some),
                Err(control::ControlError::NotRunning { .. }) => Ok(None),
                Err(_) => Err(()),
            }
        });
        asked.push((plain, Some(task)));
    }
    let mut agents = Vec::new();
    for (plain, task) in asked {
        let Some(task) = task else {
            agents.push(plain);
            continue;
        };
        match tokio::time::timeout(metrics::AGENT_TIMEOUT * 2, task).await {
            Ok(Ok(Ok(Some(sample)))) => agents.push(sample),
            Ok(Ok(Ok(None))) => agents.push(plain),
            _ => {
                state.counters.scrape_errors.fetch_add(1, Ordering::Relaxed);
                agents.push(plain);
            }
        }
    }
    let c = &state.counters;
    let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
    let counts = DaemonCounts {
        starts: state.starts,
        launched: get(&c.launched),
        adopted: get(&c.adopted),
        exited: get(&c.exited),
        killed: get(&c.killed),
        refused_peers: get(&c.refused_peers),
        requests: get(&c.requests),
        events_streamed: get(&c.events_streamed),
        scrape_errors: get(&c.scrape_errors),
    };
    (counts, agents)
}

fn no_agent(id: &str) -> Response {
    error(format!("no agent {id:?} is running under this daemon (see `agt-jail ps`)"), 125)
}

async fn info(state: &State, agent: &Agent) -> AgentInfo {
    let rec = &agent.record;
    let status = if rec.policy {
        let (dir, id) = (state.config.control_dir.clone(), rec.agent.clone());
        tokio::task::spawn_blocking(move || control::request(&dir, &id, "status"))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|v| v.to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    AgentInfo {
        agent: rec.agent.clone(),
        pid: rec.pid,
        started: rec.started,
        ring: rec.ring,
        policy: rec.policy,
        events: rec.events.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        command: rec.command.clone(),
        adopted: agent.adopted,
        status,
    }
}

/// Sends one line to the agent's supervisor's control socket (agents under --policy).
async fn forward(state: &State, id: &str, line: String, done_message: String) -> Response {
    let Some(agent) = state.agent(id) else { return no_agent(id) };
    if !agent.record.policy {
        return error(format!("agent {id} runs without --policy: it has no evaluator to approve, deny or demote"), 125);
    }
    let dir = state.config.control_dir.clone();
    let id = id.to_string();
    match tokio::task::spawn_blocking(move || control::request(&dir, &id, &line)).await {
        Ok(Ok(_)) => done(done_message),
        Ok(Err(err @ control::ControlError::Refused { .. })) => error(err.to_string(), 1),
        Ok(Err(err)) => error(err.to_string(), 125),
        Err(err) => error(format!("control request failed: {err}"), 125),
    }
}

/// `reload`: the named agent (it must run under --policy) or every agent under --policy.
async fn reload(state: &State, id: &str) -> Response {
    let targets = if id.is_empty() {
        state.all().into_iter().filter(|a| a.record.policy).map(|a| a.record.agent.clone()).collect()
    } else {
        let Some(agent) = state.agent(id) else { return no_agent(id) };
        if !agent.record.policy {
            return error(format!("agent {id} runs without --policy: it has no policy to reload"), 125);
        }
        vec![id.to_string()]
    };
    let mut agents = Vec::new();
    for id in targets {
        let dir = state.config.control_dir.clone();
        let asked = id.clone();
        let entry = match tokio::task::spawn_blocking(move || control::request(&dir, &asked, "reload")).await {
            Ok(Ok(answer)) => proto::AgentReload {
                agent: id,
                old_policy: answer["old_policy"].as_str().unwrap_or_default().to_string(),
                policy: answer["policy"].as_str().unwrap_or_default().to_string(),
                error: String::new(),
            },
            Ok(Err(err)) => proto::AgentReload { agent: id, error: err.to_string(), ..Default::default() },
            Err(err) => {
                proto::AgentReload { agent: id, error: format!("control request failed: {err}"), ..Default::default() }
            }
        };
        agents.push(entry);
    }
    Response { body: Some(Body::Reloaded(proto::Reloaded { agents })) }
}

/// SIGHUP: every agent under --policy reloads its policy; one journal line per agent.
async fn reload_on_sighup(state: &State) {
    let Response { body: Some(Body::Reloaded(reloaded)) } = reload(state, "").await else { return };
    log!("SIGHUP: reloading the policies of {} agents", reloaded.agents.len());
    for a in reloaded.agents {
        if a.error.is_empty() {
            log!("agent {}: policy {} (was {})", a.agent, a.policy, a.old_policy);
        } else {
            log!("agent {}: policy not reloaded: {}", a.agent, a.error);
        }
    }
}

/// The kill switch: the supervisor's evaluator ends the cgroup (agents under --policy);
/// otherwise the daemon writes the agent's cgroup.kill itself, or SIGKILLs the command
/// (in rings 1-3 the jail's init, whose death ends its pid namespace).
async fn kill(state: &Arc<State>, id: &str) -> Response {
    let Some(agent) = state.agent(id) else { return no_agent(id) };
    if agent.record.policy {
        let reply = forward(state, id, "kill".into(), format!("killed agent {id}")).await;
        if matches!(reply.body, Some(Body::Done(_))) {
            state.counters.killed.fetch_add(1, Ordering::Relaxed);
            log!("agent {id} killed (through its supervisor)");
        }
        return reply;
    }
    // A supervisor that is still starting has no command yet: the kill waits for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match kill_children(&state.config.proc_root, agent.record.pid) {
            Ok(0) if agent.exit.borrow().is_some() => return done(format!("agent {id} had already ended")),
            Ok(0) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(0) => return error(format!("agent {id} started no command within 10 s; nothing was killed"), 125),
            Ok(_) => {
                state.counters.killed.fetch_add(1, Ordering::Relaxed);
                log!("agent {id} killed");
                return done(format!("killed agent {id}"));
            }
            Err(err) => return error(format!("cannot kill agent {id}: {err}"), 125),
        }
    }
}

/// The processes whose parent is `pid`, from `/proc/*/stat`.
fn children(proc_root: &Path, pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(proc_root.join(child.to_string()).join("stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                == Some(pid)
        })
        .collect()
}

/// Field 4 (ppid) of a `/proc/<pid>/stat` text.
fn parent_of(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// The cgroup v2 path of a process (`0::/path` in `/proc/<pid>/cgroup`).
fn cgroup_of(proc_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// Where cgroup2 is mounted, from a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// Kills the agent of the supervisor `pid`: its descendants in a cgroup of their own
/// (the agent's; the supervisor's helpers and the jail's stages share the supervisor's
/// or the root), through cgroup.kill, else SIGKILL to each such process. Returns how
/// many it found.
fn kill_children(proc_root: &Path, pid: u32) -> io::Result<usize> {
    let own = cgroup_of(proc_root, pid);
    let mount = std::fs::read_to_string(proc_root.join("self/mountinfo")).ok().and_then(|m| cgroup2_mount(&m));
    let mut found = 0;
    let mut level = vec![pid];
    let mut killed: Vec<String> = Vec::new();
    // The agent's command is a child or grandchild (under the jail's init stage).
    for _ in 0..3 {
        let mut next = Vec::new();
        for parent in level {
            for kid in children(proc_root, parent) {
                next.push(kid);
                let Some(cgroup) = cgroup_of(proc_root, kid).filter(|c| Some(c) != own.as_ref() && c != "/") else {
                    continue;
                };
                found += 1;
                if killed.contains(&cgroup) {
                    continue;
                }
                let by_cgroup = mount.as_ref().is_some_and(|mount| {
                    std::fs::write(mount.join(cgroup.trim_start_matches('/')).join("cgroup.kill"), "1").is_ok()
                });
                if by_cgroup {
                    killed.push(cgroup);
                } else {
                    let kid = i32::try_from(kid).map_err(|_| io::Error::other("pid out of range"))?;
                    sys::kill(kid, libc::SIGKILL)?;
                }
            }
        }
        level = next;
    }
    Ok(found)
}

/// Signals a client may forward (those `agt-jail exec` forwards to its command).
const FORWARDED: [i32; 5] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1];

fn signal_agent(state: &State, id: &str, signal: i32) -> Response {
    let Some(agent) = state.agent(id) else { return no_agent(id) };
    if !FORWARDED.contains(&signal) {
        return error(format!("signal {signal} is not forwarded (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 are)"), 125);
    }
    match sys::pidfd_send_signal(agent.pidfd.as_fd(), signal) {
        Ok(()) => done(format!("signal {signal} sent to agent {id}")),
        Err(err) => error(format!("cannot signal agent {id}: {err}"), 125),
    }
}

async fn launch_agent(
    state: &Arc<State>,
    mut stream: UnixStream,
    launch: proto::Launch,
    fds: Vec<OwnedFd>,
    peer: (u32, u32, u32),
) {
    let spawned = match spawn(state, launch, fds) {
        Ok(agent) => agent,
        Err(reply) => {
            let _ = send(&mut stream, &reply).await;
            return;
        }
    };
    state.counters.launched.fetch_add(1, Ordering::Relaxed);
    log!(
        "agent {} launched for uid {} (supervisor pid {}, ring {}{})",
        spawned.record.agent,
        peer.1,
        spawned.record.pid,
        spawned.record.ring,
        if spawned.record.policy { ", policy" } else { "" }
    );
    let launched = proto::Launched { agent: spawned.record.agent.clone(), pid: spawned.record.pid };
    let _ = send(&mut stream, &Response { body: Some(Body::Launched(launched)) }).await;
    let mut exit = spawned.exit.clone();
    let ended = loop {
        if let Some(ended) = *exit.borrow_and_update() {
            break ended;
        }
        if exit.changed().await.is_err() {
            break Ended::Unknown;
        }
    };
    let exited = match ended {
        Ended::Status(status) => proto::Exited { status: u32::from(status), known: true },
        Ended::Unknown => proto::Exited { status: 125, known: false },
    };
    let _ = send(&mut stream, &Response { body: Some(Body::Exited(exited)) }).await;
}

/// Starts the supervisor with the client's descriptors, in a session of its own, and
/// records it.
fn spawn(state: &Arc<State>, launch: proto::Launch, fds: Vec<OwnedFd>) -> Result<Arc<Agent>, Response> {
    let Ok::<[OwnedFd; 3], _>([stdin, stdout, stderr]) = fds.try_into() else {
        return Err(error("a launch must pass stdin, stdout and stderr", 125));
    };
    let args: Vec<OsString> = launch.args.into_iter().map(OsString::from_vec).collect();
    let describe = (state.config.describe)(&args).map_err(|e| error(e, 125))?;
    let cwd = PathBuf::from(OsString::from_vec(launch.cwd));
    if !cwd.is_absolute() {
        return Err(error(format!("the working directory {} is not absolute", cwd.display()), 125));
    }
    if let Some(name) = &describe.agent {
        if state.agent(name).is_some() {
            return Err(error(format!("agent {name} is already running (see `agt-jail ps`)"), 125));
        }
    }
    let events = describe.events.filter(|e| e.as_os_str() != "-").map(|e| cwd.join(e));
    let events_from = events.as_deref().and_then(|f| std::fs::metadata(f).ok()).map_or(0, |m| m.len());
    let mut command = std::process::Command::new(&state.config.supervisor);
    command.arg("exec").arg("--standalone").args(&args).current_dir(&cwd).env_clear();
    for entry in launch.env {
        let entry = OsString::from_vec(entry);
        let bytes = entry.as_encoded_bytes();
        if let Some(eq) = bytes.iter().position(|b| *b == b'=').filter(|eq| *eq > 0) {
            let (key, value) = (OsString::from_vec(bytes[..eq].to_vec()), OsString::from_vec(bytes[eq + 1..].to_vec()));
            command.env(key, value);
        }
    }
    command.stdin(Stdio::from(stdin)).stdout(Stdio::from(stdout)).stderr(Stdio::from(stderr));
    // SAFETY: the closure runs in the forked child before exec and calls only setsid,
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(sys::new_session);
    }
    let child = command
        .spawn()
        .map_err(|e| error(format!("cannot start the supervisor {}: {e}", state.config.supervisor.display()), 125))?;
    let pid = child.id();
    // The child is reaped through its pidfd (wait_end), not through `child`.
    drop(child);
    let pidfd = sys::pidfd_open(pid).map_err(|e| error(format!("pidfd_open of the supervisor {pid}: {e}"), 125))?;
    let record = Record {
        agent: describe.agent.unwrap_or_else(|| format!("agent-{pid}")),
        pid,
        start_ticks: record::process_start(&state.config.proc_root, pid).unwrap_or(0),
        started: now(),
        ring: describe.ring,
        policy: describe.policy,
        events,
        command: describe.command.iter().map(|c| c.to_string_lossy().into_owned()).collect(),
    };
    if let Err(err) = record.store(&state.agents_dir()) {
        // Running without a record would lose the agent on a restart: say so, keep serving it.
        log!("agent {}: {err} (a restarted daemon will not adopt it)", record.agent);
    }
    Ok(insert(state, record, pidfd, false, events_from))
}

/// Sends the agents' event records: see `Events` in proto/agt.proto.
async fn stream_events(state: &Arc<State>, mut stream: UnixStream, req: proto::Events) {
    let wanted = |id: &str| req.agent.is_empty() || req.agent == id;
    if !req.agent.is_empty() && state.agent(&req.agent).is_none() {
        let _ = send(&mut stream, &no_agent(&req.agent)).await;
        return;
    }
    // Per agent: its file and the offset read up to.
    let mut offsets: BTreeMap<String, (PathBuf, u64, Vec<u8>)> = BTreeMap::new();
    for agent in state.all().iter().filter(|a| wanted(&a.record.agent)) {
        if let Some(file) = &agent.record.events {
            let from = if req.follow { std::fs::metadata(file).map_or(0, |m| m.len()) } else { 0 };
            offsets.insert(agent.record.agent.clone(), (file.clone(), from, Vec::new()));
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let live = state.all();
        if req.follow {
            // Agents launched since: from where their file stood at launch.
            for agent in live.iter().filter(|a| wanted(&a.record.agent)) {
                if let Some(file) = &agent.record.events {
                    offsets
                        .entry(agent.record.agent.clone())
                        .or_insert_with(|| (file.clone(), agent.events_from, Vec::new()));
                }
            }
        }
        let mut sent = Vec::new();
        for (id, (file, offset, partial)) in offsets.iter_mut() {
            for record in read_new_lines(file, offset, partial) {
                sent.push(Response { body: Some(Body::Event(proto::Event { agent: id.clone(), record })) });
            }
        }
        for reply in &sent {
            if send(&mut stream, reply).await.is_err() {
                return;
            }
            state.counters.events_streamed.fetch_add(1, Ordering::Relaxed);
        }
        if !req.follow {
            let _ = send(&mut stream, &done("end of records")).await;
            return;
        }
        if !req.agent.is_empty() && !live.iter().any(|a| a.record.agent == req.agent) {
            // The agent ended: its last records were read above.
            let _ = send(&mut stream, &done(format!("agent {} ended", req.agent))).await;
            return;
        }
        tokio::select! {
            _ = tick.tick() => {}
            // A client that hangs up ends the stream.
            readable = stream.readable() => {
                // Clients send nothing after the request: readable means closed.
                let mut probe = [0u8; 1];
                match stream.try_read(&mut probe) {
                    Err(err) if readable.is_ok() && err.kind() == io::ErrorKind::WouldBlock => {}
                    _ => return,
                }
            }
        }
    }
}

/// Whole lines appended to `file` after `offset` (advanced); a trailing partial line is
/// kept in `partial` until its newline arrives.
fn read_new_lines(file: &Path, offset: &mut u64, partial: &mut Vec<u8>) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(file) else { return Vec::new() };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    *offset += buf.len() as u64;
    partial.extend_from_slice(&buf);
    let mut lines = Vec::new();
    while let Some(nl) = partial.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = partial.drain(..=nl).collect();
        let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        if !text.trim().is_empty() {
            lines.push(text);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn proc_parsers() {
        assert_eq!(parent_of("12 (x) y) S 34 12 12 0"), Some(34));
        assert_eq!(parent_of("nonsense"), None);
        let mountinfo =
            "22 1 0:21 / /proc rw - proc proc rw\n30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(mountinfo), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount("22 1 0:21 / /proc rw - proc proc rw\n"), None);
        let own = children(Path::new("/proc"), std::process::id());
        assert!(own.is_empty() || own.iter().all(|p| *p != std::process::id()));
    }

    #[test]
    fn new_lines_are_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("e.jsonl");
        std::fs::write(&file, "{\"a\":1}\n{\"b\"").unwrap();
        let (mut offset, mut partial) = (0, Vec::new());
        assert_eq!(read_new_lines(&file, &mut offset, &mut partial), vec!["{\"a\":1}".to_string()]);
        std::fs::write(&file, "{\"a\":1}\n{\"b\":2}\n").unwrap();
        assert_eq!(read_new_lines(&file, &mut offset, &mut partial), vec!["{\"b\":2}".to_string()]);
        assert!(read_new_lines(&file, &mut offset, &mut partial).is_empty());
    }
}
