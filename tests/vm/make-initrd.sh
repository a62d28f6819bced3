#!/usr/bin/env bash
# A ~2 MB initrd for the harness guests: the guest's static busybox plus the
# modules (and their dependencies, from modules.dep) needed to mount virtio
# ext4 disks; whatever the kernel has built in is skipped.
# Its /init mounts /dev/vda (root) and, when present, /dev/vdb at /ksmvm (the
# work disk with the source tree and results), then switch_root's to the
# `init=` of the kernel command line.
#
# usage: make-initrd.sh ROOT KVER OUT.gz
set -euo pipefail

ROOT=$1 KVER=$2 OUT=$3
M=$ROOT/lib/modules/$KVER
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT

mkdir -p "$D"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$ROOT/usr/bin/busybox" "$D/bin/busybox"

# modules.dep lines read "kernel/x/a.ko.xz: kernel/y/dep1.ko.xz kernel/z/dep2.ko.xz";
# load dependencies last-to-first, then the module itself.
: > "$D/lib/modules/order"
for want in crc32c_generic virtio_pci virtio_blk ext4; do
  line=$(grep -E "/${want}\.ko(\.xz|\.zst|\.gz)?:" "$M/modules.dep" || true)
  [ -n "$line" ] || continue
  for f in $(echo "$line" | tr -d ':' | awk '{ for (i = NF; i > 1; i--) print $i; print $1 }'); do
    name=$(basename "$f"); name=${name%.xz}; name=${name%.zst}; name=${name%.gz}
    grep -qx "$name" "$D/lib/modules/order" && continue
    case $f in
      *.xz) xz -dc "$M/$f" ;;
      *.zst) zstd -qdc "$M/$f" ;;
      *.gz) gzip -dc "$M/$f" ;;
      *) cat "$M/$f" ;;
    esac > "$D/lib/modules/$name"
    echo "$name" >> "$D/lib/modules/order"
  done
done

cat > "$D/init" <<'EOI'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
fail() { echo "KSMVM-INITRD-FAIL $*"; poweroff -f; }
for i in $(seq 200); do [ -b /dev/vda ] && break; sleep 0.05; done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda (modules: $(tr '\n' ' ' < /lib/modules/order))"
if [ -b /dev/vdb ]; then
  mount -t ext4 -o rw /dev/vdb /newroot/ksmvm || fail "cannot mount /dev/vdb"
fi
INIT=/sbin/init
for a in $(cat /proc/cmdline); do case $a in init=*) INIT=${a#init=} ;; esac; done
[ -x "/newroot$INIT" ] || fail "no executable init $INIT"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$INIT"
EOI
chmod +x "$D/init"
(cd "$D" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT"
echo "initrd $(du -h "$OUT" | cut -f1), modules: $(tr '\n' ' ' < "$D/lib/modules/order")"
