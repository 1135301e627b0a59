# Shared helpers for the scenarios, sourced by each scenario script inside the test host.
# A scenario runs in $WORK (its logs: $WORK/*.log, printed by /init when it fails) and reports
# with pass/fail/skip; the first argument of each is the check's name, so one scenario may
# report several checks as "<scenario>.<check>".

GUEST_DIR=/palisade/guest
# The rig's reference VMM: QEMU's microvm machine on the same /dev/kvm.
QEMU_MICROVM="qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off -accel kvm -cpu host -nodefaults -no-user-config -display none -serial stdio -no-reboot"

report() { # report STATUS CHECK DETAIL...
  status=$1 check=$2
  shift 2
  if [ "$check" = "$SCENARIO" ] || [ -z "$check" ]; then
    echo "PALISADE-TEST $SCENARIO $status $*"
  else
    echo "PALISADE-TEST $SCENARIO.$check $status $*"
  fi
}
pass() { report PASS "$@"; }
fail() {
  report FAIL "$@"
  FAILED=1
}
skip() { report SKIP "$@"; }

# Fails the scenario (and exits) when a component of the image is missing; the detail says
# which and why, e.g. "guest-kernel missing: guest-kernel/build.sh has not produced ...".
require() {
  for c in "$@"; do
    line=$(grep "^$c " /palisade/components)
    case $line in
      "$c ok"*) ;;
      "") fail "$SCENARIO" "component $c not in the image"; exit 1 ;;
      *) fail "$SCENARIO" "blocked: $line"; exit 1 ;;
    esac
  done
}

# Extracts key=value from th-helper output: kv KEY "$out"
kv() { echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -1; }

finish() { exit "${FAILED:-0}"; }
