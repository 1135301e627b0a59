# smoke: the rig itself, independent of palisade's code. L1's kvm-amd gives a working
# /dev/kvm and QEMU's microvm machine boots on it, with 2 vCPUs, to the guest's own reset:
#   smoke        Debian's kernel + a busybox initramfs;
#   smoke.guest-kernel  palisade's guest vmlinux (PVH) + the same busybox initramfs — tells
#                guest-kernel problems apart from palisade-vmm problems.
. /palisade/scenarios/lib.sh

if [ ! -c /dev/kvm ]; then
  fail smoke "no /dev/kvm in the test host (kvm-amd did not load: $(dmesg | grep -i kvm | tail -1))"
  finish
fi

# boot_check CHECK KERNEL LOG: boots KERNEL with the smoke initramfs, expects 2 CPUs.
boot_check() {
  out=$(th-helper spawn-until --marker PALISADE-SMOKE-GUEST-READY --timeout 90 --log "$3" --wait 30 -- \
    $QEMU_MICROVM -m 256 -smp 2 -kernel "$2" -initrd $GUEST_DIR/smoke-initramfs.cpio \
    -append "console=ttyS0 reboot=t panic=-1 quiet")
  ready=$(kv ready_ms "$out")
  exit_code=$(kv exit "$out")
  guest_line=$(grep PALISADE-SMOKE-GUEST-READY "$3" | head -1 | tr -d '\r')
  if [ "$ready" = none ] || [ -z "$ready" ]; then
    fail "$1" "guest never printed its ready line: $(echo "$out" | tr '\n' ' ')"
  elif [ "$exit_code" != 0 ]; then
    fail "$1" "qemu exited '$exit_code' after the guest reset: $(echo "$out" | tr '\n' ' ')"
  else
    case $guest_line in
      *cpus=2*) pass "$1" "$(basename "$2") on L1 KVM ready in ${ready} ms, qemu exit 0 after $(kv total_ms "$out") ms: ${guest_line#*READY }" ;;
      *) fail "$1" "guest does not see 2 CPUs: $guest_line" ;;
    esac
  fi
}

boot_check smoke $GUEST_DIR/debian-vmlinuz "$WORK/qemu-debian.log"
if grep -q '^guest-kernel ok' /palisade/components; then
  boot_check guest-kernel $GUEST_DIR/vmlinux "$WORK/qemu-guest-kernel.log"
else
  fail guest-kernel "blocked: $(grep '^guest-kernel ' /palisade/components)"
fi
finish
