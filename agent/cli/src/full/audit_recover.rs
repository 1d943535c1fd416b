//! `agt-jail audit recover`: an audited run whose agt-jail was killed (kill -9, a crash)
//! left its kernel records pinned (see `pinned_run`). Recovery ends what is left of the
//! agent (its governor is gone), writes what the rings still hold into the run's log,
//! continuing its chain, each record marked `"recovered": true`, then the kernel's
//! counters, closes the log with a signed checkpoint and unpins.
use std::collections::{HashMap, HashSet};

use agt_jail_audit::{
    entry::Kind,
    key,
    resume::{ResumeError, Resumed},
    writer::now_ms,
};
use agt_jail_ebpf_loader::{pinned_counter, pins, Event, EventReader};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::pinned_run::{self, RunMeta};

/// What one recovery wrote.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Ring records written now.
    pub records: u64,
    /// Ring records the dead writer had written already (read, not yet handed back).
    pub already_written: u64,
    /// Denies counted in the kernel's deny summary and written now.
    pub summary_denies: u64,
    pub torn_bytes: usize,
}

/// The identity of a ring record in the log: kind, thread, process, kernel time (the
/// kernel's records of one thread never share a time).
fn ring_key(record: &Value) -> Option<String> {
    let ktime = record.get("ktime_ns")?.as_u64()?;
    if ktime == 0 {
        return None;
    }
    Some(format!("{}/{}/{}/{ktime}", record.get("kind")?.as_str()?, record.get("tgid")?, record.get("pid")?))
}

/// A deny summary record (thread and time zeroed), without its count: the same text for
/// the same summary entry.
fn summary_key(record: &Value) -> Option<(String, u64)> {
    let object = record.as_object()?;
    if object.get("ktime_ns")?.as_u64()? != 0 || object.get("pid")?.as_u64()? != 0 {
        return None;
    }
    let count = object.get("count").and_then(Value::as_u64).unwrap_or(1);
    let mut rest = object.clone();
    rest.remove("count");
    rest.remove("recovered");
    Some((serde_json::to_string(&rest).ok()?, count))
}

/// What the log already holds of the kernel's records (raw records only: without a
/// policy the log's records are the kernel's events as they were read).
#[derive(Default)]
struct OnRecord {
    ring: HashSet<String>,
    summary: HashMap<String, u64>,
}

impl OnRecord {
    fn see(&mut self, line: &[u8]) {
        let Ok(entry) = serde_json::from_slice::<Value>(line) else { return };
        let record = &entry["record"];
        if let Some(key) = ring_key(record) {
            self.ring.insert(key);
        } else if let Some((key, count)) = summary_key(record) {
            *self.summary.entry(key).or_default() += count;
        }
    }
}

fn event_value(event: &Event) -> Result<Value> {
    let mut value = serde_json::to_value(event).context("cannot serialise a kernel record")?;
    if let Some(object) = value.as_object_mut() {
        object.insert("recovered".into(), Value::Bool(true));
    }
    Ok(value)
}

/// Recovers one run. The writer must be gone.
pub fn recover(run: &RunMeta, key_override: Option<&std::path::Path>) -> Result<Recovered> {
    if run.writer_alive() {
        bail!("run {}: agt-jail (pid {}) still runs it", run.id, run.pid);
    }
    // The agent lost its governor: nothing of it may go on (and nothing more is queued).
    let kill = run.cgroup.join("cgroup.kill");
    if kill.exists() {
        std::fs::write(&kill, "1").with_context(|| format!("cannot kill the orphaned agent ({})", kill.display()))?;
    }
    let key_path = key_override.unwrap_or(&run.audit_key);
    let signing = key::load_or_create(key_path).map_err(|e| anyhow!("{e}"))?;
    let mut on_record = OnRecord::default();
    let dir = run.pin_dir();
    let mut reader =
        EventReader::open_pinned(&dir).with_context(|| format!("run {}: cannot open its pinned rings", run.id))?;
    // The rings give nothing back before the log holds it (a failed recovery can be retried).
    reader.commit_manually();
    let mut log = match Resumed::open(&run.audit, signing, |e| {
        if e.kind == Kind::Record && !run.governed {
            on_record.see(e.line);
        }
    }) {
        Ok(log) => log,
        Err(ResumeError::Closed(path)) => {
            // The writer closed the log and died before unpinning: nothing may be left.
            let mut left = 0;
            reader.drain(&mut |_| left += 1);
            if left > 0 {
                bail!(
                    "run {}: {} is closed, yet its rings still hold {left} record(s); they stay pinned at {}",
                    run.id,
                    path.display(),
                    dir.display()
                );
            }
            pinned_run::unpin(run)?;
            return Ok(Recovered::default());
        }
        Err(err) => bail!("run {}: cannot continue {}: {err}", run.id, run.audit.display()),
    };
    let mut out = Recovered { torn_bytes: log.torn.as_ref().map_or(0, Vec::len), ..Recovered::default() };
    let (did, policy) = (run.did.clone(), run.policy.clone());
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut failure: Option<anyhow::Error> = None;
    // The rings: the priority ring, then the event ring, in the order the kernel queued.
    reader.drain(&mut |decoded| {
        let (value, summary) = match decoded {
            // Without a policy the log's summary records are the kernel's: their counts are
            // taken off the totals below. Under a policy they are the evaluator's: what the
            // summary counted beyond the counts committed as written is written now.
            Ok(event) if event_is_summary(&event) => {
                if !run.governed {
                    return;
                }
                out.summary_denies += summary_count(&event);
                (event_value(&event), true)
            }
            Ok(event) => (event_value(&event), false),
            Err(err) => {
                (Ok(json!({"event": "undecodable_kernel_record", "error": err.to_string(), "recovered": true})), false)
            }
        };
        match value {
            Ok(value) => {
                if ring_key(&value).is_some_and(|key| on_record.ring.contains(&key)) {
                    out.already_written += 1;
                    return;
                }
                if !summary {
                    out.records += 1;
                }
                lines.push(value.to_string().into_bytes());
            }
            Err(err) => {
                failure.get_or_insert(err);
            }
        }
    });
    if let Some(err) = failure {
        return Err(err);
    }
    // The deny summary: the kernel's total per entry, less what the log holds of it.
    let mut totals: HashMap<String, (Event, u64)> = HashMap::new();
    for event in reader.summary_totals() {
        let event = event.map_err(|e| anyhow!("run {}: undecodable deny summary entry: {e}", run.id))?;
        let Some((key, total)) = summary_key(&serde_json::to_value(&event)?) else { continue };
        totals.entry(key).and_modify(|(_, sum)| *sum += total).or_insert((event, total));
    }
    let mut summary_total = 0;
    for (key, (event, total)) in totals {
        summary_total += total;
        let written = on_record.summary.get(&key).copied().unwrap_or(0);
        if total > written && !run.governed {
            let mut value = event_value(&event)?;
            value["count"] = json!(total - written);
            out.summary_denies += total - written;
            lines.push(value.to_string().into_bytes());
        }
    }
    let events_dropped = pinned_counter(&dir, pins::EVENT_DROPS)?;
    let denies_dropped = pinned_counter(&dir, pins::DENY_DROPS)?;
    let time = now_ms() as f64 / 1000.0;
    lines.push(
        json!({"event": "kernel_drops", "time": time, "events_dropped": events_dropped,
               "denies_dropped": denies_dropped, "recovered": true})
        .to_string()
        .into_bytes(),
    );
    let mut note = json!({
        "event": "audit_recovered", "time": time, "run": run.id, "writer_pid": run.pid,
        "ring_records_recovered": out.records, "ring_records_already_written": out.already_written,
        "deny_summary_total": summary_total, "deny_summary_recovered": out.summary_denies,
    });
    if let Some(torn) = &log.torn {
        note["torn_tail_bytes"] = json!(torn.len());
        note["torn_tail"] = json!(String::from_utf8_lossy(torn));
    }
    lines.push(note.to_string().into_bytes());
    for line in &lines {
        log.append(&did, &policy, line).map_err(|e| anyhow!("run {}: {e}", run.id))?;
    }
    log.close(now_ms()).map_err(|e| anyhow!("run {}: cannot close the log: {e}", run.id))?;
    reader.commit().map_err(|e| anyhow!("run {}: {e}", run.id))?;
    pinned_run::unpin(run)?;
    Ok(out)
}

fn summary_count(event: &Event) -> u64 {
    match event {
        Event::Connect { count, .. } => *count,
        Event::Sendmsg { net, .. } | Event::Bind { net, .. } => net.count,
        _ => 0,
    }
}

fn event_is_summary(event: &Event) -> bool {
    match event {
        Event::Connect { count, pid, ktime_ns, .. } => *pid == 0 && *ktime_ns == 0 && *count >= 1,
        Event::Sendmsg { net, pid, ktime_ns, .. } | Event::Bind { net, pid, ktime_ns, .. } => {
            *pid == 0 && *ktime_ns == 0 && net.count >= 1
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(record: Value) -> Vec<u8> {
        json!({"did": "did:mesh:00", "kind": "record", "policy": "none", "prev": "00", "record": record, "seq": 1})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn ring_records_are_known_by_thread_and_kernel_time_and_summaries_by_the_rest() {
        let deny = json!({"kind": "connect", "pid": 7, "tgid": 7, "ktime_ns": 99, "verdict": "deny", "port": 9});
        let summary = json!({"kind": "connect", "pid": 0, "tgid": 7, "ktime_ns": 0, "verdict": "deny", "port": 9});
        let mut seen = OnRecord::default();
        seen.see(&entry(deny.clone()));
        let mut five = summary.clone();
        five["count"] = json!(5);
        seen.see(&entry(five));
        seen.see(&entry(summary.clone()));
        seen.see(b"not json");
        assert!(seen.ring.contains(&ring_key(&deny).unwrap()));
        // The same record read again from the ring (recovered) is the same key.
        let mut again = deny.clone();
        again["recovered"] = json!(true);
        assert_eq!(ring_key(&again), ring_key(&deny));
        let mut later = deny;
        later["ktime_ns"] = json!(100);
        assert!(!seen.ring.contains(&ring_key(&later).unwrap()));
        // Summary records: no ring key; their counts add up per entry (count 1 is left out).
        assert_eq!(ring_key(&summary), None);
        let (key, count) = summary_key(&summary).unwrap();
        assert_eq!((seen.summary.get(&key).copied(), count), (Some(6), 1));
        let mut other_port = summary;
        other_port["port"] = json!(10);
        assert_ne!(summary_key(&other_port).unwrap().0, key);
    }
}
