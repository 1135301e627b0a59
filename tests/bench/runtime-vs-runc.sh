#!/usr/bin/env bash
# Benchmark: `palisade run` vs `runc run` of the same busybox bundle running /bin/true.
#
# Both runtimes run N times, interleaved (palisade, runc, palisade, runc, ...) so that
# machine noise hits both alike; wall time of each run is taken with bash's
# $EPOCHREALTIME (no extra fork per sample). Prints each side's median and p90 and the
# ratio palisade/runc (goal: <= 0.7).
#
# Needs root, runc (apt), busybox-static (apt). Builds palisade in release mode unless
# PALISADE=/path/to/palisade is given.
#   usage: tests/bench/runtime-vs-runc.sh [N]      (default N=100)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-${N:-100}}
if [[ $(id -u) != 0 ]]; then
  echo "runtime-vs-runc: run as root" >&2
  exit 1
fi
if [[ -z ${PALISADE:-} ]]; then
  cargo build --release -q -p palisade-runtime --bin palisade
  target=${CARGO_TARGET_DIR:-target}
  PALISADE=$target/release/palisade
fi
RUNC=${RUNC:-$(command -v runc)}

work=$(mktemp -d /tmp/palisade-bench.XXXXXX)
cleanup() {
  "$PALISADE" --root "$work/palisade-root" delete --force bench-palisade >/dev/null 2>&1 || true
  "$RUNC" --root "$work/runc-root" delete --force bench-runc >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The bundle: busybox-static with its applets, and a `runc spec`-like config.
bundle=$work/bundle
mkdir -p "$bundle/rootfs"/{bin,proc,sys,dev,tmp,etc}
cp /bin/busybox "$bundle/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [[ $applet == busybox ]] || ln -s busybox "$bundle/rootfs/bin/$applet"
done
cat > "$bundle/config.json" <<'JSON'
{
  "ociVersion": "1.0.2-dev",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": ["/bin/true"],
    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
    "cwd": "/",
    "capabilities": {
      "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
      "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
      "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    },
    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
    "noNewPrivileges": true
  },
  "root": {"path": "rootfs", "readonly": true},
  "hostname": "bench",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
  ],
  "linux": {
    "resources": {"devices": [{"allow": false, "access": "rwm"}]},
    "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
    "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
  }
}
JSON

palisade_run() { "$PALISADE" --root "$work/palisade-root" run --bundle "$bundle" bench-palisade; }
runc_run() { "$RUNC" --root "$work/runc-root" run --bundle "$bundle" bench-runc; }

# One warm-up each (page cache, first cgroup creation), and a correctness check.
palisade_run || { echo "palisade run failed" >&2; exit 1; }
runc_run || { echo "runc run failed" >&2; exit 1; }

# Microseconds of one run of "$@".
time_us() {
  local start=$EPOCHREALTIME
  "$@" >/dev/null
  local end=$EPOCHREALTIME
  echo $(( (${end/./} - ${start/./}) ))
}

: > "$work/palisade.us"
: > "$work/runc.us"
for ((i = 0; i < N; i++)); do
  time_us palisade_run >> "$work/palisade.us"
  time_us runc_run >> "$work/runc.us"
done

# percentile FILE P -> value (nearest rank)
percentile() {
  sort -n "$1" | awk -v p="$2" '{ v[NR] = $1 } END { i = int((p / 100) * NR + 0.999999); if (i < 1) i = 1; print v[i] }'
}
p_med=$(percentile "$work/palisade.us" 50)
r_med=$(percentile "$work/runc.us" 50)
p_p90=$(percentile "$work/palisade.us" 90)
r_p90=$(percentile "$work/runc.us" 90)
ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
echo "runtime-vs-runc: /bin/true in a busybox bundle, $N interleaved runs each"
printf '  %-9s median %7s ms   p90 %7s ms\n' palisade "$(ms "$p_med")" "$(ms "$p_p90")"
printf '  %-9s median %7s ms   p90 %7s ms\n' runc "$(ms "$r_med")" "$(ms "$r_p90")"
awk -v p="$p_med" -v r="$r_med" 'BEGIN { printf "  ratio palisade/runc (median): %.2fx (goal <= 0.70x)\n", p / r }'
