#!/usr/bin/env bash
# The test command README.md gives: every test, as root, with real parts.
#   1. unit + integration tests of every crate (real namespaces, cgroups, containerd + ctr +
#      CRI, KVM smoke tests on this host's /dev/kvm);
#   2. the nested test host (QEMU TCG + kvm-amd) that boots real microVMs with palisade-vmm,
#      including VM mode through containerd (`ctr-vm`);
#   3. the bounded reliability suite (tests/reliability/run.sh --quick: native churn 100,
#      20 concurrent pods, faults, the hostile-input table, VMM seccomp confinement, the test
#      host's VM reliability scenarios if present, cargo-fuzz targets FUZZ_SECONDS each; 15 s here).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "tests/run.sh: run as root (containers, cgroups, containerd and KVM need it)" >&2
  exit 1
fi
tests/setup.sh
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

# The containerd tests run the shim and CLI binaries from the target dir: build them all.
cargo build --workspace --all-targets
cargo test --workspace
echo "tests: cargo tests passed ($(elapsed))"

tests/test-host/run.sh all
echo "tests: nested test host passed ($(elapsed))"

FUZZ_SECONDS=${FUZZ_SECONDS:-15} tests/reliability/run.sh --quick
echo "tests: all passed ($(elapsed))"
