# ctr-vm: containerd + `ctr run --runtime io.containerd.palisade.v2` in VM mode (the mode
# comes from the shim config passed with --runtime-config-path). Checks:
#   hi      `echo hi` prints through the shim's VM sandbox; no palisade-vmm is left after
#           `ctr run --rm`
#   uname   `uname -r` inside = the guest kernel's release, not the test host's
#   exit    `sh -c 'exit 3'` -> ctr exits 3
#   exec    `ctr task exec` in a running VM container prints; the exec's exit code comes back
#   tty     `ctr task exec -t`: the guest process runs on a pty (`tty` = /dev/pts/N) whose
#           size is ctr's terminal's (ResizePty at start, and again after a resize: the
#           guest shell gets SIGWINCH), typed input reaches it, its exit code comes back.
#           ctr runs on a pty of its own (th-helper pty-run, stdin an empty pipe): in raw
#           mode on the test host's serial console it once stalled the whole test host.
#   pause   `ctr task pause` / `resume`
#   kill    `ctr task kill -s KILL` ends a foreground `ctr run`, which reports 137 (wait)
#   delete  deleting the task removes the VM: no palisade-vmm process, no VM state dir
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs shim-vm

RUNTIME=io.containerd.palisade.v2
IMAGE=docker.io/palisade/busybox:latest
d=$WORK/containerd
mkdir -p "$d"
cfg=$WORK/palisade.toml
vm_shim_config "$cfg" 90 1
containerd_config "$d"

# The shim's own log goes to containerd's log (debug level).
containerd --config "$d/config.toml" >"$WORK/containerd.log" 2>&1 &
CONTAINERD_PID=$!
stop_containerd() {
  kill "$CONTAINERD_PID" 2>/dev/null
  wait "$CONTAINERD_PID" 2>/dev/null
}
n=0
while [ ! -S "$d/containerd.sock" ] && [ $n -lt 300 ]; do usleep 100000; n=$((n + 1)); done
if [ ! -S "$d/containerd.sock" ]; then
  fail ctr-vm "containerd did not start: $(tail -3 "$WORK/containerd.log" | tr '\n' ' ')"
  stop_containerd
  finish
fi
export CONTAINERD_SNAPSHOTTER=native
# stdin from /dev/null: the scenario's own stdin is the test host's console.
ctr() { command ctr --address "$d/containerd.sock" --namespace palisade "$@" </dev/null; }
vm_run() { # vm_run ARGS...: ctr run --rm in VM mode, stdout+stderr captured
  ctr run --rm --runtime "$RUNTIME" --runtime-config-path "$cfg" "$@"
}
vmm_count() { ps -o comm | grep -cx palisade-vmm; }

if ! out=$(ctr image import --base-name docker.io/palisade/busybox /palisade/images/busybox.tar 2>&1); then
  fail ctr-vm "ctr image import failed: $out"
  stop_containerd
  finish
fi

# hi: the container's output through the VM sandbox.
t0=$(now_ms)
out=$(vm_run "$IMAGE" vm-hi echo hi 2>&1)
rc=$?
t_hi=$(($(now_ms) - t0))
if [ $rc = 0 ] && [ "$out" = hi ]; then
  pass hi "'hi' from inside the microVM (ctr run --rm: ${t_hi} ms)"
else
  fail hi "rc=$rc output: $(echo "$out" | head -c 400 | tr '\n' '|')"
fi
[ "$(vmm_count)" = 0 ] || fail hi "palisade-vmm still running after ctr run --rm"

# uname: the guest kernel, not L1's.
guest_release=$(strings "$GUEST_DIR/vmlinux" | sed -n 's/^Linux version \([0-9][^ ]*\) .*/\1/p' | head -1)
out=$(vm_run "$IMAGE" vm-uname uname -r 2>&1)
rc=$?
if [ $rc = 0 ] && [ "$out" = "$guest_release" ] && [ "$out" != "$(uname -r)" ]; then
  pass uname "uname -r inside = $out (guest kernel; test host runs $(uname -r))"
else
  fail uname "rc=$rc got '$(echo "$out" | head -c 200)', guest kernel '$guest_release', host '$(uname -r)'"
fi

# exit: the container's exit code is ctr's.
vm_run "$IMAGE" vm-exit sh -c 'exit 3' >"$WORK/exit.out" 2>&1
rc=$?
if [ $rc = 3 ]; then
  pass exit "sh -c 'exit 3' -> 3"
else
  fail exit "exit status $rc, want 3: $(head -c 300 "$WORK/exit.out" | tr '\n' '|')"
fi

# exec: a detached container, then ctr task exec into it.
if out=$(ctr run -d --runtime "$RUNTIME" --runtime-config-path "$cfg" "$IMAGE" vm-long sleep 600 2>&1); then
  boot_id=$(ctr task exec --exec-id e1 vm-long cat /proc/sys/kernel/random/boot_id 2>&1)
  rc1=$?
  ctr task exec --exec-id e2 vm-long sh -c 'echo from-exec; exit 5' >"$WORK/exec.out" 2>&1
  rc2=$?
  if [ $rc1 = 0 ] && [ "$boot_id" != "$(cat /proc/sys/kernel/random/boot_id)" ] &&
    [ "$(head -1 "$WORK/exec.out")" = from-exec ] && [ $rc2 = 5 ]; then
    pass exec "ctr task exec: output from the guest (boot id ${boot_id%%-*}... differs from the host's), exit 5 propagated"
  else
    fail exec "rc1=$rc1 boot_id='$boot_id' rc2=$rc2 out: $(head -c 300 "$WORK/exec.out" | tr '\n' '|')"
  fi
  tty_script='tty; n=0
while [ "$(stty size)" != "37 101" ] && [ $n -lt 100 ]; do usleep 100000; n=$((n + 1)); done
stty size; echo tty-ready; read -r line; echo "got:$line"
trap "stty size; exit 7" WINCH; echo wait-winch; while :; do sleep 1; done'
  : | th-helper pty-run --size 37x101 --timeout 120 --on tty-ready 'send=hello-tty\n' \
    --on wait-winch resize=50x132 -- ctr --address "$d/containerd.sock" --namespace palisade \
    task exec -t --exec-id t1 vm-long sh -c "$tty_script" >"$WORK/tty.out" 2>&1
  rc=$?
  tty_out=$(tr -d '\r' <"$WORK/tty.out")
  if [ $rc = 7 ] && echo "$tty_out" | grep -q '^/dev/pts/[0-9]' && echo "$tty_out" | grep -qx '37 101' &&
    echo "$tty_out" | grep -qx 'got:hello-tty' && echo "$tty_out" | grep -qx '50 132'; then
    pass tty "ctr task exec -t: guest $(echo "$tty_out" | head -1), size 37x101 then 50x132 after a resize, input 'hello-tty' read, exit 7"
  else
    fail tty "rc=$rc (want 7) output: $(echo "$tty_out" | head -c 400 | tr '\n' '|')"
  fi
  ctr task pause vm-long >/dev/null 2>&1 && status=$(ctr task ls | awk '$1 == "vm-long" {print $3}')
  ctr task resume vm-long >/dev/null 2>&1
  [ "${status:-}" = PAUSED ] && pass pause "ctr task pause/resume (status $status)" ||
    fail pause "status after pause: '${status:-?}'"

  # delete: kill, delete the task -> the VM is gone.
  ctr task kill -s KILL vm-long >/dev/null 2>&1
  n=0
  while [ "$(ctr task ls | awk '$1 == "vm-long" {print $3}')" != STOPPED ] && [ $n -lt 100 ]; do
    usleep 100000
    n=$((n + 1))
  done
  [ "$(vmm_count)" = 1 ] || fail delete "expected the stopped task's VM to exist until delete, found $(vmm_count) VMMs"
  ctr task delete vm-long >"$WORK/delete.out" 2>&1
  ctr container delete vm-long >/dev/null 2>&1
  n=0
  while [ "$(vmm_count)" != 0 ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
  left=$(ls /run/palisade/vm 2>/dev/null | tr '\n' ' ')
  if [ "$(vmm_count)" = 0 ] && [ -z "$left" ]; then
    pass delete "task delete removed the VM (no palisade-vmm, no VM state dir)"
  else
    fail delete "after task delete: $(vmm_count) palisade-vmm, state dirs: '$left'"
  fi
else
  fail exec "ctr run -d failed: $(echo "$out" | head -c 300)"
fi

# kill/wait: a foreground ctr run waits for the task; kill -s KILL ends it with 137.
vm_run "$IMAGE" vm-wait sleep 600 >"$WORK/wait.out" 2>&1 &
RUN_PID=$!
n=0
while [ "$(ctr task ls 2>/dev/null | awk '$1 == "vm-wait" {print $3}')" != RUNNING ] && [ $n -lt 600 ]; do
  usleep 100000
  n=$((n + 1))
done
ctr task kill -s KILL vm-wait >/dev/null 2>&1
wait $RUN_PID
rc=$?
if [ $rc = 137 ]; then
  pass kill "ctr task kill -s KILL -> the waiting ctr run exits 137"
else
  fail kill "ctr run exited $rc, want 137: $(head -c 300 "$WORK/wait.out" | tr '\n' '|')"
fi
n=0
while [ "$(vmm_count)" != 0 ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
[ "$(vmm_count)" = 0 ] || fail kill "palisade-vmm left after ctr run --rm of a killed task"

stop_containerd
# The VMs' consoles and VMM logs live in the bundles (removed with the tasks); keep the
# shim's log lines (in containerd's log) for a failure report.
grep -E 'palisade|shim' "$WORK/containerd.log" | tail -80 >"$WORK/shim.log" 2>/dev/null
[ "${FAILED:-0}" = 0 ] && pass ctr-vm "all checks passed"
finish
