//! The control socket of one running agent: approvals, denials, the kill switch, live
//! demotion and policy reload from outside the jail.
//!
//! One request line in, one JSON line out. The socket lives in agt-jail's runtime
//! directory, which every confined ring hides, and only root or the user running
//! agt-jail may talk to it (checked with SO_PEERCRED, not only with file modes).
use std::{
    io::{self, BufRead, BufReader},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agt_jail_policy::quoted;
use serde_json::{json, Value};

use crate::{
    evaluator::Evaluator,
    line_socket::{self, LineServer},
    sys,
};

/// Where agents' control sockets live (hidden inside every confined ring).
pub const RUNTIME_DIR: &str = "/run/agt-jail/agents";

/// What `status` and `key` say of the agent's identity (none without one).
#[derive(Debug, Clone, Default)]
pub struct IdentityView {
    pub spiffe_id: String,
    pub cgroup_id: u64,
    /// The agent's public key as a JWK Set.
    pub jwks: Value,
    /// The identity socket the agent asks for tokens.
    pub socket: PathBuf,
}

/// Reads the agent's policy files again and puts them in force as one snapshot; on
/// success the hashes of the policy that was in force and of the one now in force, on any
/// error the one located error line (the old policy stays in force).
pub type Reloader = Arc<dyn Fn() -> Result<(String, String), String> + Send + Sync>;

/// Longest accepted request line.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("agent name {} is not valid: use 1-64 of A-Z a-z 0-9 . _ -, not starting with '.'", quoted(.0))]
    BadName(String),
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("agent {name} is already running (its control socket {path} answers)")]
    InUse { name: String, path: PathBuf },
    #[error(
        "no running agent {name}: no control socket at {path} ({source}); only `agt-jail exec --policy` creates \
         one (an agent run without --policy cannot be controlled)"
    )]
    NotRunning { name: String, path: PathBuf, source: io::Error },
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("agent {name}: {message}")]
    Refused { name: String, message: String },
}

/// Checks an agent name: it becomes a file name.
pub fn check_name(name: &str) -> Result<(), ControlError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ControlError::BadName(name.to_string()))
    }
}

pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// A listening control socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
    server: Option<LineServer>,
}

impl ControlServer {
    /// Listens at `dir/<name>.sock` and serves requests against `evaluator`.
    pub fn start(
        dir: &Path,
        name: &str,
        evaluator: Arc<Evaluator>,
        identity: Option<IdentityView>,
        reload: Option<Reloader>,
    ) -> Result<ControlServer, ControlError> {
        check_name(name)?;
        let create = |source| ControlError::Create { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(create)?;
        let path = socket_path(dir, name);
        if UnixStream::connect(&path).is_ok() {
            return Err(ControlError::InUse { name: name.to_string(), path });
        }
        // A socket left by a killed agt-jail answers nobody: replace it.
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(|source| ControlError::Create { path: path.clone(), source })?;
        // Owner only; SO_PEERCRED below is the real check.
        let _ = sys::chmod(&path, 0o600);
        let me = sys::euid();
        let server = LineServer::spawn("control", listener, move |stream| {
            if sys::peer_uid(stream).is_ok_and(|uid| uid == 0 || uid == me) {
                line_socket::read_request(stream, MAX_REQUEST)
                    .map_or_else(|e| json!({"ok": false, "error": e}), |line| {
                    answer(&evaluator, identity.as_ref(), reload.as_ref(), &line)
                })
            } else {
                json!({"ok": false, "error": "permission denied: only root or the user running agt-jail may control an agent"})
            }
        })
        .map_err(|source| ControlError::Create { path: path.clone(), source })?;
        Ok(ControlServer { path, server: Some(server) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one request line: `approve ID`, `deny ID`, `kill`, `demote RING`, `status`, `metrics`,
/// `key`, `reload`.
pub fn answer(
    evaluator: &Arc<Evaluator>,
    identity: Option<&IdentityView>,
    reload: Option<&Reloader>,
    line: &str,
) -> Value {
    let words: Vec<&str> = line.split_whitespace().collect();
    let id = |w: Option<&&str>| -> Result<u64, String> {
        w.and_then(|s| s.parse().ok()).ok_or_else(|| format!("expected a request number in {}", quoted(line)))
    };
    let result = match words.as_slice() {
        ["approve", rest @ ..] => id(rest.first()).and_then(|id| evaluator.approve(id)),
        ["deny", rest @ ..] => id(rest.first()).and_then(|id| evaluator.deny(id)),
        ["kill"] => {
            let d = agt_jail_policy::Decision::new(
                agt_jail_policy::Action::Kill,
                None,
                None,
                "killed by the operator".into(),
            );
            evaluator.kill(&d);
            Ok(())
        }
        ["demote", ring] => match ring.parse::<u8>() {
            Ok(r) => evaluator.demote(r, "demoted by the operator"),
            Err(_) => Err(format!("expected a ring number 0-3, found {}", quoted(ring))),
        },
        ["status"] => {
            let agent = evaluator.agent();
            let pending: Vec<Value> = evaluator
                .pending()
                .into_iter()
                .map(|(id, event, pid, rule)| json!({"request": id, "event": event, "pid": pid, "rule": rule}))
                .collect();
            let mut status = json!({"ok": true, "agent": agent.id, "did": agent.did, "ring": agent.ring,
                          "trust": agent.trust, "tier": agent.tier, "pending": pending});
            if let Some(id) = identity {
                status["spiffe_id"] = json!(id.spiffe_id);
                status["cgroup_id"] = json!(id.cgroup_id);
                status["identity_socket"] = json!(id.socket.display().to_string());
            }
            // The policy in force now (a reload replaces it).
            status["policy_hash"] = json!(evaluator.policy().hash);
            return status;
        }
        ["metrics"] => {
            let agent = evaluator.agent();
            let mut answer = json!({"ok": true, "agent": agent.id, "ring": agent.ring, "tier": agent.tier});
            answer["metrics"] = json!(evaluator.metrics().snapshot());
            return answer;
        }
        ["key"] => match identity {
            Some(id) => return json!({"ok": true, "did": evaluator.agent().did, "jwks": id.jwks}),
            None => Err("the agent has no identity key".to_string()),
        },
        ["reload"] => match reload {
            Some(reload) => match reload() {
                Ok((old, new)) => return json!({"ok": true, "old_policy": old, "policy": new}),
                Err(e) => Err(e),
            },
            None => Err("this agent's policy cannot be reloaded".to_string()),
        },
        _ => Err(format!(
            "unknown request {}; expected approve ID, deny ID, kill, demote RING, status, metrics, key or reload",
            quoted(line)
        )),
    };
    match result {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

/// Sends one request to a running agent and returns its JSON answer.
pub fn request(dir: &Path, name: &str, line: &str) -> Result<Value, ControlError> {
    request_within(dir, name, line, Duration::from_secs(10))
}

/// [`request`], waiting at most `timeout` for each read and write.
pub fn request_within(dir: &Path, name: &str, line: &str, timeout: Duration) -> Result<Value, ControlError> {
    check_name(name)?;
    let path = socket_path(dir, name);
    let stream = UnixStream::connect(&path).map_err(|source| ControlError::NotRunning {
        name: name.to_string(),
        path: path.clone(),
        source,
    })?;
    let io = |source| ControlError::Io { path: path.clone(), source };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    sys::send_all(&stream, format!("{line}\n").as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    let value: Value = serde_json::from_str(answer.trim())
        .map_err(|e| ControlError::Io { path: path.clone(), source: io::Error::other(e) })?;
    if value["ok"] == Value::Bool(true) {
        Ok(value)
    } else {
        let message = value["error"].as_str().unwrap_or("refused").to_string();
        Err(ControlError::Refused { name: name.to_string(), message })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn evaluator() -> Arc<Evaluator> {
        let set = agt_jail_policy::PolicySet::from_str("p.yaml", "name: p\nagents: ['*']\ndefault_action: allow\n");
        let cfg = crate::evaluator::EvaluatorConfig {
            policies: Arc::new(set.unwrap()),
            policy_hash: "sha256:a".into(),
            agent: agt_jail_policy::context::AgentFacts::new("a1", "did:mesh:00", 2, 500, "s"),
            approval_timeout: Duration::from_secs(1),
            trust: crate::evaluator::TrustRules::default(),
            entry_program: PathBuf::from("/bin/true"),
            show_denials: false,
            proc_root: PathBuf::from("/proc"),
        };
        struct NoEffects;
        impl crate::evaluator::Actuator for NoEffects {
            fn kill_agent(&self) -> io::Result<()> {
                Ok(())
            }
            fn demote(&self, _: &agt_jail_policy::context::AgentFacts) -> io::Result<()> {
                Ok(())
            }
        }
        Evaluator::new(cfg, crate::evaluator::RecordSink::new(None), Arc::new(NoEffects))
    }

    #[test]
    fn reload_answers_with_both_hashes_or_the_located_error() {
        let ev = evaluator();
        let none = answer(&ev, None, None, "reload");
        assert_eq!(none["ok"], false, "{none}");
        let ok: Reloader = Arc::new(|| Ok(("sha256:a".into(), "sha256:b".into())));
        let done = answer(&ev, None, Some(&ok), "reload");
        assert_eq!(
            (done["ok"].as_bool(), done["old_policy"].as_str(), done["policy"].as_str()),
            (Some(true), Some("sha256:a"), Some("sha256:b"))
        );
        let bad: Reloader = Arc::new(|| Err("/etc/p.yaml:3:1: expected a mapping".into()));
        let refused = answer(&ev, None, Some(&bad), "reload");
        assert_eq!(refused, json!({"ok": false, "error": "/etc/p.yaml:3:1: expected a mapping"}));
        // `status` names the policy in force.
        assert_eq!(answer(&ev, None, None, "status")["policy_hash"], "sha256:a");
    }

    #[test]
    fn names_become_file_names_safely() {
        for good in ["a", "agent-1", "coder.v2_x"] {
            check_name(good).unwrap();
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_name_is_shown_as_typed_not_debug_quoted() {
        let err = check_name("a\\b c").unwrap_err().to_string();
        assert!(err.starts_with("agent name \"a\\b c\" is not valid"), "{err}");
        let err = check_name("x\ny").unwrap_err().to_string();
        assert!(err.starts_with("agent name \"x\\ny\" is not valid"), "{err}");
    }
}
