# smoke: the rig itself. L1's kvm-amd gives a working /dev/kvm and QEMU's microvm boots
# Debian's kernel with a busybox initramfs on it (2 vCPUs), to the guest's own poweroff.
. /palisade/scenarios/lib.sh

if [ ! -c /dev/kvm ]; then
  fail smoke "no /dev/kvm in the test host (kvm-amd did not load: $(dmesg | grep -i kvm | tail -1))"
  finish
fi

out=$(th-helper spawn-until --marker PALISADE-SMOKE-GUEST-READY --timeout 90 --log "$WORK/qemu.log" --wait 60 -- \
  $QEMU_MICROVM -m 256 -smp 2 \
  -kernel $GUEST_DIR/debian-vmlinuz -initrd $GUEST_DIR/smoke-initramfs.cpio \
  -append "console=ttyS0 panic=-1 quiet")
ready=$(kv ready_ms "$out")
exit_code=$(kv exit "$out")
guest_line=$(grep PALISADE-SMOKE-GUEST-READY "$WORK/qemu.log" | head -1 | tr -d '\r')
if [ "$ready" = none ] || [ -z "$ready" ]; then
  fail smoke "guest never printed its ready line ($out)"
elif [ "$exit_code" != 0 ]; then
  fail smoke "qemu exited '$exit_code' after the guest powered off ($out)"
else
  case $guest_line in
    *cpus=2*) pass smoke "Debian guest on L1 KVM ready in ${ready} ms, qemu exit 0 after $(kv total_ms "$out") ms: ${guest_line#*READY }" ;;
    *) fail smoke "guest does not see 2 CPUs: $guest_line" ;;
  esac
fi
finish
