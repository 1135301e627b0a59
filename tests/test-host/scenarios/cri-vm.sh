# cri-vm: the Kubernetes path in VM mode (issue 7, must-show 2 and 3). containerd with its
# CRI plugin and the shipped runtime-handler snippet (deploy/containerd/config-1.6.toml:
# handler `palisade` -> io.containerd.palisade.v2 with ConfigPath
# /etc/palisade/configuration-vm.toml, written from deploy/configuration-vm.toml with this
# test host's paths) and a CNI config (Debian's plugins: bridge `cni0` 10.95.0.1/24 and
# fd95::1/64, MTU 1450, host-local IPAM). A CRI client (cri-vm-check,
# tests/src/bin/cri-vm-check.rs) plays the kubelet, first for a host-network pod, then for
# a pod in its own netns. Checks:
#   check       `palisade check` with that config: exit 0, hardware KVM (kvm-amd), the
#               configured guest kernel, "VM mode: ready"
#   pod         RunPodSandbox starts exactly one palisade-vmm and one shim
#   containers  two containers start in the pod, still in that one VM
#   boot-id     both see the same guest boot id (not the test host's) and the guest kernel
#   exec        ExecSync: stdout, stderr, exit code 3
#   log         the container's stdout/stderr lines are in its CRI log file
#   stop        StopContainer: SIGTERM reaches the guest process (its trap exits 0)
#   cleanup     StopPodSandbox + RemovePodSandbox: no VMM, no shim, no new socket or mount,
#               no VM state dir, no bundle
# The CNI pod (issue 9: VM mode uses exactly the network CNI set up in the pod netns):
#   cni-pod      RunPodSandbox: one VMM and shim, an IP in PodSandboxStatus, the pod netns
#                holds CNI's veth eth0 and the shim's tap
#   cni-identity the guest's eth0 (ExecSync) has the veth's MAC and MTU (1450) and the pod
#                IP, default route via 10.95.0.1
#   cni-dns      in the guest: hostname = the pod's name, /etc/resolv.conf has the pod's
#                DNS config (server, search, ndots), /etc/hosts is the node's
#   cni-ping     the container pings the bridge (10.95.0.1)
#   cni-fetch    the container wgets a token from a server in L1 that sees the pod IP
#   cni-serve    L1 fetches a token from busybox httpd in the container at the pod IP
#   cni-ipv6     dual-stack: the guest's eth0 has the veth's IPv6 address (CRI's second pod
#                IP) and a default route via fd95::1; the container pings it; L1 fetches
#                the token at the pod's IPv6 address
#   cni-localhost a second container gets that token from 127.0.0.1 and has the same eth0
#   cni-pod-to-pod a second CNI pod (its own VM) gets that token at the first pod's IP
#   cni-vmm-crash kill -9 of the second pod's VMM: its tap leaves the netns (the shim), the
#                pod goes NOTREADY and its container EXITED 137 (CRI), the first pod serves on
#   cni-cleanup  as cleanup
#   cni-netns    afterwards the netns file is gone; the namespace (held open by the
#                client) has only lo: no tap, no veth, no tc filter; no process in it; no
#                bridge port in L1; host-local released the IP
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs shim-vm cri-vm
# iproute2's when the image has it (net-tools), else busybox's: both list and delete links.
ip() { if [ -x /palisade/bin/ip ]; then /palisade/bin/ip "$@"; else busybox ip "$@"; fi; }

IMAGE=docker.io/palisade/busybox:latest
PAUSE_IMAGE=docker.io/palisade/pause:latest
VM_CONFIG=/etc/palisade/configuration-vm.toml
d=$WORK/containerd
mkdir -p "$d" "$WORK/pod-logs" /etc/palisade

# The shipped VM config with the test host's VMM, kernel and initramfs, a boot timeout
# for nested TCG and the spare drives two app containers need.
sed -e "s|^vmm = .*|vmm = \"/palisade/bin/palisade-vmm\"|" \
  -e "s|^kernel = .*|kernel = \"$GUEST_DIR/vmlinux\"|" \
  -e "s|^initramfs = .*|initramfs = \"$GUEST_DIR/initramfs.cpio.gz\"|" \
  -e "s|^memory_mib = .*|memory_mib = $GUEST_MEM_MIB|" \
  -e "s|^boot_timeout_secs = .*|boot_timeout_secs = 120|" \
  -e "s|^spare_disks = .*|spare_disks = 2|" \
  /palisade/deploy/configuration-vm.toml >"$VM_CONFIG"
if ! grep -q "^kernel = \"$GUEST_DIR/vmlinux\"" "$VM_CONFIG" || ! grep -q '^default_mode = "vm"' "$VM_CONFIG"; then
  fail cri-vm "deploy/configuration-vm.toml changed shape; cannot point it at the test host: $(grep -E '^(default_mode|vmm|kernel|initramfs) ' "$VM_CONFIG" | tr '\n' ' ')"
  finish
fi

# check: palisade check with the config the handler uses.
out=$(palisade check --config "$VM_CONFIG" 2>&1)
rc=$?
echo "$out" >"$WORK/check.log"
if [ $rc = 0 ] && echo "$out" | grep -q '^ok    kvm            hardware (AMD-V)' &&
  echo "$out" | grep -q "^ok    guest-kernel   $GUEST_DIR/vmlinux" &&
  echo "$out" | grep -q '^VM mode: ready'; then
  pass check "palisade check: exit 0, $(echo "$out" | grep '^ok    kvm' | sed 's/  */ /g'), guest kernel $GUEST_DIR/vmlinux, VM mode: ready"
else
  fail check "palisade check exit $rc: $(echo "$out" | tr '\n' '|' | head -c 600)"
fi

# CRI's stream server listens on 127.0.0.1; every pod gets copies of the node's
# /etc/hosts and /etc/resolv.conf (RunPodSandbox fails without them).
ip link set lo up
[ -f /etc/hosts ] || echo "127.0.0.1 localhost" >/etc/hosts
[ -f /etc/resolv.conf ] || : >/etc/resolv.conf
containerd_config "$d" debug "$(cat <<TOML
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$WORK/cni"
TOML
)"
# The pod network, dual-stack: a bridge with the gateway addresses (no masquerading: nothing
# leaves L1) and host-local IPAM with a default route per family. The CRI plugin runs the loopback plugin for the
# pod's lo itself. MTU 1450, not the default, so the guest's MTU shows it was carried over.
# A subnet of its own: net and net-bench use 10.88-10.92.x.x/16 in the same L1.
CNI_GATEWAY=10.95.0.1
# The bridge plugin turns on forwarding (isGateway) for the node; put back afterwards.
FORWARD4=$(cat /proc/sys/net/ipv4/ip_forward)
FORWARD6=$(cat /proc/sys/net/ipv6/conf/all/forwarding)
CNI_GATEWAY6=fd95::1
CNI_MTU=1450
mkdir -p "$WORK/cni"
cat >"$WORK/cni/10-palisade.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "palisade-cri",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "mtu": $CNI_MTU,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [{ "subnet": "10.95.0.0/24", "gateway": "$CNI_GATEWAY" }],
          [{ "subnet": "fd95::/64", "gateway": "$CNI_GATEWAY6" }]
        ],
        "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }]
      }
    }
  ]
}
JSON
# The shipped handler snippet, as an operator merges it (its `version` line is ours).
grep -v '^version' /palisade/deploy/config-1.6.toml >>"$d/config.toml"

containerd --config "$d/config.toml" >"$WORK/containerd.log" 2>&1 &
CONTAINERD_PID=$!
stop_containerd() {
  kill "$CONTAINERD_PID" 2>/dev/null
  wait "$CONTAINERD_PID" 2>/dev/null
}
n=0
while [ ! -S "$d/containerd.sock" ] && [ $n -lt 300 ]; do usleep 100000; n=$((n + 1)); done
if [ ! -S "$d/containerd.sock" ]; then
  fail cri-vm "containerd did not start: $(tail -3 "$WORK/containerd.log" | tr '\n' ' ')"
  stop_containerd
  finish
fi
for img in busybox pause; do
  if ! out=$(ctr --address "$d/containerd.sock" --namespace k8s.io image import \
    --base-name "docker.io/palisade/$img" "/palisade/images/$img.tar" 2>&1 </dev/null); then
    fail cri-vm "ctr image import $img into k8s.io failed: $out"
    stop_containerd
    finish
  fi
done

guest_release=$(strings "$GUEST_DIR/vmlinux" | sed -n 's/^Linux version \([0-9][^ ]*\) .*/\1/p' | head -1)
# cri_check NAME [cri-vm-check flags...]: one run of the CRI client, its PASS/FAIL lines
# turned into checks.
cri_check() {
  name=$1
  shift
  cri-vm-check --socket "$d/containerd.sock" --handler palisade --image "$IMAGE" \
    --containerd-state "$d/state" --log-dir "$WORK/pod-logs" --step-timeout 120 "$@" \
    </dev/null >"$WORK/$name.out" 2>"$WORK/$name-stderr.log"
  rc=$?
  failed_before=${FAILED:-0}
  FAILED=0
  while read -r status check detail; do
    case $status in
      PASS) pass "$check" "$detail" ;;
      FAIL) fail "$check" "$detail" ;;
    esac
  done <"$WORK/$name.out"
  [ $rc = 0 ] || [ "$FAILED" = 1 ] || fail cri-vm "cri-vm-check ($name) exited $rc: $(tail -3 "$WORK/$name-stderr.log" | tr '\n' ' ')"
  [ "$failed_before" = 1 ] && FAILED=1
}
cri_check cri --guest-release "$guest_release"
# The CNI pod, after the host-network one has gone.
cni=$(grep '^cni ' /palisade/components)
case $cni in
  "cni ok"*)
    cri_check cri-cni --network cni --cni-gateway "$CNI_GATEWAY" --cni-gateway6 "$CNI_GATEWAY6" --cni-mtu "$CNI_MTU"
    # For a failure report: L1's links and addresses after the pod.
    ip -d addr show >"$WORK/l1-net.log" 2>&1
    ;;
  *) fail cni "blocked: ${cni:-component cni not in the image}" ;;
esac

stop_containerd
# What CNI leaves on a node by design (the bridge plugin never removes its bridge, host-local
# keeps its state dir, forwarding stays on) goes: later scenarios share L1's root netns.
if ip link show cni0 >/dev/null 2>&1 && ! out=$(ip link del cni0 2>&1); then
  fail cni "removing the CNI bridge cni0 after the pods failed: $out"
fi
rm -rf /var/lib/cni
echo "$FORWARD4" >/proc/sys/net/ipv4/ip_forward
echo "$FORWARD6" >/proc/sys/net/ipv6/conf/all/forwarding
# For a failure report: the shim's lines (containerd's log at debug level) and the pod's
# VM console if a bundle is still there.
grep -E 'palisade|shim|level=error' "$WORK/containerd.log" | tail -80 >"$WORK/shim.log" 2>/dev/null
for f in "$d"/state/io.containerd.runtime.v2.task/k8s.io/*/vm-console.log; do
  [ -f "$f" ] && cp "$f" "$WORK/vm-console-$(basename "$(dirname "$f")" | cut -c1-12).log"
done
[ "${FAILED:-0}" = 0 ] && pass cri-vm "all checks passed"
finish
