//! Agent identity end to end: two agents on one host, each with its own key pair and
//! DID; a process of an agent gets a token (JWT-SVID) for its agent through the identity
//! socket, the token verifies with the key `agt-jail identity key` publishes and
//! expires; a process of another agent, and a host process, are refused; the key is not
//! reachable from inside the jail.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agt_jail_test_support::{require, Need};
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");
/// The full binary: the one an agent runs to ask for its token.
const FULL: &str = env!("CARGO_BIN_EXE_agt-jail-full");
const DEADLINE: Duration = Duration::from_secs(120);
const AUDIENCE: &str = "tools.example";

fn policy(dir: &Path) -> PathBuf {
    let path = dir.join("allow.yaml");
    std::fs::write(&path, "apiVersion: governance.toolkit/v1\nname: allow\nagents: [\"*\"]\ndefault_action: allow\n")
        .unwrap();
    path
}

fn wait_for(path: &Path, child: &mut Child) {
    let started = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the agent ended ({status}) before {} appeared", path.display());
        }
        assert!(started.elapsed() < DEADLINE, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn agt(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn json_of(output: &Output) -> Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn verifier(jwks: &Value) -> (DecodingKey, String) {
    let set: JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let jwk = &set.keys[0];
    (DecodingKey::from_jwk(jwk).unwrap(), jwk.common.key_id.clone().unwrap())
}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&[AUDIENCE]);
    v.leeway = 0;
    v
}

fn verify(token: &str, key: &DecodingKey) -> Result<Value, jsonwebtoken::errors::Error> {
    jsonwebtoken::decode::<Value>(token, key, &validation()).map(|data| data.claims)
}

/// The claims of a token, unverified (to look at a token signed by a key the test lacks).
fn claims_unverified(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Asks an identity socket directly, as any host process could.
fn ask(socket: &Path) -> Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(format!("token {AUDIENCE}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn tokens_are_given_to_the_agents_own_processes_only_and_verify_and_expire() {
    if !require("identity::tokens", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("agt-jail-identity-").tempdir_in("/tmp").unwrap();
    let d = dir.path().display().to_string();
    let policy = policy(dir.path());
    let (a, b) = (format!("id-a-{}", std::process::id()), format!("id-b-{}", std::process::id()));

    // Agent A (ring 2): answers token requests until told to stop, and reports what it sees.
    let script = format!(
        "ls -a /run/agt-jail/identity/{a} > {d}/a.ls; ls /run/agt-jail/agents > {d}/a.agents 2>&1; \
         env > {d}/a.env; ls /proc/self/fd > {d}/a.fds; \
         while [ ! -e {d}/agt.pid ]; do sleep 0.05; done; \
         test -e /proc/$(cat {d}/agt.pid) && echo visible > {d}/a.pid || echo hidden > {d}/a.pid; \
         touch {d}/a.ready; \
         while [ ! -e {d}/done ]; do \
           if [ -e {d}/req ]; then rm {d}/req; {FULL} identity token --audience {AUDIENCE} > {d}/tok.tmp; \
             mv {d}/tok.tmp {d}/tok; fi; \
           sleep 0.05; done"
    );
    let mut agent_a = Command::new(BIN)
        .args(["exec", "--ring", "2", "--agent", &a, "--token-ttl", "2", "--policy"])
        .arg(&policy)
        .args(["--rw", &d, "--allow-exec", FULL, "--events"])
        .arg(dir.path().join("a.events"))
        .args(["--", "/bin/sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // agt-jail's own pid: the process whose memory holds the key.
    std::fs::write(dir.path().join("agt.pid"), agent_a.id().to_string()).unwrap();
    let ready = dir.path().join("a.ready");
    wait_for(&ready, &mut agent_a);

    let status = json_of(&agt(&["status", "--agent", &a]));
    let key = json_of(&agt(&["identity", "key", "--agent", &a]));
    assert_eq!(key["did"], status["did"]);
    let (verifying_key, kid) = verifier(&key["jwks"]);
    assert_eq!(kid, format!("{}#key-1", status["did"].as_str().unwrap()));
    // The DID is the key's: did:mesh + the first 16 bytes of SHA-256 of the public key.
    let x = key["jwks"]["keys"][0]["x"].as_str().unwrap();
    let raw = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(x).unwrap()
    };
    let digest = Sha256::digest(&raw);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(status["did"], format!("did:mesh:{hex}"));
    assert!(status["cgroup_id"].as_u64().unwrap() > 0, "{status}");
    // The first record binds the DID, the key and the cgroup.
    let events = std::fs::read_to_string(dir.path().join("a.events")).unwrap();
    let first: Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(first["event"], "identity", "{first}");
    assert_eq!(
        (&first["did"], &first["cgroup_id"], &first["jwks"]),
        (&status["did"], &status["cgroup_id"], &key["jwks"])
    );
    // `ps` lists the agent with the same facts.
    let ps = String::from_utf8(agt(&["ps"]).stdout).unwrap();
    let row: Vec<&str> = ps.lines().find(|l| l.starts_with(&format!("{a} "))).unwrap().split_whitespace().collect();
    let cgroup_id = status["cgroup_id"].to_string();
    assert_eq!(row[1..6], ["2", "500", "standard", status["did"].as_str().unwrap(), cgroup_id.as_str()], "{ps}");

    // A second run under A's name is refused and leaves A's identity socket alone.
    let twin = Command::new(BIN)
        .args(["exec", "--ring", "2", "--agent", &a, "--policy"])
        .arg(&policy)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(twin.status.code(), Some(125), "{}", String::from_utf8_lossy(&twin.stderr));

    // A process of A gets A's token; it verifies with the published key and says who A is.
    let tok = dir.path().join("tok");
    std::fs::write(dir.path().join("req"), "").unwrap();
    wait_for(&tok, &mut agent_a);
    let token = std::fs::read_to_string(&tok).unwrap().trim().to_string();
    let claims = verify(&token, &verifying_key).unwrap();
    assert_eq!(claims["sub"], format!("spiffe://agt-jail.local/agt-jail/{a}"));
    assert_eq!(claims["did"], status["did"]);
    assert_eq!((claims["ring"].as_u64(), claims["trust"].as_u64()), (Some(2), Some(500)));
    assert_eq!(claims["tier"], "standard");
    assert_eq!(claims["cgroup_id"], status["cgroup_id"]);
    // What `sha256sum POLICY` prints.
    let digest = Sha256::digest(std::fs::read(&policy).unwrap());
    let policy_hash = format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert_eq!(claims["policy_hash"], policy_hash);
    assert_eq!(status["policy_hash"], policy_hash);
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 2);

    // A host process outside every agent is refused.
    let socket = PathBuf::from(status["identity_socket"].as_str().unwrap());
    let refused = ask(&socket);
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("not a process of this agent"), "{refused}");

    // Agent B (ring 0: it sees the host's files, so it can reach A's socket) asks A's socket
    // and is refused; from its own socket it gets its own token.
    let script_b = format!(
        "{FULL} identity token --audience {AUDIENCE} --socket {} > {d}/b_as_a.out 2> {d}/b_as_a.err; \
         echo $? > {d}/b_as_a.rc; {FULL} identity token --audience {AUDIENCE} > {d}/b.tok",
        socket.display()
    );
    let out_b = Command::new(BIN)
        .args(["exec", "--ring", "0", "--agent", &b, "--policy"])
        .arg(&policy)
        .args(["--", "/bin/sh", "-c", &script_b])
        .output()
        .unwrap();
    assert!(out_b.status.success(), "{}", String::from_utf8_lossy(&out_b.stderr));
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap().trim().to_string();
    assert_eq!(read("b_as_a.rc"), "1");
    assert_eq!(read("b_as_a.out"), "", "B got a token from A's socket");
    assert!(read("b_as_a.err").contains("not a process of this agent"), "{}", read("b_as_a.err"));
    let b_token = read("b.tok");
    let b_claims = claims_unverified(&b_token);
    assert_eq!(b_claims["sub"], format!("spiffe://agt-jail.local/agt-jail/{b}"));
    assert_ne!(b_claims["did"], status["did"]);
    assert!(verify(&b_token, &verifying_key).is_err(), "B's token verified with A's key");

    // The token expires: once the clock is past `exp`, verification refuses it (one wait).
    let exp = claims["exp"].as_u64().unwrap();
    while now() <= exp {
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = verify(&token, &verifying_key).unwrap_err();
    assert_eq!(*err.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature);

    // Nothing of the key inside A's jail: its identity directory holds the socket only, the
    // control sockets are not there, agt-jail's process is out of sight (its memory is
    // where the key is), no descriptor beyond the standard ones was inherited, and the
    // environment names the socket, nothing else of agt-jail's.
    std::fs::write(dir.path().join("done"), "").unwrap();
    let out_a = agent_a.wait_with_output().unwrap();
    assert!(out_a.status.success(), "{}", String::from_utf8_lossy(&out_a.stderr));
    let listing: Vec<String> = read("a.ls").lines().map(str::to_string).collect();
    assert_eq!(listing, [".", "..", "identity.sock"]);
    assert!(read("a.agents").contains("No such file"), "{}", read("a.agents"));
    assert_eq!(read("a.pid"), "hidden");
    let fds: Vec<String> = read("a.fds").lines().map(str::to_string).collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "3 is ls's own directory");
    let env = read("a.env");
    let agt_vars: Vec<&str> = env.lines().filter(|l| l.contains("AGT_JAIL")).collect();
    assert_eq!(agt_vars, [format!("AGT_JAIL_IDENTITY_SOCKET={}", socket.display())]);
}

#[test]
fn bad_identity_settings_are_refused_with_125() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path());
    for bad in [["--token-ttl", "0"], ["--token-ttl", "3601"], ["--trust-domain", "Bad Domain"]] {
        let out = Command::new(BIN)
            .args(["exec", "--ring", "2", "--policy"])
            .arg(&policy)
            .args(bad)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{bad:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1, "{bad:?}");
    }
}
