#!/bin/sh
# Provisions the Vagrant test box (see Vagrantfile). Idempotent; runs as root.
set -eu
export DEBIAN_FRONTEND=noninteractive
series=${AGT_VM_KERNEL:-6.1}

apt-get update -qq
apt-get install -y -qq --no-install-recommends build-essential ca-certificates curl pkg-config bash

case "$series" in
    6.1) pattern='^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
    6.12) pattern='^linux-image-6\.12\.[0-9]+\+(deb12|bpo)-amd64$' ;;
    *) echo "AGT_VM_KERNEL must be 6.1 or 6.12, not $series" >&2; exit 1 ;;
esac
package=$(apt-cache search --names-only "$pattern" | cut -d' ' -f1 | sort -V | tail -n 1)
if [ -z "$package" ] && [ "$series" = 6.12 ]; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/agt-jail-vm-backports.list
    apt-get update -qq
    package=$(apt-cache search --names-only "$pattern" | cut -d' ' -f1 | sort -V | tail -n 1)
fi
[ -n "$package" ] || { echo "no kernel package matches $pattern" >&2; exit 1; }
apt-get install -y -qq "$package"
release=${package#linux-image-}

# Boot that kernel by default, with BPF LSM in the active list.
sed -i 's/^GRUB_DEFAULT=.*/GRUB_DEFAULT=saved/' /etc/default/grub
sed -i 's/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX="lsm=lockdown,capability,landlock,bpf"/' /etc/default/grub
update-grub
entry=$(grep -o "menuentry '[^']*$release'" /boot/grub/grub.cfg | grep -v recovery | head -n 1 | cut -d"'" -f2)
submenu=$(grep -o "submenu '[^']*'" /boot/grub/grub.cfg | head -n 1 | cut -d"'" -f2)
if [ -n "$entry" ]; then
    grub-set-default "${submenu:+$submenu>}$entry" || true
fi

mkdir -p /etc/agt-vm
printf '%s\n' "${AGT_HOST_KERNEL:-}" > /etc/agt-vm/host-kernel
printf '%s\n' "$release" > /etc/agt-vm/kernel

if [ ! -x /root/.cargo/bin/cargo ]; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
fi
echo "provisioned $package; run 'vagrant reload' to boot it with lsm=...,bpf"
