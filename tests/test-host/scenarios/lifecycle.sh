# lifecycle: (1) the guest resets itself (agent DestroySandbox → reboot → i8042 reset) and
# the VMM exits 0; (2) the VMM is killed with SIGKILL while the guest runs and a host peer
# is connected: the peer sees the connection end, and nothing is left on the host — no VMM
# process, no live socket; (3) a new VMM starts on the same socket path.
. /palisade/scenarios/lib.sh
require palisade-vmm guest-kernel guest-initramfs

# (1) guest-initiated reset.
vmm_start reset
if ! agent_wait_ready 60; then
  fail reset "agent not reachable: $CHECK_OUT"
  vmm_stop
  finish
fi
t0=$(now_ms)
agent DestroySandbox >/dev/null 2>&1
if vmm_wait_exit 30; then
  if [ "$VMM_EXIT" = 0 ]; then
    pass reset "guest reset → VMM exited 0 in $(($(now_ms) - t0)) ms"
  else
    fail reset "guest reset → VMM exited $VMM_EXIT (want 0)"
  fi
else
  fail reset "VMM still running 30 s after the guest was told to reset"
  vmm_stop
fi

# (2) kill -9 with a host peer connected to the agent.
vmm_start kill9
if ! agent_wait_ready 60; then
  fail kill9 "agent not reachable: $CHECK_OUT"
  vmm_stop
  finish
fi
pid=$VMM_PID
th-helper hvsock "$VMM_SOCK" $AGENT_PORT --hold 20 >"$WORK/peer.out" 2>&1 &
peer=$!
th-helper wait-log "$WORK/peer.out" handshake= 10 >/dev/null
kill -9 "$pid"
vmm_wait_exit 10
wait $peer
peer_result=$(kv peer_closed "$(cat "$WORK/peer.out")")
left=
[ -d "/proc/$pid" ] && left="$left process $pid;"
others=$(ps -o pid,comm | awk 'NR>1 && $2 ~ /palisade-vmm/ {print $1}' | tr '\n' ' ')
[ -n "$others" ] && left="$left palisade-vmm processes $others;"
# A socket still bound and alive shows up in /proc/net/unix with its path.
grep -q " $VMM_SOCK\$" /proc/net/unix && left="$left live socket $VMM_SOCK;"
if [ -n "$left" ]; then
  fail kill9 "left behind after kill -9:$left"
elif [ "$peer_result" != eof ] && [ "$peer_result" != reset ]; then
  fail kill9 "the connected host peer did not see the connection end: $(tr '\n' ' ' <"$WORK/peer.out")"
else
  file=none
  [ -e "$VMM_SOCK" ] && file="only the socket file (a killed process cannot unlink; its owner does — reused below)"
  pass kill9 "VMM killed -9: peer saw $peer_result, no process or live socket left; remains: $file"
fi

# (3) the next VMM on the same path. The stale socket file's owner (the shim, here the
# scenario) removes it; a VMM started before that must either reclaim the path or refuse
# with an error naming it — never hang or fail silently.
SOCK_PATH=$VMM_SOCK vmm_start reuse
if agent_wait_ready 60; then
  pass reuse "a new VMM reclaims the killed VMM's stale socket path (agent ready in ${AGENT_READY_MS} ms)"
else
  vmm_wait_exit 10
  if [ "$VMM_EXIT" != 0 ] && [ "$VMM_EXIT" != timeout ] && grep -q "$VMM_SOCK" "$VMM_LOG"; then
    detail="stale path refused (exit $VMM_EXIT: $(grep -o "cannot listen.*" "$VMM_LOG" | head -1))"
    vmm_stop
    rm -f "$VMM_SOCK"
    SOCK_PATH=$VMM_SOCK vmm_start reuse2
    if agent_wait_ready 60; then
      pass reuse "$detail; after the owner removed it a new VMM serves there (agent ready in ${AGENT_READY_MS} ms)"
    else
      fail reuse "$detail; after removing the file a new VMM still fails: $CHECK_OUT"
    fi
  else
    fail reuse "a new VMM on the stale socket path neither served nor refused clearly (exit $VMM_EXIT): $CHECK_OUT"
  fi
fi
vmm_stop
finish
