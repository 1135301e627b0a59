//! Start-up benchmark driver for `tests/bench/vmm-start.sh`.
//!
//! Boots a tiny guest (writes "OK\n" to COM1, then spins) with palisade-vmm and, as the
//! reference, QEMU's `microvm` machine, interleaved, and reports for each:
//! - process start → first serial byte on the VMM's stdout (median, min, max);
//! - RSS outside guest memory once the guest has printed (total RSS minus the resident
//!   part of the guest-RAM mapping, from /proc/PID/smaps).
//!
//! The guest code is valid in both 32-bit protected mode (PVH entry, what QEMU requires
//! for an ELF kernel) and 64-bit mode, so both VMMs run the very same bytes; the ELF carries
//! a PVH note, so palisade-vmm takes its PVH path too.
//!
//! Usage: vmm-start-bench <palisade-vmm> <rounds> [qemu-system-x86_64]
//! Needs root and /dev/kvm.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade_vmm::testing::{self, TINY_GUEST_LOAD};

const MEM_MIB: u64 = 128;
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(20);

struct Sample {
    first_byte: Duration,
    rss_outside_guest_kib: u64,
    rss_total_kib: u64,
}

/// RSS of `pid` and the resident size of its guest RAM mapping (the anonymous mapping of
/// MEM_MIB .. MEM_MIB + 4 MiB), in KiB.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size = 0u64;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("Size:") => size = it.next()?.parse().ok()?,
            Some("Rss:") => {
                let r: u64 = it.next()?.parse().ok()?;
                total += r;
                let mem_kib = MEM_MIB * 1024;
                if size >= mem_kib && size <= mem_kib + 4096 {
                    guest += r;
                }
            }
            _ => {}
        }
    }
    Some((total, guest))
}

fn measure(mut cmd: Command) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    // Read on a helper thread so a VMM that never prints cannot hang the benchmark.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        let got = stdout.read(&mut byte).map(|n| n == 1);
        let _ = tx.send((got, Instant::now()));
        // Keep the pipe open (and drained) until the VMM is killed.
        let mut sink = [0u8; 256];
        while matches!(stdout.read(&mut sink), Ok(n) if n > 0) {}
    });
    let result = match rx.recv_timeout(FIRST_BYTE_TIMEOUT) {
        Ok((Ok(true), at)) => {
            let first_byte = at - start;
            // Let the rest of the line arrive; the guest then spins.
            std::thread::sleep(Duration::from_millis(50));
            match rss(child.id()) {
                Some((total, guest)) => Ok(Sample {
                    first_byte,
                    rss_outside_guest_kib: total - guest,
                    rss_total_kib: total,
                }),
                None => Err("cannot read smaps".to_string()),
            }
        }
        Ok((other, _)) => Err(format!("no serial output ({other:?})")),
        Err(_) => Err(format!("no serial output within {FIRST_BYTE_TIMEOUT:?}")),
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!(
            "usage: {} <palisade-vmm> <rounds> [qemu-system-x86_64]",
            args[0]
        );
        std::process::exit(2);
    }
    let vmm = &args[1];
    let rounds: usize = args[2].parse().unwrap_or(10).max(1);
    let qemu = args.get(3);

    let dir = std::env::temp_dir().join(format!("vmm-start-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kernel = dir.join("tiny-pvh.elf");
    let code = testing::spin_guest();
    std::fs::write(
        &kernel,
        testing::tiny_elf(&code, TINY_GUEST_LOAD, Some(TINY_GUEST_LOAD as u32)),
    )
    .expect("write guest");

    let palisade = || {
        let mut c = Command::new(vmm);
        c.args(["--kernel", kernel.to_str().unwrap_or_default()])
            .args(["--mem-mib", &MEM_MIB.to_string()]);
        c
    };
    let reference = |q: &String| {
        let mut c = Command::new(q);
        c.args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,isa-serial=on",
            "-accel",
            "kvm",
        ])
        .args(["-m", &format!("{MEM_MIB}M"), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args([
            "-serial",
            "stdio",
            "-kernel",
            kernel.to_str().unwrap_or_default(),
        ]);
        c
    };

    let mut p = Vec::new();
    let mut q = Vec::new();
    let mut q_error = None;
    for _ in 0..rounds {
        match measure(palisade()) {
            Ok(s) => p.push(s),
            Err(e) => {
                eprintln!("palisade-vmm run failed: {e}");
                std::process::exit(1);
            }
        }
        if let Some(qemu) = qemu {
            match measure(reference(qemu)) {
                Ok(s) => q.push(s),
                Err(e) => q_error = Some(e),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let report = |name: &str, s: &[Sample]| {
        let times: Vec<Duration> = s.iter().map(|x| x.first_byte).collect();
        let med = median(times.clone());
        let min = times.iter().min().copied().unwrap_or_default();
        let max = times.iter().max().copied().unwrap_or_default();
        let own = s.iter().map(|x| x.rss_outside_guest_kib).max().unwrap_or(0);
        let total = s.iter().map(|x| x.rss_total_kib).max().unwrap_or(0);
        println!(
            "{name:<14} start->first serial byte: median {:.2} ms (min {:.2}, max {:.2}, n={}); \
             RSS outside guest RAM {:.2} MiB (total {:.2} MiB)",
            med.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            s.len(),
            own as f64 / 1024.0,
            total as f64 / 1024.0
        );
        (med, own)
    };
    let (p_med, p_own) = report("palisade-vmm", &p);
    println!(
        "palisade-vmm RSS outside guest RAM goal <= 5 MiB: {}",
        if p_own <= 5 * 1024 { "met" } else { "NOT met" }
    );
    if !q.is_empty() {
        let (q_med, q_own) = report("qemu microvm", &q);
        println!(
            "ratio palisade/qemu: start->first byte {:.3}, RSS outside guest RAM {:.3}",
            p_med.as_secs_f64() / q_med.as_secs_f64(),
            p_own as f64 / q_own.max(1) as f64
        );
    } else if let Some(e) = q_error {
        println!("qemu microvm reference could not run here: {e}");
    }
}
