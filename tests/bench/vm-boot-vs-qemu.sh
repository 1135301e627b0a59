#!/usr/bin/env bash
# Guest-ready time and RSS of palisade-vmm vs QEMU's microvm machine, side by side in one
# run of the nested test host (real KVM inside QEMU TCG; see tests/test-host/README.md).
# Both VMMs boot the same guest vmlinux + initramfs (agent as PID 1) with 256 MiB, 1 vCPU and
# a vsock device; rounds are interleaved. Prints per-round numbers, medians and the ratio
# (goal: palisade-vmm ≤ 0.8 × QEMU).
#
#   tests/bench/vm-boot-vs-qemu.sh            # 5 rounds
#   BENCH_ROUNDS=9 tests/bench/vm-boot-vs-qemu.sh
#
# Timings are TCG-nested: compare the ratio, not the absolute milliseconds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PALISADE_TEST_HOST_EXTRA_APPEND="palisade.bench_rounds=${BENCH_ROUNDS:-5}" \
  exec "$here/../test-host/run.sh" bench
