//! `audit show`: what a log says each agent did.
use std::{collections::BTreeMap, path::PathBuf};

use serde_json::Value;

use crate::{
    entry::Kind,
    verify::{walk, Verified, VerifyError},
};

/// One agent's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentSummary {
    /// The agent's name (`agent` of its decision records), when one was recorded.
    pub name: Option<String>,
    pub records: u64,
    /// Records of a policy decision.
    pub decisions: u64,
    /// Denied actions (a kernel deny summary counts each call it stands for).
    pub denies: u64,
    pub kills: u64,
    pub approvals: u64,
    /// Events the kernel dropped (the last of its drop counters' totals recorded).
    pub dropped: u64,
}

/// Counts per agent (by DID, in DID order), with the walk's result (the chain is
/// checked; signatures are `audit verify`'s).
pub fn summarise(files: &[PathBuf]) -> Result<(BTreeMap<String, AgentSummary>, Verified), VerifyError> {
    let mut agents: BTreeMap<String, AgentSummary> = BTreeMap::new();
    let verified = walk(files, None, |e| {
        if e.kind != Kind::Record {
            return;
        }
        let Ok(entry) = serde_json::from_slice::<Value>(e.line) else { return };
        let did = entry["did"].as_str().unwrap_or("").to_string();
        let record = &entry["record"];
        let s = agents.entry(did).or_default();
        if let Some(name) = record["agent"].as_str() {
            s.name.get_or_insert_with(|| name.to_string());
        }
        s.records += 1;
        let count = record["count"].as_u64().unwrap_or(1);
        let outcome = record["outcome"].as_str().or_else(|| record["verdict"].as_str()).unwrap_or("");
        if record.get("decision").is_some() {
            s.decisions += 1;
        }
        match outcome {
            "deny" | "denied" | "timeout" | "killed" => s.denies += count,
            "kill" => s.kills += 1,
            "approved" => s.approvals += 1,
            _ => {}
        }
        if record["event"] == "kernel_drops" {
            s.dropped +=
                record["events_dropped"].as_u64().unwrap_or(0) + record["denies_dropped"].as_u64().unwrap_or(0);
        }
    })?;
    Ok((agents, verified))
}
