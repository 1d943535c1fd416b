#!/bin/bash
# The checks of the systemd test guest (`cargo xtask vm-test --systemd`): systemd is PID 1,
# `cargo xtask install` runs there, and the unit it installs loads and passes
# `systemd-analyze verify`, then the daemon runs under it. One line per check, read by
# the runner on the host like the busybox guests' lines (vm-tests/init.sh):
#   AGT-VM-RESULT test=systemd::NAME status=pass|fail [reason=...]
#   AGT-VM-VERDICT pass=N fail=N skip=0
# and the guest powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
UNIT=/etc/systemd/system/agt-jail.service
pass=0
fail=0

result() { # NAME pass|fail [REASON]
    if [ "$2" = pass ]; then
        pass=$((pass + 1))
        echo "AGT-VM-RESULT test=systemd::$1 status=pass"
    else
        fail=$((fail + 1))
        echo "AGT-VM-RESULT test=systemd::$1 status=fail reason=$(printf '%s' "$3" | tr '\n' ' ' | cut -c1-400)"
    fi
}

check() { # NAME COMMAND...: pass when COMMAND succeeds; its output is the reason otherwise
    local name=$1 said
    shift
    echo "AGT-VM-RUN test=systemd::$name"
    if said=$("$@" 2>&1); then
        result "$name" pass
    else
        result "$name" fail "$said"
    fi
}

finish() {
    echo "AGT-VM-VERDICT pass=$pass fail=$fail skip=0"
    # Through systemd's private socket: the guest runs no D-Bus (nor logind).
    systemctl --no-block start poweroff.target
    exit 0
}

echo "AGT-VM-INIT kernel=$(uname -r) init=$(cat /proc/1/comm) lsm=$(cat /sys/kernel/security/lsm 2>/dev/null) tests=systemd"

pid1_is_systemd() {
    local exe
    exe=$(readlink /proc/1/exe)
    [ "$(cat /proc/1/comm)" = systemd ] && [ "${exe##*/}" = systemd ] || {
        echo "PID 1 is $exe ($(cat /proc/1/comm))"
        return 1
    }
}
check pid1_is_systemd pid1_is_systemd

booted() {
    local state
    state=$(timeout 300 systemctl is-system-running --wait)
    [ "$state" = running ] || {
        echo "system state $state; failed units: $(systemctl list-units --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
        return 1
    }
}
check boot_reaches_running booted

# `cargo xtask install` itself, with the binaries the runner built (xtask/src/install.rs):
# binaries, profiles, policies, the unit, the agt-jail group, `systemctl daemon-reload`.
# xtask reads profiles/ and policies/ at the repository's host path.
repo_at_host_path() {
    local repo
    repo=$(cat /usr/local/lib/agt-vm/repo.path) && mkdir -p "$repo" &&
        ln -sfn /usr/local/lib/agt-vm/repo/profiles "$repo/profiles" &&
        ln -sfn /usr/local/lib/agt-vm/repo/policies "$repo/policies"
}
check repository_files_in_place repo_at_host_path
check xtask_install /usr/local/lib/agt-vm/bin/xtask install --prefix /usr/local --prebuilt /usr/local/lib/agt-vm/bin
installed() {
    local path
    for path in /usr/local/bin/agt-jail /usr/local/bin/agt-jail-full "$UNIT" \
        /usr/local/share/agt-jail/profiles/ring2.yaml /usr/local/share/agt-jail/policies/coding-agent/policy.yaml; do
        [ -e "$path" ] || { echo "install left no $path"; return 1; }
    done
    getent group agt-jail >/dev/null || { echo "install added no group agt-jail"; return 1; }
    /usr/local/bin/agt-jail --version >/dev/null || { echo "the installed agt-jail does not run"; return 1; }
}
check install_placed_everything installed

verify_clean() {
    local said
    said=$(systemd-analyze verify "$UNIT" 2>&1) || { echo "$said"; return 1; }
    [ -z "$said" ] || { echo "$said"; return 1; }
}
check unit_verifies verify_clean

unit_loads() {
    local shown expected
    shown=$(systemctl show agt-jail -p LoadState -p Type -p KillMode -p NotifyAccess -p RuntimeDirectoryPreserve -p ExecStart)
    for expected in LoadState=loaded Type=notify KillMode=process NotifyAccess=main RuntimeDirectoryPreserve=yes "path=/usr/local/bin/agt-jail"; do
        grep -qF -- "$expected" <<<"$shown" || { echo "no $expected in: $shown"; return 1; }
    done
}
check unit_loads unit_loads

finish
