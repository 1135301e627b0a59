# vm-churn: VM-mode churn and concurrency through containerd + the shim (issue #8). Checks:
#   cycles      palisade.churn_cycles (default 50) `ctr run --rm` cycles, each booting its own
#               microVM, running `echo`, checking the output and tearing the VM down
#   leaks       after the cycles, the leak snapshot (lib.sh) equals the one taken after the
#               first (warm-up) cycle
#   concurrent  palisade.concurrent_vms (default 4) `ctr run -d` at once: all succeed, each in a
#               VM of its own (that many palisade-vmm, distinct guest boot ids), then all are
#               killed and deleted at once and the leak snapshot is clean again
# Prints `PALISADE-REL vm-churn cycles=N leaks=N` and `PALISADE-REL vm-concurrent cycles=N
# leaks=N` for tests/reliability/run.sh, and the time per cycle.
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs shim-vm

cycles=$(knob churn_cycles 50)
nvms=$(knob concurrent_vms 4)

if ! vm_containerd_start; then
  fail vm-churn "$VM_CTR_ERROR"
  vm_containerd_stop
  finish
fi
# --- churn ---------------------------------------------------------------------------------
ok=0
failed=0
consecutive=0
total_ms=0
min_ms=
max_ms=0
i=0
while [ $i -lt "$cycles" ]; do
  i=$((i + 1))
  progress "cycle $i/$cycles"
  t0=$(now_ms)
  out=$(vm_ctr_run --rm "$VM_IMAGE" "churn-$i" echo "cycle-$i" 2>&1)
  rc=$?
  dt=$(($(now_ms) - t0))
  total_ms=$((total_ms + dt))
  [ -z "$min_ms" ] || [ $dt -lt "$min_ms" ] && min_ms=$dt
  [ $dt -gt $max_ms ] && max_ms=$dt
  if [ $i = 1 ]; then
    # The first cycle is the warm-up (see leak_snapshot): the baseline follows it.
    stack_settle 30
    leak_snapshot "$WORK/before.snap"
  fi
  if [ $rc = 0 ] && [ "$out" = "cycle-$i" ]; then
    ok=$((ok + 1))
    consecutive=0
  else
    failed=$((failed + 1))
    consecutive=$((consecutive + 1))
    echo "cycle $i failed: rc=$rc output: $(echo "$out" | head -c 400 | tr '\n' '|')"
    fail cycles "cycle $i: rc=$rc output: $(echo "$out" | head -c 200 | tr '\n' '|')"
    # A broken stack fails every cycle; three in a row say enough.
    [ $consecutive -ge 3 ] && break
  fi
done
mean_ms=$((total_ms / i))
[ $failed = 0 ] && pass cycles "$ok/$cycles ctr run --rm cycles, each its own microVM: ${mean_ms} ms per cycle (min ${min_ms}, max ${max_ms})"
echo "PALISADE-BENCH vm-churn cycle_ms mean=$mean_ms min=$min_ms max=$max_ms cycles=$i"

if leak_check "$WORK/before.snap" 60; then
  pass leaks "no leak after cycles 2-$i (processes, mounts, cgroups, sockets, state dirs, VM dirs, drive images)"
else
  fail leaks "$LEAKS resources left after cycles 2-$i: $LEAK_LIST"
fi
rel vm-churn "cycles=$i" "leaks=$LEAKS"

# --- concurrent VMs ------------------------------------------------------------------------
progress "starting $nvms VMs at once"
leak_snapshot "$WORK/before-concurrent.snap"
t0=$(now_ms)
pids=
j=0
while [ $j -lt "$nvms" ]; do
  j=$((j + 1))
  (
    vm_ctr_run -d "$VM_IMAGE" "conc-$j" sleep 600 >"$WORK/conc-$j.out" 2>&1
    echo $? >"$WORK/conc-$j.rc"
  ) &
  pids="$pids $!"
done
wait $pids
t_up=$(($(now_ms) - t0))
started=0
j=0
while [ $j -lt "$nvms" ]; do
  j=$((j + 1))
  if [ "$(cat "$WORK/conc-$j.rc")" = 0 ] && [ "$(task_status "conc-$j")" = RUNNING ]; then
    started=$((started + 1))
  else
    echo "conc-$j: rc=$(cat "$WORK/conc-$j.rc") status=$(task_status "conc-$j"): $(head -c 400 "$WORK/conc-$j.out")"
  fi
done
running_vmms=$(vmm_count)
host_boot_id=$(cat /proc/sys/kernel/random/boot_id)
j=0
: >"$WORK/boot-ids"
while [ $j -lt "$nvms" ]; do
  j=$((j + 1))
  ctr task exec --exec-id boot-id "conc-$j" cat /proc/sys/kernel/random/boot_id >>"$WORK/boot-ids" 2>&1
done
distinct=$(grep -v -x "$host_boot_id" "$WORK/boot-ids" | grep -E '^[0-9a-f-]{36}$' | sort -u | wc -l)
if [ $started = "$nvms" ] && [ "$running_vmms" = "$nvms" ] && [ "$distinct" = "$nvms" ]; then
  pass concurrent "$nvms concurrent ctr run -d: all RUNNING in ${t_up} ms, $running_vmms palisade-vmm, $distinct distinct guest boot ids"
else
  fail concurrent "$started/$nvms started, $running_vmms palisade-vmm running, $distinct distinct guest boot ids ($(tr '\n' ' ' <"$WORK/boot-ids" | head -c 300))"
fi

# All killed and deleted at once.
progress "killing and deleting the $nvms tasks"
pids=
j=0
while [ $j -lt "$nvms" ]; do
  j=$((j + 1))
  (
    ctr task kill -s KILL "conc-$j" >/dev/null 2>&1
    task_wait_status "conc-$j" STOPPED 60
    ctr task delete "conc-$j" >/dev/null 2>&1
    ctr container delete "conc-$j" >/dev/null 2>&1
  ) &
  pids="$pids $!"
done
wait $pids
if leak_check "$WORK/before-concurrent.snap" 60; then
  pass concurrent-leaks "all $nvms deleted at once: no palisade-vmm, shim, VM dir, mount or socket left"
else
  fail concurrent-leaks "$LEAKS resources left after deleting the $nvms tasks: $LEAK_LIST"
fi
rel vm-concurrent "cycles=$nvms" "leaks=$LEAKS"

vm_containerd_stop
[ "${FAILED:-0}" = 0 ] && pass vm-churn "all checks passed"
finish
