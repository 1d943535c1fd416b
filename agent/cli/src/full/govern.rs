//! The policy's glue lives in the agent runtime (docs/adr/0011-agent-runtime.md); the
//! commands that only read a policy use these parts of it.
pub use agt_jail_runtime::govern::{host_caps, load_warning, resolve_domains};
