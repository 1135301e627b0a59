# container: a busybox container runs in the microVM through the agent, the way the shim
# drives it: the rootfs is an ext4 image on a virtio-blk drive, the OCI config.json goes over
# ttrpc (CreateContainer), then StartContainer, ReadStdout until EOF, WaitProcess.
# Its stdout must reach the host and its exit code (7) must be reported.
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs

bundle=/palisade/container
id=busybox-1
vmm_start container --block "$bundle/rootfs.ext4,ro"
if ! agent_wait_ready 60; then
  fail container "agent not reachable: $CHECK_OUT"
  vmm_stop
  finish
fi

step() { # step NAME METHOD FIELDS...: one agent call, failing the scenario on error.
  name=$1
  shift
  if ! STEP_OUT=$(agent "$@" 2>&1); then
    fail container "$name failed: $(echo "$STEP_OUT" | tr '\n' ' ')"
    vmm_stop
    finish
  fi
}

step create CreateContainer "1=$id" "2@=$bundle/config.json" '3{' 1=/dev/vda 4=ext4 5=ro '}'
step start StartContainer "1=$id"
: >"$WORK/stdout"
eof=0
reads=0
while [ "$eof" != 1 ] && [ $reads -lt 200 ]; do
  step read-stdout --save 1 "$WORK/stdout" ReadStdout "1=$id"
  eof=$(kv f2 "$STEP_OUT")
  reads=$((reads + 1))
done
step wait WaitProcess "1=$id"
status=$(kv f1 "$STEP_OUT")
step remove RemoveContainer "1=$id"

first=$(head -1 "$WORK/stdout")
if [ "$eof" != 1 ]; then
  fail container "stdout never reached EOF after $reads reads"
elif [ "$first" != "hello from a palisade microVM container" ]; then
  fail container "unexpected stdout: $(head -c 300 "$WORK/stdout" | tr '\n' '|')"
elif [ "${status:-0}" != 7 ]; then
  fail container "exit status ${status:-0 (field absent)}, want 7; stdout: $(tr '\n' '|' <"$WORK/stdout")"
else
  pass container "stdout reached the host ($(sed -n 2p "$WORK/stdout")), exit status 7 reported"
fi
vmm_stop
finish
