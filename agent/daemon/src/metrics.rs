//! The daemon's metrics in the Prometheus text exposition format (version 0.0.4), served
//! on an opt-in loopback listener (`--metrics-listen`) and in the control API's
//! `Metrics` reply. Names and labels: docs/metrics.md.
//!
//! Each agent under `--policy` is asked for its evaluator's counters on its control
//! socket at every scrape; an agent that does not answer within [`AGENT_TIMEOUT`] is
//! counted in `agt_jail_agent_scrape_errors_total` and left out of that scrape.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use agt_jail_supervisor::metrics::{MetricsSnapshot, LATENCY_BUCKETS_US};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// How long a scrape waits for one agent's answer.
pub const AGENT_TIMEOUT: Duration = Duration::from_millis(500);
/// The file in the runtime directory that counts daemon starts across restarts.
pub const STARTS_FILE: &str = "daemon-starts";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "--metrics-listen {0}: not a loopback address; the metrics listener serves 127.0.0.0/8 or ::1 only (put a \
         proxy with authentication in front of it to expose it further)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot count the daemon's starts in {path}: {source}")]
    Starts { path: PathBuf, source: io::Error },
}

/// Refuses an address that is not loopback: the listener has no authentication.
pub fn check_listen(addr: SocketAddr) -> Result<(), MetricsError> {
    let loopback = match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    };
    if loopback {
        Ok(())
    } else {
        Err(MetricsError::NotLoopback(addr))
    }
}

pub async fn listen(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    check_listen(addr)?;
    TcpListener::bind(addr).await.map_err(|source| MetricsError::Listen { addr, source })
}

/// Adds this start to the count kept in `run_dir` (written whole: a temporary file renamed
/// into place) and returns the new count. An unreadable count starts again from 1.
pub fn count_start(run_dir: &Path) -> Result<u64, MetricsError> {
    let path = run_dir.join(STARTS_FILE);
    let before = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0);
    let now = before.saturating_add(1);
    let tmp = run_dir.join(format!(".{STARTS_FILE}.tmp"));
    let err = |source| MetricsError::Starts { path: path.clone(), source };
    std::fs::write(&tmp, format!("{now}\n")).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(now)
}

/// The daemon's own counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct DaemonCounts {
    pub starts: u64,
    pub launched: u64,
    pub adopted: u64,
    pub exited: u64,
    pub killed: u64,
    pub refused_peers: u64,
    pub requests: u64,
    pub events_streamed: u64,
    pub scrape_errors: u64,
}

/// One agent as a scrape saw it.
#[derive(Debug, Clone)]
pub struct AgentSample {
    pub agent: String,
    pub ring: u32,
    /// The trust tier; `none` for an agent without an evaluator.
    pub tier: String,
    /// The evaluator's counters (agents under `--policy` that answered).
    pub metrics: Option<MetricsSnapshot>,
}

/// Reads a control socket's `metrics` answer.
pub fn sample_from_answer(agent: &str, answer: &serde_json::Value) -> Option<AgentSample> {
    let metrics = serde_json::from_value(answer.get("metrics")?.clone()).ok()?;
    Some(AgentSample {
        agent: agent.to_string(),
        ring: u32::try_from(answer["ring"].as_u64()?).ok()?,
        tier: answer["tier"].as_str()?.to_string(),
        metrics: Some(metrics),
    })
}

/// A label value, escaped as the text format wants it.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(daemon: &DaemonCounts, agents: &[AgentSample]) -> String {
    let mut out = String::new();
    let counters: [(&str, &str, u64); 8] = [
        (
            "agt_jail_daemon_starts_total",
            "Daemon starts on this runtime directory (kept across restarts).",
            daemon.starts,
        ),
        ("agt_jail_launches_total", "Agents launched by this daemon process.", daemon.launched),
        (
            "agt_jail_readoptions_total",
            "Agents re-adopted from their records when this daemon process started.",
            daemon.adopted,
        ),
        ("agt_jail_agent_ends_total", "Agents of this daemon process that ended.", daemon.exited),
        ("agt_jail_kills_total", "Kill switch uses through this daemon process.", daemon.killed),
        (
            "agt_jail_refused_peers_total",
            "Control socket connections refused by peer credentials.",
            daemon.refused_peers,
        ),
        ("agt_jail_requests_total", "Control API requests served.", daemon.requests),
        (
            "agt_jail_agent_scrape_errors_total",
            "Agents that did not answer a metrics scrape in time.",
            daemon.scrape_errors,
        ),
    ];
    for (name, help, value) in counters {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    head(&mut out, "agt_jail_events_streamed_total", "counter", "Event records sent to control API clients.");
    let _ = writeln!(out, "agt_jail_events_streamed_total {}", daemon.events_streamed);

    let mut by_ring_tier: BTreeMap<(u32, &str), u64> = BTreeMap::new();
    for a in agents {
        *by_ring_tier.entry((a.ring, a.tier.as_str())).or_default() += 1;
    }
    head(&mut out, "agt_jail_agents", "gauge", "Running agents by ring and trust tier (tier none: no --policy).");
    for ((ring, tier), n) in &by_ring_tier {
        let _ = writeln!(out, "agt_jail_agents{{ring=\"{ring}\",tier=\"{}\"}} {n}", label(tier));
    }

    let with: Vec<(&str, &MetricsSnapshot)> =
        agents.iter().filter_map(|a| Some((a.agent.as_str(), a.metrics.as_ref()?))).collect();
    head(&mut out, "agt_jail_decisions_total", "counter", "Evaluator decisions by outcome (action) and plane.");
    for (agent, m) in &with {
        for (action, plane, n) in &m.decisions {
            let _ = writeln!(
                out,
                "agt_jail_decisions_total{{agent=\"{}\",action=\"{}\",plane=\"{}\"}} {n}",
                label(agent),
                label(action),
                label(plane)
            );
        }
    }
    head(
        &mut out,
        "agt_jail_denied_calls_total",
        "counter",
        "Calls denied, by plane (a kernel summary counts each call).",
    );
    for (agent, m) in &with {
        for (plane, n) in &m.denied_calls {
            let _ = writeln!(
                out,
                "agt_jail_denied_calls_total{{agent=\"{}\",plane=\"{}\"}} {n}",
                label(agent),
                label(plane)
            );
        }
    }
    head(
        &mut out,
        "agt_jail_kernel_drops_total",
        "counter",
        "Kernel records lost because a ring buffer was full, by kind.",
    );
    for (agent, m) in &with {
        let a = label(agent);
        let _ =
            writeln!(out, "agt_jail_kernel_drops_total{{agent=\"{a}\",kind=\"event\"}} {}", m.kernel_events_dropped);
        let _ = writeln!(out, "agt_jail_kernel_drops_total{{agent=\"{a}\",kind=\"deny\"}} {}", m.kernel_denies_dropped);
    }
    let name = "agt_jail_decision_latency_seconds";
    head(&mut out, name, "histogram", "Time from an event reaching the evaluator to its decision being recorded.");
    for (agent, m) in &with {
        let a = label(agent);
        let count = m.latency_buckets.last().copied().unwrap_or(0);
        for (i, cumulative) in m.latency_buckets.iter().enumerate() {
            let le = LATENCY_BUCKETS_US.get(i).map_or("+Inf".to_string(), |us| seconds(*us));
            let _ = writeln!(out, "{name}_bucket{{agent=\"{a}\",le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum{{agent=\"{a}\"}} {}", seconds(m.latency_sum_us));
        let _ = writeln!(out, "{name}_count{{agent=\"{a}\"}} {count}");
    }
    out
}

/// Microseconds as seconds, exactly (no float rounding in bucket bounds).
fn seconds(us: u64) -> String {
    let frac = us % 1_000_000;
    if frac == 0 {
        format!("{}", us / 1_000_000)
    } else {
        let text = format!("{}.{frac:06}", us / 1_000_000);
        text.trim_end_matches('0').to_string()
    }
}

/// Largest request head read from a metrics client.
const MAX_HEAD: usize = 8 << 10;

/// Answers one HTTP connection: `GET /metrics` gets `body()`, anything else 404 or 405.
pub async fn http(mut stream: TcpStream, body: impl std::future::Future<Output = String>) -> io::Result<()> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Err(io::Error::other("request head incomplete or too long"));
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, text) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body.await),
        (_, "/metrics") => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_string()),
        _ => ("404 Not Found", "text/plain; charset=utf-8", "see /metrics\n".to_string()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn snapshot() -> MetricsSnapshot {
        let m = agt_jail_supervisor::metrics::DecisionMetrics::default();
        m.decision("allow", "seccomp_notify", 1, 40);
        m.decision("deny", "seccomp_notify", 1, 300);
        m.decision("deny", "kernel", 5, 12);
        m.kernel_drops(2, 0);
        m.snapshot()
    }

    #[test]
    fn the_exposition_parses_and_says_what_was_counted() {
        let daemon = DaemonCounts { starts: 3, adopted: 2, launched: 1, scrape_errors: 1, ..Default::default() };
        let agents = vec![
            AgentSample { agent: "a\"1".into(), ring: 2, tier: "standard".into(), metrics: Some(snapshot()) },
            AgentSample { agent: "b".into(), ring: 2, tier: "standard".into(), metrics: Some(snapshot()) },
            AgentSample { agent: "c".into(), ring: 3, tier: "none".into(), metrics: None },
        ];
        let text = render(&daemon, &agents);
        // Every family has HELP and TYPE before its samples, and only once.
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let value = |name: &str, labels: &[(&str, &str)]| -> Option<prometheus_parse::Value> {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
                .map(|s| s.value.clone())
        };
        use prometheus_parse::Value::{Counter, Gauge, Histogram};
        assert_eq!(value("agt_jail_daemon_starts_total", &[]), Some(Counter(3.0)));
        assert_eq!(value("agt_jail_readoptions_total", &[]), Some(Counter(2.0)));
        assert_eq!(value("agt_jail_agent_scrape_errors_total", &[]), Some(Counter(1.0)));
        assert_eq!(value("agt_jail_agents", &[("ring", "2"), ("tier", "standard")]), Some(Gauge(2.0)));
        assert_eq!(value("agt_jail_agents", &[("ring", "3"), ("tier", "none")]), Some(Gauge(1.0)));
        let deny = [("agent", "b"), ("action", "deny"), ("plane", "kernel")];
        assert_eq!(value("agt_jail_decisions_total", &deny), Some(Counter(1.0)));
        assert_eq!(value("agt_jail_denied_calls_total", &[("agent", "b"), ("plane", "kernel")]), Some(Counter(5.0)));
        assert_eq!(value("agt_jail_kernel_drops_total", &[("agent", "b"), ("kind", "event")]), Some(Counter(2.0)));
        assert!(text.contains("agt_jail_kernel_drops_total{agent=\"a\\\"1\",kind=\"deny\"} 0\n"), "{text}");
        let Some(Histogram(buckets)) = value("agt_jail_decision_latency_seconds", &[("agent", "b")]) else {
            panic!("no histogram in {text}")
        };
        assert_eq!(buckets.len(), LATENCY_BUCKETS_US.len() + 1);
        assert_eq!(buckets[0].less_than, 0.00001);
        assert_eq!(buckets[0].count, 0.0);
        assert_eq!(buckets[1].count, 1.0, "12 us is in the 25 us bucket");
        assert!(buckets.last().unwrap().less_than.is_infinite());
        assert_eq!(buckets.last().unwrap().count, 3.0);
        assert!(text.contains("agt_jail_decision_latency_seconds_count{agent=\"b\"} 3\n"), "{text}");
        assert!(text.contains("agt_jail_decision_latency_seconds_sum{agent=\"b\"} 0.000352\n"), "{text}");
    }

    #[test]
    fn only_loopback_is_served_and_starts_are_kept() {
        assert!(check_listen("127.0.0.1:9100".parse().unwrap()).is_ok());
        assert!(check_listen("[::1]:0".parse().unwrap()).is_ok());
        let err = check_listen("0.0.0.0:9100".parse().unwrap()).unwrap_err().to_string();
        assert!(err.starts_with("--metrics-listen 0.0.0.0:9100: not a loopback address"), "{err}");
        assert!(check_listen("10.1.2.3:1".parse().unwrap()).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(count_start(dir.path()).unwrap(), 1);
        assert_eq!(count_start(dir.path()).unwrap(), 2);
        std::fs::write(dir.path().join(STARTS_FILE), "garbage").unwrap();
        assert_eq!(count_start(dir.path()).unwrap(), 1);
        assert!(count_start(&dir.path().join("missing")).is_err());
        assert_eq!(seconds(250_000), "0.25");
        assert_eq!(seconds(1_000), "0.001");
        assert_eq!(seconds(3_000_000), "3");
    }

    #[test]
    fn http_serves_get_metrics_only() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let asks = [
                "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
                "GET /metrics?x=1 HTTP/1.0\n\n".to_string(),
                "POST /metrics HTTP/1.1\r\n\r\n".to_string(),
                "GET / HTTP/1.1\r\n\r\n".to_string(),
                format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(MAX_HEAD)),
            ];
            let client = std::thread::spawn(move || {
                asks.iter()
                    .map(|ask| {
                        use std::io::{Read, Write};
                        let mut s = std::net::TcpStream::connect(addr).unwrap();
                        let _ = s.write_all(ask.as_bytes());
                        let mut reply = String::new();
                        let _ = s.read_to_string(&mut reply);
                        reply
                    })
                    .collect::<Vec<_>>()
            });
            for _ in 0..5 {
                let (stream, _) = listener.accept().await.unwrap();
                http(stream, async { "agt_jail_x 1\n".to_string() }).await.unwrap();
            }
            let replies = tokio::task::spawn_blocking(move || client.join().unwrap()).await.unwrap();
            assert!(replies[0].starts_with("HTTP/1.1 200 OK\r\n"), "{}", replies[0]);
            assert!(replies[0].contains("Content-Type: text/plain; version=0.0.4"), "{}", replies[0]);
            assert!(replies[0].ends_with("\r\n\r\nagt_jail_x 1\n"), "{}", replies[0]);
            assert!(replies[1].starts_with("HTTP/1.1 200 OK"), "{}", replies[1]);
            assert!(replies[2].starts_with("HTTP/1.1 405"), "{}", replies[2]);
            assert!(replies[3].starts_with("HTTP/1.1 404"), "{}", replies[3]);
            assert_eq!(replies[4], "", "a head beyond the limit is dropped unanswered");
        });
    }

    #[test]
    fn an_answer_becomes_a_sample() {
        let answer = serde_json::json!({"ok": true, "ring": 2, "tier": "trusted", "metrics": snapshot()});
        let s = sample_from_answer("x", &answer).unwrap();
        assert_eq!((s.ring, s.tier.as_str()), (2, "trusted"));
        assert_eq!(s.metrics.unwrap(), snapshot());
        assert!(sample_from_answer("x", &serde_json::json!({"ok": true})).is_none());
    }
}
