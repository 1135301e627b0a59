#!/usr/bin/env bash
# Verify a built guest kernel .config: every option the guest needs is =y.
# Usage: guest-kernel/check-config.sh [CONFIG]   (default: <repo>/build/guest-kernel/config)
# Checks (1) the explicit list below, which is the contract with the agent/VMM, and
# (2) every `CONFIG_X=y` in config.fragment (kconfig silently drops options whose
# dependencies are unmet; this catches that).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:-$here/../build/guest-kernel/config}"
[[ -f "$config" ]] || { echo "check-config: no such file: $config" >&2; exit 2; }

required=(
    64BIT SMP HYPERVISOR_GUEST PARAVIRT PVH KVM_GUEST
    VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VSOCKETS VIRTIO_VSOCKETS
    EXT4_FS OVERLAY_FS FUSE_FS VIRTIO_FS
    NAMESPACES UTS_NS IPC_NS PID_NS NET_NS USER_NS TIME_NS
    CGROUPS MEMCG CGROUP_SCHED FAIR_GROUP_SCHED CFS_BANDWIDTH CPUSETS CGROUP_PIDS INOTIFY_USER
    BLK_CGROUP CGROUP_FREEZER CGROUP_BPF BPF_SYSCALL
    SECCOMP SECCOMP_FILTER
    SERIAL_8250 SERIAL_8250_CONSOLE DEVTMPFS BLK_DEV_INITRD RD_GZIP
    NET UNIX INET HW_RANDOM_VIRTIO VIRTIO_NET
    TTY UNIX98_PTYS PROC_FS SYSFS TMPFS POSIX_MQUEUE MULTIUSER FUTEX EPOLL SIGNALFD
    TIMERFD EVENTFD SHMEM FILE_LOCKING BINFMT_ELF BINFMT_SCRIPT PRINTK
)
from_fragment=$(sed -n 's/^CONFIG_\([A-Za-z0-9_]*\)=y$/\1/p' "$here/config.fragment")

missing=0
for opt in "${required[@]}" $from_fragment; do
    if ! grep -qx "CONFIG_${opt}=y" "$config"; then
        echo "check-config: CONFIG_${opt} is not =y in $config (got: $(grep -E "^(# )?CONFIG_${opt}[= ]" "$config" || echo absent))" >&2
        missing=$((missing + 1))
    fi
done
if ((missing)); then
    echo "check-config: FAIL: $missing option(s) missing" >&2
    exit 1
fi
echo "check-config: OK: ${#required[@]} required + $(wc -w <<<"$from_fragment") fragment options are =y"
