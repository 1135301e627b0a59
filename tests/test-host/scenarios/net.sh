# net: pod networking in VM mode (issue 9). A network namespace set up as CNI's bridge plugin
# would (lib-net.sh: pod_netns), and `ctr run --runtime io.containerd.palisade.v2
# --with-ns network:/run/netns/pod1` in VM mode: the shim mirrors the pod's veth to a tap
# with tc, starts the VMM in the namespace and configures the guest through the agent.
# Everything stays inside L1. Checks:
#   identity  the guest's eth0 has the netns's MAC, MTU (1450, not the default) and address,
#             and its default route
#   ping      the container pings the veth peer (L1's side)
#   fetch     the container fetches a file over TCP (busybox wget) from busybox httpd on the
#             peer side; the content matches
#   teardown  after `ctr run --rm`: no palisade-vmm, no tap, no ingress qdisc on the veth
. /palisade/scenarios/lib.sh
. /palisade/scenarios/lib-net.sh
require palisade-vmm guest-kernel guest-initramfs shim-vm net-tools

cleanup() {
  [ -n "${HTTPD_PID:-}" ] && kill "$HTTPD_PID" 2>/dev/null
  net_containerd_stop
  pod_netns_del pod1
}
if ! net_containerd_start; then
  cleanup
  finish
fi
if ! pod_netns pod1 10.88.0 1450 >"$WORK/netns.log" 2>&1; then
  fail net "setting up the pod netns failed: $(tr '\n' ' ' <"$WORK/netns.log")"
  cleanup
  finish
fi

mkdir -p "$WORK/www"
token=palisade-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$token" >"$WORK/www/hello.txt"
busybox httpd -f -p 10.88.0.1:8080 -h "$WORK/www" &
HTTPD_PID=$!

t0=$(now_ms)
ctr run --rm --runtime "$RUNTIME" --runtime-config-path "$WORK/vm.toml" \
  --with-ns network:/run/netns/pod1 "$NET_IMAGE" net1 sh -c '
    echo "LINK $(ip -o link show eth0)"
    echo "ADDR $(ip -o addr show dev eth0 | tr "\n" ";")"
    echo "ROUTE $(ip route | tr "\n" ";")"
    if ping -c 3 -W 5 10.88.0.1 >/tmp/ping.out 2>&1; then echo "PING ok"; else echo "PING failed: $(tr "\n" " " </tmp/ping.out)"; fi
    echo "FETCH $(wget -q -O - http://10.88.0.1:8080/hello.txt 2>&1 | tr "\n" " ")"
    # Diagnostics only (not a result): the same file over a plain TCP connection.
    echo "NCFETCH $(printf "GET /hello.txt HTTP/1.0\r\n\r\n" | nc -w 20 10.88.0.1 8080 2>&1 | tail -n 1)"
  ' >"$WORK/run.log" 2>&1
rc=$?
t_run=$(($(now_ms) - t0))
line() { sed -n "s/^$1 //p" "$WORK/run.log" | head -1; }

link=$(line LINK)
addr=$(line ADDR)
route=$(line ROUTE)
if [ $rc = 0 ] && echo "$link" | grep -q "link/ether $POD_MAC " && echo "$link" | grep -q " mtu 1450 " &&
  echo "$addr" | grep -q "inet 10.88.0.5/16 " && echo "$route" | grep -q "default via 10.88.0.1 dev eth0"; then
  pass identity "guest eth0 has the netns's MAC $POD_MAC, MTU 1450, 10.88.0.5/16, default via 10.88.0.1 (ctr run --rm: ${t_run} ms)"
else
  fail identity "rc=$rc link='$link' addr='$addr' route='$route'; output: $(head -c 600 "$WORK/run.log" | tr '\n' '|')"
fi
ping_result=$(line PING)
if [ "$ping_result" = ok ]; then
  pass ping "the container pinged 10.88.0.1 (the veth peer in L1) 3 times"
else
  fail ping "${ping_result:-no PING line}"
fi
fetched=$(line FETCH)
fetched=${fetched% }
if [ "$fetched" = "$token" ]; then
  pass fetch "wget http://10.88.0.1:8080/hello.txt from the container: content matches ($token)"
else
  fail fetch "wget got '$(echo "$fetched" | head -c 200)', want '$token' (plain TCP with nc got '$(line NCFETCH | head -c 100)')"
fi

n=0
while [ "$(vmm_count)" != 0 ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
taps=$(ip -n pod1 -o link show | grep -c _palisade)
qdisc=$(tc -n pod1 qdisc show dev eth0 | grep -c ingress)
if [ "$(vmm_count)" = 0 ] && [ "$taps" = 0 ] && [ "$qdisc" = 0 ]; then
  pass teardown "after ctr run --rm: no palisade-vmm, no tap, no ingress qdisc on the pod's eth0"
else
  fail teardown "$(vmm_count) palisade-vmm, $taps taps, $qdisc ingress qdiscs left: $(ip -n pod1 -o link show | tr '\n' '|')"
fi

cleanup
[ "${FAILED:-0}" = 0 ] && pass net "all checks passed"
finish
