//! The pinned objects of audited runs live in the agent runtime, which pins them; `audit
//! recover` and `doctor` read them through these.
pub use agt_jail_runtime::pinned_run::{orphan_warning, orphaned, runs, unpin, RunMeta};
