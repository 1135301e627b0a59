//! vCPUs: boot-time configuration and the per-vCPU thread run loop.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and dispatches port-I/O and MMIO exits to the
//! shared buses. Another thread pauses, resumes or stops a vCPU through [`VcpuHandle`]:
//! it records the request and *kicks* the thread with a real-time signal whose handler
//! sets `kvm_run.immediate_exit`, so the request is seen whether the thread is inside
//! `KVM_RUN` (it returns `EINTR`) or about to enter it (it returns at once).

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread;

use kvm_bindings::{
    Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::regs::{self, BootEntry};
use crate::arch::x86_64::{cpuid, interrupts};
use crate::devices::Bus;

/// Errors configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {cpu}: KVM {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        cpu: u8,
        /// The operation.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("vCPU {cpu}: KVM set only {set} of {total} boot MSRs")]
    Msrs {
        /// vCPU index.
        cpu: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
    },
    /// Writing boot tables into guest memory failed.
    #[error("cannot write boot tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be started.
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The thread's start hook (seccomp filter) failed.
    #[error("vCPU {cpu} start hook failed: {reason}")]
    StartHook {
        /// vCPU index.
        cpu: u8,
        /// What failed.
        reason: String,
    },
}

/// Why a vCPU stopped running guest code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The guest asked for a power-off (`KVM_SYSTEM_EVENT_SHUTDOWN`).
    GuestPowerOff,
    /// The guest asked for a reset through a KVM system event.
    GuestReset,
    /// The guest halted with no in-kernel irqchip to wake it (only without an irqchip).
    GuestHalted,
    /// The guest cannot continue: triple fault, emulation failure, crash event.
    GuestFailure(String),
    /// The VMM asked the vCPU to stop.
    Stopped,
    /// A host-side error (a failing KVM ioctl).
    HostError(String),
}

/// Run state requested by the VMM for one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// Run state shared between a vCPU thread and its controllers.
#[derive(Debug)]
struct RunState {
    request: Request,
    /// Whether the vCPU thread is currently parked in the paused state.
    paused: bool,
}

/// [`RunState`] and the condition variable signalled whenever it changes.
#[derive(Debug)]
struct Shared {
    state: Mutex<RunState>,
    changed: Condvar,
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: a TLS read and a byte store.
    let ptr = IMMEDIATE_EXIT.with(|p| p.get());
    if !ptr.is_null() {
        // SAFETY: the pointer is set by this thread's run loop to the `immediate_exit` byte
        // of its own mmap'ed `kvm_run`, which outlives the loop; it is cleared before the
        // `VcpuFd` is dropped.
        unsafe { ptr.write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal);
    });
    result
}

/// A vCPU before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
}

impl Vcpu {
    /// Wrap vCPU `index` created by the VM, with the buses it dispatches exits to.
    pub fn new(index: u8, fd: VcpuFd, io_bus: Arc<Bus>, mmio_bus: Arc<Bus>) -> Self {
        Vcpu {
            index,
            fd,
            io_bus,
            mmio_bus,
        }
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let cpu = self.index;
        move |source| VcpuError::Kvm { cpu, what, source }
    }

    /// CPUID (normalised for this vCPU), boot MSRs and LAPIC LINT0/1 — for every vCPU.
    pub fn configure_common(
        &self,
        base_cpuid: &kvm_bindings::CpuId,
        cpu_count: u8,
    ) -> Result<(), VcpuError> {
        let cpuid = cpuid::for_vcpu(base_cpuid, self.index, cpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("KVM_SET_CPUID2"))?;

        let entries = crate::arch::x86_64::msr::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            cpu: self.index,
            set: 0,
            total: entries.len(),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                cpu: self.index,
                set,
                total: entries.len(),
            });
        }

        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        interrupts::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Registers, segments and FPU for the boot vCPU entering the kernel at `entry`.
    /// (The boot tables themselves are written by [`regs::write_boot_tables`].)
    /// Application processors are not given an entry state: the in-kernel LAPIC keeps them
    /// waiting for the INIT/SIPI sequence the guest sends.
    pub fn configure_boot(&self, entry: BootEntry) -> Result<(), VcpuError> {
        let sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&regs::boot_sregs(entry, sregs))
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(self.kvm_err("KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.kvm_err("KVM_SET_FPU"))?;
        Ok(())
    }

    /// Start the vCPU thread. `on_start` runs first on the new thread (the VMM installs the
    /// vCPU seccomp filter there); `on_exit` receives the reason the vCPU stopped unless the
    /// VMM stopped it.
    pub fn start<S, E>(self, on_start: S, on_exit: E) -> Result<VcpuHandle, VcpuError>
    where
        S: FnOnce() -> Result<(), String> + Send + 'static,
        E: FnOnce(u8, VcpuExitReason) + Send + 'static,
    {
        install_kick_handler()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(RunState {
                request: Request::Run,
                paused: false,
            }),
            changed: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let index = self.index;
        let thread = thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let reason = match on_start() {
                    Ok(()) => self.run_loop(&thread_shared),
                    Err(reason) => VcpuExitReason::HostError(format!(
                        "vCPU {index} start hook failed: {reason}"
                    )),
                };
                if reason != VcpuExitReason::Stopped {
                    on_exit(index, reason.clone());
                }
                reason
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            index,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn run_loop(mut self, shared: &Shared) -> VcpuExitReason {
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let reason = loop {
            match wait_while_paused(shared) {
                Request::Stop => break VcpuExitReason::Stopped,
                Request::Pause => continue,
                Request::Run => {}
            }
            if let Some(reason) = self.run_once() {
                break reason;
            }
        };
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        reason
    }

    /// One `KVM_RUN`; `Some` when the vCPU must stop.
    fn run_once(&mut self) -> Option<VcpuExitReason> {
        match self.fd.run() {
            Ok(exit) => handle_exit(self.index, exit, &self.io_bus, &self.mmio_bus),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag so the next KVM_RUN enters the guest.
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VcpuExitReason::HostError(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                self.index
            ))),
        }
    }
}

/// Park while a pause is requested; return the request in force once it is not `Pause`
/// (or `Pause` after a spurious wake-up).
fn wait_while_paused(shared: &Shared) -> Request {
    let mut state = lock(&shared.state);
    if state.request != Request::Pause {
        return state.request;
    }
    state.paused = true;
    shared.changed.notify_all();
    while state.request == Request::Pause {
        state = shared
            .changed
            .wait(state)
            .unwrap_or_else(|p| p.into_inner());
    }
    state.paused = false;
    shared.changed.notify_all();
    state.request
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Dispatch one exit; `Some` when the vCPU must stop.
fn handle_exit(
    cpu: u8,
    exit: VcpuExit<'_>,
    io_bus: &Bus,
    mmio_bus: &Bus,
) -> Option<VcpuExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !io_bus.read(u64::from(port), data) {
                // Nothing decodes this port: the ISA bus floats high.
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            if !io_bus.write(u64::from(port), data) {
                tracing::trace!("vCPU {cpu}: unhandled write to port {port:#x}");
            }
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio_bus.read(addr, data) {
                tracing::debug!("vCPU {cpu}: unhandled MMIO read at {addr:#x}");
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio_bus.write(addr, data) {
                tracing::debug!("vCPU {cpu}: unhandled MMIO write at {addr:#x}");
            }
            None
        }
        VcpuExit::Hlt => Some(VcpuExitReason::GuestHalted),
        VcpuExit::Shutdown => Some(VcpuExitReason::GuestFailure(
            "triple fault (KVM_EXIT_SHUTDOWN)".into(),
        )),
        VcpuExit::SystemEvent(kind, data) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => Some(VcpuExitReason::GuestPowerOff),
            KVM_SYSTEM_EVENT_RESET => Some(VcpuExitReason::GuestReset),
            KVM_SYSTEM_EVENT_CRASH => Some(VcpuExitReason::GuestFailure(
                "guest crash system event".into(),
            )),
            other => Some(VcpuExitReason::GuestFailure(format!(
                "unknown system event {other} {data:x?}"
            ))),
        },
        VcpuExit::FailEntry(reason, hw_cpu) => Some(VcpuExitReason::GuestFailure(format!(
            "KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on host CPU {hw_cpu}"
        ))),
        VcpuExit::InternalError => Some(VcpuExitReason::GuestFailure(
            "KVM_EXIT_INTERNAL_ERROR (emulation failure)".into(),
        )),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        other => Some(VcpuExitReason::GuestFailure(format!(
            "unexpected exit {other:?}"
        ))),
    }
}

/// Controls a running vCPU thread. Shared by the VMM's main and API threads.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    shared: Arc<Shared>,
    thread: Mutex<Option<thread::JoinHandle<VcpuExitReason>>>,
}

impl VcpuHandle {
    /// vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Kick the thread out of `KVM_RUN`; false if it has ended.
    fn kick(&self) -> bool {
        match &*lock(&self.thread) {
            Some(t) if !t.is_finished() => {
                // ESRCH: the thread ended meanwhile; nothing to kick.
                let _ = t.kill(kick_signal());
                true
            }
            _ => false,
        }
    }

    fn request(&self, request: Request) {
        {
            let mut state = lock(&self.shared.state);
            if state.request == Request::Stop {
                return; // stopping is final
            }
            state.request = request;
        }
        self.shared.changed.notify_all();
        self.kick();
    }

    /// Ask the vCPU to leave the guest and park; returns once it is parked (or gone).
    pub fn pause(&self) {
        self.request(Request::Pause);
        loop {
            {
                let state = lock(&self.shared.state);
                if state.paused || state.request != Request::Pause {
                    return;
                }
                let (state, _) = self
                    .shared
                    .changed
                    .wait_timeout(state, std::time::Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner());
                if state.paused || state.request != Request::Pause {
                    return;
                }
            }
            // Not parked yet: the first kick may have landed between two runs.
            if !self.kick() {
                return;
            }
        }
    }

    /// Let a paused vCPU run again.
    pub fn resume(&self) {
        self.request(Request::Run);
    }

    /// Whether the vCPU is parked.
    pub fn is_paused(&self) -> bool {
        lock(&self.shared.state).paused
    }

    /// Stop the vCPU and wait for its thread; returns why it ended. Idempotent.
    pub fn stop(&self) -> VcpuExitReason {
        lock(&self.shared.state).request = Request::Stop;
        self.shared.changed.notify_all();
        // Kick until the thread is out: the handler re-arms immediate_exit so one kick is
        // enough once the thread is in or entering KVM_RUN; repeating covers a kick that
        // lands while the thread is between runs and has not yet seen the request.
        while self.kick() {
            thread::sleep(std::time::Duration::from_millis(1));
        }
        let Some(thread) = lock(&self.thread).take() else {
            return VcpuExitReason::Stopped;
        };
        thread
            .join()
            .unwrap_or_else(|_| VcpuExitReason::HostError("vCPU thread panicked".into()))
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
