//! `palisade check` on the build machine itself. The build and CI machines are kvm-pvm
//! hosts (see /work/shared/ENVIRONMENT.md: /dev/kvm without VT-x/AMD-V, module kvm_pvm),
//! so the report must name kvm-pvm and refuse VM mode because a stock guest kernel cannot
//! boot there. Needs: such a host, read access to /dev/kvm (root).

use std::process::Command;

#[test]
fn reports_kvm_pvm_and_refuses_a_stock_kernel() {
    let dir = tempfile::tempdir().unwrap();
    // A stock kernel as far as PVM is concerned: palisade's own guest kernel (tinyconfig +
    // fragment) has no CONFIG_PVM_GUEST either; any file without the markers is one.
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF stock kernel, Linux version 6.12.0").unwrap();
    let present = dir.path().join("present");
    std::fs::write(&present, b"").unwrap();
    let config = dir.path().join("configuration.toml");
    std::fs::write(
        &config,
        format!(
            "[shim]\ndefault_mode = \"vm\"\n[vm]\nvmm = \"{p}\"\nkernel = \"{k}\"\ninitramfs = \"{p}\"\n",
            p = present.display(),
            k = kernel.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok    kvm            kvm-pvm"), "{stdout}");
    assert!(stdout.contains("cannot boot on kvm-pvm"), "{stdout}");
    assert!(stdout.contains("stock kernel"), "{stdout}");
    assert!(
        stdout.contains("VM mode: NOT ready (guest-kernel)"),
        "{stdout}"
    );

    // A named config that does not exist is an error naming it, not a report.
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["check", "--config", "/nonexistent/palisade.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/palisade.toml"));
}
