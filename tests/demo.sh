#!/usr/bin/env bash
# The README's demo: builds palisade and runs a busybox bundle
#   1. natively with the `palisade` CLI and through containerd + palisade's shim;
#   2. inside a palisade microVM: directly when this host's KVM can boot a Linux guest
#      (`palisade check` says so), otherwise inside the nested test host (QEMU TCG + kvm-amd),
#      which is the case on kvm-pvm machines.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "tests/demo.sh: run as root (containers, cgroups and KVM need it)" >&2
  exit 1
fi
tests/setup.sh
cargo build --release --workspace --bins
export PALISADE_BIN_DIR=$PWD/target/release

cargo run --release -q -p palisade-tests --example demo

echo "== microVM =="
if "$PALISADE_BIN_DIR/palisade" check; then
  echo "(this host can boot the guest: the nested test host is not needed, but is what is run here)"
else
  echo "(VM mode cannot boot a Linux guest on this host's KVM: running it in the nested test host)"
fi
tests/test-host/run.sh ctr-vm
