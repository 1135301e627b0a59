# Shared helpers for the scenarios, sourced by each scenario script inside the test host.
# A scenario runs in $WORK (its logs: $WORK/*.log, printed by /init when it fails) and reports
# with pass/fail/skip; the first argument of each is the check's name, so one scenario may
# report several checks as "<scenario>.<check>".

GUEST_DIR=/palisade/guest
# The rig's reference VMM: QEMU's microvm machine on the same /dev/kvm.
QEMU_MICROVM="qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off -accel kvm -cpu host -nodefaults -no-user-config -display none -serial stdio -no-reboot"

report() { # report STATUS CHECK DETAIL...
  status=$1 check=$2
  shift 2
  if [ "$check" = "$SCENARIO" ] || [ -z "$check" ]; then
    echo "PALISADE-TEST $SCENARIO $status $*"
  else
    echo "PALISADE-TEST $SCENARIO.$check $status $*"
  fi
}
pass() { report PASS "$@"; }
fail() {
  report FAIL "$@"
  FAILED=1
}
skip() { report SKIP "$@"; }

# Fails the scenario (and exits) when a component of the image is missing; the detail says
# which and why, e.g. "guest-kernel missing: guest-kernel/build.sh has not produced ...".
require() {
  for c in "$@"; do
    line=$(grep "^$c " /palisade/components)
    case $line in
      "$c ok"*) ;;
      "") fail "$SCENARIO" "component $c not in the image"; exit 1 ;;
      *) fail "$SCENARIO" "blocked: $line"; exit 1 ;;
    esac
  done
}

# Picks a value from th-helper output (one key=value per line): kv KEY "$out"
kv() { echo "$2" | sed -n "s/^$1=//p" | head -1; }

finish() { exit "${FAILED:-0}"; }

# --- palisade-vmm + agent ---------------------------------------------------------------
AGENT_PORT=1024
AGENT_SERVICE=palisade.agent.v1.Agent
# The line the agent logs on the console once its ttrpc server listens (agent/src/main.rs):
# guest-ready for the benchmark.
AGENT_READY_MARKER="palisade-agent serving"
# The guest kernel command line, the same for every VMM: reboot=k makes a guest reset go
# through the i8042, which palisade-vmm turns into a clean exit (no ACPI in the guest).
GUEST_CMDLINE="console=ttyS0 reboot=k panic=-1 quiet"
GUEST_MEM_MIB=256
# The flags every scenario boots palisade-vmm with (one place to follow its CLI); values
# without spaces only (the command line and socket are passed separately).
VMM_BOOT_FLAGS="--kernel $GUEST_DIR/vmlinux --initrd $GUEST_DIR/initramfs.cpio.gz --memory-mib $GUEST_MEM_MIB --vsock-cid 3"

now_ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }

# vmm_start NAME [palisade-vmm flags...]: boots the guest kernel + initramfs in the background
# with a vsock device; sets VMM_PID, VMM_SOCK (hybrid-vsock socket; $SOCK_PATH if set) and
# VMM_LOG (serial console and the VMM's own log), VMM_START_MS.
vmm_start() {
  name=$1
  shift
  VMM_SOCK=${SOCK_PATH:-$WORK/$name.vsock}
  VMM_LOG=$WORK/$name-vmm.log
  VMM_START_MS=$(now_ms)
  palisade-vmm $VMM_BOOT_FLAGS --cmdline "$GUEST_CMDLINE" --vsock-socket "$VMM_SOCK" "$@" >"$VMM_LOG" 2>&1 &
  VMM_PID=$!
  # When the agent's "serving" line appears, relative to the VMM's start: tells a slow boot
  # from a slow vsock path when Check takes long.
  th-helper wait-log "$VMM_LOG" "$AGENT_READY_MARKER" 120 >"$WORK/$name.serving" &
  SERVING_WATCH_PID=$!
}

# serving_ms: ms from VMM start to the agent's "serving" line ("?" if not seen yet).
serving_ms() {
  v=$(kv found_ms "$(cat "$WORK/$name.serving" 2>/dev/null)")
  echo "${v:-?}"
}

# agent [--save FIELD FILE] METHOD [FIELD...]: one ttrpc call to the agent through the VMM's
# socket ($AGENT_TIMEOUT seconds for the connection and the answer, default 30); --save
# appends the response's bytes field FIELD to FILE.
agent() {
  save=
  if [ "$1" = --save ]; then
    save="--save $2 $3"
    shift 3
  fi
  method=$1
  shift
  th-helper ttrpc $save --timeout "${AGENT_TIMEOUT:-30}" "$VMM_SOCK" $AGENT_PORT $AGENT_SERVICE "$method" "$@"
}

# agent_wait_ready TIMEOUT_S: polls Check until the agent answers; sets AGENT_READY_MS (since
# vmm_start) and CHECK_OUT. Returns 1 if the VMM died or the time ran out.
agent_wait_ready() {
  deadline=$(($(now_ms) + $1 * 1000))
  while [ "$(now_ms)" -lt $deadline ]; do
    if ! kill -0 "$VMM_PID" 2>/dev/null; then
      CHECK_OUT="the VMM exited before the agent answered"
      return 1
    fi
    # Short per-attempt timeout: before the guest's vsock driver is up a CONNECT may get
    # no answer at all.
    if [ -S "$VMM_SOCK" ] && CHECK_OUT=$(AGENT_TIMEOUT=3 agent Check 2>&1); then
      AGENT_READY_MS=$(($(now_ms) - VMM_START_MS))
      return 0
    fi
    usleep 50000
  done
  CHECK_OUT="no answer to Check within $1 s (last: $CHECK_OUT)"
  return 1
}

# vmm_wait_exit TIMEOUT_S: waits for the VMM to exit; sets VMM_EXIT (exit code or "timeout").
vmm_wait_exit() {
  deadline=$(($(now_ms) + $1 * 1000))
  while kill -0 "$VMM_PID" 2>/dev/null && [ "$(now_ms)" -lt $deadline ]; do
    usleep 20000
  done
  if kill -0 "$VMM_PID" 2>/dev/null; then
    VMM_EXIT=timeout
    return 1
  fi
  wait "$VMM_PID"
  VMM_EXIT=$?
}

# vmm_stop: ends a VMM still running (kill -9; the scenarios that test shutdown paths do
# their own), so nothing outlives the scenario.
vmm_stop() {
  [ -n "$SERVING_WATCH_PID" ] && kill "$SERVING_WATCH_PID" 2>/dev/null
  if [ -n "$VMM_PID" ] && kill -0 "$VMM_PID" 2>/dev/null; then
    kill -9 "$VMM_PID" 2>/dev/null
    wait "$VMM_PID" 2>/dev/null
  fi
}

# knob NAME DEFAULT: the value of palisade.NAME=<digits> on the test host's kernel command
# line (run.sh: PALISADE_TEST_HOST_EXTRA_APPEND), DEFAULT when absent.
knob() {
  v=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^palisade\.$1=\([0-9][0-9]*\)$/\1/p" | tail -1)
  echo "${v:-$2}"
}

# progress MESSAGE: a timestamped line straight to the serial console while the scenario
# runs (its own output is only shown when it ends): shows where a long or wedged scenario
# is, and keeps run.sh's silence watchdog from taking a long churn run for a wedged host.
progress() { echo "PALISADE-PROGRESS $SCENARIO $(cut -d' ' -f1 /proc/uptime)s $*" >/dev/console 2>/dev/null; }

# rel PART KEY=N...: one line for tests/reliability/run.sh's summary table
# (PALISADE-REL <part> cycles=<n> faults=<n> inputs=<n> leaks=<n>, any subset of keys).
rel() { echo "PALISADE-REL $*"; }

# vm_shim_config FILE BOOT_TIMEOUT_S [SPARE_DISKS]: the shim's configuration.toml for VM mode
# with the test host's VMM and guest (1 vCPU, $GUEST_MEM_MIB); SPARE_DISKS omitted: the
# shim's default.
vm_shim_config() {
  cat >"$1" <<TOML
[shim]
default_mode = "vm"

[vm]
vmm = "/palisade/bin/palisade-vmm"
kernel = "$GUEST_DIR/vmlinux"
initramfs = "$GUEST_DIR/initramfs.cpio.gz"
vcpus = 1
memory_mib = $GUEST_MEM_MIB
boot_timeout_secs = $2
state_dir = "/run/palisade/vm"
${3:+spare_disks = $3}
TOML
}

# containerd_config DIR [LOG_LEVEL] [CRI_SECTION]: writes DIR/config.toml for a private
# containerd (root, state and sockets under DIR, no metrics; log level default debug, where
# the shim's own log lines land too). The CRI plugin is disabled unless CRI_SECTION (its
# `[plugins."io.containerd.grpc.v1.cri"]` TOML) is given.
containerd_config() {
  cri_disabled='"io.containerd.grpc.v1.cri", '
  [ -z "${3:-}" ] || cri_disabled=
  cat >"$1/config.toml" <<TOML
version = 2
root = "$1/root"
state = "$1/state"
disabled_plugins = [${cri_disabled}"io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$1/containerd.sock"
[ttrpc]
  address = "$1/containerd.sock.ttrpc"
[debug]
  level = "${2:-debug}"
[metrics]
  address = ""
${3:-}
TOML
}

# --- containerd in VM mode (the shim's VM sandbox) ----------------------------------------
# vm_containerd_start: a private containerd under $WORK/containerd, the shim configured for VM
# mode ($VM_SHIM_CONFIG), the busybox image imported. Defines ctr (stdin from /dev/null: the
# scenario's own stdin is the console) and vm_ctr_run. Returns 1 with $VM_CTR_ERROR on
# failure. vm_containerd_stop ends it.
VM_RUNTIME=io.containerd.palisade.v2
VM_IMAGE=docker.io/palisade/busybox:latest
vm_containerd_start() {
  CTRD_DIR=$WORK/containerd
  VM_SHIM_CONFIG=$WORK/palisade.toml
  mkdir -p "$CTRD_DIR"
  vm_shim_config "$VM_SHIM_CONFIG" "${VM_BOOT_TIMEOUT:-240}" 1
  containerd_config "$CTRD_DIR"
  # The shim's own log goes to containerd's log (debug level).
  containerd --config "$CTRD_DIR/config.toml" >"$WORK/containerd.log" 2>&1 &
  CONTAINERD_PID=$!
  n=0
  while [ ! -S "$CTRD_DIR/containerd.sock" ] && [ $n -lt 300 ]; do usleep 100000; n=$((n + 1)); done
  if [ ! -S "$CTRD_DIR/containerd.sock" ]; then
    VM_CTR_ERROR="containerd did not start: $(tail -3 "$WORK/containerd.log" | tr '\n' ' ')"
    return 1
  fi
  export CONTAINERD_SNAPSHOTTER=native
  if ! out=$(ctr image import --base-name docker.io/palisade/busybox /palisade/images/busybox.tar 2>&1); then
    VM_CTR_ERROR="ctr image import failed: $out"
    return 1
  fi
}
vm_containerd_stop() {
  kill "$CONTAINERD_PID" 2>/dev/null
  wait "$CONTAINERD_PID" 2>/dev/null
  # The shim's lines of containerd's log, for a failure report (printed by /init).
  grep -E 'palisade|shim' "$WORK/containerd.log" | tail -150 >"$WORK/shim.log" 2>/dev/null
}
ctr() { command ctr --address "$CTRD_DIR/containerd.sock" --namespace palisade "$@" </dev/null; }
# vm_ctr_run [ctr run flags...] IMAGE ID ARGS...: `ctr run` with the VM-mode shim config.
vm_ctr_run() { ctr run --runtime "$VM_RUNTIME" --runtime-config-path "$VM_SHIM_CONFIG" "$@"; }
# task_status ID: the task's status in `ctr task ls` (empty when there is no task).
task_status() { ctr task ls 2>/dev/null | awk -v id="$1" '$1 == id {print $3}'; }
# task_wait_status ID STATUS TIMEOUT_S: polls until the task has STATUS.
task_wait_status() {
  deadline=$(($(now_ms) + $3 * 1000))
  while [ "$(task_status "$1")" != "$2" ]; do
    [ "$(now_ms)" -lt $deadline ] || return 1
    usleep 100000
  done
}
vmm_count() { ps -o comm | grep -cx palisade-vmm; }
# vmm_pids: the running palisade-vmm processes.
vmm_pids() { ps -o pid,comm | awk '$2 == "palisade-vmm" {print $1}'; }

# --- leak snapshots ------------------------------------------------------------------------
# Take the baseline after one warm-up container (and stack_settle): containerd and the shim
# create their runtime dirs (/run/containerd/{fifo,s}, /run/palisade/vm, the namespace's
# task dirs) on first use and keep them; a leak is what each further run leaves.
# leak_snapshot FILE: one sorted line per resource a VM-mode container creates in the test
# host and must remove again: processes of the stack (VMMs, shims, ctr, mkfs), mounts,
# cgroups, bound unix sockets, network devices, and every file/fifo/socket/dir under the
# palisade and containerd state dirs (runtime dirs, containerd's state, its bundles,
# snapshots and fifo dirs, the VM dirs with their sockets and drive images). Containerd's
# content store and metadata DB are deliberately not listed: they hold the image.
leak_snapshot() {
  {
    ps -o pid,comm,args | awk 'NR > 1 && $2 ~ /^(palisade|containerd-shim|ctr$|mke2fs|mkfs)/ {$1 = "process " $1; print}'
    # mount point, fs type, source (mount ids change, these do not)
    awk '{for (i = 7; $i != "-"; i++); print "mount", $5, $(i + 1), $(i + 2)}' /proc/self/mountinfo
    find /sys/fs/cgroup -type d 2>/dev/null | sed 's/^/cgroup /'
    awk 'NR > 1 && $8 != "" {print "unix-socket", $8}' /proc/net/unix
    ls /sys/class/net 2>/dev/null | sed 's/^/netdev /'
    for dir in /run/palisade* /run/containerd* ${CTRD_DIR:+$CTRD_DIR/state}; do
      [ -e "$dir" ] && find "$dir" 2>/dev/null | sed 's/^/file /'
    done
    if [ -n "$CTRD_DIR" ] && [ -d "$CTRD_DIR/root" ]; then
      # Snapshots and per-task dirs, not the image's content.
      find "$CTRD_DIR/root" -maxdepth 3 2>/dev/null | grep -v -e '/io.containerd.content.v1.content' \
        -e '/io.containerd.metadata.v1.bolt' | sed 's/^/file /'
    fi
  } | LC_ALL=C sort >"$1"
}

# stack_settle TIMEOUT_S: waits until no palisade-vmm or shim process runs (teardown after
# `ctr run --rm` returns is asynchronous) before a baseline snapshot is taken.
stack_settle() {
  deadline=$(($(now_ms) + $1 * 1000))
  while ps -o comm | grep -q -E '^(palisade-vmm|containerd-shim)'; do
    [ "$(now_ms)" -lt $deadline ] || return 1
    usleep 100000
  done
}

# leak_diff BEFORE AFTER: sets LEAKS (count) and LEAK_LIST (the new resources, "; "-joined,
# at most 10) — what AFTER has that BEFORE had not.
leak_diff() {
  # (busybox has no comm) a multiset difference: duplicates count
  awk 'FILENAME == ARGV[1] {seen[$0]++; next} seen[$0] > 0 {seen[$0]--; next} {print}' "$1" "$2" >"$2.new"
  LEAKS=$(wc -l <"$2.new" | tr -d ' ')
  LEAK_LIST=$(head -10 "$2.new" | tr '\n' ';' | sed 's/;$//; s/;/; /g')
}

# leak_check BEFORE TIMEOUT_S: snapshots again until nothing new remains (teardown is
# asynchronous: a shim exits after containerd's Shutdown, a VMM after its guest resets) or
# the time runs out; sets LEAKS and LEAK_LIST from the last snapshot.
leak_check() {
  deadline=$(($(now_ms) + $2 * 1000))
  k=0
  while :; do
    k=$((k + 1))
    leak_snapshot "$WORK/after.snap"
    leak_diff "$1" "$WORK/after.snap"
    [ "$LEAKS" = 0 ] && return 0
    [ "$(now_ms)" -lt $deadline ] || return 1
    usleep 250000
  done
}
