//! The agent's identity socket: the one agt-jail socket an agent can reach. It hands a
//! process of the agent a JWT-SVID for the agent, and nothing to anyone else.
//!
//! The caller is who the kernel says it is ([`crate::peer::identify`]): a process whose
//! cgroup is the agent's cgroup or below it. One request line in (`token AUDIENCE`), one
//! JSON line out. Every answer, given or refused, is a record.
use std::{
    io::{self, BufRead, BufReader},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde_json::{json, Value};

use crate::{
    evaluator::Evaluator,
    identity::{AgentClaims, AgentIdentity},
    line_socket::{self, LineServer},
    peer, sys,
};

/// Where agents' identity sockets live: `<dir>/<agent>/identity.sock`. Each agent's
/// directory is shown (read-only) inside its own jail, at the same path.
pub const IDENTITY_DIR: &str = "/run/agt-jail/identity";
/// The variable that tells the agent where its identity socket is.
pub const SOCKET_ENV: &str = "AGT_JAIL_IDENTITY_SOCKET";

const MAX_REQUEST: u64 = 1024;

/// What the socket needs to know of the agent besides its evaluator.
pub struct IdentityFacts {
    pub identity: Arc<AgentIdentity>,
    /// The agent's cgroup, as `/proc/PID/cgroup` names it.
    pub cgroup: String,
    pub cgroup_id: u64,
    pub proc_root: PathBuf,
}

/// A listening identity socket; removed (with its directory) when dropped.
pub struct IdentitySocket {
    dir: PathBuf,
    path: PathBuf,
    server: Option<LineServer>,
}

impl IdentitySocket {
    /// Listens at `<root>/<agent>/identity.sock`.
    pub fn start(
        root: &Path,
        agent: &str,
        facts: IdentityFacts,
        evaluator: Arc<Evaluator>,
    ) -> io::Result<IdentitySocket> {
        crate::control::check_name(agent).map_err(io::Error::other)?;
        let dir = root.join(agent);
        let at = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(at)?;
        // Anyone may connect (the agent may run as any user); the kernel's answer about
        // the caller is the check, not the file mode.
        sys::chmod(root, 0o755).map_err(at)?;
        sys::chmod(&dir, 0o755).map_err(at)?;
        let path = dir.join("identity.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(at)?;
        sys::chmod(&path, 0o666).map_err(at)?;
        let server =
            LineServer::spawn("identity", listener, move |stream| answer(stream, &facts, &evaluator)).map_err(at)?;
        Ok(IdentitySocket { dir, path, server: Some(server) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory to show inside the agent's jail.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for IdentitySocket {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Identifies the caller, then answers its request; records the outcome.
fn answer(stream: &UnixStream, facts: &IdentityFacts, evaluator: &Evaluator) -> Value {
    let caller = peer::identify(stream, &facts.proc_root);
    let (pid, cgroup, pinned) = match &caller {
        Ok(p) => (p.pid, Some(p.cgroup.clone()), Some(p.pinned_at_connect)),
        Err(_) => (0, None, None),
    };
    // Read whatever was asked even when the answer is a refusal, so the caller gets the
    // refusal rather than a broken pipe.
    let request = line_socket::read_request(stream, MAX_REQUEST);
    let outcome = match caller {
        Err(err) => Err(format!("refused: {err}")),
        Ok(p) if !peer::within(&p.cgroup, &facts.cgroup) => {
            Err(format!("refused: pid {} (cgroup {}) is not a process of this agent", p.pid, p.cgroup))
        }
        Ok(_) => request.and_then(|line| issue(&line, facts, evaluator)),
    };
    let agent = evaluator.agent();
    let mut record = json!({
        "time": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "agent": agent.id, "did": agent.did, "event": "identity_token", "pid": pid, "cgroup": cgroup,
        "peer_pidfd": pinned,
    });
    let reply = match outcome {
        Ok((token, audience)) => {
            record["outcome"] = json!("issued");
            record["audience"] = json!(audience);
            json!({"ok": true, "token": token})
        }
        Err(e) => {
            record["outcome"] = json!("refused");
            record["reason"] = json!(e);
            json!({"ok": false, "error": e})
        }
    };
    evaluator.observe_raw(&record);
    evaluator.flush();
    reply
}

/// `token AUDIENCE` → (the token, the audience).
fn issue(line: &str, facts: &IdentityFacts, evaluator: &Evaluator) -> Result<(String, String), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let ["token", audience] = words.as_slice() else {
        return Err(format!("unknown request {}; expected: token AUDIENCE", agt_jail_policy::quoted(line)));
    };
    let agent = evaluator.agent();
    let claims = AgentClaims {
        did: agent.did,
        ring: agent.ring,
        trust: agent.trust,
        tier: agent.tier,
        // The policy in force now: a reload replaces it.
        policy_hash: evaluator.policy().hash.clone(),
        cgroup_id: facts.cgroup_id,
    };
    let token = facts.identity.issue(audience, claims, SystemTime::now()).map_err(|e| e.to_string())?;
    Ok((token, (*audience).to_string()))
}

/// Asks the identity socket at `path` for a token for `audience` (the agent side).
pub fn request_token(path: &Path, audience: &str) -> Result<String, String> {
    let stream =
        UnixStream::connect(path).map_err(|e| format!("cannot reach the identity socket {}: {e}", path.display()))?;
    let io = |e: io::Error| format!("identity socket {}: {e}", path.display());
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    sys::send_all(&stream, format!("token {audience}\n").as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    let value: Value = serde_json::from_str(reply.trim())
        .map_err(|e| format!("identity socket {}: bad answer '{}': {e}", path.display(), reply.trim()))?;
    match value["token"].as_str() {
        Some(token) if value["ok"] == Value::Bool(true) => Ok(token.to_string()),
        _ => Err(value["error"].as_str().unwrap_or("refused").to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{
        evaluator::{Actuator, EvaluatorConfig, RecordSink, TrustRules},
        identity::TokenClaims,
    };
    use agt_jail_policy::{context::AgentFacts, PolicySet};
    use std::{io::Write, sync::Mutex};

    struct NoEffects;
    impl Actuator for NoEffects {
        fn kill_agent(&self) -> io::Result<()> {
            Ok(())
        }
        fn demote(&self, _: &AgentFacts) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An identity socket in a temp dir for an agent whose cgroup is `cgroup`.
    fn socket(cgroup: &str) -> (tempfile::TempDir, IdentitySocket, Arc<AgentIdentity>, Lines) {
        let policies = PolicySet::from_str("p.yaml", "name: p\nagents: ['*']\ndefault_action: allow\n").unwrap();
        let identity =
            Arc::new(AgentIdentity::from_secret(&[3; 32], "a1", "example.org", Duration::from_secs(60)).unwrap());
        let cfg = EvaluatorConfig {
            policies: Arc::new(policies),
            policy_hash: "ab".repeat(32),
            agent: AgentFacts::new("a1", identity.did(), 2, 640, "s"),
            approval_timeout: Duration::from_secs(1),
            trust: TrustRules::default(),
            entry_program: PathBuf::from("/bin/true"),
            show_denials: false,
            proc_root: PathBuf::from("/proc"),
        };
        let lines = Lines::default();
        let evaluator = Evaluator::new(cfg, RecordSink::new(Some(Box::new(lines.clone()))), Arc::new(NoEffects));
        let facts = IdentityFacts {
            identity: Arc::clone(&identity),
            cgroup: cgroup.to_string(),
            cgroup_id: 77,
            proc_root: PathBuf::from("/proc"),
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = IdentitySocket::start(dir.path(), "a1", facts, evaluator).unwrap();
        (dir, socket, identity, lines)
    }

    fn records(lines: &Lines) -> Vec<Value> {
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn a_process_of_the_agents_cgroup_gets_a_token_naming_the_agent() {
        // This test process plays the agent: the agent's cgroup is its own.
        let own = peer::cgroup_of(Path::new("/proc"), std::process::id()).unwrap();
        let (_dir, socket, identity, lines) = socket(&own);
        let token = request_token(socket.path(), "tools.example").unwrap();
        let x = {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(identity.public_key())
        };
        let key = jsonwebtoken::DecodingKey::from_ed_components(&x).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        v.set_audience(&["tools.example"]);
        let claims = jsonwebtoken::decode::<TokenClaims>(&token, &key, &v).unwrap().claims;
        assert_eq!((claims.agent.ring, claims.agent.trust, claims.agent.cgroup_id), (2, 640, 77));
        assert_eq!(claims.agent.did, identity.did());
        let r = records(&lines);
        assert_eq!((r[0]["event"].as_str(), r[0]["outcome"].as_str()), (Some("identity_token"), Some("issued")));
        assert_eq!(r[0]["pid"].as_u64(), Some(u64::from(std::process::id())));
        assert_eq!(r[0]["audience"], "tools.example");
        // A malformed request is refused, and recorded.
        let err = request_token(socket.path(), "two w\\ords").unwrap_err();
        assert!(err.contains("unknown request \"token two w\\ords\""), "shown as sent, not debug-quoted: {err}");
    }

    #[test]
    fn a_process_outside_the_agents_cgroup_is_refused() {
        let (_dir, socket, _, lines) = socket("/agt-jail/some-other-agent");
        let err = request_token(socket.path(), "tools.example").unwrap_err();
        assert!(err.contains("is not a process of this agent"), "{err}");
        let r = records(&lines);
        assert_eq!(r[0]["outcome"], "refused");
        assert!(r[0]["reason"].as_str().unwrap().contains("not a process of this agent"));
    }
}
