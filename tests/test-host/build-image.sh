#!/usr/bin/env bash
# Builds the nested test host ("L1"): a Debian cloud kernel plus one initramfs holding
# busybox (as /init), the kvm-amd modules, qemu-system-x86_64 (reference VMM for the
# benchmark and the rig's own smoke test), the palisade binaries (static), the guest kernel
# and guest initramfs, and the scenario scripts. run.sh boots it under QEMU TCG `-cpu max`,
# whose emulated AMD CPU has SVM, so /dev/kvm inside is real KVM (see
# /work/shared/ENVIRONMENT.md).
#
# Everything is rebuilt from Debian packages and the repo; downloads and compiled helpers are
# cached by content under $PALISADE_TEST_HOST_CACHE (default build/test-host/cache), so a
# rerun only re-packs the initramfs (~1 s). An empty cache rebuilds everything.
#
# Output (paths printed at the end; run.sh reads them from build/test-host/image.env):
#   build/test-host/vmlinuz   the L1 kernel
#   build/test-host/l1.cpio   the L1 initramfs (uncompressed: unpacking gzip under TCG
#                             costs more than copying the bytes)
#
# Components built by other areas are built through their own scripts; when one is not
# available yet the image records that in /palisade/components and the scenarios that need
# it fail saying which component is missing (they never fake a result).
#
# Needs: apt-get (Debian repo access), dpkg-deb, busybox-static, qemu-system-x86, cpio,
# rustc + cargo. Runs as any user that can write build/; apt-get download needs no root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build_dir=${PALISADE_BUILD_DIR:-$repo/build}
out=$build_dir/test-host
cache=${PALISADE_TEST_HOST_CACHE:-$out/cache}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
# The L1 kernel: Debian's cloud flavour (small, has kvm-amd as a module). Override with a
# .deb path to pin a version.
kernel_meta=${PALISADE_TEST_HOST_KERNEL_PKG:-linux-image-cloud-amd64}
kernel_deb=${PALISADE_TEST_HOST_KERNEL_DEB:-}
# PALISADE_TEST_HOST_PREBUILT=1: do not run cargo or the other areas' build scripts; take
# whatever binaries, guest kernel and initramfs already exist (e.g. while iterating on the
# scenarios, or while another engineer's build of the same tree is running).
prebuilt=${PALISADE_TEST_HOST_PREBUILT:-0}

log() { echo "build-image: $*" >&2; }
# Static (or static-pie) ELF? ldd (libc-bin) is always there, file(1) may not be.
# (ldd exits 1 for static binaries: capture first, pipefail would otherwise bite.)
is_static() {
  local out
  out=$(ldd "$1" 2>&1 || true)
  grep -Eq 'statically linked|not a dynamic executable' <<<"$out"
}
die() { echo "build-image: error: $*" >&2; exit 1; }

mkdir -p "$out" "$cache/debs"

# --- 1. L1 kernel + modules from the Debian package -------------------------------------
fetch_kernel_deb() {
  if [[ -n $kernel_deb ]]; then
    [[ -f $kernel_deb ]] || die "PALISADE_TEST_HOST_KERNEL_DEB=$kernel_deb does not exist"
    echo "$kernel_deb"
    return
  fi
  # The meta package depends on the current ABI package (linux-image-6.1.0-N-cloud-amd64).
  local pkg
  pkg=$(apt-cache depends "$kernel_meta" 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [[ -n $pkg ]] || die "cannot resolve $kernel_meta to a kernel package (apt-get update?)"
  local ver
  ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
  local deb="$cache/debs/${pkg}_${ver}_amd64.deb"
  if [[ ! -s $deb ]]; then
    log "downloading $pkg $ver"
    local tmp
    tmp=$(mktemp -d "$cache/debs/dl.XXXXXX")
    # apt-get download writes into the current directory; the _apt sandbox warning for a
    # root-owned directory is harmless.
    (cd "$tmp" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
      { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
    mv "$tmp"/*.deb "$deb"
    rmdir "$tmp"
  fi
  echo "$deb"
}

deb=$(fetch_kernel_deb)
# The extraction is keyed by package and by the module list below (bump when it changes).
kdir="$cache/kernel-$(basename "$deb" .deb)-m4"
if [[ ! -f $kdir/.done ]]; then
  log "extracting $(basename "$deb")"
  rm -rf "$kdir" && mkdir -p "$kdir/x"
  dpkg-deb -x "$deb" "$kdir/x"
  kver=$(ls "$kdir/x/lib/modules")
  cp "$kdir/x/boot/vmlinuz-$kver" "$kdir/vmlinuz"
  mkdir -p "$kdir/modules"
  # Load order matters (kvm needs irqbypass, kvm-amd needs kvm); overlay and loop serve the
  # containerd scenarios; the vhost-vsock stack gives the reference VMM (QEMU) the same vsock
  # device palisade-vmm has, so the benchmark compares like with like; tun, veth and the tc
  # ingress qdisc / u32 classifier / mirred action serve pod networking (`net`, `net-bench`:
  # the shim's tap + tc mirroring); llc, stp and bridge serve CNI's bridge plugin (`cri-vm`'s
  # CNI pod). Modules may be xz/zstd-compressed in newer packages.
  for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd fs/overlayfs/overlay \
    drivers/block/loop net/vmw_vsock/vsock net/vmw_vsock/vmw_vsock_virtio_transport_common \
    drivers/vhost/vhost_iotlb drivers/vhost/vhost drivers/vhost/vhost_vsock \
    drivers/net/tun drivers/net/veth net/sched/sch_ingress net/sched/cls_u32 net/sched/act_mirred \
    net/llc/llc net/802/stp net/bridge/bridge; do
    src="$kdir/x/lib/modules/$kver/kernel/$m"
    name=$(basename "$m")
    if [[ -f $src.ko ]]; then
      cp "$src.ko" "$kdir/modules/$name.ko"
    elif [[ -f $src.ko.xz ]]; then
      xz -dc "$src.ko.xz" >"$kdir/modules/$name.ko"
    elif [[ -f $src.ko.zst ]]; then
      zstd -qdc "$src.ko.zst" >"$kdir/modules/$name.ko"
    else
      die "module $m not found in $(basename "$deb")"
    fi
    echo "$name.ko" >>"$kdir/modules/order"
  done
  echo "$kver" >"$kdir/kver"
  rm -rf "$kdir/x"
  touch "$kdir/.done"
fi
cp "$kdir/vmlinuz" "$out/vmlinuz"

# --- 2. The rig's helper (std-only Rust, compiled with rustc, no crate) ------------------
helper_src="$here/helper/th-helper.rs"
helper_hash=$( (sha256sum "$helper_src"; rustc --version) | sha256sum | cut -c1-16)
helper_bin="$cache/th-helper-$helper_hash"
if [[ ! -x $helper_bin ]]; then
  log "compiling th-helper"
  rustc --edition 2021 -O -C target-feature=+crt-static --target x86_64-unknown-linux-gnu \
    -o "$helper_bin.tmp" "$helper_src"
  mv "$helper_bin.tmp" "$helper_bin"
fi

# --- 3. palisade binaries, guest kernel, guest initramfs ---------------------------------
# Each line of components.txt: "<name> ok|missing <detail>". Scenarios read it.
components=$(mktemp)
trap 'rm -f "$components"' EXIT
component() { echo "$*" >>"$components"; }

static_bins=(palisade-vmm)
cargo_failed=0
if [[ $prebuilt != 1 ]]; then
  log "building static palisade binaries (${static_bins[*]}) in $target_dir"
  pkgs=()
  for b in "${static_bins[@]}"; do pkgs+=(-p "$b"); done
  # The explicit --target keeps build scripts and proc-macros dynamic while the binaries are
  # static-pie (no libc needed inside L1).
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target_dir \
    cargo build --quiet --release --target x86_64-unknown-linux-gnu "${pkgs[@]}" >&2 ||
    { cargo_failed=1; log "cargo build of ${static_bins[*]} failed (errors above); scenarios needing it will say so"; }
fi
bin_dir="$target_dir/x86_64-unknown-linux-gnu/release"

# PALISADE_TEST_HOST_GUEST_KERNEL / _GUEST_INITRAMFS: test these artefacts instead of
# building the repo's (e.g. another kernel tree's vmlinux); no build script is run for them.
guest_kernel=${PALISADE_TEST_HOST_GUEST_KERNEL:-$build_dir/guest-kernel/vmlinux}
guest_kernel_failed=
if [[ $prebuilt != 1 && -z ${PALISADE_TEST_HOST_GUEST_KERNEL:-} && -x $repo/guest-kernel/build.sh ]]; then
  log "guest kernel: guest-kernel/build.sh (skips itself when up to date)"
  BUILD_DIR="$build_dir/guest-kernel" "$repo/guest-kernel/build.sh" >&2 ||
    guest_kernel_failed="guest-kernel/build.sh failed (errors above)"
fi
if [[ -n $guest_kernel_failed ]]; then
  component guest-kernel missing "$guest_kernel_failed"
  guest_kernel=/nonexistent # never test a stale kernel
elif [[ -f $guest_kernel ]]; then
  component guest-kernel ok "$guest_kernel"
else
  component guest-kernel missing "no $guest_kernel (guest-kernel/build.sh)"
fi

guest_initramfs=${PALISADE_TEST_HOST_GUEST_INITRAMFS:-$build_dir/guest/initramfs.cpio.gz}
guest_initramfs_failed=
if [[ $prebuilt != 1 && -z ${PALISADE_TEST_HOST_GUEST_INITRAMFS:-} && -x $repo/agent/build-initramfs.sh ]]; then
  log "guest initramfs: agent/build-initramfs.sh"
  CARGO_TARGET_DIR=$target_dir "$repo/agent/build-initramfs.sh" "$guest_initramfs" >&2 ||
    guest_initramfs_failed="agent/build-initramfs.sh failed (errors above)"
fi
if [[ -n $guest_initramfs_failed ]]; then
  component guest-initramfs missing "$guest_initramfs_failed"
  guest_initramfs=/nonexistent # never test a stale initramfs
elif [[ -f $guest_initramfs ]]; then
  component guest-initramfs ok "$guest_initramfs"
else
  component guest-initramfs missing "no $guest_initramfs (agent/build-initramfs.sh)"
fi

# --- 4. Stage the L1 root ---------------------------------------------------------------
root="$out/root"
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules,palisade/scenarios,palisade/bin,palisade/guest,usr/share/qemu}

busybox=$(command -v busybox) || die "busybox not found (apt-get install busybox-static)"
is_static "$busybox" || die "$busybox is not static (install busybox-static)"
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"

cp "$here/init" "$root/init"
chmod 755 "$root/init"
cp "$here"/scenarios/*.sh "$root/palisade/scenarios/"
cp "$helper_bin" "$root/palisade/bin/th-helper"
cp "$kdir"/modules/*.ko "$kdir/modules/order" "$root/lib/modules/"

# qemu-system-x86_64 (dynamic): binary, its libraries, the firmware microvm loads. Only the
# KVM accelerator is used inside L1, so no accel/ui modules are needed.
qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
copy_with_libs() {
  local bin=$1 dest=$2
  cp "$bin" "$dest"
  ldd "$bin" | awk '/=> \// {print $3} /^\t\/lib64/ {print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    [[ -e $root$lib ]] || cp -L "$lib" "$root$lib"
  done
}
mkdir -p "$root/usr/bin"
copy_with_libs "$qemu" "$root/usr/bin/qemu-system-x86_64"
# qemu finds its data relative to the binary (../share/qemu).
for f in bios-microvm.bin linuxboot_dma.bin pvh.bin; do
  cp "/usr/share/qemu/$f" "$root/usr/share/qemu/"
done
# The rig's self-test guest (L2): Debian's own kernel and a busybox initramfs, so `smoke`
# depends on nothing from the other areas.
cp "$kdir/vmlinuz" "$root/palisade/guest/debian-vmlinuz"
smoke_root=$(mktemp -d)
mkdir -p "$smoke_root/bin" "$smoke_root/proc" "$smoke_root/dev"
cp "$busybox" "$smoke_root/bin/busybox"
cp "$here/smoke-guest/init" "$smoke_root/init"
chmod 755 "$smoke_root/init"
(cd "$smoke_root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$root/palisade/guest/smoke-initramfs.cpio"
rm -rf "$smoke_root"
component qemu ok "$($qemu --version | head -1)"

for b in "${static_bins[@]}"; do
  if [[ $cargo_failed == 1 ]]; then
    # Never test a stale binary left by an earlier build.
    component "$b" missing "cargo build failed"
  elif [[ -x $bin_dir/$b ]] && is_static "$bin_dir/$b"; then
    cp "$bin_dir/$b" "$root/palisade/bin/$b"
    component "$b" ok "$(stat -c %s "$bin_dir/$b") bytes"
  else
    component "$b" missing "no static $bin_dir/$b"
  fi
done
[[ -f $guest_kernel ]] && cp "$guest_kernel" "$root/palisade/guest/vmlinux"
[[ -f $guest_initramfs ]] && cp "$guest_initramfs" "$root/palisade/guest/initramfs.cpio.gz"

# The `container` scenario's rootfs: a busybox tree in an ext4 image (what the agent mounts
# from a virtio-blk drive), and the bundle's config.json.
rootfs_dir=$(mktemp -d)
mkdir -p "$rootfs_dir"/{bin,dev,proc,sys,tmp,etc,root}
cp "$busybox" "$rootfs_dir/bin/busybox"
for applet in sh echo cat uname hostname sleep ls id true false; do
  ln -s busybox "$rootfs_dir/bin/$applet"
done
mkdir -p "$root/palisade/container"
mkfs.ext4 -q -F -L palisade-rootfs -d "$rootfs_dir" "$root/palisade/container/rootfs.ext4" 16M >/dev/null ||
  die "mkfs.ext4 -d failed (apt-get install e2fsprogs)"
rm -rf "$rootfs_dir"
cp "$here/container/config.json" "$root/palisade/container/config.json"

# >>> shim-vm block (engineer "shimvm", issue 7): what ctr-vm / cri-vm need ------------
# containerd + ctr (Debian's, with their libraries), the static shim with its VM sandbox,
# mke2fs (the shim writes each container's rootfs into an ext4 image with mkfs.ext4 -d)
# and a busybox OCI image archive for `ctr image import` (umoci, cached by busybox).
shim_vm_missing=
if [[ $prebuilt != 1 ]]; then
  log "building the static shim (containerd-shim-palisade-v2)"
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target_dir \
    cargo build --quiet --release --target x86_64-unknown-linux-gnu -p containerd-shim-palisade-v2 >&2 ||
    shim_vm_missing="cargo build of containerd-shim-palisade-v2 failed (errors above)"
fi
shim_bin=$bin_dir/containerd-shim-palisade-v2
if [[ -z $shim_vm_missing ]] && { [[ ! -x $shim_bin ]] || ! is_static "$shim_bin"; }; then
  shim_vm_missing="no static $shim_bin"
fi
for tool in containerd ctr mke2fs umoci; do
  command -v $tool >/dev/null || shim_vm_missing="${shim_vm_missing:+$shim_vm_missing; }$tool not installed"
done
if [[ -z $shim_vm_missing ]]; then
  cp "$shim_bin" "$root/palisade/bin/containerd-shim-palisade-v2"
  copy_with_libs "$(command -v containerd)" "$root/usr/bin/containerd"
  copy_with_libs "$(command -v ctr)" "$root/usr/bin/ctr"
  # In /palisade/bin (first on PATH) so busybox's own mke2fs applet never shadows it.
  copy_with_libs "$(command -v mke2fs)" "$root/palisade/bin/mke2fs"
  ln -sf mke2fs "$root/palisade/bin/mkfs.ext4"
  cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
  image_key=$( (sha256sum "$busybox"; umoci --version) | sha256sum | cut -c1-16)
  image_tar="$cache/busybox-oci-$image_key.tar"
  if [[ ! -s $image_tar ]]; then
    log "building the busybox OCI image (umoci)"
    img_dir=$(mktemp -d)
    mkdir -p "$img_dir"/rootfs/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,run,var}
    cp "$busybox" "$img_dir/rootfs/bin/busybox"
    for applet in $("$busybox" --list); do
      [[ $applet == busybox ]] || ln -sf busybox "$img_dir/rootfs/bin/$applet"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$img_dir/rootfs/etc/passwd"
    echo 'root:x:0:' >"$img_dir/rootfs/etc/group"
    umoci init --layout "$img_dir/layout" >&2
    umoci new --image "$img_dir/layout:latest" >&2
    umoci insert --image "$img_dir/layout:latest" "$img_dir/rootfs" / >&2
    umoci config --image "$img_dir/layout:latest" --config.cmd=/bin/sh \
      --config.env=PATH=/usr/sbin:/usr/bin:/sbin:/bin --config.workingdir=/ >&2
    umoci gc --layout "$img_dir/layout" >&2
    tar -C "$img_dir/layout" -cf "$image_tar.tmp" .
    mv "$image_tar.tmp" "$image_tar"
    rm -rf "$img_dir"
  fi
  mkdir -p "$root/palisade/images"
  cp "$image_tar" "$root/palisade/images/busybox.tar"
  component shim-vm ok "$($root/usr/bin/ctr --version 2>/dev/null || echo ctr), shim $(stat -c %s "$shim_bin") bytes"
else
  component shim-vm missing "$shim_vm_missing"
fi
# <<< shim-vm block -------------------------------------------------------------------

# >>> cri-vm block (issue 7: cri-vm, palisade check, ctr-bench) -------------------------
# The static `palisade` CLI (`palisade check`), the static CRI client of the cri-vm
# scenario (tests/src/bin/cri-vm-check.rs), a pod "pause" image, containerd's runc shim +
# runc with their libraries (the benchmark's reference) and the deploy/ files the
# scenarios use as shipped.
cri_vm_missing=
if [[ $prebuilt != 1 ]]; then
  log "building the static palisade CLI and cri-vm-check"
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target_dir \
    cargo build --quiet --release --target x86_64-unknown-linux-gnu \
    -p palisade-runtime -p palisade-tests --bin palisade --bin cri-vm-check >&2 ||
    cri_vm_missing="cargo build of palisade / cri-vm-check failed (errors above)"
fi
for b in palisade cri-vm-check; do
  if [[ -z $cri_vm_missing ]] && { [[ ! -x $bin_dir/$b ]] || ! is_static "$bin_dir/$b"; }; then
    cri_vm_missing="no static $bin_dir/$b"
  fi
done
if [[ -z $cri_vm_missing ]]; then
  cp "$bin_dir/palisade" "$bin_dir/cri-vm-check" "$root/palisade/bin/"
  mkdir -p "$root/palisade/deploy"
  cp "$repo/deploy/containerd/config-1.6.toml" "$repo/deploy/configuration-vm.toml" "$root/palisade/deploy/"
  pause_key=$( (sha256sum "$busybox"; umoci --version; echo pause-v1) | sha256sum | cut -c1-16)
  pause_tar="$cache/pause-oci-$pause_key.tar"
  if [[ ! -s $pause_tar ]]; then
    log "building the pause OCI image (umoci)"
    img_dir=$(mktemp -d)
    mkdir -p "$img_dir"/rootfs/{bin,proc,sys,dev,etc,tmp}
    cp "$busybox" "$img_dir/rootfs/bin/busybox"
    for applet in sh sleep; do ln -s busybox "$img_dir/rootfs/bin/$applet"; done
    umoci init --layout "$img_dir/layout" >&2
    umoci new --image "$img_dir/layout:latest" >&2
    umoci insert --image "$img_dir/layout:latest" "$img_dir/rootfs" / >&2
    # Sleeps until stopped; a shell as PID 1 ignores signals it has no trap for.
    umoci config --image "$img_dir/layout:latest" --config.cmd=/bin/sh --config.cmd=-c \
      --config.cmd="trap 'exit 0' TERM INT; while :; do sleep 1; done" \
      --config.env=PATH=/bin --config.workingdir=/ >&2
    umoci gc --layout "$img_dir/layout" >&2
    tar -C "$img_dir/layout" -cf "$pause_tar.tmp" .
    mv "$pause_tar.tmp" "$pause_tar"
    rm -rf "$img_dir"
  fi
  mkdir -p "$root/palisade/images"
  cp "$pause_tar" "$root/palisade/images/pause.tar"
  component cri-vm ok "palisade $(stat -c %s "$bin_dir/palisade") bytes, cri-vm-check $(stat -c %s "$bin_dir/cri-vm-check") bytes"
else
  component cri-vm missing "$cri_vm_missing"
fi
runc_missing=
for tool in runc containerd-shim-runc-v2; do
  command -v $tool >/dev/null || runc_missing="${runc_missing:+$runc_missing; }$tool not installed"
done
if [[ -z $runc_missing ]]; then
  copy_with_libs "$(command -v containerd-shim-runc-v2)" "$root/usr/bin/containerd-shim-runc-v2"
  mkdir -p "$root/usr/sbin"
  copy_with_libs "$(command -v runc)" "$root/usr/sbin/runc"
  component runc-shim ok "$(runc --version | head -1)"
else
  component runc-shim missing "$runc_missing"
fi
# <<< cri-vm block --------------------------------------------------------------------
# >>> net block (issue 9): what `net` and `net-bench` need -------------------------------
# iproute2's ip and tc (busybox's ip has no netns or veth peers), iperf3 (Debian's, with
# its libraries) in L1, and an OCI image of busybox + iperf3 for the container side.
net_missing=
for tool in ip tc iperf3; do
  command -v $tool >/dev/null || net_missing="${net_missing:+$net_missing; }$tool not installed"
done
if [[ -z $net_missing ]]; then
  # The scenarios call them by path (lib-net.sh): busybox sh prefers its own ip applet.
  for tool in ip tc iperf3; do
    copy_with_libs "$(command -v $tool)" "$root/palisade/bin/$tool"
  done
  iperf3_bin=$(command -v iperf3)
  net_image_key=$( (echo opt-v2; sha256sum "$busybox" "$iperf3_bin" $(ldd "$iperf3_bin" | awk '/=> \// {print $3}'); umoci --version) | sha256sum | cut -c1-16)
  net_image_tar="$cache/net-oci-$net_image_key.tar"
  if [[ ! -s $net_image_tar ]]; then
    log "building the net OCI image (busybox + iperf3, umoci)"
    img_dir=$(mktemp -d)
    mkdir -p "$img_dir"/rootfs/{bin,usr/bin,etc,root,tmp,proc,sys,dev,run,var}
    cp "$busybox" "$img_dir/rootfs/bin/busybox"
    for applet in $("$busybox" --list); do
      [[ $applet == busybox ]] || ln -sf busybox "$img_dir/rootfs/bin/$applet"
    done
    # iperf3 with its own glibc under /opt/iperf3, started through that glibc's loader: no
    # glibc in /lib, where the static busybox's NSS code would find (and crash on) it.
    mkdir -p "$img_dir/rootfs/opt/iperf3/lib"
    cp "$iperf3_bin" "$img_dir/rootfs/opt/iperf3/iperf3"
    ldd "$iperf3_bin" | awk '/=> \// {print $3} /^\t\/lib64/ {print $1}' | while read -r lib; do
      cp -L "$lib" "$img_dir/rootfs/opt/iperf3/lib/"
    done
    printf '#!/bin/sh\nexec /opt/iperf3/lib/ld-linux-x86-64.so.2 --library-path /opt/iperf3/lib /opt/iperf3/iperf3 "$@"\n' \
      >"$img_dir/rootfs/usr/bin/iperf3"
    chmod 755 "$img_dir/rootfs/usr/bin/iperf3"
    echo 'root:x:0:0:root:/root:/bin/sh' >"$img_dir/rootfs/etc/passwd"
    echo 'root:x:0:' >"$img_dir/rootfs/etc/group"
    umoci init --layout "$img_dir/layout" >&2
    umoci new --image "$img_dir/layout:latest" >&2
    umoci insert --image "$img_dir/layout:latest" "$img_dir/rootfs" / >&2
    umoci config --image "$img_dir/layout:latest" --config.cmd=/bin/sh \
      --config.env=PATH=/usr/sbin:/usr/bin:/sbin:/bin --config.workingdir=/ >&2
    umoci gc --layout "$img_dir/layout" >&2
    tar -C "$img_dir/layout" -cf "$net_image_tar.tmp" .
    mv "$net_image_tar.tmp" "$net_image_tar"
    rm -rf "$img_dir"
  fi
  mkdir -p "$root/palisade/images"
  cp "$net_image_tar" "$root/palisade/images/net.tar"
  component net-tools ok "$(iperf3 --version | head -1)"
else
  component net-tools missing "$net_missing"
fi
# <<< net block -------------------------------------------------------------------------
# >>> cni block (issue 9): CNI plugins for cri-vm's CNI pod ------------------------------
# Debian's containernetworking-plugins: bridge + host-local build the pod's network, loopback
# is what containerd's CRI plugin runs for every pod's `lo`. Go binaries linked against glibc
# only (copy_with_libs). No portmap: it programs iptables, which L1 does not have.
cni_missing=
cni_plugins=(bridge host-local loopback)
for p in "${cni_plugins[@]}"; do
  [[ -x /usr/lib/cni/$p ]] || cni_missing="${cni_missing:+$cni_missing; }no /usr/lib/cni/$p (apt-get install containernetworking-plugins)"
done
if [[ -z $cni_missing ]]; then
  mkdir -p "$root/usr/lib/cni"
  for p in "${cni_plugins[@]}"; do
    copy_with_libs "/usr/lib/cni/$p" "$root/usr/lib/cni/$p"
  done
  component cni ok "containernetworking-plugins $(dpkg-query -W -f='${Version}' containernetworking-plugins 2>/dev/null || echo '?'): ${cni_plugins[*]}"
else
  component cni missing "$cni_missing"
fi
# <<< cni block -------------------------------------------------------------------------

cp "$components" "$root/palisade/components"

# --- 5. Pack ----------------------------------------------------------------------------
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$out/l1.cpio.tmp"
mv "$out/l1.cpio.tmp" "$out/l1.cpio"
cat >"$out/image.env" <<EOF
L1_KERNEL=$out/vmlinuz
L1_INITRD=$out/l1.cpio
L1_KERNEL_PKG=$(basename "$deb")
EOF
log "image: $out/vmlinuz + $out/l1.cpio ($(du -h "$out/l1.cpio" | cut -f1)); components:"
sed 's/^/build-image:   /' "$root/palisade/components" >&2
