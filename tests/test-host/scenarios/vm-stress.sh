# vm-stress: the rig's own stability under many short VM lives, for judging the test host
# (QEMU TCG's emulated SVM + L1's kvm-amd), not palisade. Workers boot the guest kernel with
# the busybox initramfs in palisade-vmm (reaches /init, resets, VMM exits 0) back to back
# for palisade.stress_seconds (default 300) s, palisade.stress_parallel (default 2) at once.
#   vm-stress   every VM reached /init and exited 0; prints how many ran
# A test-host fault (L1 panic, freeze, soft lockup) shows as the test host stopping short;
# run.sh reports it. Not in `all`: run it by name to compare rig settings
# (PALISADE_TEST_HOST_KVM_AMD, PALISADE_TEST_HOST_CPU).
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel

seconds=$(knob stress_seconds 300)
parallel=$(knob stress_parallel 2)
deadline=$(($(now_ms) / 1000 + seconds))

worker() { # worker N: boots until the deadline; one line per VM in $WORK/worker-N.res
  n=0
  while [ $(($(now_ms) / 1000)) -lt $deadline ]; do
    n=$((n + 1))
    vm_log=$WORK/vm-$1.txt
    rm -f "$vm_log"
    out=$(th-helper spawn-until --marker PALISADE-SMOKE-GUEST-READY --timeout 60 --log "$vm_log" --wait 30 -- \
      palisade-vmm --kernel $GUEST_DIR/vmlinux --initrd $GUEST_DIR/smoke-initramfs.cpio --memory-mib $GUEST_MEM_MIB \
      --cmdline "$GUEST_CMDLINE" 2>&1)
    ready=$(kv ready_ms "$out")
    code=$(kv exit "$out")
    echo "${ready:-none} ${code:-none}" >>"$WORK/worker-$1.res"
    if [ "${ready:-none}" = none ] || [ "$code" != 0 ]; then
      # Kept for the failure report (the init prints every *.log of a failed scenario).
      { echo "worker $1 VM $n: $(echo "$out" | tr '\n' ' ')"; tail -n 40 "$vm_log"; } >"$WORK/failed-$1-$n.log"
    fi
    [ $((n % 10)) = 0 ] && progress "worker $1: $n VMs"
  done
}

i=0
while [ $i -lt "$parallel" ]; do
  worker $i &
  i=$((i + 1))
done
wait

total=$(cat "$WORK"/worker-*.res | wc -l)
bad=$(cat "$WORK"/worker-*.res | awk '$1 == "none" || $2 != 0' | wc -l)
ready=$(cat "$WORK"/worker-*.res | awk '$1 ~ /^[0-9]+$/ {print $1}' | sort -n)
median=$(echo "$ready" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
if [ "$total" = 0 ]; then
  fail vm-stress "no VM ran in $seconds s"
elif [ "$bad" != 0 ]; then
  fail vm-stress "$bad of $total VMs did not reach /init or exit 0 ($parallel workers, $seconds s)"
else
  pass vm-stress "$total VMs in $seconds s, $parallel at once, each reached /init (median $median ms) and exited 0"
fi
finish
