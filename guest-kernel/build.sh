#!/usr/bin/env bash
# Build palisade's guest kernel: tinyconfig + config.fragment -> PVH-bootable vmlinux.
#
# Usage: guest-kernel/build.sh
#   BUILD_DIR   output directory        (default: <repo>/build/guest-kernel)
#   KERNEL_SRC  kernel source tree      (default: Debian's linux-source-6.12, untarred into BUILD_DIR)
#   JOBS        make parallelism        (default: nproc)
#   FORCE=1     rebuild even if the stamp matches
#
# Output: $BUILD_DIR/vmlinux (ELF with the PVH entry note) and $BUILD_DIR/config.
# The build is skipped when the fragment hash, the kernel source identity and this
# script are unchanged (stamp file $BUILD_DIR/stamp).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
build_dir="${BUILD_DIR:-$repo/build/guest-kernel}"
fragment="$here/config.fragment"
jobs="${JOBS:-$(nproc)}"
debian_pkg=linux-source-6.12
debian_tarball=/usr/src/linux-source-6.12.tar.xz

log() { echo "guest-kernel: $*" >&2; }

install_deps() {
    local missing=()
    local pkgs=(bc flex bison libelf-dev libssl-dev make gcc)
    [[ -z "${KERNEL_SRC:-}" ]] && pkgs+=("$debian_pkg")
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

# Identity of the kernel source, so a different tree or version forces a rebuild.
source_id() {
    if [[ -n "${KERNEL_SRC:-}" ]]; then
        local rev=""
        if git -C "$KERNEL_SRC" rev-parse HEAD >/dev/null 2>&1; then
            rev="$(git -C "$KERNEL_SRC" rev-parse HEAD)$(git -C "$KERNEL_SRC" diff --quiet || echo -dirty)"
        fi
        echo "tree:$(cd "$KERNEL_SRC" && pwd):$(make -s -C "$KERNEL_SRC" kernelversion):$rev"
    else
        echo "debian:$debian_pkg:$(dpkg-query -W -f='${Version}' "$debian_pkg")"
    fi
}

install_deps
mkdir -p "$build_dir"

stamp_file="$build_dir/stamp"
stamp="$(
    sha256sum "$fragment" "${BASH_SOURCE[0]}" | cut -d' ' -f1
    source_id
)"
if [[ "${FORCE:-0}" != 1 && -f "$build_dir/vmlinux" && -f "$stamp_file" ]] &&
    [[ "$(cat "$stamp_file")" == "$stamp" ]]; then
    log "up to date: $build_dir/vmlinux"
    exit 0
fi
rm -f "$stamp_file"

if [[ -n "${KERNEL_SRC:-}" ]]; then
    src="$(cd "$KERNEL_SRC" && pwd)"
else
    src="$build_dir/$debian_pkg"
    # Re-extract when the packaged version changed (or the tree is missing).
    pkg_version="$(dpkg-query -W -f='${Version}' "$debian_pkg")"
    if [[ ! -f "$src/Makefile" || "$(cat "$build_dir/source-version" 2>/dev/null)" != "$pkg_version" ]]; then
        log "extracting $debian_tarball"
        rm -rf "$src"
        tar -C "$build_dir" -xf "$debian_tarball"
        echo "$pkg_version" >"$build_dir/source-version"
    fi
fi

# Out-of-tree object dir: keeps a user-supplied KERNEL_SRC clean.
obj="$build_dir/obj"
mkdir -p "$obj"
start=$(date +%s)
log "configuring ($src -> $obj)"
make -s -C "$src" O="$obj" tinyconfig
# merge_config lists every overridden tinyconfig value; keep that in a log, not on the terminal.
(cd "$src" && scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" "$fragment") >"$build_dir/merge-config.log"
make -s -C "$src" O="$obj" olddefconfig
log "building vmlinux with -j$jobs"
make -s -C "$src" O="$obj" -j"$jobs" vmlinux

cp "$obj/vmlinux" "$build_dir/vmlinux.tmp" && mv "$build_dir/vmlinux.tmp" "$build_dir/vmlinux"
cp "$obj/.config" "$build_dir/config"
"$here/check-config.sh" "$build_dir/config"
echo "$stamp" >"$stamp_file"
log "built $build_dir/vmlinux ($(stat -c %s "$build_dir/vmlinux") bytes) in $(($(date +%s) - start)) s"
