# vm-ops: the rest of the Task API in VM mode, through containerd + ctr (two VMs). Checks:
#   bind     `--mount type=bind,...,options=rbind:ro` of a host file and of a directory
#            (with a symlink inside) -> the container reads them (copied into the guest);
#            the read-only mount refuses writes
#   cgroup   the VMM runs in its own cgroup (/proc/<vmm>/cgroup = /palisade/vmm-<id>)
#   metrics  `ctr task metrics` returns the guest container's memory usage and pids
#   update   Task.Update (containerd's Update request, sent to the shim's socket; ctr 1.6
#            has no `task update`) with a memory limit -> memory.max inside the container
#            (its /sys/fs/cgroup)
#   vmm-death  kill -9 of the VMM -> the task is STOPPED (exit 137) and the shim logs why;
#            task delete leaves no VMM, VM state dir or VMM cgroup
#   oom      a container over its memory limit -> exit 137 and a /tasks/oom event in
#            `ctr events`
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs shim-vm

RUNTIME=io.containerd.palisade.v2
IMAGE=docker.io/palisade/busybox:latest
d=$WORK/containerd
mkdir -p "$d"
cfg=$WORK/palisade.toml
vm_shim_config "$cfg" 90 0
containerd_config "$d"

containerd --config "$d/config.toml" >"$WORK/containerd.log" 2>&1 &
CONTAINERD_PID=$!
EVENTS_PID=
stop_all() {
  [ -n "$EVENTS_PID" ] && kill "$EVENTS_PID" 2>/dev/null
  kill "$CONTAINERD_PID" 2>/dev/null
  wait "$CONTAINERD_PID" 2>/dev/null
  grep -E 'palisade|shim' "$WORK/containerd.log" | tail -80 >"$WORK/shim.log" 2>/dev/null
}
n=0
while [ ! -S "$d/containerd.sock" ] && [ $n -lt 300 ]; do usleep 100000; n=$((n + 1)); done
if [ ! -S "$d/containerd.sock" ]; then
  fail vm-ops "containerd did not start: $(tail -3 "$WORK/containerd.log" | tr '\n' ' ')"
  stop_all
  finish
fi
export CONTAINERD_SNAPSHOTTER=native
ctr() { command ctr --address "$d/containerd.sock" --namespace palisade "$@" </dev/null; }
vmm_pids() { ps -o pid,comm | awk '$2 == "palisade-vmm" {print $1}'; }
task_status() { ctr task ls 2>/dev/null | awk -v id="$1" '$1 == id {print $3}'; }
wait_status() { # wait_status ID STATUS TENTHS
  n=0
  while [ "$(task_status "$1")" != "$2" ] && [ $n -lt "$3" ]; do usleep 100000; n=$((n + 1)); done
  [ "$(task_status "$1")" = "$2" ]
}
# in_ctr ID EXEC-ID CMD...: output of a process run in the container.
in_ctr() {
  id=$1 exec_id=$2
  shift 2
  ctr task exec --exec-id "$exec_id" "$id" "$@" 2>&1
}
# The container's memory.max as the container sees it. ctr 1.6's default spec has no
# /sys/fs/cgroup mount, so `ops` asks for one (--mount type=cgroup): the runtime binds the
# container's own cgroup there (pure cgroup2 guest); else it would be the full tree.
MEMORY_MAX='p=$(sed -n "s/^0:://p" /proc/self/cgroup); cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup${p%/}/memory.max'

if ! out=$(ctr image import --base-name docker.io/palisade/busybox /palisade/images/busybox.tar 2>&1); then
  fail vm-ops "ctr image import failed: $out"
  stop_all
  finish
fi

# --- one long-running container for bind, cgroup, metrics, update, vmm-death ---------
printf 'palisade bind %s\n' "$$" >"$WORK/bind-file"
mkdir -p "$WORK/bind-dir/sub"
echo nested >"$WORK/bind-dir/sub/f"
ln -s sub/f "$WORK/bind-dir/link"
if out=$(ctr run -d --runtime "$RUNTIME" --runtime-config-path "$cfg" \
  --mount "type=bind,src=$WORK/bind-file,dst=/etc/palisade-test,options=rbind:ro" \
  --mount "type=bind,src=$WORK/bind-dir,dst=/data,options=rbind:ro" \
  --mount "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:noexec:nodev" \
  "$IMAGE" ops sleep 600 2>&1); then
  # bind
  got=$(in_ctr ops b1 cat /etc/palisade-test)
  nested=$(in_ctr ops b2 cat /data/link)
  in_ctr ops b3 sh -c 'echo x >/etc/palisade-test' >"$WORK/bind-write.out"
  rc_write=$?
  if [ "$got" = "$(cat "$WORK/bind-file")" ] && [ "$nested" = nested ] && [ $rc_write != 0 ]; then
    pass bind "host file and directory (symlink inside) read in the guest: '$got', '$nested'; ro write refused ($(head -c 80 "$WORK/bind-write.out" | tr '\n' ' '))"
  else
    fail bind "file '$got' (want '$(cat "$WORK/bind-file")'), dir link '$nested', write rc=$rc_write"
  fi

  # cgroup
  vmm=$(vmm_pids | head -1)
  vmm_cg=$(sed -n 's/^0:://p' "/proc/$vmm/cgroup" 2>/dev/null)
  if [ -n "$vmm" ] && [ "$vmm_cg" = /palisade/vmm-ops ] && [ -d "/sys/fs/cgroup$vmm_cg" ] &&
    grep -qx "$vmm" "/sys/fs/cgroup$vmm_cg/cgroup.procs"; then
    pass cgroup "VMM pid $vmm in its own cgroup $vmm_cg"
  else
    fail cgroup "VMM pid '$vmm' cgroup '$vmm_cg' ($(cat "/proc/$vmm/cgroup" 2>/dev/null | tr '\n' ' '))"
  fi

  # metrics: containerd's v2 metrics, converted from the guest container's cgroup.
  ctr task metrics --format json ops >"$WORK/metrics.json" 2>&1
  rc=$?
  mem=$(tr -d ' \n' <"$WORK/metrics.json" | sed -n 's/.*"memory":{[^}]*"usage":\([0-9]*\).*/\1/p')
  pids=$(tr -d ' \n' <"$WORK/metrics.json" | sed -n 's/.*"pids":{"current":\([0-9]*\).*/\1/p')
  if [ $rc = 0 ] && [ "${mem:-0}" -gt 0 ] && [ "${pids:-0}" -ge 1 ]; then
    pass metrics "ctr task metrics: memory.usage=$mem bytes, pids.current=$pids"
  else
    fail metrics "rc=$rc memory.usage='$mem' pids.current='$pids': $(head -c 300 "$WORK/metrics.json" | tr '\n' ' ')"
  fi

  # update: containerd's UpdateTaskRequest { id = 1; Any resources = 2 } straight to the
  # shim (what containerd's Tasks.Update forwards; CRI's UpdateContainerResources too).
  limit=50331648
  printf '{"memory":{"limit":%s}}' "$limit" >"$WORK/resources.json"
  shim_sock=$(sed 's|^unix://||' "$d/state/io.containerd.runtime.v2.task/palisade/ops/address" 2>/dev/null)
  th-helper ttrpc "$shim_sock" - containerd.task.v2.Task Update 1=ops \
    "2{" 1=types.containerd.io/opencontainers/runtime-spec/1/LinuxResources "2@=$WORK/resources.json" "}" \
    >"$WORK/update.out" 2>&1
  rc=$?
  inside=$(in_ctr ops u1 sh -c "$MEMORY_MAX")
  if [ $rc = 0 ] && [ "$inside" = "$limit" ]; then
    pass update "Task.Update memory limit $limit -> memory.max in the guest container = $inside"
  else
    fail update "rc=$rc ($(tr '\n' ' ' <"$WORK/update.out" | head -c 200)), memory.max inside '$inside'; cgroup view: $(in_ctr ops u2 sh -c 'cat /proc/self/cgroup; ls /sys/fs/cgroup' | tr '\n' ' ' | head -c 300)"
  fi

  # vmm-death: kill -9 the VMM under a running task.
  vmm_cg_dir=/sys/fs/cgroup/palisade/vmm-ops
  kill -9 "$vmm" 2>/dev/null
  if wait_status ops STOPPED 300; then
    ctr task delete ops >"$WORK/delete.out" 2>&1
    rc_delete=$?
    ctr container delete ops >/dev/null 2>&1
    n=0
    while [ -n "$(vmm_pids)" ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
    left=$(ls /run/palisade/vm 2>/dev/null | tr '\n' ' ')
    why=$(grep -c 'microVM exited unexpectedly' "$WORK/containerd.log")
    if [ -z "$(vmm_pids)" ] && [ -z "$left" ] && [ ! -d "$vmm_cg_dir" ] && [ "$why" -ge 1 ]; then
      pass vmm-death "VMM kill -9 -> task STOPPED, shim logged 'microVM exited unexpectedly'; delete (rc $rc_delete: $(head -c 60 "$WORK/delete.out" | tr '\n' ' ')) left no VMM, state dir or VMM cgroup"
    else
      fail vmm-death "after delete: VMMs '$(vmm_pids | tr '\n' ' ')', state dirs '$left', cgroup dir $([ -d "$vmm_cg_dir" ] && echo present || echo gone), shim error lines $why"
    fi
  else
    fail vmm-death "task status '$(task_status ops)' 30 s after kill -9 of the VMM"
    ctr task kill -s KILL ops >/dev/null 2>&1
    ctr task delete -f ops >/dev/null 2>&1
    ctr container delete ops >/dev/null 2>&1
  fi
else
  fail bind "ctr run -d failed: $(echo "$out" | head -c 300)"
fi

# --- oom: a container over its memory limit --------------------------------------------
ctr events >"$WORK/events.log" 2>&1 &
EVENTS_PID=$!
# Command substitution keeps all 64 MiB in the shell's memory; the limit is 32 MiB.
if out=$(ctr run -d --runtime "$RUNTIME" --runtime-config-path "$cfg" --memory-limit 33554432 \
  "$IMAGE" oom sh -c 'x=$(head -c 67108864 /dev/zero | tr "\0" a); echo survived ${#x}' 2>&1); then
  wait_status oom STOPPED 900
  # The guest's console (agent log included) goes with the bundle: keep it for a failure.
  cp "$d/state/io.containerd.runtime.v2.task/palisade/oom/vm-console.log" "$WORK/oom-console.log" 2>/dev/null
  n=0
  while ! grep -q '/tasks/oom' "$WORK/events.log" && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
  ctr task delete oom >/dev/null 2>&1
  ctr container delete oom >/dev/null 2>&1
  exit_event=$(grep '/tasks/exit' "$WORK/events.log" | grep '"oom"' | head -1)
  oom_event=$(grep '/tasks/oom' "$WORK/events.log" | head -1)
  case $exit_event in
    *'"exit_status":137'*) exited=137 ;;
    *) exited="?" ;;
  esac
  if [ "$exited" = 137 ] && [ -n "$oom_event" ]; then
    pass oom "over its memory limit -> exit 137, event: $(echo "$oom_event" | head -c 160)"
  else
    fail oom "exit event '$exit_event' (want 137), oom event '$oom_event'; agent: $(grep -i oom "$WORK/oom-console.log" | tail -5 | tr '\n' ' ')"
  fi
else
  fail oom "ctr run -d failed: $(echo "$out" | head -c 300)"
fi
kill "$EVENTS_PID" 2>/dev/null
EVENTS_PID=
n=0
while [ -n "$(vmm_pids)" ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
[ -z "$(vmm_pids)" ] || fail oom "palisade-vmm left after the task was deleted"

stop_all
[ "${FAILED:-0}" = 0 ] && pass vm-ops "all checks passed"
finish
