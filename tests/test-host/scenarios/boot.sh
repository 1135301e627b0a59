# boot: palisade-vmm boots the guest vmlinux on the test host's KVM.
#   boot.kernel  with the rig's busybox initramfs: reaches /init, prints, resets (reboot=k →
#                i8042) and the VMM exits 0 — the VMM and kernel alone, no agent;
#   boot         with the guest initramfs (agent as PID 1): the agent answers its health
#                check (Check) and GuestInfo through the VMM's hybrid-vsock Unix socket;
#   boot.handshake / boot.refused  a second connection works, an unused port is refused;
#   boot.shutdown  DestroySandbox resets the guest and the VMM exits 0.
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel

out=$(th-helper spawn-until --marker PALISADE-SMOKE-GUEST-READY --timeout 60 --log "$WORK/kernel-vmm.log" --wait 30 -- \
  palisade-vmm --kernel $GUEST_DIR/vmlinux --initrd $GUEST_DIR/smoke-initramfs.cpio --memory-mib $GUEST_MEM_MIB \
  --cmdline "$GUEST_CMDLINE")
ready=$(kv ready_ms "$out")
exit_code=$(kv exit "$out")
if [ -z "$ready" ] || [ "$ready" = none ]; then
  fail kernel "guest never reached /init: $(echo "$out" | tr '\n' ' ')"
elif [ "$exit_code" != 0 ]; then
  fail kernel "guest reached /init in $ready ms but after its reset the VMM exit was '$exit_code' (want 0)"
else
  pass kernel "busybox /init ran $ready ms after VMM start ($(grep -o 'cpus=.*' "$WORK/kernel-vmm.log" | head -1 | tr -d '\r')); guest reset → exit 0 at $(kv total_ms "$out") ms"
fi

require guest-initramfs

vmm_start boot
if ! agent_wait_ready 60; then
  fail boot "agent not reachable over hybrid vsock: $CHECK_OUT"
  vmm_stop
  finish
fi
serving=$(kv f3 "$CHECK_OUT")
if [ "$serving" != 1 ]; then
  fail boot "Check answered but serving=${serving:-false}: $(echo "$CHECK_OUT" | tr '\n' ' ')"
else
  info=$(agent GuestInfo)
  pass boot "agent Check answered ${AGENT_READY_MS} ms after VMM start, $(serving_ms) ms to its serving line (protocol $(kv f1 "$CHECK_OUT"), agent $(kv f2 "$CHECK_OUT")); guest kernel $(kv f1 "$info"), $(kv f3 "$info") cpu(s)"
fi

# A second connection on the same socket while the first is gone: the VMM's vsock muxer
# must not be one-shot.
if out=$(th-helper hvsock "$VMM_SOCK" $AGENT_PORT 2>&1); then
  pass handshake "second hybrid-vsock connection: $(kv handshake "$out")"
else
  fail handshake "second CONNECT $AGENT_PORT refused: $out"
fi
# A port nobody listens on must be refused, not hang.
if out=$(th-helper hvsock "$VMM_SOCK" 4321 2>&1); then
  fail refused "CONNECT to a port without listener succeeded: $out"
else
  pass refused "CONNECT to an unused port is refused: ${out#th-helper: }"
fi

agent DestroySandbox >/dev/null 2>&1
if vmm_wait_exit 30; then
  [ "$VMM_EXIT" = 0 ] && pass shutdown "DestroySandbox: guest reset, VMM exited 0" ||
    fail shutdown "VMM exited $VMM_EXIT after DestroySandbox"
else
  fail shutdown "VMM still running 30 s after DestroySandbox"
fi
vmm_stop
finish
