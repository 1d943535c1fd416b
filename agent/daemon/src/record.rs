//! The daemon's record of one agent, `RUN_DIR/agents/<id>.json`: what a restarted daemon
//! needs to adopt the agent's supervisor again.
use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub agent: String,
    /// The supervisor (`agt-jail exec --standalone`).
    pub pid: u32,
    /// The supervisor's start time in clock ticks after boot (`/proc/<pid>/stat` field
    /// 22): a later process that reuses the pid has another.
    pub start_ticks: u64,
    /// Seconds since the epoch at launch.
    pub started: u64,
    pub ring: u32,
    pub policy: bool,
    /// The --events file, absolute.
    pub events: Option<PathBuf>,
    /// The command and its arguments (lossy text, for display).
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

pub fn path(dir: &Path, agent: &str) -> PathBuf {
    dir.join(format!("{agent}.json"))
}

impl Record {
    /// Writes the record whole or not at all (a temporary file renamed into place), so a
    /// daemon killed mid-write leaves no half record.
    pub fn store(&self, dir: &Path) -> Result<(), RecordError> {
        let dest = path(dir, &self.agent);
        let tmp = dir.join(format!(".{}.json.tmp", self.agent));
        let write = |source| RecordError::Write { path: dest.clone(), source };
        let text = serde_json::to_vec_pretty(self).map_err(|e| write(io::Error::other(e)))?;
        std::fs::write(&tmp, text).map_err(write)?;
        std::fs::rename(&tmp, &dest).map_err(write)
    }

    pub fn load(file: &Path) -> Result<Record, RecordError> {
        let text = std::fs::read(file).map_err(|source| RecordError::Read { path: file.to_path_buf(), source })?;
        serde_json::from_slice(&text).map_err(|source| RecordError::Parse { path: file.to_path_buf(), source })
    }

    /// Every `*.json` record in `dir` (those that fail to load come back as errors).
    pub fn load_all(dir: &Path) -> Vec<Result<Record, RecordError>> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        files.sort();
        files.iter().map(|f| Record::load(f)).collect()
    }
}

/// Field 22 (starttime) of a `/proc/<pid>/stat` text. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last ')'.
pub fn start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The start time of `pid` under `proc_root`.
pub fn process_start(proc_root: &Path, pid: u32) -> Option<u64> {
    start_ticks(&std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Record {
            agent: "coder".into(),
            pid: 42,
            start_ticks: 7,
            started: 1,
            ring: 2,
            policy: true,
            events: Some("/tmp/e.jsonl".into()),
            command: vec!["true".into()],
        };
        rec.store(dir.path()).unwrap();
        std::fs::write(dir.path().join("broken.json"), "{").unwrap();
        std::fs::write(dir.path().join("coder.sock"), "").unwrap();
        let all = Record::load_all(dir.path());
        assert_eq!(all.len(), 2);
        assert!(all[0].as_ref().is_err_and(|e| e.to_string().contains("broken.json")));
        assert_eq!(all[1].as_ref().unwrap(), &rec);
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 0";
        assert_eq!(start_ticks(stat), Some(987654));
        assert_eq!(start_ticks("garbage"), None);
        let own = process_start(Path::new("/proc"), std::process::id()).unwrap();
        assert!(own > 0);
    }
}
