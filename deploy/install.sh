#!/usr/bin/env bash
# Installs palisade on one host: the shim, CLI and VMM, the guest kernel + initramfs, the
# shim configs, and containerd's two runtime handlers (`palisade` = VM, `palisade-native`).
# Then restarts containerd and runs `palisade check` (VM-mode readiness).
#
#   deploy/install.sh [--root DIR] [--bin-dir DIR] [--guest-dir DIR] [--no-restart]
#
#   --bin-dir    where containerd-shim-palisade-v2, palisade, palisade-vmm are
#                (default: target/x86_64-unknown-linux-gnu/release, then target/release)
#   --guest-dir  where vmlinux and initramfs.cpio.gz are (default: build/guest-kernel and
#                build/guest of the repo)
#   --root       install below DIR instead of / (used by the DaemonSet, which mounts the
#                node's / there); containerd is then restarted through nsenter -t 1
#   --no-restart do not restart containerd
#
# Idempotent: existing /etc/palisade/*.toml are kept; the containerd snippet is appended
# only when the config does not define the palisade handlers yet (a backup is kept).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
root=/
bin_dir=
guest_dir=
restart=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --root) root=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --guest-dir) guest_dir=$2; shift 2 ;;
    --no-restart) restart=0; shift ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "install.sh: error: $*" >&2; exit 1; }
log() { echo "install.sh: $*"; }
root=${root%/}

if [[ -z $bin_dir ]]; then
  for d in "$repo/target/x86_64-unknown-linux-gnu/release" "$repo/target/release"; do
    [[ -x $d/containerd-shim-palisade-v2 ]] && { bin_dir=$d; break; }
  done
fi
[[ -n $bin_dir ]] || die "no built binaries found; pass --bin-dir (cargo build --release first)"
for b in containerd-shim-palisade-v2 palisade palisade-vmm; do
  [[ -x $bin_dir/$b ]] || die "$bin_dir/$b is missing"
done
kernel=${guest_dir:+$guest_dir/vmlinux}
kernel=${kernel:-$repo/build/guest-kernel/vmlinux}
initramfs=${guest_dir:+$guest_dir/initramfs.cpio.gz}
initramfs=${initramfs:-$repo/build/guest/initramfs.cpio.gz}

install -d "$root/usr/local/bin" "$root/usr/share/palisade" "$root/etc/palisade"
for b in containerd-shim-palisade-v2 palisade palisade-vmm; do
  install -m 0755 "$bin_dir/$b" "$root/usr/local/bin/$b"
done
log "installed binaries to $root/usr/local/bin"
if [[ -f $kernel && -f $initramfs ]]; then
  install -m 0644 "$kernel" "$root/usr/share/palisade/vmlinux"
  install -m 0644 "$initramfs" "$root/usr/share/palisade/initramfs.cpio.gz"
  log "installed the guest kernel and initramfs to $root/usr/share/palisade"
else
  log "warning: no guest kernel/initramfs ($kernel, $initramfs): VM mode will not work"
fi
for c in configuration.toml configuration-vm.toml; do
  if [[ -e $root/etc/palisade/$c ]]; then
    log "keeping existing $root/etc/palisade/$c"
  else
    install -m 0644 "$here/$c" "$root/etc/palisade/$c"
  fi
done

# containerd: the runtime handlers, in the config version this containerd speaks.
containerd_config=$root/etc/containerd/config.toml
containerd_version=$( (chroot "$root" containerd --version 2>/dev/null || containerd --version 2>/dev/null || true) |
  sed -n 's/.* v\{0,1\}\([0-9][0-9]*\)\.\([0-9][0-9]*\)\..*/\1/p' | head -1)
case ${containerd_version:-1} in
  1) snippet=$here/containerd/config-1.6.toml ;;
  *) snippet=$here/containerd/config-2.x.toml ;;
esac
install -d "$(dirname "$containerd_config")"
if [[ -f $containerd_config ]] && grep -q 'runtimes.palisade\]' "$containerd_config"; then
  log "containerd config already has the palisade handlers"
else
  if [[ -f $containerd_config ]]; then
    cp "$containerd_config" "$containerd_config.before-palisade"
  else
    (chroot "$root" containerd config default 2>/dev/null || containerd config default) >"$containerd_config"
  fi
  # The snippet's own `version =` line is the config's already.
  { echo; echo "# --- palisade (deploy/install.sh) ---"; grep -v '^version *=' "$snippet"; } >>"$containerd_config"
  log "added the palisade runtime handlers to $containerd_config ($(basename "$snippet"))"
fi

if [[ $restart = 1 ]]; then
  if [[ $root = "" || $root = / ]]; then
    systemctl restart containerd
  else
    nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd
  fi
  log "restarted containerd"
fi

# Readiness report; VM mode may be unavailable on this host (nonzero), native still works.
if chroot "${root:-/}" /usr/local/bin/palisade check --config /etc/palisade/configuration-vm.toml; then
  log "VM mode ready"
else
  log "VM mode NOT ready on this host (see above); RuntimeClass palisade-native still works"
  exit 3
fi
