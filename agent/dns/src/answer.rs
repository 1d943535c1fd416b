//! What of an upstream answer reaches the agent, and which addresses it opens.
use std::{net::IpAddr, time::Duration};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType},
};

use crate::pattern::normalize;

/// The UDP payload size agt-jail offers and accepts with EDNS (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;
/// CNAMEs followed from the query name; a longer chain stops there (the rest is dropped).
pub const MAX_CHAIN: usize = 8;

/// How long an answer's addresses stay open. The answer's TTL is clamped to
/// `min..=max` and `grace` is added, so a client that reuses an answer a little past its
/// TTL (or whose cache rounds up) still connects; the agent is told at most `max`, so it
/// never caches an address longer than the kernel allows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlPolicy {
    pub min: Duration,
    pub max: Duration,
    pub grace: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        Self { min: Duration::from_secs(5), max: Duration::from_secs(3600), grace: Duration::from_secs(30) }
    }
}

impl TtlPolicy {
    /// How long a destination of a record with `ttl` seconds stays open.
    pub fn open_for(&self, ttl: u32) -> Duration {
        Duration::from_secs(u64::from(ttl)).clamp(self.min, self.max.max(self.min)) + self.grace
    }

    /// The TTL the agent is told.
    pub fn told(&self, ttl: u32) -> u32 {
        ttl.min(u32::try_from(self.max.as_secs()).unwrap_or(u32::MAX))
    }
}

/// An answer fit for the agent and the addresses in it.
#[derive(Debug)]
pub struct Vetted {
    pub response: Message,
    /// Every A/AAAA address in `response` with the TTL it carries there.
    pub addrs: Vec<(IpAddr, u32)>,
    /// Addresses the upstream gave that are not destinations (loopback, link-local,
    /// unspecified, multicast, broadcast): left out of the answer and never opened.
    pub dropped: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VetError {
    #[error("the upstream sent a query, not a response")]
    NotAResponse,
    #[error("the upstream answered another question ({0})")]
    OtherQuestion(String),
}

/// Builds the agent's answer to `query` (one question, validated) from the upstream's
/// `upstream`: the query name's CNAME chain and the records of the asked type at its
/// names, SOA records of the authority section (negative caching), nothing else (records
/// off the chain, glue and other additional records could name addresses that were
/// never opened). TTLs are capped by `ttl`.
pub fn vet(query: &Message, upstream: &Message, ttl: &TtlPolicy) -> Result<Vetted, VetError> {
    if upstream.metadata.message_type != MessageType::Response {
        return Err(VetError::NotAResponse);
    }
    let question = query.queries.first().ok_or_else(|| VetError::OtherQuestion("none asked".into()))?;
    let same = upstream.queries.len() == 1
        && upstream.queries.iter().all(|q| {
            normalize(&q.name().to_ascii()) == normalize(&question.name().to_ascii())
                && q.query_type() == question.query_type()
                && q.query_class() == question.query_class()
        });
    if !same {
        let asked: Vec<String> = upstream.queries.iter().map(|q| format!("{} {}", q.name(), q.query_type())).collect();
        return Err(VetError::OtherQuestion(asked.join(", ")));
    }
    let mut response = reply(query, upstream.metadata.response_code);
    response.metadata.truncation = upstream.metadata.truncation;

    let capped = |record: &Record| {
        let mut record = record.clone();
        record.ttl = ttl.told(record.ttl);
        record
    };
    let mut chain = vec![normalize(&question.name().to_ascii())];
    while chain.len() <= MAX_CHAIN {
        let Some(last) = chain.last() else { break };
        let next = upstream.answers.iter().find_map(|record| match &record.data {
            RData::CNAME(target) if normalize(&record.name.to_ascii()) == *last => Some((record, target)),
            _ => None,
        });
        let Some((record, target)) = next else { break };
        let target = normalize(&target.0.to_ascii());
        if chain.contains(&target) {
            break;
        }
        response.answers.push(capped(record));
        chain.push(target);
    }

    let qtype = question.query_type();
    let (mut addrs, mut dropped) = (Vec::new(), Vec::new());
    if qtype != RecordType::CNAME {
        for record in &upstream.answers {
            if record.record_type() != qtype || !chain.contains(&normalize(&record.name.to_ascii())) {
                continue;
            }
            let addr = match &record.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            };
            match addr {
                Some(addr) if !is_destination(addr) => {
                    dropped.push(addr);
                    continue;
                }
                Some(addr) => addrs.push((addr, ttl.told(record.ttl))),
                None => {}
            }
            response.answers.push(capped(record));
        }
    }
    response.authorities =
        upstream.authorities.iter().filter(|record| record.record_type() == RecordType::SOA).map(capped).collect();
    Ok(Vetted { response, addrs, dropped })
}

/// The agent's answer to `query` with `code` and no records (REFUSED, SERVFAIL, ...).
pub fn reply(query: &Message, code: ResponseCode) -> Message {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.response_code = code;
    response.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

/// What a query must be for the proxy to look at it: a standard query with one question.
pub fn check_query(query: &Message) -> Result<(), ResponseCode> {
    if query.metadata.message_type != MessageType::Query {
        return Err(ResponseCode::FormErr);
    }
    if query.metadata.op_code != OpCode::Query {
        return Err(ResponseCode::NotImp);
    }
    if query.queries.len() != 1 {
        return Err(ResponseCode::FormErr);
    }
    Ok(())
}

/// The bytes the agent may get over UDP: the whole answer if it fits the agent's payload
/// size, else the question alone with TC set. False in the second case: the answer's
/// addresses do not reach the agent.
pub fn encode_for_udp(query: &Message, response: &Message) -> Option<(Vec<u8>, bool)> {
    let limit = usize::from(query.max_payload().min(EDNS_PAYLOAD));
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some((bytes, true));
    }
    Some((response.truncate().to_vec().ok()?, false))
}

/// Whether an answer's address may be opened: loopback, link-local, unspecified,
/// multicast and broadcast addresses would point the agent at its own host or network
/// (DNS rebinding), never at a service by name.
fn is_destination(addr: IpAddr) -> bool {
    match addr.to_canonical() {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified() || v6.is_multicast()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hickory_proto::{
        op::Query,
        rr::{
            rdata::{A, AAAA, CNAME, SOA},
            Name,
        },
    };

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn query(qname: &str, qtype: RecordType) -> Message {
        let mut query = Message::new(7, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(name(qname), qtype));
        query
    }

    fn upstream(query: &Message, answers: Vec<Record>) -> Message {
        let mut response = Message::response(99, OpCode::Query);
        response.queries = query.queries.clone();
        response.answers = answers;
        response
    }

    fn a(owner: &str, addr: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(addr.parse().unwrap())))
    }

    fn cname(owner: &str, target: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    #[test]
    fn the_cname_chain_is_followed_and_records_off_it_are_dropped() {
        let q = query("API.example.com.", RecordType::A);
        let up = upstream(
            &q,
            vec![
                a("evil.example.net.", "198.51.100.66", 60),
                cname("api.example.com.", "edge.cdn.example.", 300),
                cname("edge.cdn.example.", "pop7.cdn.example.", 300),
                a("pop7.cdn.example.", "192.0.2.10", 20),
                a("pop7.cdn.example.", "192.0.2.11", 20),
            ],
        );
        let vetted = vet(&q, &up, &TtlPolicy::default()).unwrap();
        assert_eq!(vetted.addrs, vec![("192.0.2.10".parse().unwrap(), 20), ("192.0.2.11".parse().unwrap(), 20)]);
        let kept: Vec<String> = vetted.response.answers.iter().map(|r| r.name.to_ascii()).collect();
        assert_eq!(kept, vec!["api.example.com.", "edge.cdn.example.", "pop7.cdn.example.", "pop7.cdn.example."]);
        assert_eq!(vetted.response.metadata.id, 7, "the agent's id, not the upstream's");
        assert_eq!(vetted.response.queries[0].name().to_ascii(), "API.example.com.", "the agent's question");
    }

    #[test]
    fn a_looping_or_endless_chain_stops() {
        let q = query("a.example.", RecordType::AAAA);
        let looped = upstream(&q, vec![cname("a.example.", "b.example.", 5), cname("b.example.", "a.example.", 5)]);
        let vetted = vet(&q, &looped, &TtlPolicy::default()).unwrap();
        assert_eq!(vetted.response.answers.len(), 1, "the record closing the loop is left out");
        let mut long: Vec<Record> =
            (0..20).map(|i| cname(&format!("n{i}.example."), &format!("n{}.example.", i + 1), 5)).collect();
        long.push(Record::from_rdata(name("n20.example."), 5, RData::AAAA(AAAA("2001:db8::1".parse().unwrap()))));
        let q = query("n0.example.", RecordType::AAAA);
        let vetted = vet(&q, &upstream(&q, long), &TtlPolicy::default()).unwrap();
        assert_eq!(vetted.response.answers.len(), MAX_CHAIN);
        assert!(vetted.addrs.is_empty(), "an address past the followed chain is not given");
    }

    #[test]
    fn ttls_are_capped_and_open_for_the_clamped_ttl_plus_grace() {
        let policy =
            TtlPolicy { min: Duration::from_secs(5), max: Duration::from_secs(100), grace: Duration::from_secs(7) };
        assert_eq!(policy.open_for(0), Duration::from_secs(12));
        assert_eq!(policy.open_for(50), Duration::from_secs(57));
        assert_eq!(policy.open_for(86_400), Duration::from_secs(107));
        let q = query("a.example.", RecordType::A);
        let vetted = vet(&q, &upstream(&q, vec![a("a.example.", "192.0.2.1", 86_400)]), &policy).unwrap();
        assert_eq!(vetted.addrs, vec![("192.0.2.1".parse().unwrap(), 100)]);
        assert_eq!(vetted.response.answers[0].ttl, 100);
    }

    #[test]
    fn non_destinations_are_dropped_from_the_answer() {
        let q = query("a.example.", RecordType::A);
        let answers = vec![
            a("a.example.", "127.0.0.1", 60),
            a("a.example.", "169.254.169.254", 60),
            a("a.example.", "0.0.0.0", 60),
            a("a.example.", "192.0.2.1", 60),
        ];
        let vetted = vet(&q, &upstream(&q, answers), &TtlPolicy::default()).unwrap();
        assert_eq!(vetted.addrs.len(), 1);
        assert_eq!(vetted.dropped.len(), 3);
        assert_eq!(vetted.response.answers.len(), 1);
    }

    #[test]
    fn negative_answers_keep_their_soa_and_rcode_and_lose_other_sections() {
        let q = query("missing.example.", RecordType::A);
        let mut up = upstream(&q, vec![]);
        up.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(name("example."), name("hostmaster.example."), 1, 2, 3, 4, 60);
        up.authorities.push(Record::from_rdata(name("example."), 60, RData::SOA(soa)));
        up.authorities.push(a("ns.example.", "192.0.2.53", 60));
        up.additionals.push(a("ns.example.", "192.0.2.53", 60));
        let vetted = vet(&q, &up, &TtlPolicy::default()).unwrap();
        assert_eq!(vetted.response.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(vetted.response.authorities.len(), 1);
        assert!(vetted.response.additionals.is_empty());
        assert!(vetted.addrs.is_empty());
    }

    #[test]
    fn an_answer_to_another_question_is_refused() {
        let q = query("a.example.", RecordType::A);
        let other = upstream(&query("b.example.", RecordType::A), vec![a("b.example.", "192.0.2.1", 60)]);
        assert!(matches!(vet(&q, &other, &TtlPolicy::default()), Err(VetError::OtherQuestion(_))));
        let wrong_type = upstream(&query("a.example.", RecordType::AAAA), vec![]);
        assert!(vet(&q, &wrong_type, &TtlPolicy::default()).is_err());
        let mut not_response = upstream(&q, vec![]);
        not_response.metadata.message_type = MessageType::Query;
        assert_eq!(vet(&q, &not_response, &TtlPolicy::default()).unwrap_err(), VetError::NotAResponse);
        let upper = upstream(&query("A.EXAMPLE.", RecordType::A), vec![a("A.EXAMPLE.", "192.0.2.1", 60)]);
        assert_eq!(vet(&q, &upper, &TtlPolicy::default()).unwrap().addrs.len(), 1, "0x20 case differences are fine");
    }

    #[test]
    fn an_answer_too_big_for_the_agent_is_sent_truncated_without_addresses() {
        let q = query("a.example.", RecordType::A);
        let many: Vec<Record> = (0..60).map(|i| a("a.example.", &format!("192.0.2.{i}"), 60)).collect();
        let vetted = vet(&q, &upstream(&q, many), &TtlPolicy::default()).unwrap();
        let (bytes, whole) = encode_for_udp(&q, &vetted.response).unwrap();
        assert!(!whole);
        let sent = Message::from_vec(&bytes).unwrap();
        assert!(sent.metadata.truncation && sent.answers.is_empty());
        let few = vet(&q, &upstream(&q, vec![a("a.example.", "192.0.2.1", 60)]), &TtlPolicy::default()).unwrap();
        assert!(encode_for_udp(&q, &few.response).unwrap().1);
    }

    #[test]
    fn malformed_queries_are_named() {
        let mut two = query("a.example.", RecordType::A);
        two.add_query(Query::query(name("b.example."), RecordType::A));
        assert_eq!(check_query(&two), Err(ResponseCode::FormErr));
        let mut update = query("a.example.", RecordType::A);
        update.metadata.op_code = OpCode::Update;
        assert_eq!(check_query(&update), Err(ResponseCode::NotImp));
        let mut response = query("a.example.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        assert_eq!(check_query(&response), Err(ResponseCode::FormErr));
        assert_eq!(check_query(&query("a.example.", RecordType::A)), Ok(()));
    }
}
