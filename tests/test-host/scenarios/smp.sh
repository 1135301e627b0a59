# smp: palisade-vmm with 2 vCPUs; the guest brings both online (agent GuestInfo.cpus and the
# guest kernel's own count).
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs

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
  pass smp "guest reports 2 online CPUs (VMM has $threads threads), ready in ${AGENT_READY_MS} ms"
else
  fail smp "guest reports ${cpus:-?} online CPUs with --vcpus 2: $(echo "$info" | tr '\n' ' ')"
fi
vmm_stop
finish
