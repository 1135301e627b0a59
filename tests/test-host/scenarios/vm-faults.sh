# vm-faults: faults injected under a VM-mode task run by containerd + the shim (issue #8).
# Each fault gets its own pod VM; after each, the task is deleted and the leak snapshot
# (lib.sh) must equal the one taken before. Checks:
#   vmm-kill    kill -9 of palisade-vmm: the task goes STOPPED with a TaskExit event (137),
#               the shim logs the VM's death naming the signal, exec is refused, and
#               delete leaves nothing
#   shim-kill   kill -9 of the shim: its VMM dies with it (PR_SET_PDEATHSIG), containerd
#               publishes the TaskExit (137), `shim delete` leaves nothing
#   init-kill   the container's init killed with SIGKILL from inside the guest by another
#               process (not through the shim's Kill): the task exits 137 with its event.
#               A process inside the container's own pid namespace cannot do that (the
#               kernel drops SIGKILL sent to a pid namespace's init from inside it), so the
#               container shares the guest's root pid namespace (--with-ns pid:/proc/1/ns/pid,
#               resolved by the agent in the guest) and an exec in it kills the init's pid
#   panic       guest kernel panic (`echo c > /proc/sysrq-trigger` from a privileged
#               container; CONFIG_MAGIC_SYSRQ in guest-kernel/config.fragment): the VMM
#               exits, the task goes STOPPED with a TaskExit (137), the shim's error names
#               the guest's panic, delete leaves nothing
# Prints `PALISADE-REL vm-faults faults=N leaks=N` for tests/reliability/run.sh.
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs shim-vm

if ! vm_containerd_start; then
  fail vm-faults "$VM_CTR_ERROR"
  vm_containerd_stop
  finish
fi
ctr events >"$WORK/events.log" 2>&1 &
EVENTS_PID=$!
# Warm-up (see leak_snapshot): one VM-mode run, then the baseline.
progress "warm-up run"
if ! out=$(vm_ctr_run --rm "$VM_IMAGE" warm-up true 2>&1); then
  fail vm-faults "warm-up ctr run --rm failed: $(echo "$out" | head -c 300 | tr '\n' '|')"
fi
stack_settle 30
leak_snapshot "$WORK/before.snap"
faults=0
leaks_total=0

# exit_event ID STATUS: whether containerd published /tasks/exit for ID's init with STATUS.
exit_event() {
  grep '/tasks/exit' "$WORK/events.log" | grep "\"container_id\":\"$1\"" | grep "\"id\":\"$1\"" |
    grep -q "\"exit_status\":$2[,}]"
}
# wait_event ID STATUS TIMEOUT_S
wait_event() {
  deadline=$(($(now_ms) + $3 * 1000))
  until exit_event "$1" "$2"; do
    [ "$(now_ms)" -lt $deadline ] || return 1
    usleep 100000
  done
}
# wait_no_vmm TIMEOUT_S: until no palisade-vmm runs.
wait_no_vmm() {
  deadline=$(($(now_ms) + $1 * 1000))
  while [ "$(vmm_count)" != 0 ]; do
    [ "$(now_ms)" -lt $deadline ] || return 1
    usleep 100000
  done
}
# start_task ID [ctr run flags...]: a detached `sleep 600` in its own pod VM; fails CHECK=ID.
# --null-io: no client FIFOs. ctr creates them under /run/containerd/fifo and only its
# `task delete` removes them, which has no task left to delete after containerd cleaned up
# a killed shim; they are the client's, not the runtime's.
start_task() {
  id=$1
  shift
  progress "$id: starting its pod VM"
  if ! out=$(vm_ctr_run -d --null-io "$@" "$VM_IMAGE" "$id" sleep 600 2>&1); then
    fail "$id" "ctr run -d failed: $(echo "$out" | head -c 300 | tr '\n' '|')"
    return 1
  fi
}
# cleanup_and_check CHECK ID: deletes the task and container, then the leak check; counts
# the fault.
cleanup_and_check() {
  progress "$1: deleting, then the leak check"
  ctr task delete "$2" >"$WORK/$2-delete.out" 2>&1
  ctr container delete "$2" >>"$WORK/$2-delete.out" 2>&1
  faults=$((faults + 1))
  if leak_check "$WORK/before.snap" 60; then
    pass "$1-leaks" "after delete: nothing left"
  else
    fail "$1-leaks" "$LEAKS resources left: $LEAK_LIST"
    progress "$1: $LEAKS leaks: $LEAK_LIST"
    leaks_total=$((leaks_total + LEAKS))
    # Later faults are measured against what is there now, so each names its own leaks.
    leak_snapshot "$WORK/before.snap"
  fi
}
# shim_log_has PATTERN: the shim's log lines (containerd's log at debug level) match.
shim_log_has() { grep -E 'palisade|shim' "$WORK/containerd.log" | grep -q -E "$1"; }

# --- kill -9 of the VMM -------------------------------------------------------------------
if start_task vmm-kill; then
  vmm=$(vmm_pids)
  progress "vmm-kill: kill -9 palisade-vmm $vmm"
  kill -9 $vmm
  if task_wait_status vmm-kill STOPPED 60 && wait_event vmm-kill 137 10; then
    exec_err=$(ctr task exec --exec-id after vmm-kill true 2>&1)
    exec_rc=$?
    if ! shim_log_has 'microVM exited unexpectedly.*killed by signal 9'; then
      fail vmm-kill "no shim error naming the VMM's death in containerd's log"
    elif [ $exec_rc = 0 ]; then
      fail vmm-kill "exec into the task of a dead VM succeeded"
    else
      pass vmm-kill "kill -9 palisade-vmm ($vmm): task STOPPED, TaskExit 137, shim logs the VM's death (killed by signal 9), exec refused: $(echo "$exec_err" | tail -1 | head -c 160)"
    fi
  else
    fail vmm-kill "after kill -9 of the VMM: status '$(task_status vmm-kill)', exit event: $(grep '/tasks/exit' "$WORK/events.log" | grep vmm-kill | head -c 200)"
  fi
  cleanup_and_check vmm-kill vmm-kill
fi

# --- kill -9 of the shim ------------------------------------------------------------------
if start_task shim-kill; then
  shim=$(ps -o pid,args | awk '$2 ~ /containerd-shim-palisade-v2$/ && / -id shim-kill / {print $1}')
  vmm=$(vmm_pids)
  if [ -z "$shim" ] || [ -z "$vmm" ]; then
    fail shim-kill "shim pid '$shim' or VMM pid '$vmm' not found: $(ps -o pid,args | grep -E 'shim|vmm' | head -5 | tr '\n' '|')"
  else
    progress "shim-kill: kill -9 shim $shim (VMM $vmm)"
    kill -9 $shim
    if ! wait_no_vmm 20; then
      fail shim-kill "palisade-vmm $vmm still runs 20 s after kill -9 of its shim $shim"
    elif ! wait_event shim-kill 137 60; then
      fail shim-kill "no TaskExit 137 for shim-kill after kill -9 of its shim; status '$(task_status shim-kill)'"
    else
      pass shim-kill "kill -9 of the shim ($shim): its VMM ($vmm) died with it, TaskExit 137, task status now '$(task_status shim-kill)'"
    fi
  fi
  cleanup_and_check shim-kill shim-kill
fi

# --- kill -9 of the container's init from inside the guest --------------------------------
if start_task init-kill --with-ns pid:/proc/1/ns/pid; then
  guest_pid=$(ctr task ls | awk '$1 == "init-kill" {print $2}')
  progress "init-kill: exec kill -9 $guest_pid in the guest"
  out=$(ctr task exec --exec-id killer init-kill kill -9 "$guest_pid" 2>&1)
  rc=$?
  if [ $rc != 0 ]; then
    fail init-kill "exec kill -9 $guest_pid failed (rc=$rc): $(echo "$out" | head -c 200)"
  elif task_wait_status init-kill STOPPED 30 && wait_event init-kill 137 10; then
    if [ "$(vmm_count)" = 1 ]; then
      pass init-kill "kill -9 of the init (guest pid $guest_pid) by an exec in the guest: task STOPPED, TaskExit 137, the pod VM stays until delete"
    else
      fail init-kill "the task exited 137 but $(vmm_count) palisade-vmm run (want the pod's 1 until delete)"
    fi
  else
    fail init-kill "after kill -9 $guest_pid: status '$(task_status init-kill)', exit event: $(grep '/tasks/exit' "$WORK/events.log" | grep init-kill | head -c 200)"
  fi
  cleanup_and_check init-kill init-kill
fi

# --- guest kernel panic -------------------------------------------------------------------
if start_task panic --privileged; then
  vmm=$(vmm_pids)
  progress "panic: echo c > /proc/sysrq-trigger"
  # The exec's own RPC dies with the VM: its result is not the check.
  ctr task exec --exec-id crash panic sh -c 'echo c > /proc/sysrq-trigger' >"$WORK/panic-exec.out" 2>&1 &
  EXEC_PID=$!
  if ! wait_no_vmm 90; then
    fail panic "palisade-vmm $vmm still runs 90 s after the sysrq crash; exec said: $(head -c 200 "$WORK/panic-exec.out")"
  elif ! task_wait_status panic STOPPED 30 || ! wait_event panic 137 10; then
    fail panic "after the guest panic: status '$(task_status panic)', exit event: $(grep '/tasks/exit' "$WORK/events.log" | grep '"panic"' | head -c 200)"
  elif ! shim_log_has 'microVM exited unexpectedly.*guest kernel panic'; then
    fail panic "the shim's error does not name the guest kernel panic: $(grep -E 'unexpectedly' "$WORK/containerd.log" | tail -1 | head -c 300)"
  else
    pass panic "guest kernel panic: VMM exited, task STOPPED, TaskExit 137, shim: $(grep -o 'guest kernel panic[^"]*' "$WORK/containerd.log" | tail -1 | head -c 160)"
  fi
  kill "$EXEC_PID" 2>/dev/null
  wait "$EXEC_PID" 2>/dev/null
  cleanup_and_check panic panic
fi

kill "$EVENTS_PID" 2>/dev/null
wait "$EVENTS_PID" 2>/dev/null
rel vm-faults "faults=$faults" "leaks=$leaks_total"
vm_containerd_stop
[ "${FAILED:-0}" = 0 ] && pass vm-faults "all checks passed ($faults faults, 0 leaks)"
finish
