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
