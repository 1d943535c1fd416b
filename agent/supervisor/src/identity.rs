//! An agent's identity: an Ed25519 key pair made at launch and held only by agt-jail,
//! the `did:mesh` derived from its public key, and the short-lived JWT-SVIDs it signs
//! for the agent (docs/identity.md).
//!
//! The DID is self-certifying: `did:mesh:` + hex of the first 16 bytes of SHA-256 of
//! the raw public key, so a verifier holding the key can check that a token's `did`
//! claim belongs to it, and nobody can claim a DID without its private key.
use std::{
    io::{self, Read},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::{pkcs8::EncodePrivateKey, SigningKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Shortest and longest lifetime of a token.
pub const TTL_MIN: Duration = Duration::from_secs(1);
pub const TTL_MAX: Duration = Duration::from_secs(3600);
/// Lifetime of a token unless `--token-ttl` says otherwise.
pub const TTL_DEFAULT: Duration = Duration::from_secs(300);
/// The SPIFFE trust domain unless `--trust-domain` says otherwise.
pub const TRUST_DOMAIN_DEFAULT: &str = "agt-jail.local";
/// Longest audience accepted in a token request.
const AUDIENCE_MAX: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read /dev/urandom for the agent's key: {0}")]
    Random(io::Error),
    #[error("cannot encode the agent's key: {0}")]
    Encode(String),
    #[error("cannot sign the token: {0}")]
    Sign(jsonwebtoken::errors::Error),
    #[error("token lifetime {} s is out of range: use 1 to 3600 seconds", .0.as_secs())]
    Ttl(Duration),
    #[error(
        "trust domain {} is not valid: use 1-255 of a-z 0-9 . - _ (a SPIFFE trust domain, lower case, no scheme or port)",
        agt_jail_policy::quoted(.0)
    )]
    TrustDomain(String),
    #[error("audience {} is not valid: use 1-255 printable characters without spaces", agt_jail_policy::quoted(.0))]
    Audience(String),
}

/// The `did:mesh` of a raw Ed25519 public key.
pub fn did_of(public_key: &[u8; 32]) -> String {
    let digest = Sha256::digest(public_key);
    format!("did:mesh:{}", hex(&digest[..16]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The policy in force, as tokens, `status` and the audit log name it: `sha256:` and the hex
/// SHA-256 of the policy file (what `sha256sum` prints), or, for several files, of their
/// SHA-256 digests concatenated in the order given; `none` without a policy.
pub fn policy_hash(paths: &[std::path::PathBuf]) -> io::Result<String> {
    let mut hashes = Vec::with_capacity(paths.len());
    for path in paths {
        let bytes = std::fs::read(path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?;
        hashes.push(Sha256::digest(&bytes));
    }
    Ok(match hashes.as_slice() {
        [] => "none".into(),
        [one] => format!("sha256:{}", hex(one)),
        many => format!("sha256:{}", hex(&Sha256::digest(many.concat()))),
    })
}

/// Checks a SPIFFE trust domain (the SPIFFE ID spec: lower-case letters, digits, `.`, `-`, `_`).
pub fn check_trust_domain(domain: &str) -> Result<(), IdentityError> {
    let ok = !domain.is_empty()
        && domain.len() <= 255
        && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::TrustDomain(domain.to_string()))
    }
}

/// Checks a token lifetime against [`TTL_MIN`]..=[`TTL_MAX`].
pub fn check_ttl(ttl: Duration) -> Result<(), IdentityError> {
    if (TTL_MIN..=TTL_MAX).contains(&ttl) {
        Ok(())
    } else {
        Err(IdentityError::Ttl(ttl))
    }
}

fn check_audience(audience: &str) -> Result<(), IdentityError> {
    let ok = !audience.is_empty() && audience.len() <= AUDIENCE_MAX && audience.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Audience(audience.to_string()))
    }
}

/// What a token says about the agent besides the JWT-SVID's registered claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentClaims {
    pub did: String,
    pub ring: u8,
    pub trust: u32,
    pub tier: String,
    /// The policy in force ([`policy_hash`]).
    pub policy_hash: String,
    /// The agent's cgroup (v2) id: the kernel's name for the processes the token speaks for.
    pub cgroup_id: u64,
}

/// The claims of a JWT-SVID issued by agt-jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// `spiffe://<trust domain>/agt-jail/<agent>`
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: u64,
    pub iat: u64,
    #[serde(flatten)]
    pub agent: AgentClaims,
}

/// An agent's key pair, never written anywhere: it lives and dies with agt-jail.
pub struct AgentIdentity {
    key: SigningKey,
    /// The key in PKCS#8 form, as the JWT library takes it.
    encoding: EncodingKey,
    did: String,
    spiffe_id: String,
    ttl: Duration,
}

impl AgentIdentity {
    /// A fresh key pair from the kernel's random source.
    pub fn generate(agent: &str, trust_domain: &str, ttl: Duration) -> Result<AgentIdentity, IdentityError> {
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut secret))
            .map_err(IdentityError::Random)?;
        let identity = Self::from_secret(&secret, agent, trust_domain, ttl);
        secret.fill(0);
        identity
    }

    /// The identity of a given secret key (tests; `generate` for real use).
    pub fn from_secret(
        secret: &[u8; 32],
        agent: &str,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<AgentIdentity, IdentityError> {
        check_trust_domain(trust_domain)?;
        check_ttl(ttl)?;
        let key = SigningKey::from_bytes(secret);
        let der = key.to_pkcs8_der().map_err(|e| IdentityError::Encode(e.to_string()))?;
        let encoding = EncodingKey::from_ed_der(der.as_bytes());
        let did = did_of(key.verifying_key().as_bytes());
        Ok(AgentIdentity { key, encoding, did, spiffe_id: format!("spiffe://{trust_domain}/agt-jail/{agent}"), ttl })
    }

    pub fn did(&self) -> &str {
        &self.did
    }

    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// The key id tokens name in their header: the DID's key fragment.
    pub fn kid(&self) -> String {
        format!("{}#key-1", self.did)
    }

    /// The raw public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key as a JWK Set (RFC 7517, OKP/Ed25519), what a verifier loads.
    pub fn jwks(&self) -> Value {
        use base64::Engine as _;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.public_key());
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid(), "x": x}]})
    }

    /// Signs a JWT-SVID for `audience`, issued at `now`.
    pub fn issue(&self, audience: &str, agent: AgentClaims, now: SystemTime) -> Result<String, IdentityError> {
        check_audience(audience)?;
        let iat = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = TokenClaims {
            sub: self.spiffe_id.clone(),
            aud: vec![audience.to_string()],
            exp: iat + self.ttl.as_secs(),
            iat,
            agent,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some("JWT".into());
        header.kid = Some(self.kid());
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(IdentityError::Sign)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use jsonwebtoken::{decode, jwk::JwkSet, DecodingKey, Validation};

    fn identity(ttl: u64) -> AgentIdentity {
        AgentIdentity::from_secret(&[7u8; 32], "coder", "example.org", Duration::from_secs(ttl)).unwrap()
    }

    fn claims() -> AgentClaims {
        AgentClaims {
            did: identity(60).did().to_string(),
            ring: 2,
            trust: 640,
            tier: "standard".into(),
            policy_hash: "ab".repeat(32),
            cgroup_id: 4242,
        }
    }

    fn verifier(id: &AgentIdentity) -> DecodingKey {
        let set: JwkSet = serde_json::from_value(id.jwks()).unwrap();
        DecodingKey::from_jwk(set.find(&id.kid()).unwrap()).unwrap()
    }

    fn validation(aud: &str) -> Validation {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[aud]);
        v.leeway = 0;
        v
    }

    #[test]
    fn the_did_is_the_hash_of_the_public_key() {
        let id = identity(60);
        let digest = Sha256::digest(id.public_key());
        assert_eq!(id.did(), format!("did:mesh:{}", hex(&digest[..16])));
        assert_eq!(id.did().len(), "did:mesh:".len() + 32);
        let other = AgentIdentity::from_secret(&[8u8; 32], "coder", "example.org", TTL_DEFAULT).unwrap();
        assert_ne!(id.did(), other.did(), "another key, another DID");
    }

    #[test]
    fn a_token_verifies_with_the_published_key_and_carries_the_claims() {
        let id = identity(60);
        let token = id.issue("tools.example", claims(), SystemTime::now()).unwrap();
        let data = decode::<TokenClaims>(&token, &verifier(&id), &validation("tools.example")).unwrap();
        assert_eq!(data.header.kid.as_deref(), Some(id.kid().as_str()));
        assert_eq!(data.claims.sub, "spiffe://example.org/agt-jail/coder");
        assert_eq!(data.claims.aud, vec!["tools.example".to_string()]);
        assert_eq!(data.claims.exp - data.claims.iat, 60);
        assert_eq!(data.claims.agent, claims());
    }

    #[test]
    fn a_token_for_another_audience_or_key_does_not_verify() {
        let id = identity(60);
        let token = id.issue("tools.example", claims(), SystemTime::now()).unwrap();
        assert!(decode::<TokenClaims>(&token, &verifier(&id), &validation("other.example")).is_err());
        let other = AgentIdentity::from_secret(&[8u8; 32], "coder", "example.org", TTL_DEFAULT).unwrap();
        assert!(decode::<TokenClaims>(&token, &verifier(&other), &validation("tools.example")).is_err());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let id = identity(5);
        let issued = SystemTime::now() - Duration::from_secs(6);
        let token = id.issue("tools.example", claims(), issued).unwrap();
        let err = decode::<TokenClaims>(&token, &verifier(&id), &validation("tools.example")).unwrap_err();
        assert_eq!(*err.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature);
        let fresh = id.issue("tools.example", claims(), SystemTime::now()).unwrap();
        decode::<TokenClaims>(&fresh, &verifier(&id), &validation("tools.example")).unwrap();
    }

    #[test]
    fn bad_settings_and_audiences_are_refused() {
        for ttl in [0, 3601] {
            assert!(AgentIdentity::from_secret(&[1; 32], "a", "d", Duration::from_secs(ttl)).is_err(), "{ttl}");
        }
        for domain in ["", "Upper.example", "spiffe://x", "a b", "x:80"] {
            assert!(check_trust_domain(domain).is_err(), "{domain}");
        }
        let id = identity(60);
        for aud in ["", "a b", &"x".repeat(256)] {
            assert!(id.issue(aud, claims(), SystemTime::now()).is_err(), "{aud:?}");
        }
    }

    #[test]
    fn the_key_set_holds_no_private_part() {
        let jwks = identity(60).jwks();
        let key = &jwks["keys"][0];
        assert_eq!((key["kty"].as_str(), key["crv"].as_str()), (Some("OKP"), Some("Ed25519")));
        assert!(key.get("d").is_none());
    }
}
