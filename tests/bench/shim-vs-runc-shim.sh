#!/usr/bin/env bash
# `ctr run --rm IMAGE ID /bin/true` through palisade's shim (io.containerd.palisade.v2)
# vs containerd's runc shim (io.containerd.runc.v2), interleaved in one run against one
# private containerd, plus the resident memory of each shim serving one running task.
# Prints per-round times, medians and ratios (goals: time <= 1.0x, RSS <= 0.5x).
#
#   tests/bench/shim-vs-runc-shim.sh       # 20 rounds, palisade-runtime in-process
#   BENCH_ROUNDS=40 tests/bench/shim-vs-runc-shim.sh
#   PALISADE_RUNTIME_BINARY=/usr/sbin/runc tests/bench/shim-vs-runc-shim.sh
#       # the shim's cli engine on runc: both shims drive runc, isolating the shim's cost
#
# Needs root, containerd/ctr, umoci, busybox-static, and built binaries in
# PALISADE_BIN_DIR (default: target/debug; use a release build for real numbers:
# `cargo build --release -p containerd-shim-palisade-v2 -p palisade-runtime` and
# PALISADE_BIN_DIR=target/release).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
bin_dir=${PALISADE_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/debug}
rounds=${BENCH_ROUNDS:-20}
runtime_binary=${PALISADE_RUNTIME_BINARY:-}
engine=library
[[ -n $runtime_binary ]] && engine=cli

for f in "$bin_dir/containerd-shim-palisade-v2" ${runtime_binary:+"$runtime_binary"}; do
  [[ -x $f ]] || { echo "missing $f (build it first)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/palisade-bench-XXXXXX)
ctrd_pid=
cleanup() {
  set +e
  if [[ -n $ctrd_pid ]]; then
    for id in $(ctr_ tasks ls -q 2>/dev/null); do
      ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1
      sleep 0.2
      ctr_ tasks delete -f "$id" >/dev/null 2>&1
    done
    for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$id" >/dev/null 2>&1; done
    kill "$ctrd_pid" 2>/dev/null
    wait "$ctrd_pid" 2>/dev/null
  fi
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$work" "/run/containerd/runc/$ns"
  for c in /sys/fs/cgroup/*/"$ns"; do [[ -d $c ]] && rmdir "$c"; done
}
trap cleanup EXIT

ns=bench
ctr_() { ctr --address "$work/containerd.sock" --namespace "$ns" "$@"; }

# --- private containerd --------------------------------------------------------------
cat >"$work/palisade.toml" <<EOF
[native]
engine = "$engine"
runtime_binary = "${runtime_binary:-palisade}"
runtime_root = "$work/palisade-root"
EOF
cat >"$work/config.toml" <<EOF
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
[metrics]
  address = ""
EOF
PATH="$bin_dir:$PATH" PALISADE_CONFIG="$work/palisade.toml" \
  containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
ctrd_pid=$!
for _ in $(seq 200); do ctr_ version >/dev/null 2>&1 && break; sleep 0.05; done
ctr_ version >/dev/null

# --- busybox image (same recipe as tests/src/image.rs) --------------------------------
mkdir -p "$work/img/rootfs/bin" "$work/img/rootfs/etc"
cp /bin/busybox "$work/img/rootfs/bin/"
for applet in sh true sleep; do ln -s busybox "$work/img/rootfs/bin/$applet"; done
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/img/rootfs/etc/passwd"
echo 'root:x:0:' >"$work/img/rootfs/etc/group"
umoci init --layout "$work/img/layout"
umoci new --image "$work/img/layout:latest"
umoci insert --image "$work/img/layout:latest" "$work/img/rootfs" /
umoci config --image "$work/img/layout:latest" --config.cmd=/bin/true
tar -C "$work/img/layout" -cf "$work/img/image.tar" .
ctr_ images import --base-name docker.io/palisade/bench "$work/img/image.tar" >/dev/null
image=docker.io/palisade/bench:latest

now_ns() { date +%s%N; }
run_once() { # runtime id -> prints milliseconds
  local start end
  start=$(now_ns)
  ctr_ run --rm --runtime "$1" "$image" "$2" /bin/true >/dev/null
  end=$(now_ns)
  echo $(((end - start) / 1000))
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# Warm-up (page cache, first shim exec) for both, not counted.
run_once io.containerd.runc.v2 warm-r >/dev/null
run_once io.containerd.palisade.v2 warm-p >/dev/null

printf '%-6s %14s %14s\n' round "runc-shim(ms)" "palisade(ms)"
: >"$work/runc.txt"
: >"$work/palisade.txt"
for i in $(seq "$rounds"); do
  # Alternate which goes first so neither always runs on a warmer system.
  if ((i % 2)); then
    r=$(run_once io.containerd.runc.v2 "r$i"); p=$(run_once io.containerd.palisade.v2 "p$i")
  else
    p=$(run_once io.containerd.palisade.v2 "p$i"); r=$(run_once io.containerd.runc.v2 "r$i")
  fi
  echo "$r" >>"$work/runc.txt"; echo "$p" >>"$work/palisade.txt"
  printf '%-6s %14.1f %14.1f\n' "$i" "$(echo "$r/1000" | bc -l)" "$(echo "$p/1000" | bc -l)"
done
mr=$(median <"$work/runc.txt"); mp=$(median <"$work/palisade.txt")
printf '\nctr run --rm median: runc shim %.1f ms, palisade shim %.1f ms, ratio %.2fx (goal <= 1.0x)\n' \
  "$(echo "$mr/1000" | bc -l)" "$(echo "$mp/1000" | bc -l)" "$(echo "$mp/$mr" | bc -l)"

# --- shim RSS with one running task each ----------------------------------------------
shim_rss_kb() { # container id -> VmRSS (kB) of the shim serving it
  local pid
  for pid in $(pgrep -f "containerd-shim"); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-address $work/containerd.sock"; then
      if [[ $(tr '\0' ' ' <"/proc/$pid/cmdline") == *"-id $1 "* ]]; then
        awk '/^VmRSS/ {print $2}' "/proc/$pid/status"
        awk '/^(RssAnon|RssFile|Threads)/ {printf "  %s %s %s\n", $1, $2, $3}' "/proc/$pid/status" >&2
        if [[ -n ${BENCH_VERBOSE:-} ]]; then # resident kB per mapped file
          awk '/^[0-9a-f]+-[0-9a-f]+ / {f=$2" "$6} /^Rss:/ {r[f]+=$2} END {for (f in r) if (r[f] > 100) printf "    %6d kB %s\n", r[f], f}' \
            "/proc/$pid/smaps" | sort -rn >&2
        fi
        return
      fi
    fi
  done
  echo 0
}
ctr_ run -d --runtime io.containerd.runc.v2 "$image" rss-r /bin/sleep 1000 >/dev/null
ctr_ run -d --runtime io.containerd.palisade.v2 "$image" rss-p /bin/sleep 1000 >/dev/null
sleep 0.5
rr=$(shim_rss_kb rss-r); rp=$(shim_rss_kb rss-p)
printf 'shim RSS with one task: runc shim %d kB, palisade shim %d kB, ratio %.2fx (goal <= 0.5x)\n' \
  "$rr" "$rp" "$(echo "$rp/$rr" | bc -l)"
echo "(palisade shim engine: $engine${runtime_binary:+ on $runtime_binary}; binaries from $bin_dir)"
