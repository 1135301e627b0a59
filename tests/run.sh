#!/usr/bin/env bash
# The test command README.md gives: every test, as root, with real parts.
#   1. unit + integration tests of every crate (real namespaces, cgroups, containerd, KVM
#      smoke tests on this host's /dev/kvm);
#   2. the nested test host (QEMU TCG + kvm-amd) that boots real microVMs with palisade-vmm.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "tests/run.sh: run as root (containers, cgroups, containerd and KVM need it)" >&2
  exit 1
fi
tests/setup.sh
start=$(date +%s)

cargo build --workspace --all-targets
cargo test --workspace
echo "tests: cargo tests passed ($(( $(date +%s) - start )) s)"

tests/test-host/run.sh all
echo "tests: all passed ($(( $(date +%s) - start )) s)"
