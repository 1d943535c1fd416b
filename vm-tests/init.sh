#!/bin/sh
# PID 1 of agt-jail's test VM (busybox sh, inside the initramfs built by `cargo xtask vm-test`).
#
# Mounts what the suite needs, runs every selected test on its own, one at a time, and
# prints one machine-readable line per test and a final verdict on the serial console:
#   AGT-VM-RESULT test=TARGET::NAME status=pass|fail|skip [reason=... (rest of the line)]
#   AGT-VM-VERDICT pass=N fail=N skip=N
# The runner on the host reads those lines; anything else on the console is for people.
# The same script runs under the Vagrant box (vm-tests/Vagrantfile) with AGT_VM_CONF set.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
CONF=${AGT_VM_CONF:-/etc/agt-vm}

if [ "$$" = 1 ] && [ ! -e /.agt-vm-root ]; then
    # pivot_root(2) refuses the initial rootfs (EINVAL), and jails pivot_root like on any
    # real system: copy the initramfs into a tmpfs and make that the root first.
    /bin/busybox mkdir -p /newroot
    /bin/busybox mount -t tmpfs -o mode=0755 tmpfs /newroot
    for entry in /*; do
        [ "$entry" = /newroot ] && continue
        /bin/busybox cp -a "$entry" /newroot/
    done
    /bin/busybox touch /newroot/.agt-vm-root
    exec /bin/busybox switch_root /newroot /init
fi

if [ "$$" = 1 ]; then
    /bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
    /bin/busybox --install -s
    mkdir -p /proc /sys /dev /tmp /run /root
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev 2>/dev/null
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    mount -t tmpfs tmpfs /dev/shm
    # The root is already a tmpfs; a second one on /tmp or /run would hide the host paths
    # mirrored there (a checkout under /tmp keeps its test binaries at /tmp/...).
    chmod 1777 /tmp
    mount -t securityfs securityfs /sys/kernel/security || echo "agt-vm: cannot mount securityfs"
    mount -t bpf bpf /sys/fs/bpf || echo "agt-vm: cannot mount bpffs"
    mount -t tracefs tracefs /sys/kernel/tracing || echo "agt-vm: cannot mount tracefs"
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    # Pure cgroup v2, as on systemd hosts with the unified hierarchy.
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "agt-vm: cannot mount cgroup2"
    for controller in $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null); do
        echo "+$controller" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
    done
    # What Debian builds as modules and the jail needs (an allowlist ring's veth and NAT),
    # dependencies first (xtask/src/vm.rs, GUEST_MODULES).
    modules=/usr/lib/agt-modules/$(uname -r)
    for module in $(cat "$modules/order" 2>/dev/null); do
        insmod "$modules/$module" || echo "agt-vm: cannot load $module"
    done
    ip link set lo up 2>/dev/null
    hostname agt-vm
    # Names a policy may use for loopback (the initramfs has no /etc/hosts of its own).
    [ -e /etc/hosts ] || printf '127.0.0.1 localhost\n::1 localhost\n' > /etc/hosts
    export HOME=/root
fi

export AGT_JAIL_IN_VM=1
export RUST_BACKTRACE=1
export AGT_JAIL_HOST_KERNEL="$(cat "$CONF/host-kernel" 2>/dev/null)"
TEST_TIMEOUT=$(cat "$CONF/test-timeout" 2>/dev/null || echo 300)
cd "$(cat "$CONF/cwd" 2>/dev/null || echo /)" 2>/dev/null || cd /

# This kernel's tests (vm-tests/matrix): the runner names the series on the command line
# and writes one list per series. A line is `TARGET PART PATH`: PART is `all` or the
# comma-separated TARGET::NAME prefixes of the tests selected in that binary.
series=$(sed -n 's/.*agt_vm_series=\([^ ]*\).*/\1/p' /proc/cmdline 2>/dev/null)
TESTS="$CONF/tests"
if [ -n "$series" ] && [ -e "$CONF/tests-$series" ]; then
    TESTS="$CONF/tests-$series"
fi

echo "AGT-VM-INIT kernel=$(uname -r) host=$AGT_JAIL_HOST_KERNEL lsm=$(cat /sys/kernel/security/lsm 2>/dev/null) tests=${TESTS##*/}"

# True when TARGET::NAME contains any line of the filter file (or the file is empty).
selected() {
    [ -s "$CONF/filter" ] || return 0
    while IFS= read -r pattern; do
        [ -z "$pattern" ] && continue
        case "$1" in *"$pattern"*) return 0 ;; esac
    done < "$CONF/filter"
    return 1
}

# True when TARGET::NAME starts with one of the comma-separated prefixes in $2 (or $2 is
# `all`: the whole binary is selected).
in_part() {
    [ "$2" = all ] && return 0
    rest="$2,"
    while [ -n "$rest" ]; do
        prefix=${rest%%,*}
        rest=${rest#*,}
        case "$1" in "$prefix"*) return 0 ;; esac
    done
    return 1
}

pass=0
fail=0
skip=0
while read -r target part bin; do
    [ -z "$bin" ] && continue
    if ! "$bin" --list --format terse > /tmp/agt-vm-list 2>/tmp/agt-vm-list.err; then
        echo "AGT-VM-RESULT test=$target::--list status=fail reason=cannot-list"
        cat /tmp/agt-vm-list.err
        fail=$((fail + 1))
        continue
    fi
    "$bin" --list --format terse --ignored > /tmp/agt-vm-ignored 2>/dev/null
    while IFS= read -r line; do
        case "$line" in *": test") name=${line%: test} ;; *) continue ;; esac
        full="$target::$name"
        in_part "$full" "$part" || continue
        selected "$full" || continue
        if grep -qxF "$line" /tmp/agt-vm-ignored; then
            echo "AGT-VM-RESULT test=$full status=skip reason=ignored"
            skip=$((skip + 1))
            continue
        fi
        echo "AGT-VM-RUN test=$full"
        timeout -s KILL "$TEST_TIMEOUT" "$bin" --exact "$name" --test-threads=1 --nocapture \
            < /dev/null > /tmp/agt-vm-out 2>&1
        rc=$?
        cat /tmp/agt-vm-out
        echo
        if [ "$rc" = 0 ] && grep -qE '(^|[.][.][.] )SKIP [^ ]+: ' /tmp/agt-vm-out; then
            # A test that skipped itself in the VM proves nothing: never a silent pass here.
            echo "AGT-VM-RESULT test=$full status=fail reason=skipped-in-vm"
            fail=$((fail + 1))
        elif [ "$rc" = 0 ] && grep -qE '(^|[.][.][.] )VM-SKIP [^ ]+: ' /tmp/agt-vm-out; then
            # The test needs a feature this kernel version cannot have (agt-jail-test-support
            # decides which): a counted skip with its reason, per kernel.
            reason=$(sed -n 's/.*VM-SKIP [^ ]*: //p' /tmp/agt-vm-out | head -n 1)
            echo "AGT-VM-RESULT test=$full status=skip reason=$reason"
            skip=$((skip + 1))
        elif [ "$rc" = 0 ]; then
            echo "AGT-VM-RESULT test=$full status=pass"
            pass=$((pass + 1))
        else
            echo "AGT-VM-RESULT test=$full status=fail reason=exit-$rc"
            fail=$((fail + 1))
        fi
    done < /tmp/agt-vm-list
done < "$TESTS"

echo "AGT-VM-VERDICT pass=$pass fail=$fail skip=$skip"
if [ "$$" = 1 ]; then
    sync
    poweroff -f
    # poweroff should not return; if it does, leaving PID 1 panics the kernel and QEMU
    # exits through -no-reboot.
fi
[ "$fail" = 0 ]
