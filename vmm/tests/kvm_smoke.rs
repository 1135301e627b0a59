//! KVM smoke tests: tiny hand-assembled guests run through the real VMM (loader, VM,
//! vCPU run loop, buses, devices, seccomp) on this machine's KVM.
//!
//! Needs root and /dev/kvm (CI runs as root). They work on kvm-pvm, which cannot boot a
//! stock Linux guest: the guests are a few instructions in 64-bit mode, entered through
//! the ELF-without-PVH-note path, and end by pulsing the i8042 reset line (with an
//! in-kernel irqchip `hlt` never returns to userspace).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use palisade_vmm::testing::{self, TINY_GUEST_LOAD};
use palisade_vmm::{Outcome, VmConfig, Vmm};

const VMM: &str = env!("CARGO_BIN_EXE_palisade-vmm");

fn write_guest(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, testing::tiny_elf(code, TINY_GUEST_LOAD, None)).unwrap();
    path
}

fn run_vmm(args: &[&str]) -> Output {
    let child = Command::new(VMM)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Collect output while the VMM runs: a full pipe would block it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: killing our own child process by pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("palisade-vmm did not exit within 30 s");
        }
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > timeout {
            child.kill().unwrap();
            panic!("palisade-vmm did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serial_output_reaches_file_and_reset_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), "ok.elf", &testing::serial_ok_guest());
    let serial = dir.path().join("serial.log");
    let out = run_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial-output",
        serial.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&serial).unwrap(), b"OK\n");
}

#[test]
fn serial_to_stdout_with_two_vcpus() {
    // The application processor stays in wait-for-SIPI inside KVM; stopping it on the
    // guest reset must still be prompt.
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), "ok.elf", &testing::serial_ok_guest());
    let out = run_vmm(&["--kernel", kernel.to_str().unwrap(), "--vcpus", "2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"OK\n");
}

#[test]
fn virtio_mmio_identity_read_by_guest() {
    // A real virtio-blk device behind the virtio-mmio transport at the first slot.
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let kernel = write_guest(
        dir.path(),
        "probe.elf",
        &testing::virtio_probe_guest(0xd000_0000),
    );
    let out = run_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--block",
        &format!("path={},ro", disk.display()),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = &out.stdout;
    assert_eq!(s.len(), 12, "12 bytes expected, got {s:x?}");
    let word = |i: usize| u32::from_le_bytes(s[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(word(0), 0x7472_6976, "magic 'virt'");
    assert_eq!(word(1), 2, "virtio-mmio version 2");
    assert_eq!(word(2), 2, "device id 2 = block");
}

#[test]
fn unmapped_mmio_reads_as_all_ones() {
    // No device at the first slot: the run loop answers unhandled reads itself.
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(
        dir.path(),
        "probe.elf",
        &testing::virtio_probe_guest(0xd000_0000),
    );
    let out = run_vmm(&["--kernel", kernel.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, vec![0xff; 12]);
}

#[test]
fn i8042_reset_is_the_guest_reset_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), "ok.elf", &testing::serial_ok_guest());
    let mut config = VmConfig::new(kernel);
    config.serial_output = palisade_vmm::config::SerialOutput::File(dir.path().join("s"));
    // The test harness's threads would inherit the main-thread filter.
    config.seccomp = false;
    let vmm = Vmm::build(config, Vec::new()).unwrap();
    assert_eq!(vmm.run().unwrap(), Outcome::GuestReset);
    assert_eq!(Outcome::GuestReset.exit_code(), 0);
}

#[test]
fn triple_fault_exits_with_guest_failure() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), "ud2.elf", &testing::triple_fault_guest());
    let out = run_vmm(&["--kernel", kernel.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("guest failed"), "{stderr}");
}

#[test]
fn api_pause_resume_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), "spin.elf", &testing::spin_guest());
    let api = dir.path().join("api.sock");
    let serial = dir.path().join("serial.log");
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-socket",
            api.to_str().unwrap(),
            "--serial-output",
            serial.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(&api) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => {
                child.kill().unwrap();
                panic!("API socket never came up: {e}");
            }
        }
    };
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut call = |req: &str| -> serde_json::Value {
        writer.write_all(req.as_bytes()).unwrap();
        writer.write_all(b"\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let status = call(r#"{"cmd":"status"}"#);
    assert_eq!(status["state"], "running");
    assert_eq!(status["vcpus"], 1);
    let paused = call(r#"{"cmd":"pause"}"#);
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(call(r#"{"cmd":"status"}"#)["state"], "paused");
    assert_eq!(call(r#"{"cmd":"resume"}"#)["state"], "running");
    let bad = call(r#"{"cmd":"explode"}"#);
    assert_eq!(bad["ok"], false);
    assert_eq!(call(r#"{"cmd":"shutdown"}"#)["state"], "shutting-down");
    wait_with_timeout(&mut child, Duration::from_secs(10));
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!api.exists(), "API socket removed on exit");
    // The guest ran before being paused.
    assert_eq!(std::fs::read(&serial).unwrap(), b"OK\n");
}

#[test]
fn sigterm_stops_a_spinning_guest() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), "spin.elf", &testing::spin_guest());
    let serial = dir.path().join("serial.log");
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--serial-output",
            serial.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    // Wait until the guest has run (its output is there), then terminate the VMM.
    let start = Instant::now();
    while std::fs::read(&serial).map(|s| s.is_empty()).unwrap_or(true) {
        assert!(start.elapsed() < Duration::from_secs(10), "guest never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_with_timeout(&mut child, Duration::from_secs(10));
    assert_eq!(child.wait().unwrap().code(), Some(128 + libc::SIGTERM));
}

#[test]
fn bad_kernel_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"definitely not a kernel image").unwrap();
    let out = run_vmm(&["--kernel", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("neither a valid ELF vmlinux"),
        "stderr: {stderr}"
    );
    let out = run_vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot open kernel /nonexistent/vmlinux")
    );
}

#[test]
fn vsock_device_identity_and_socket_cleanup() {
    // vsock is attached first (slot 0 at 0xd0000000), the disk second (0xd0001000).
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let sock = dir.path().join("v.sock");
    for (base, device_id) in [(0xd000_0000u64, 19u32), (0xd000_1000, 2)] {
        let kernel = write_guest(dir.path(), "probe.elf", &testing::virtio_probe_guest(base));
        let out = run_vmm(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--vsock-cid",
            "3",
            "--vsock-uds",
            sock.to_str().unwrap(),
            "--block",
            disk.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = &out.stdout;
        assert_eq!(s.len(), 12, "{s:x?}");
        assert_eq!(&s[..4], b"virt");
        assert_eq!(u32::from_le_bytes(s[8..12].try_into().unwrap()), device_id);
        assert!(!sock.exists(), "vsock socket removed when the VMM exits");
    }
}

#[test]
fn host_vsock_peer_is_served_under_seccomp() {
    // The guest has no vsock driver, so the device is not active: a host peer's CONNECT
    // must not be acknowledged (the muxer holds or closes it), it is handled on the device
    // thread within its seccomp allow-list, and the VMM keeps running.
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), "spin.elf", &testing::spin_guest());
    let sock = dir.path().join("v.sock");
    let serial = dir.path().join("serial.log");
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--vsock-cid",
            "3",
            "--vsock-uds",
            sock.to_str().unwrap(),
            "--serial-output",
            serial.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read(&serial).map(|s| s.is_empty()).unwrap_or(true) {
        assert!(start.elapsed() < Duration::from_secs(10), "guest never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..3 {
        let mut peer = UnixStream::connect(&sock).unwrap();
        peer.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        peer.write_all(b"CONNECT 1024\n").unwrap();
        let mut reply = Vec::new();
        let _ = std::io::Read::read_to_end(&mut peer, &mut reply);
        assert!(
            !String::from_utf8_lossy(&reply).starts_with("OK"),
            "no guest driver, yet the connection was accepted: {reply:?}"
        );
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "VMM died serving a host peer"
    );
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_with_timeout(&mut child, Duration::from_secs(10));
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sock.exists());
}

#[test]
fn serial_input_from_stdin_reaches_the_guest() {
    // stdin -> device event loop -> UART receive FIFO -> guest polls LSR, echoes the byte.
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), "echo.elf", &testing::serial_echo_guest());
    let mut child = Command::new(VMM)
        .args(["--kernel", kernel.to_str().unwrap(), "--serial-input"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(b"Z").unwrap();
    wait_with_timeout(&mut child, Duration::from_secs(30));
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"Z\n");
}

#[test]
fn hostile_port_and_mmio_accesses_do_not_hurt_the_vmm() {
    // Every port below 0x1000 with 8/16/32-bit accesses, and every word of the two
    // virtio-mmio windows (vsock, then a block device) overwritten with garbage; the VMM
    // must neither panic nor exit early, and the guest must still reach its serial print.
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let kernel = write_guest(
        dir.path(),
        "hostile.elf",
        &testing::hostile_guest(0xd000_0000),
    );
    let out = run_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--block",
        disk.to_str().unwrap(),
        "--vsock-cid",
        "3",
        "--vsock-uds",
        dir.path().join("v.sock").to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.ends_with(b"OK\n"), "{:x?}", out.stdout);
    // The disk image is untouched: the guest never set up a valid queue.
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0u8; 4096]);
}
