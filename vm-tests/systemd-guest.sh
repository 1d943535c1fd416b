#!/bin/bash
# The checks of the systemd test guest (`cargo xtask vm-test --systemd`): systemd is PID 1,
# `cargo xtask install` runs there, and the unit it installs loads and passes
# `systemd-analyze verify`; then the daemon runs under it: ready, its socket, a governed
# launch through it, a restart that a running agent survives and is re-adopted across. One line per check, read by
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
    shown=$(systemctl show agt-jail -p LoadState -p Type -p KillMode -p NotifyAccess -p RuntimeDirectoryPreserve -p ExecStart -p ExecReload)
    for expected in LoadState=loaded Type=notify KillMode=process NotifyAccess=main RuntimeDirectoryPreserve=yes "path=/usr/local/bin/agt-jail" "argv[]=/usr/local/bin/agt-jail reload"; do
        grep -qF -- "$expected" <<<"$shown" || { echo "no $expected in: $shown"; return 1; }
    done
}
check unit_loads unit_loads

# The daemon under systemd: Type=notify start (systemctl start returns once READY=1 came),
# the control socket, a governed launch through it, and a restart that running agents
# survive (KillMode=process) and the new daemon lists again (re-adoption).
# Agents' workspace: the launching client's directory.
check workspace_directory sh -c 'mkdir -p /var/tmp/agt-work'
cd /var/tmp/agt-work || cd /
check daemon_starts timeout 120 systemctl start agt-jail

daemon_ready() {
    local state
    state=$(systemctl show agt-jail -p ActiveState -p SubState -p MainPID -p Result)
    grep -qx ActiveState=active <<<"$state" && grep -qx SubState=running <<<"$state" &&
        grep -qx Result=success <<<"$state" && ! grep -qx MainPID=0 <<<"$state" || {
        echo "$state"
        journalctl -u agt-jail --no-pager -n 20 -o cat
        return 1
    }
    systemctl status agt-jail --no-pager >/dev/null || { echo "systemctl status exits $?"; return 1; }
}
check daemon_active_and_ready daemon_ready

socket_mode() {
    local said
    said=$(stat -c '%a %U %G %F' /run/agt-jail/agt.sock 2>&1)
    [ "$said" = "660 root agt-jail socket" ] || { echo "/run/agt-jail/agt.sock: $said"; return 1; }
}
check control_socket_root_agt_jail_0660 socket_mode

# `systemctl reload`: ExecReload= runs `agt-jail reload` through the daemon's Reload op; the
# daemon stays the same process.
reload_through_systemd() {
    local before after
    before=$(systemctl show agt-jail -p MainPID --value)
    timeout 60 systemctl reload agt-jail || { journalctl -u agt-jail --no-pager -n 20 -o cat; return 1; }
    after=$(systemctl show agt-jail -p MainPID --value)
    [ "$before" = "$after" ] && systemctl is-active --quiet agt-jail || { echo "MainPID $before -> $after"; return 1; }
}
check systemctl_reload reload_through_systemd

launch_through_daemon() {
    local out since
    since=$(date '+%Y-%m-%d %H:%M:%S')
    out=$(timeout 120 agt-jail exec --ring 2 -- /bin/echo hi 2>&1) || { echo "exit $?: $out"; return 1; }
    [ "$out" = hi ] || { echo "output: $out"; return 1; }
    # The daemon's own journal lines for it: launched in ring 2 through the socket (not a
    # standalone exec), and its end with the status the client got.
    out=$(journalctl -u agt-jail --no-pager -o cat --since "$since")
    grep -q 'launched for uid 0 (supervisor pid [0-9]*, ring 2)' <<<"$out" &&
        grep -q 'ended with status 0' <<<"$out" || { echo "daemon journal: $out"; return 1; }
}
check governed_launch_through_socket launch_through_daemon

listed() { # PHASE: `agt-jail ps` (through the daemon) lists the `sleep 600` agent; its name on stdout
    local i name
    for i in $(seq 1 60); do
        name=$(agt-jail ps 2>/dev/null | awk 'NR > 1 && /sleep 600$/ {print $1}')
        [ -n "$name" ] && { echo "$name"; return 0; }
        sleep 1
    done
    echo "$1: agt-jail ps does not list the sleep 600 agent: $(agt-jail ps 2>&1); its exec said: $(cat /var/tmp/agt-sleeper.log); daemon: $(journalctl -u agt-jail --no-pager -o cat -n 8)"
    return 1
}

agent_survives_restart() {
    local old new name i said
    timeout 900 agt-jail exec --ring 2 -- /bin/sleep 600 >/var/tmp/agt-sleeper.log 2>&1 &
    name=$(listed "before the restart") || { echo "$name"; return 1; }
    # The record comes first; under TCG the jail takes seconds more to exec the command.
    # (No procps in the guest: the agent's `sleep` by name from /proc.)
    for i in $(seq 1 120); do
        grep -qx sleep /proc/[0-9]*/comm 2>/dev/null && break
        sleep 1
    done
    grep -qx sleep /proc/[0-9]*/comm 2>/dev/null || { echo "the agent never ran its sleep: $(cat /var/tmp/agt-sleeper.log)"; return 1; }
    old=$(systemctl show agt-jail -p MainPID --value)
    timeout 120 systemctl restart agt-jail || { echo "systemctl restart failed"; return 1; }
    new=$(systemctl show agt-jail -p MainPID --value)
    [ "$new" != "$old" ] && [ "$new" != 0 ] || { echo "MainPID $old before, $new after the restart"; return 1; }
    [ "$(systemctl is-active agt-jail)" = active ] || { echo "not active after the restart"; return 1; }
    grep -qx sleep /proc/[0-9]*/comm 2>/dev/null || {
        echo "the agent's sleep is gone after the restart; its exec said: $(cat /var/tmp/agt-sleeper.log); daemon: $(journalctl -u agt-jail --no-pager -o cat -n 12)"
        return 1
    }
    name=$(listed "after the restart") || { echo "$name"; return 1; }
    journalctl -u agt-jail --no-pager -o cat _PID="$new" | grep -q "agent $name adopted" ||
        { echo "the new daemon (pid $new) did not log adopting $name"; return 1; }
    said=$(agt-jail kill --agent "$name" 2>&1) || { echo "agt-jail kill --agent $name through the new daemon: $said"; return 1; }
    for i in $(seq 1 60); do
        grep -qx sleep /proc/[0-9]*/comm 2>/dev/null || return 0
        sleep 1
    done
    echo "the agent's sleep still runs 60 s after agt-jail kill --agent $name ($said)"
    return 1
}
check restart_keeps_agents_and_readopts agent_survives_restart
check daemon_stops timeout 60 systemctl stop agt-jail

finish
