#!/usr/bin/env bash
# palisade's reliability and security suite (issue 8).
#
#   tests/reliability/run.sh [--quick] [--skip-fuzz] [--skip-vm]
#
# Parts (each ends with a leak diff: mounts, cgroups, processes, state dirs, sockets, FIFOs,
# taps — tests/src/leaks.rs):
#   native-churn         create/start/delete cycles through containerd + palisade's shim
#                        (1000; --quick 100; PALISADE_REL_CHURN_CYCLES overrides)
#   native-concurrency   20 concurrent pods through the shim
#   native-fault-*       kill -9 of a container's init, of the shim, containerd restarted
#                        mid-run, the runtime's state dir on a full file system
#   hostile-*            the malformed-spec table through the CLI and through the shim, and
#                        malformed Task API requests against a running task
#   vmm-seccomp          the VMM's real seccomp filters kill a thread making a forbidden syscall
#   vm-*                 the test host's reliability scenarios (VM churn 50 / --quick 10,
#                        faults), if tests/test-host/run.sh --list names them
#   fuzz                 every cargo-fuzz target, 300 s each (--quick 30 s; FUZZ_SECONDS)
# Every part prints `PALISADE-REL <part> cycles=.. faults=.. inputs=.. leaks=..`; this script
# folds those lines and the fuzz results into one table and exits nonzero on any leak, crash
# or failed part. Needs root, containerd + ctr, and (for vm-*) QEMU; see README.md.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
quick=0
skip_fuzz=0
skip_vm=0
vm_missing=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1; shift ;;
        --skip-fuzz) skip_fuzz=1; shift ;;
        --skip-vm) skip_vm=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//; /^set -uo/d'; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

if [[ $quick -eq 1 ]]; then
    fuzz_seconds="${FUZZ_SECONDS:-30}"
    churn_cycles="${PALISADE_REL_CHURN_CYCLES:-100}"
    vm_churn_cycles="${PALISADE_REL_VM_CHURN_CYCLES:-10}"
else
    fuzz_seconds="${FUZZ_SECONDS:-300}"
    churn_cycles="${PALISADE_REL_CHURN_CYCLES:-1000}"
    vm_churn_cycles="${PALISADE_REL_VM_CHURN_CYCLES:-50}"
fi

work=$(mktemp -d /tmp/palisade-reliability.XXXXXX)
trap 'rm -rf "$work"' EXIT
lines="$work/rel.lines"    # every PALISADE-REL line of every part
failed="$work/failed"      # parts whose command failed
: >"$lines"
: >"$failed"
start=$(date +%s)
cd "$ROOT" || exit 1

# run_part NAME CMD...: runs CMD, streaming its output to the console and a log, keeps its
# PALISADE-REL lines and records NAME as failed if CMD fails.
run_part() {
    local name=$1; shift
    local log="$work/$name.log" t0=$(date +%s)
    echo "== $name: $*"
    "$@" >"$log" 2>&1
    local rc=$?
    # cargo test prints `test NAME ... ` and the test's first line on one line.
    grep -oE 'PALISADE-REL(-LEAK|-FAIL)? .*$' "$log" | tee -a "$lines"
    if [[ $rc -ne 0 ]]; then
        echo "$name" >>"$failed"
        echo "-- $name FAILED (exit $rc); last lines of its output:"
        tail -n 60 "$log"
    fi
    echo "-- $name: $(( $(date +%s) - t0 )) s"
}

if [[ $(id -u) != 0 ]]; then
    echo "run.sh: the native parts need root (containers, cgroups, containerd)" >&2
    exit 1
fi

# One build of everything the parts run (the tests find the shim and CLI next to them).
run_part build cargo build -p containerd-shim-palisade-v2 -p palisade-runtime --bins

test_args=(-- --ignored --nocapture --test-threads=1)
run_part native-churn env PALISADE_REL_CHURN_CYCLES="$churn_cycles" \
    cargo test -p palisade-tests --test reliability "${test_args[@]}" --exact churn
run_part native-concurrency \
    cargo test -p palisade-tests --test reliability "${test_args[@]}" --exact concurrent_pods
run_part native-faults \
    cargo test -p palisade-tests --test reliability "${test_args[@]}" init_killed state_dir_on_full_filesystem
# The shim kill -9 and containerd-restart tests live with the shim's other ctr tests.
run_part native-faults-shim \
    cargo test -p palisade-tests --test shim_ctr -- --nocapture --test-threads=1 \
    shim_killed_leaves_nothing_behind containerd_restart_keeps_task_managed
run_part hostile-cli \
    cargo test -p palisade-runtime --test lifecycle -- --nocapture --exact bad_input_is_rejected_by_name_and_leaves_nothing
run_part hostile-shim \
    cargo test -p palisade-tests --test reliability "${test_args[@]}" hostile_
run_part vmm-seccomp cargo test -p palisade-vmm --test seccomp_confinement

# VM-side parts: scenarios of the nested test host, when they exist.
if [[ $skip_vm -eq 0 ]]; then
    vm_scenarios=()
    listed=$(tests/test-host/run.sh --list 2>/dev/null | awk '{print $1}')
    for s in vm-churn vm-faults; do
        grep -qx "$s" <<<"$listed" && vm_scenarios+=("$s")
    done
    if [[ ${#vm_scenarios[@]} -gt 0 ]]; then
        run_part vm env PALISADE_TEST_HOST_EXTRA_APPEND="palisade.churn_cycles=$vm_churn_cycles ${PALISADE_TEST_HOST_EXTRA_APPEND:-}" \
            tests/test-host/run.sh "${vm_scenarios[@]}"
    else
        echo "== vm: tests/test-host/run.sh --list names no vm-churn/vm-faults scenario; VM parts not run"
        vm_missing=1
    fi
fi

if [[ $skip_fuzz -eq 0 ]]; then
    echo "== fuzzing (${fuzz_seconds}s per target)"
    "$HERE/fuzz.sh" --seconds "$fuzz_seconds" --summary "$work/fuzz.tsv" || echo fuzz >>"$failed"
fi

# ---- summary ----
status=0
echo
echo "== summary ($(( $(date +%s) - start )) s)"
fmt='%-34s %8s %7s %7s %6s %12s %8s\n'
printf "$fmt" part cycles faults inputs leaks "fuzz execs" crashes
tc=0 tf=0 ti=0 tl=0 te=0 tx=0
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$2"; }
while read -r _ part rest; do
    [[ -n $part ]] || continue
    c=$(field cycles " $rest"); x=$(field failed " $rest"); f=$(field faults " $rest"); i=$(field inputs " $rest"); l=$(field leaks " $rest")
    [[ -z $x || $x == 0 ]] || part="$part ($x failed)"
    printf "$fmt" "$part" "${c:--}" "${f:--}" "${i:--}" "${l:--}" - -
    tc=$((tc + ${c:-0})); tf=$((tf + ${f:-0})); ti=$((ti + ${i:-0})); tl=$((tl + ${l:-0}))
done < <(grep -E '^PALISADE-REL ' "$lines")
if [[ -s "$work/fuzz.tsv" ]]; then
    while IFS=$'\t' read -r name execs crashes; do
        printf "$fmt" "fuzz $name" - - - - "$execs" "$crashes"
        te=$((te + execs)); tx=$((tx + crashes))
    done <"$work/fuzz.tsv"
elif [[ $skip_fuzz -eq 0 ]]; then
    printf "$fmt" "fuzz" - - - - "no results" FAIL
fi
[[ $vm_missing -eq 0 ]] || printf "$fmt" "vm-* (no test-host scenarios)" "not run" - - - - -
printf "$fmt" total "$tc" "$tf" "$ti" "$tl" "$te" "$tx"
if grep -qE '^PALISADE-REL-LEAK ' "$lines"; then
    echo "leftovers:"
    grep -E '^PALISADE-REL-LEAK ' "$lines" | sed 's/^PALISADE-REL-LEAK /  /'
fi
if grep -qE '^PALISADE-REL-FAIL ' "$lines"; then
    echo "failures:"
    grep -E '^PALISADE-REL-FAIL ' "$lines" | sed 's/^PALISADE-REL-FAIL /  /'
fi
[[ $tl -eq 0 && $tx -eq 0 ]] || status=1
if [[ -s "$failed" ]]; then
    echo "failed parts: $(tr '\n' ' ' <"$failed")"
    status=1
fi
if [[ $status -eq 0 ]]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
exit $status
