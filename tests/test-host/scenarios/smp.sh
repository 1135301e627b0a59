# smp: palisade-vmm with --vcpus 2; the guest brings both CPUs online.
#   smp.kernel  with the rig's busybox initramfs (nproc in the guest), no agent needed;
#   smp         with the agent: GuestInfo.cpus = 2.
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel

out=$(th-helper spawn-until --marker PALISADE-SMOKE-GUEST-READY --timeout 60 --log "$WORK/kernel-vmm.log" --wait 30 -- \
  palisade-vmm --kernel $GUEST_DIR/vmlinux --initrd $GUEST_DIR/smoke-initramfs.cpio --memory-mib $GUEST_MEM_MIB \
  --vcpus 2 --cmdline "$GUEST_CMDLINE")
line=$(grep -o 'PALISADE-SMOKE-GUEST-READY.*' "$WORK/kernel-vmm.log" | head -1 | tr -d '\r')
case $line in
  *cpus=2*) pass kernel "guest nproc = 2 ($(kv ready_ms "$out") ms after VMM start), VMM exit $(kv exit "$out") after the guest reset" ;;
  "") fail kernel "guest never reached /init: $(echo "$out" | tr '\n' ' ')" ;;
  *) fail kernel "guest with --vcpus 2 reports: ${line#PALISADE-SMOKE-GUEST-READY }" ;;
esac

require guest-initramfs
vmm_start smp --vcpus 2
if ! agent_wait_ready 60; then
  fail smp "agent not reachable: $CHECK_OUT"
  vmm_stop
  finish
fi
info=$(agent GuestInfo)
cpus=$(kv f3 "$info")
threads=$(ls /proc/$VMM_PID/task | wc -l)
if [ "$cpus" = 2 ]; then
  pass smp "agent GuestInfo: 2 online CPUs (VMM has $threads threads), agent Check answered in ${AGENT_READY_MS} ms (serving line at $(serving_ms) ms)"
else
  fail smp "agent GuestInfo reports ${cpus:-?} online CPUs with --vcpus 2: $(echo "$info" | tr '\n' ' ')"
fi
vmm_stop
finish
