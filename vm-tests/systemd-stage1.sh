#!/bin/busybox sh
# First stage of the systemd test guest (`cargo xtask vm-test --systemd`, xtask/src/vm_systemd.rs).
#
# The guest's root is a Debian image built from Debian packages (mmdebstrap) on a virtio
# disk, opened copy-on-write (QEMU -snapshot), so every run starts from the same image.
# Debian builds virtio_blk and ext4 as modules: this initramfs loads them, mounts the
# disk, copies in what the run installs (binaries, the xtask that installs them, and the
# guest test unit, under /payload) and hands PID 1 to systemd.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modules=/lib/agt-modules/$(uname -r)
for module in $(cat "$modules/order" 2>/dev/null); do
    insmod "$modules/$module" 2>/dev/null || echo "agt-vm: cannot load $module"
done
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 100 ]; do
    sleep 0.2
    tries=$((tries + 1))
done
fail() {
    echo "AGT-VM-RESULT test=systemd::stage1 status=fail reason=$*"
    echo "AGT-VM-VERDICT pass=0 fail=1 skip=0"
    poweroff -f
}
[ -b /dev/vda ] || fail "no /dev/vda (virtio disk) after 20 s"
mount -t ext4 /dev/vda /newroot || fail "cannot mount /dev/vda as ext4"
cp -a /payload/. /newroot/ || fail "cannot copy the payload into the guest root"
umount /dev /sys /proc
exec switch_root /newroot /lib/systemd/systemd
