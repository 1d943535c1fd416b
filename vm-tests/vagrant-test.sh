#!/bin/sh
# Runs agt-jail's integration tests inside the Vagrant box as Tier A (see Vagrantfile):
# AGT_JAIL_IN_VM=1 turns every unmet test requirement into a failure, as in the QEMU VM.
# Arguments are passed to `cargo test` as test-target names (e.g. vm_smoke).
set -eu
[ "$(id -u)" = 0 ] || { echo "run as root (sudo)" >&2; exit 1; }
want=$(cat /etc/agt-vm/kernel 2>/dev/null || true)
if [ -n "$want" ] && [ "$(uname -r)" != "$want" ]; then
    echo "running $(uname -r), provisioned $want: run 'vagrant reload' first" >&2
    exit 1
fi
grep -q 'lsm=[^ ]*bpf' /proc/cmdline || { echo "kernel command line lacks lsm=...,bpf: run 'vagrant reload'" >&2; exit 1; }
mountpoint -q /sys/kernel/security || mount -t securityfs securityfs /sys/kernel/security

export PATH="/root/.cargo/bin:$PATH"
export AGT_JAIL_IN_VM=1
export AGT_JAIL_HOST_KERNEL="$(cat /etc/agt-vm/host-kernel 2>/dev/null || true)"
export RUST_BACKTRACE=1
cd /agt-jail
targets=""
for name in "$@"; do targets="$targets --test $name"; done
set -f # `--test *` is cargo's glob, not the shell's
# shellcheck disable=SC2086 # word splitting of $targets is intended
exec cargo test --workspace ${targets:---test *} -- --test-threads=1
