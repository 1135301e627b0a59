//! containerd's own runc shim (containerd-shim-runc-v2) driving the `palisade` CLI through
//! `ctr run --runc-binary` (issue 2, must-show 2).
//!
//! Needs root, containerd + ctr installed, and the `palisade` binary built
//! (`cargo build -p palisade-runtime`; found in `$PALISADE_BIN_DIR` or the cargo target dir).

mod common;

use palisade_tests::containerd::RuntimeUnderTest;

fn runtime() -> RuntimeUnderTest {
    common::require_ctr();
    let rt = RuntimeUnderTest::palisade_cli();
    if let RuntimeUnderTest::RuncBinary(bin) = &rt {
        assert!(bin.exists(), "{} is not built", bin.display());
    }
    rt
}

#[test]
fn echo_prints_hi() {
    let rt = runtime();
    common::echo_prints_hi(&common::containerd(), &rt);
}

#[test]
fn exit_code_propagates() {
    let rt = runtime();
    common::exit_code_propagates(&common::containerd(), &rt);
}

#[test]
fn killed_by_signal_reports_128_plus_n() {
    let rt = runtime();
    common::killed_by_signal_reports_128_plus_n(&common::containerd(), &rt);
}

#[test]
fn tty_works() {
    let rt = runtime();
    common::tty_works(&common::containerd(), &rt);
}

#[test]
fn stdin_is_forwarded() {
    let rt = runtime();
    common::stdin_is_forwarded(&common::containerd(), &rt);
}

#[test]
fn exec_ps_pause_resume_kill() {
    let rt = runtime();
    common::exec_ps_pause_resume_kill(&common::containerd(), &rt);
}
