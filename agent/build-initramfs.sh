#!/usr/bin/env bash
# Pack the static palisade-agent as /init into a gzip cpio initramfs.
#
# Usage: agent/build-initramfs.sh [OUTPUT]     (default: <repo>/build/guest/initramfs.cpio.gz)
#   AGENT_BIN=path  use an already built static agent instead of building it
#   CARGO_TARGET_DIR is honoured.
#
# Contents: /init (the agent, static-pie), the directories it mounts on, and /dev/console
# (so the kernel can give init a console before devtmpfs is mounted). Nothing else.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="${1:-$repo/build/guest/initramfs.cpio.gz}"
target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

if [[ -z "${AGENT_BIN:-}" ]]; then
    # The explicit --target keeps build scripts and proc-macros dynamically linked while
    # the agent itself is static.
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --target "$target" -p palisade-agent)
    AGENT_BIN="$target_dir/$target/release/palisade-agent"
fi
if ! file "$AGENT_BIN" | grep -Eq "static(-pie)? linked|statically linked"; then
    echo "build-initramfs: $AGENT_BIN is not statically linked: $(file -b "$AGENT_BIN")" >&2
    exit 1
fi

staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging"/{dev,proc,sys,run,tmp,newroot,etc}
install -m 0755 "$AGENT_BIN" "$staging/init"
mknod -m 0600 "$staging/dev/console" c 5 1
mkdir -p "$(dirname "$out")"
# Reproducible: sorted names, fixed owner and mtime.
(cd "$staging" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    xargs -0 touch -h -d @0 &&
    find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -9n >"$out.tmp"
mv "$out.tmp" "$out"
size=$(stat -c %s "$out")
echo "build-initramfs: $out: $size bytes ($((size / 1024)) KiB; agent $(stat -c %s "$AGENT_BIN") bytes uncompressed)"
if ((size >= 5 * 1024 * 1024)); then
    echo "build-initramfs: warning: initramfs is over the 5 MB goal" >&2
fi
