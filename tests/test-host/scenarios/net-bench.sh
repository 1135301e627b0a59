# net-bench: TCP throughput between L1 ("the host") and a container, VM mode vs native mode
# of the same shim, in one test-host run (iperf3 from Debian on both ends). Each mode's pod
# gets a network namespace set up as CNI's bridge plugin would (lib-net.sh: pod_netns): VM
# mode reaches it through tap + tc mirroring + virtio-net, native mode is the container in
# the namespace itself. The container runs `iperf3 -s`; L1 runs the client for
# host->container and, with -R, container->host. Prints
#   PALISADE-BENCH net-bench <direction> vm=<Mbit/s> native=<Mbit/s> ratio=<vm/native>
# Absolute numbers are TCG numbers (both L1 and the guest are emulated); the ratio is what
# compares. BENCH_SECONDS (palisade.bench_seconds=N on the kernel command line) sets the
# length of one iperf3 run (default 5).
. /palisade/scenarios/lib.sh
. /palisade/scenarios/lib-net.sh
require palisade-vmm guest-kernel guest-initramfs shim-vm net-tools

secs=5
for word in $(cat /proc/cmdline); do
  case $word in palisade.bench_seconds=*) secs=${word#palisade.bench_seconds=} ;; esac
done

cleanup() {
  for id in bench-vm bench-native; do
    ctr task kill -s KILL "$id" >/dev/null 2>&1
    ctr task delete -f "$id" >/dev/null 2>&1
    ctr container delete "$id" >/dev/null 2>&1
  done
  net_containerd_stop
  pod_netns_del podvm
  pod_netns_del podnat
}
if ! net_containerd_start; then
  cleanup
  finish
fi
if ! { pod_netns podvm 10.90.0 1500 && pod_netns podnat 10.91.0 1500; } >"$WORK/netns.log" 2>&1; then
  fail net-bench "setting up the pod netns failed: $(tr '\n' ' ' <"$WORK/netns.log")"
  cleanup
  finish
fi

# mbits FILE: the receiver's Mbit/s of an `iperf3 -f m` run.
mbits() { awk '/receiver/ {for (i = 1; i < NF; i++) if ($(i + 1) == "Mbits/sec") v = $i} END {print v}' "$1"; }

# measure MODE ID NETNS ADDR: starts the iperf3 server container, waits until it answers,
# runs both directions; sets UP (host->container) and DOWN (container->host) in Mbit/s.
measure() {
  mode=$1 id=$2 netns=$3 addr=$4
  UP= DOWN=
  if ! out=$(ctr run -d --runtime "$RUNTIME" --runtime-config-path "$WORK/$mode.toml" \
    --with-ns "network:/var/run/netns/$netns" "$NET_IMAGE" "$id" iperf3 -s 2>&1); then
    fail "$mode" "ctr run -d ($mode) failed: $(echo "$out" | head -c 300)"
    return 1
  fi
  # The server is up once a short probe connects (the VM boots first).
  n=0
  until iperf3 -c "$addr" -t 1 -f m >"$WORK/$mode-probe.log" 2>&1; do
    n=$((n + 1))
    if [ $n -ge 60 ]; then
      fail "$mode" "iperf3 server in the $mode container never answered: $(tail -2 "$WORK/$mode-probe.log" | tr '\n' ' ')"
      return 1
    fi
    sleep 1
  done
  iperf3 -c "$addr" -t "$secs" -f m >"$WORK/$mode-up.log" 2>&1
  iperf3 -c "$addr" -t "$secs" -f m -R >"$WORK/$mode-down.log" 2>&1
  UP=$(mbits "$WORK/$mode-up.log")
  DOWN=$(mbits "$WORK/$mode-down.log")
  ctr task kill -s KILL "$id" >/dev/null 2>&1
  n=0
  while [ "$(ctr task ls | awk -v id="$id" '$1 == id {print $3}')" = RUNNING ] && [ $n -lt 100 ]; do
    usleep 100000
    n=$((n + 1))
  done
  ctr task delete "$id" >/dev/null 2>&1
  ctr container delete "$id" >/dev/null 2>&1
  if [ -z "$UP" ] || [ -z "$DOWN" ]; then
    fail "$mode" "no iperf3 result: up='$(tail -3 "$WORK/$mode-up.log" | tr '\n' ' ')' down='$(tail -3 "$WORK/$mode-down.log" | tr '\n' ' ')'"
    return 1
  fi
  pass "$mode" "$mode mode: host->container $UP Mbit/s, container->host $DOWN Mbit/s (iperf3 -t $secs)"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "?"}'; }

if measure vm bench-vm podvm 10.90.0.5; then
  vm_up=$UP vm_down=$DOWN
  if measure native bench-native podnat 10.91.0.5; then
    echo "PALISADE-BENCH net-bench host->container vm=$vm_up native=$UP ratio=$(ratio "$vm_up" "$UP") Mbit/s"
    echo "PALISADE-BENCH net-bench container->host vm=$vm_down native=$DOWN ratio=$(ratio "$vm_down" "$DOWN") Mbit/s"
  fi
fi
cleanup
[ "${FAILED:-0}" = 0 ] && pass net-bench "TCP throughput measured in both modes (PALISADE-BENCH lines)"
finish
