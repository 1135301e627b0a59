# Shared by the pod-networking scenarios (net, net-bench): a private containerd, the VM-mode
# shim config, and network namespaces set up as CNI's bridge plugin leaves them.
# Sourced after lib.sh.

# iproute2's, by path: busybox's sh runs its own applets (busybox ip: no netns, no veth
# peers) before looking at PATH.
ip() { /palisade/bin/ip "$@"; }
tc() { /palisade/bin/tc "$@"; }

RUNTIME=io.containerd.palisade.v2
NET_IMAGE=docker.io/palisade/net:latest

# net_containerd_start: containerd on $WORK/containerd, the net image imported; defines ctr()
# and writes $WORK/vm.toml (the shim's config). Fails the
# scenario and returns 1 if anything of it fails.
net_containerd_start() {
  d=$WORK/containerd
  mkdir -p "$d"
  vm_shim_config "$WORK/vm.toml" 90
  containerd_config "$d"
  containerd --config "$d/config.toml" >"$WORK/containerd.log" 2>&1 &
  CONTAINERD_PID=$!
  n=0
  while [ ! -S "$d/containerd.sock" ] && [ $n -lt 300 ]; do usleep 100000; n=$((n + 1)); done
  if [ ! -S "$d/containerd.sock" ]; then
    fail "$SCENARIO" "containerd did not start: $(tail -3 "$WORK/containerd.log" | tr '\n' ' ')"
    return 1
  fi
  export CONTAINERD_SNAPSHOTTER=native
  if ! out=$(ctr image import --base-name docker.io/palisade/net /palisade/images/net.tar 2>&1); then
    fail "$SCENARIO" "ctr image import failed: $out"
    return 1
  fi
}

# stdin from /dev/null: the scenario's own stdin is the test host's console.
ctr() { command ctr --address "$WORK/containerd/containerd.sock" --namespace palisade "$@" </dev/null; }

net_containerd_stop() {
  [ -n "${CONTAINERD_PID:-}" ] || return 0
  kill "$CONTAINERD_PID" 2>/dev/null
  wait "$CONTAINERD_PID" 2>/dev/null
  # The shim's log lines (in containerd's log) for a failure report.
  grep -E 'palisade|shim' "$WORK/containerd.log" | tail -120 >"$WORK/shim.log" 2>/dev/null
}

# pod_netns NAME SUBNET MTU: network namespace NAME as the CNI bridge plugin leaves it: the
# container end `eth0` (SUBNET.5/16, a fixed locally administered MAC, MTU, default route via
# SUBNET.1) inside, the other end `v-NAME` (SUBNET.1/16) in L1's root namespace (where the
# bridge would be). Sets POD_MAC. The namespace is /run/netns/NAME (iproute2 keeps them
# there; /var/run is /run on Debian).
pod_netns() {
  name=$1 subnet=$2 mtu=$3
  POD_MAC=02:42:$(echo "$subnet" | awk -F. '{printf "%02x:%02x:%02x", $1, $2, $3}'):05
  mkdir -p /run/netns
  ip netns add "$name" &&
    ip link add "v-$name" mtu "$mtu" type veth peer name eth0 netns "$name" &&
    ip -n "$name" link set eth0 address "$POD_MAC" mtu "$mtu" up &&
    ip -n "$name" link set lo up &&
    ip -n "$name" addr add "$subnet.5/16" dev eth0 &&
    ip -n "$name" route add default via "$subnet.1" &&
    ip addr add "$subnet.1/16" dev "v-$name" &&
    ip link set "v-$name" up
}

pod_netns_del() {
  ip link del "v-$1" 2>/dev/null
  ip netns del "$1" 2>/dev/null
}

vmm_count() { ps -o comm | grep -cx palisade-vmm; }
