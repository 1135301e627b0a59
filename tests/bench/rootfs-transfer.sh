#!/usr/bin/env bash
# Host-side cost of handing a container rootfs to the guest as a virtio-blk ext4 image
# (`mkfs.ext4 -d`), measured on a ~200 MB rootfs, next to the reference cost of copying the
# same tree (`cp -a`), so the numbers read as ratios.
#
# Usage: tests/bench/rootfs-transfer.sh [SIZE_MB] [RUNS]     (defaults: 200, 5). Needs
# e2fsprogs (mkfs.ext4 >= 1.43 for -d) and busybox-static; root is not required.
set -euo pipefail

size_mb="${1:-200}"
runs="${2:-5}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A rootfs that looks like an image: busybox + a spread of file sizes (mostly small files,
# some large ones), incompressible content so no layer of the stack can cheat.
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc,usr/lib,usr/share,var,tmp}
cp /bin/busybox "$rootfs/bin/"
remaining=$((size_mb * 1024 * 1024))
i=0
while ((remaining > 0)); do
    # 70% of files 4 KiB, 25% 64 KiB, 5% 4 MiB.
    case $((i % 20)) in
        0) sz=$((4 << 20)) ;;
        1 | 2 | 3 | 4 | 5) sz=$((64 << 10)) ;;
        *) sz=$((4 << 10)) ;;
    esac
    ((sz > remaining)) && sz=$remaining
    dir="$rootfs/usr/lib/d$((i / 100))"
    mkdir -p "$dir"
    head -c "$sz" /dev/urandom >"$dir/f$i"
    remaining=$((remaining - sz))
    i=$((i + 1))
done
files=$(find "$rootfs" -type f | wc -l)
bytes=$(du -sb "$rootfs" | cut -f1)
echo "rootfs: $files files, $((bytes / 1024 / 1024)) MiB"

# Image size: content + 20% + 16 MiB for metadata and the container's writes.
image_mb=$((bytes * 12 / 10 / 1024 / 1024 + 16))

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
time_ms() {
    local start end
    start=$(date +%s%N)
    "$@" >/dev/null 2>&1
    end=$(date +%s%N)
    echo $(((end - start) / 1000000))
}

mkfs_once() {
    local img="${1:-$work/rootfs.img}"
    rm -f "$img"
    truncate -s "${image_mb}M" "$img"
    # No journal: the image is rebuilt, never recovered; lazy init keeps mkfs O(content);
    # nodiscard: the sparse file has nothing to discard. mkfs fsyncs the image at the end.
    mkfs.ext4 -q -F -O ^has_journal -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 \
        -d "$rootfs" "$img"
}
cp_once() {
    rm -rf "$work/copy"
    cp -a "$rootfs" "$work/copy"
}
# The fair reference: mkfs ends with fsync, so the copy must reach the disk too.
cp_sync_once() {
    cp_once
    sync -f "$work/copy"
}

sync
mkfs_ms=$(for _ in $(seq "$runs"); do time_ms mkfs_once; done | median)
# The same into tmpfs: mkfs's own CPU cost, without the disk write-back.
shm_img="/dev/shm/palisade-rootfs-bench.$$.img"
mkfs_shm_ms=$(for _ in $(seq "$runs"); do time_ms mkfs_once "$shm_img"; done | median)
rm -f "$shm_img"
cp_ms=$(for _ in $(seq "$runs"); do time_ms cp_once; done | median)
cp_sync_ms=$(for _ in $(seq "$runs"); do time_ms cp_sync_once; done | median)
alloc=$(du -sb "$work/rootfs.img" | cut -f1)
echo "mkfs.ext4 -d (${image_mb} MiB sparse image): median ${mkfs_ms} ms over $runs runs; image allocates $((alloc / 1024 / 1024)) MiB"
echo "mkfs.ext4 -d into tmpfs (no disk I/O):      median ${mkfs_shm_ms} ms over $runs runs"
echo "cp -a of the same tree (page cache only):   median ${cp_ms} ms over $runs runs"
echo "cp -a + sync (reference, data on disk):     median ${cp_sync_ms} ms over $runs runs"
awk -v a="$mkfs_ms" -v b="$cp_ms" -v c="$cp_sync_ms" \
    'BEGIN { if (b > 0 && c > 0) printf "ratio mkfs/cp: %.2f   mkfs/(cp+sync): %.2f\n", a / b, a / c }'
