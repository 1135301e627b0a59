# net-bench: TCP throughput between L1 ("the host") and a pod, VM mode vs native mode, in
# one test-host run (iperf3 from Debian on both ends). Each side gets a network namespace set
# up as CNI's bridge plugin would (lib-net.sh: pod_netns):
#   vm      a VM-mode container (`ctr run --with-ns`, iperf3 -s inside): veth -> tc mirred
#           -> tap -> palisade-vmm virtio-net -> guest
#   native  the same image and command in a native-mode container of palisade's shim, in
#           its own pod netns (the container's process sits in that netns)
#   netns   iperf3 -s run in a pod netns directly, no container: the ceiling of the path
# L1 runs the client: host->container, and with -R container->host. Prints
#   PALISADE-BENCH net-bench <direction> vm=<Mbit/s> native=<Mbit/s> netns=<Mbit/s> ratio=<vm/native>
# Absolute numbers are TCG numbers (L1 is emulated; the guest runs on its nested KVM); the
# ratio is what compares. palisade.bench_seconds=N on the kernel command line sets the
# length of one iperf3 run (default 5).
#
# Native mode cannot pivot_root out of L1's initramfs: like ctr-bench, the scenario re-runs
# itself in a mount namespace whose root is a bind mount of the test host's tree.
if [ -z "${NET_BENCH_ROOT_MOVED:-}" ]; then
  mkdir -p /net-bench-root
  exec unshare -m sh -c 'mount --rbind / /net-bench-root && cd /net-bench-root && mount --move . / &&
    exec chroot . env NET_BENCH_ROOT_MOVED=1 sh /palisade/scenarios/net-bench.sh'
fi
. /palisade/scenarios/lib.sh
. /palisade/scenarios/lib-net.sh
require palisade-vmm guest-kernel guest-initramfs shim-vm net-tools

secs=5
for word in $(cat /proc/cmdline); do
  case $word in palisade.bench_seconds=*) secs=${word#palisade.bench_seconds=} ;; esac
done

cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null
  for id in bench-vm bench-native; do
    ctr task kill -s KILL "$id" >/dev/null 2>&1
    ctr task delete -f "$id" >/dev/null 2>&1
    ctr container delete "$id" >/dev/null 2>&1
  done
  net_containerd_stop
  pod_netns_del podvm
  pod_netns_del podnative
  pod_netns_del podnat
}
if ! net_containerd_start; then
  cleanup
  finish
fi
cat >"$WORK/native.toml" <<TOML
[shim]
default_mode = "native"

[native]
engine = "library"
runtime_root = "/run/palisade-net-bench"
TOML
if ! { pod_netns podvm 10.90.0 1500 && pod_netns podnative 10.92.0 1500 &&
  pod_netns podnat 10.91.0 1500; } >"$WORK/netns.log" 2>&1; then
  fail net-bench "setting up the pod netns failed: $(tr '\n' ' ' <"$WORK/netns.log")"
  cleanup
  finish
fi

# mbits FILE: the receiver's Mbit/s of an `iperf3 -f m` run.
mbits() { awk '/receiver/ {for (i = 1; i < NF; i++) if ($(i + 1) == "Mbits/sec") v = $i} END {print v}' "$1"; }

# measure MODE ID NETNS ADDR: starts the iperf3 server (MODE vm / native: a container of
# that mode; netns: in the namespace directly), waits until it answers, runs both directions; sets UP
# (host->pod) and DOWN (pod->host) in Mbit/s.
measure() {
  mode=$1 id=$2 netns=$3 addr=$4
  UP= DOWN= SERVER_PID=
  if [ "$mode" = netns ]; then
    ip netns exec "$netns" iperf3 -s >"$WORK/netns-server.log" 2>&1 &
    SERVER_PID=$!
  elif ! out=$(ctr run -d --runtime "$RUNTIME" --runtime-config-path "$WORK/$mode.toml" \
    --with-ns "network:/run/netns/$netns" "$NET_IMAGE" "$id" iperf3 -s 2>&1); then
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
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
  else
    ctr task kill -s KILL "$id" >/dev/null 2>&1
    n=0
    while [ "$(ctr task ls | awk -v id="$id" '$1 == id {print $3}')" = RUNNING ] && [ $n -lt 100 ]; do
      usleep 100000
      n=$((n + 1))
    done
    ctr task delete "$id" >/dev/null 2>&1
    ctr container delete "$id" >/dev/null 2>&1
  fi
  if [ -z "$UP" ] || [ -z "$DOWN" ]; then
    fail "$mode" "no iperf3 result: up='$(tail -3 "$WORK/$mode-up.log" | tr '\n' ' ')' down='$(tail -3 "$WORK/$mode-down.log" | tr '\n' ' ')'"
    return 1
  fi
  pass "$mode" "$mode: host->pod $UP Mbit/s, pod->host $DOWN Mbit/s (iperf3 -t $secs)"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "?"}'; }

if measure vm bench-vm podvm 10.90.0.5; then
  vm_up=$UP vm_down=$DOWN
  if measure native bench-native podnative 10.92.0.5; then
    native_up=$UP native_down=$DOWN
    if measure netns - podnat 10.91.0.5; then
      echo "PALISADE-BENCH net-bench host->pod vm=$vm_up native=$native_up netns=$UP ratio=$(ratio "$vm_up" "$native_up") Mbit/s"
      echo "PALISADE-BENCH net-bench pod->host vm=$vm_down native=$native_down netns=$DOWN ratio=$(ratio "$vm_down" "$native_down") Mbit/s"
    fi
  fi
fi
cleanup
[ "${FAILED:-0}" = 0 ] && pass net-bench "TCP throughput measured in both modes (PALISADE-BENCH lines)"
finish
