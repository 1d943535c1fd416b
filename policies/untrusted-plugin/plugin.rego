# File and network verdicts for the untrusted plugin, consulted when no YAML rule matched.
# Query: data.agtjail.plugin.verdict -> {"decision": "allow"|"deny", "reason": "..."}
package agtjail.plugin

import rego.v1

default verdict := {"decision": "deny", "reason": "plugin sandbox: not on the allow list"}

readable_prefixes := [
	"/workspace/plugin/",
	"/usr/lib/python3",
	"/usr/lib/x86_64-linux-gnu/",
	"/lib/x86_64-linux-gnu/",
	"/etc/ssl/certs/",
]

readable if {
	input.event == "file_open"
	input.file.access == "read"
	some prefix in readable_prefixes
	startswith(input.file.path, prefix)
}

writable if {
	input.event in {"file_open", "file_write", "unlink", "rename"}
	startswith(input.file.path, "/workspace/plugin/out/")
}

api_call if {
	input.event == "connect"
	input.net.domain == "api.plugin.example"
	input.net.port == 443
}

verdict := {"decision": "allow", "reason": "plugin sandbox: workspace or library read"} if readable

verdict := {"decision": "allow", "reason": "plugin sandbox: output directory"} if {
	not readable
	writable
}

verdict := {"decision": "allow", "reason": "plugin sandbox: its API host"} if api_call
