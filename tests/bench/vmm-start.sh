#!/usr/bin/env bash
# VMM start-up benchmark on this machine's KVM: palisade-vmm vs QEMU's microvm machine,
# interleaved rounds, same tiny guest (prints "OK" on COM1, then spins), same memory.
#
# Reports process start -> first serial byte (median/min/max) and RSS outside guest RAM
# (goal for palisade-vmm: <= 5 MiB), and the palisade/qemu ratios.
#
# Usage: tests/bench/vmm-start.sh [ROUNDS]      (default 20; env QEMU=... to pick QEMU,
#        QEMU=none to skip the reference; PALISADE_VMM=... to use a prebuilt binary)
# Needs: root, /dev/kvm, qemu-system-x86 (apt). Takes ~10 s plus the release build.
#
# The full-Linux boot comparison (guest ready, same vmlinux/initramfs) runs in the nested
# test host: tests/test-host/run.sh bench.
set -euo pipefail

rounds=${1:-20}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

cargo build --release -q -p palisade-vmm --bin palisade-vmm --example vmm-start-bench
target=${CARGO_TARGET_DIR:-$repo/target}
vmm=${PALISADE_VMM:-$target/release/palisade-vmm}
driver=$target/release/examples/vmm-start-bench

qemu=${QEMU:-$(command -v qemu-system-x86_64 || true)}
[ "$qemu" = none ] && qemu=

echo "palisade-vmm: $vmm"
echo "reference:    ${qemu:-none}"
exec "$driver" "$vmm" "$rounds" ${qemu:+"$qemu"}
