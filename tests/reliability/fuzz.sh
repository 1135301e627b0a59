#!/usr/bin/env bash
# Bounded libFuzzer run of every palisade fuzz target (fuzz/, issue 8).
#
#   tests/reliability/fuzz.sh [--seconds N] [--targets "a b ..."] [--summary FILE] [--no-build]
#
# Builds the targets with `cargo fuzz` (installed from crates.io if missing), replays the
# committed crash reproducers (fuzz/regressions/<target>/*), then fuzzes each target for N
# seconds (default 30) in a single process, starting from the committed seed corpus
# (fuzz/corpus/<target>, never written to: new inputs go to a scratch directory).
# Prints per target: executions, crashes. Exits nonzero if anything crashed.
#
# Stable toolchain: cargo-fuzz's default AddressSanitizer needs `-Zsanitizer`, i.e. nightly,
# so we build with `--sanitizer none` (coverage instrumentation uses stable -C flags). The
# code under test is safe Rust over vm-memory's bounds-checked accessors: what we hunt is
# panics, aborts, timeouts and OOMs, which need no sanitizer. FUZZ_SANITIZER=address (with
# RUSTC_BOOTSTRAP=1 on stable) enables ASan when a nightly-like toolchain is acceptable.
#
# Environment: CARGO_TARGET_DIR (default <repo>/fuzz/target), FUZZ_SANITIZER (none),
# FUZZ_CODEGEN_UNITS (16: faster builds, slightly slower fuzzing), FUZZ_CORPUS_OUT (keep
# the inputs libFuzzer found under this directory, one subdirectory per target, e.g. to
# refresh the seed corpus with `<target binary> -merge=1 fuzz/corpus/<t> $FUZZ_CORPUS_OUT/<t>`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FUZZ_DIR="$ROOT/fuzz"
ALL_TARGETS="virtio_vsock_tx virtio_net_tx virtio_blk_request virtio_mmio_registers oci_config seccomp_profile agent_request"

seconds=30
targets="$ALL_TARGETS"
summary=""
build=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --targets) targets="$2"; shift 2 ;;
        --summary) summary="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "fuzz.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]] || { echo "fuzz.sh: --seconds needs a positive integer" >&2; exit 2; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FUZZ_DIR/target}"
sanitizer="${FUZZ_SANITIZER:-none}"
codegen_units="${FUZZ_CODEGEN_UNITS:-16}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi

if [[ $build -eq 1 ]]; then
    build_start=$(date +%s)
    echo "fuzz.sh: building targets (sanitizer=$sanitizer, target dir $CARGO_TARGET_DIR)"
    (cd "$FUZZ_DIR" && cargo fuzz build --sanitizer "$sanitizer" --codegen-units "$codegen_units" \
        --target-dir "$CARGO_TARGET_DIR")
    echo "fuzz.sh: build took $(( $(date +%s) - build_start )) s"
fi

bin_dir="$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release"
work=$(mktemp -d /tmp/palisade-fuzz-run.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The targets' scratch files (disk images, vsock sockets) live in a process-wide temp dir
# that libFuzzer's exit() never drops: keep them under $work so the trap removes them.
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"

failed=0
declare -A execs crashes notes

# 1. Reproducers of crashes found earlier must not crash any more.
for t in $targets; do
    crashes[$t]=0
    notes[$t]=""
    reg_dir="$FUZZ_DIR/regressions/$t"
    [[ -d "$reg_dir" ]] || continue
    for input in "$reg_dir"/*; do
        [[ -f "$input" ]] || continue
        if ! "$bin_dir/$t" -runs=1 "$input" >"$work/replay.log" 2>&1; then
            echo "fuzz.sh: $t: regression input $(basename "$input") still crashes:"
            grep -E "panicked|ERROR: libFuzzer|SUMMARY" "$work/replay.log" | head -5 || true
            crashes[$t]=$(( ${crashes[$t]} + 1 ))
            notes[$t]+="regression $(basename "$input") "
            failed=1
        fi
    done
done

# 2. Bounded fuzzing from the committed corpus.
for t in $targets; do
    corpus="${FUZZ_CORPUS_OUT:-$work/corpus}/$t"
    mkdir -p "$corpus" "$work/artifacts/$t"
    log="$work/$t.log"
    echo "fuzz.sh: $t for ${seconds}s"
    set +e
    "$bin_dir/$t" "$corpus" "$FUZZ_DIR/corpus/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$work/artifacts/$t/" >"$log" 2>&1
    rc=$?
    set -e
    # libFuzzer's final stats, or the last status line's "#N" if it died first.
    n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [[ -n "$n" ]] || n=$( (grep -oE '^#[0-9]+' "$log" || true) | tail -1 | tr -d '#')
    execs[$t]=${n:-0}
    found=$(find "$work/artifacts/$t" -type f | wc -l)
    if [[ $rc -ne 0 || $found -gt 0 ]]; then
        failed=1
        crashes[$t]=$(( ${crashes[$t]} + (found > 0 ? found : 1) ))
        keep="$FUZZ_DIR/artifacts/$t"
        mkdir -p "$keep"
        cp "$work/artifacts/$t"/* "$keep/" 2>/dev/null || true
        cp "$log" "$keep/last-run.log"
        notes[$t]+="exit $rc, reproducer(s) + log in fuzz/artifacts/$t/ "
        echo "fuzz.sh: $t FAILED (exit $rc):"
        grep -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written" "$log" | head -8 || true
    fi
done

printf '\n%-24s %12s %8s  %s\n' "fuzz target" "executions" "crashes" "notes"
for t in $targets; do
    printf '%-24s %12s %8s  %s\n' "$t" "${execs[$t]}" "${crashes[$t]}" "${notes[$t]}"
done
if [[ -n "$summary" ]]; then
    for t in $targets; do
        printf 'fuzz:%s\t%s\t%s\n' "$t" "${execs[$t]}" "${crashes[$t]}"
    done >"$summary"
fi
exit $failed
