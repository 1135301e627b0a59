# boot: palisade-vmm boots the guest vmlinux + initramfs (agent as PID 1) on the test host's
# KVM; the agent answers its health check (Check) and GuestInfo through the VMM's
# hybrid-vsock Unix socket; DestroySandbox resets the guest and the VMM exits 0.
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs

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
  pass boot "agent Check answered ${AGENT_READY_MS} ms after VMM start (protocol $(kv f1 "$CHECK_OUT"), agent $(kv f2 "$CHECK_OUT")); guest kernel $(kv f1 "$info"), $(kv f3 "$info") cpu(s)"
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
