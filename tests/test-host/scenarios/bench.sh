# bench: guest-ready time of palisade-vmm vs QEMU's microvm machine (the reference VMM),
# both on the test host's KVM, booting the same guest vmlinux + initramfs with the same
# memory, vCPUs and command line, each with a virtio-vsock device (palisade: hybrid vsock;
# QEMU: vhost-vsock). Rounds are interleaved, alternating which VMM goes first.
# "Ready" = the agent's ready line on the serial console, timed from process start by the
# same helper for both; RSS is sampled at that moment, total and outside guest RAM.
# Prints medians, the ratio (goal ≤ 0.8) and RSS; PASS means every run reached ready (a
# benchmark reports the ratio, it does not fail on it).
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs qemu

rounds=$(sed -n 's/.*palisade.bench_rounds=\([0-9]*\).*/\1/p' /proc/cmdline)
rounds=${rounds:-5}
mem=$GUEST_MEM_MIB

run_palisade() {
  rm -f "$WORK/bench.vsock"
  th-helper spawn-until --marker "$AGENT_READY_MARKER" --timeout 60 --log "$WORK/palisade-vmm.log" \
    --guest-mem-mib $mem --kill -- \
    palisade-vmm $VMM_BOOT_FLAGS --cmdline "$GUEST_CMDLINE" --vsock-socket "$WORK/bench.vsock"
}
run_qemu() {
  th-helper spawn-until --marker "$AGENT_READY_MARKER" --timeout 60 --log "$WORK/qemu.log" \
    --guest-mem-mib $mem --kill -- \
    $QEMU_MICROVM -m $mem -smp 1 -kernel $GUEST_DIR/vmlinux -initrd $GUEST_DIR/initramfs.cpio.gz \
    -append "$GUEST_CMDLINE" -device vhost-vsock-device,guest-cid=3
}

: >"$WORK/palisade.ms"
: >"$WORK/qemu.ms"
record() { # record VMM OUTPUT
  ready=$(kv ready_ms "$2")
  if [ -z "$ready" ] || [ "$ready" = none ]; then
    fail bench "$1 did not reach ready: $(echo "$2" | tr '\n' ' ')"
    finish
  fi
  echo "$ready $(kv rss_kib "$2") $(kv rss_outside_guest_kib "$2")" >>"$WORK/$1.ms"
  echo "PALISADE-BENCH vm-boot $1 round=$round ready_ms=$ready rss_kib=$(kv rss_kib "$2") rss_outside_guest_kib=$(kv rss_outside_guest_kib "$2")"
}
round=1
while [ $round -le $rounds ]; do
  if [ $((round % 2)) = 1 ]; then
    record palisade "$(run_palisade)"
    record qemu "$(run_qemu)"
  else
    record qemu "$(run_qemu)"
    record palisade "$(run_palisade)"
  fi
  round=$((round + 1))
done

median() { # median COLUMN FILE
  sort -n -k"$1" "$2" | awk -v c="$1" '{v[NR]=$c} END {if (NR%2) print v[(NR+1)/2]; else printf "%d", (v[NR/2]+v[NR/2+1])/2}'
}
p_ms=$(median 1 "$WORK/palisade.ms")
q_ms=$(median 1 "$WORK/qemu.ms")
p_rss=$(median 2 "$WORK/palisade.ms")
q_rss=$(median 2 "$WORK/qemu.ms")
p_own=$(median 3 "$WORK/palisade.ms")
q_own=$(median 3 "$WORK/qemu.ms")
ratio=$(awk -v p="$p_ms" -v q="$q_ms" 'BEGIN {printf "%.2f", p/q}')
# TCG-nested timings on a shared machine are noisy: the fastest round of each is reported too.
p_min=$(sort -n "$WORK/palisade.ms" | head -1 | cut -d' ' -f1)
q_min=$(sort -n "$WORK/qemu.ms" | head -1 | cut -d' ' -f1)
min_ratio=$(awk -v p="$p_min" -v q="$q_min" 'BEGIN {printf "%.2f", p/q}')
goal=$(awk -v r="$ratio" 'BEGIN {print (r <= 0.8) ? "met" : "NOT met"}')
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k/1024}'; }
echo "PALISADE-BENCH vm-boot summary rounds=$rounds palisade_ready_ms=$p_ms qemu_ready_ms=$q_ms ratio=$ratio palisade_min_ms=$p_min qemu_min_ms=$q_min min_ratio=$min_ratio palisade_rss_kib=$p_rss palisade_rss_outside_guest_kib=$p_own qemu_rss_kib=$q_rss qemu_rss_outside_guest_kib=$q_own"
pass bench "guest ready (median of $rounds, interleaved): palisade-vmm $p_ms ms vs qemu microvm $q_ms ms = ratio $ratio (goal ≤ 0.80: $goal; fastest rounds $p_min vs $q_min ms = $min_ratio); RSS at ready: palisade-vmm $(mib "$p_rss") MiB ($(mib "$p_own") MiB outside guest RAM) vs qemu $(mib "$q_rss") MiB ($(mib "$q_own") MiB)"
finish
