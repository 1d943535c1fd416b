//! Name-based egress for agents, after Cilium's DNS-aware `toFQDNs` policies.
//!
//! The agent's resolver is a [`DnsProxy`] that agt-jail serves. A query for a name the
//! [`AllowSet`] allows is resolved upstream; every address of the answer is handed to an
//! [`AllowSink`] (the agent's kernel allow map) for each port the name is allowed, and
//! only when every write succeeded does the answer reach the agent. Other names get
//! REFUSED and an [`Observation`]. [`ExpiringAllows`] removes addresses again when the
//! last name that allowed them lapses. See docs/dns-egress.md.
use std::{net::IpAddr, time::Instant};

mod answer;
mod expiry;
mod limit;
mod pattern;
mod proxy;
mod resolv;
mod tcp;
mod upstream;

pub use answer::{vet, TtlPolicy, VetError, Vetted};
pub use expiry::{spawn_expiry, AllowMap, Dest, ExpiringAllows, ExpiryTable};
pub use limit::TokenBucket;
pub use pattern::{normalize, AllowSet, NamePattern, PatternError};
pub use proxy::{DnsProxy, Limits, Observation, Observer, Outcome, ProxyConfig};
pub use resolv::{first_nameserver, ResolvError};

/// Why an [`AllowSink`] could not allow a destination; the query it served gets SERVFAIL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where an allowed name's addresses go before the agent sees them.
pub trait AllowSink: Send {
    /// Allows `addr:port` until `expires`, because `name` (normalised query name)
    /// resolved to it. An error withholds the answer from the agent (SERVFAIL).
    fn allow(&mut self, addr: IpAddr, port: u16, expires: Instant, name: &str) -> Result<(), SinkError>;
}
