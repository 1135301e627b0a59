//! Building a VM from a [`VmConfig`] and running it to its end.
//!
//! Threads: the caller's (main) thread builds everything, starts one thread per vCPU, the
//! device event-loop thread and, if configured, the API thread, then waits for a
//! [`VmmEvent`]. Each thread installs its own seccomp filter before it touches guest
//! state; the main thread installs its filter last (threads inherit filters of their
//! creator, so it must not constrain threads created after it).

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{self, IRQ_BASE, MMIO_GAP_START, VIRTIO_MMIO_WINDOW};
use crate::arch::x86_64::{mptable, regs};
use crate::config::{BlockSpec, NetSpec, SerialOutput, VmConfig, VsockSpec};
use crate::devices::bus::SharedDevice;
use crate::devices::legacy::{self, ResetCallback, ResetControl, Serial, SerialInput, Sink, I8042};
use crate::devices::virtio::block::{BlockConfig, BlockDevice};
use crate::devices::virtio::net::{NetConfig, NetDevice};
use crate::devices::virtio::vsock::{VsockConfig, VsockDevice};
use crate::devices::virtio::MmioTransport;
use crate::devices::{Bus, BusError, MmioSlot, VirtioMmioDevice};
use crate::event_loop::{EventLoop, EventLoopError, EventLoopStopper};
use crate::loader::{self, LoadError};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::seccomp::{self, ThreadKind};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuExitReason, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Kernel/initrd loading.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A file named in the configuration cannot be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Bus layout.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// Boot tables.
    #[error("cannot write boot tables: {0}")]
    BootTables(#[from] vm_memory::GuestMemoryError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Event loop.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// A device could not be created.
    #[error("cannot create {what}: {reason}")]
    Device {
        /// Which device.
        what: String,
        /// Why.
        reason: String,
    },
    /// Too many virtio devices for the interrupt lines.
    #[error("too many virtio devices")]
    TooManyDevices,
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Seccomp filter setup.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// API socket.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
}

/// What ends a VM run; sent to the main thread.
#[derive(Debug)]
pub enum VmmEvent {
    /// The guest pulsed a reset line (i8042 0xFE, 0xcf9).
    GuestReset,
    /// A vCPU stopped on its own.
    VcpuExit(u8, VcpuExitReason),
    /// The API asked for a shutdown.
    ApiShutdown,
}

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reset itself (how a Linux guest without ACPI "powers off").
    GuestReset,
    /// The guest powered off.
    GuestPowerOff,
    /// Shutdown requested through the API.
    Shutdown,
    /// Stopped by a signal (SIGTERM/SIGINT/SIGHUP).
    Signal(i32),
    /// The guest failed (triple fault, emulation failure, crash).
    GuestFailure(String),
    /// The VMM failed while running.
    HostError(String),
}

impl Outcome {
    /// The process exit status for this outcome (documented in `--help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::GuestReset | Outcome::GuestPowerOff | Outcome::Shutdown => 0,
            Outcome::HostError(_) => 1,
            Outcome::GuestFailure(_) => 2,
            Outcome::Signal(sig) => 128 + sig,
        }
    }
}

/// Extra virtio-mmio devices supplied by the embedder (tests), attached after the
/// configured ones.
pub type ExtraDevice = Box<dyn VirtioMmioDevice>;

/// Signal number received by the process (0: none), set by the termination handler.
static TERMINATION_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_termination(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATION_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Make SIGTERM/SIGINT/SIGHUP end the VM cleanly instead of killing the process mid-write.
pub fn install_termination_handlers() -> Result<(), VmmError> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_termination).map_err(|e| {
            VmmError::Device {
                what: "signal handlers".into(),
                reason: e.to_string(),
            }
        })?;
    }
    Ok(())
}

/// A built VM, ready to [`run`](Vmm::run).
pub struct Vmm {
    config: VmConfig,
    vm: Vm,
    mem: GuestMemoryMmap,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    vcpus: Vec<Vcpu>,
    event_loop: EventLoop,
    events_tx: Sender<VmmEvent>,
    events_rx: Receiver<VmmEvent>,
    slots: Vec<MmioSlot>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

fn open(what: &'static str, path: &Path) -> Result<File, VmmError> {
    File::open(path).map_err(|source| VmmError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn serial_writer(out: &SerialOutput) -> Result<legacy::SerialOutput, VmmError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::Open {
                    what: "serial output file",
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

impl Vmm {
    /// Create memory, the KVM VM, devices and vCPUs, and load the guest. Nothing runs yet.
    pub fn build(config: VmConfig, extra: Vec<ExtraDevice>) -> Result<Self, VmmError> {
        config.validate().map_err(|e| VmmError::Device {
            what: "VM".into(),
            reason: e.to_string(),
        })?;
        let (mem, regions) = memory::create(config.mem_size)?;
        let vm = Vm::new()?;
        vm.register_memory(&mem)?;

        let mut kernel_file = open("kernel", &config.kernel)?;
        let kernel = loader::load_kernel(&mem, &mut kernel_file)?;
        let initrd = match &config.initrd {
            Some(path) => Some(loader::load_initrd(
                &mem,
                &regions,
                kernel.end,
                &mut open("initrd", path)?,
            )?),
            None => None,
        };

        let (events_tx, events_rx) = mpsc::channel();
        let mut event_loop = EventLoop::new()?;

        // Legacy devices on the port-I/O bus.
        let mut io_bus = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&serial_irq, legacy::COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(Serial::new(
            serial_irq,
            serial_writer(&config.serial_output)?,
        )));
        let (base, len) = legacy::ports::COM1;
        io_bus.insert(serial.clone(), base, len)?;
        if config.serial_input {
            let stdin = std::io::stdin();
            set_nonblocking(&stdin)?;
            event_loop.add_handler(Box::new(SerialInput::new(stdin, serial)))?;
        }
        let reset_tx = Mutex::new(events_tx.clone());
        let on_reset: ResetCallback = Arc::new(move || {
            // The receiver is gone only once the VM is being torn down.
            let _ = lock(&reset_tx).send(VmmEvent::GuestReset);
        });
        let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&kbd_irq, legacy::KBD_IRQ)?;
        let (base, len) = legacy::ports::I8042;
        io_bus.insert(
            Arc::new(Mutex::new(I8042::new(on_reset.clone(), Some(kbd_irq)))),
            base,
            len,
        )?;
        let (base, len) = legacy::ports::RESET_CONTROL;
        io_bus.insert(Arc::new(Mutex::new(ResetControl::new(on_reset))), base, len)?;
        let (base, len) = legacy::ports::POST;
        io_bus.insert(Arc::new(Mutex::new(Sink)), base, len)?;

        // virtio-mmio devices.
        let mut mmio_bus = Bus::new();
        let mut devices: Vec<(String, ExtraDevice)> = Vec::new();
        if let Some(vsock) = &config.vsock {
            devices.push((
                format!("virtio-vsock (cid {})", vsock.guest_cid),
                build_vsock(&mem, vsock)?,
            ));
        }
        for block in &config.block {
            devices.push((
                format!("virtio-blk {}", block.path.display()),
                build_block(&mem, block)?,
            ));
        }
        for net in &config.net {
            devices.push((
                format!("virtio-net (tap {})", net.tap),
                build_net(&mem, net)?,
            ));
        }
        devices.extend(extra.into_iter().map(|d| ("extra device".to_string(), d)));
        let mut slots = Vec::new();
        for (i, (name, mut device)) in devices.into_iter().enumerate() {
            let slot = slot_for(i)?;
            attach_virtio(&vm, &mut event_loop, &slot, device.as_mut()).map_err(|reason| {
                VmmError::Device {
                    what: name.clone(),
                    reason,
                }
            })?;
            let shared: SharedDevice = Arc::new(Mutex::new(BoxedMmio(device)));
            mmio_bus.insert(shared, slot.base, slot.size)?;
            tracing::info!("{name} at {:#x}, GSI {}", slot.base, slot.gsi);
            slots.push(slot);
        }

        // Boot parameters and tables.
        let cmdline = loader::build_cmdline(&config.cmdline, &slots)?;
        let entry = loader::write_boot_params(&mem, &regions, &kernel, initrd, &cmdline)?;
        regs::write_boot_tables(&mem, entry)?;
        mptable::setup(&mem, config.vcpus)?;

        // vCPUs.
        let io_bus = Arc::new(io_bus);
        let mmio_bus = Arc::new(mmio_bus);
        let cpuid = vm.supported_cpuid()?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let vcpu = Vcpu::new(
                index,
                vm.create_vcpu(index)?,
                io_bus.clone(),
                mmio_bus.clone(),
            );
            vcpu.configure_common(&cpuid, config.vcpus)?;
            if index == 0 {
                vcpu.configure_boot(entry)?;
            }
            vcpus.push(vcpu);
        }
        Ok(Vmm {
            config,
            vm,
            mem,
            io_bus,
            mmio_bus,
            vcpus,
            event_loop,
            events_tx,
            events_rx,
            slots,
        })
    }

    /// Where the virtio devices were placed, in attach order.
    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.slots
    }

    /// Start all threads and wait until the VM ends.
    pub fn run(self) -> Result<Outcome, VmmError> {
        let Vmm {
            config,
            vm,
            mem,
            io_bus,
            mmio_bus,
            vcpus,
            event_loop,
            events_tx,
            events_rx,
            slots: _,
        } = self;
        let seccomp_on = config.seccomp;

        let filters = if seccomp_on {
            Some(seccomp::Filters::compile()?)
        } else {
            tracing::warn!("seccomp filters disabled (--no-seccomp)");
            None
        };

        let stopper = event_loop.stopper()?;
        let loop_filter = filters.as_ref().map(|f| f.get(ThreadKind::EventLoop));
        let event_thread = event_loop.spawn("vmm-devices", move || match loop_filter {
            Some(filter) => seccomp::apply(&filter)
                .map_err(|e| EventLoopError::Spawn(std::io::Error::other(e.to_string()))),
            None => Ok(()),
        })?;
        let mut running = Running {
            vcpus: Vec::new(),
            stopper,
            event_thread: Some(event_thread),
        };

        let api = match &config.api_socket {
            Some(path) => Some(crate::api::ApiServer::bind(path)?),
            None => None,
        };

        let started = Instant::now();
        for vcpu in vcpus {
            let filter = filters.as_ref().map(|f| f.get(ThreadKind::Vcpu));
            let tx = Mutex::new(events_tx.clone());
            let handle = vcpu.start(
                move || match filter {
                    Some(filter) => seccomp::apply(&filter).map_err(|e| e.to_string()),
                    None => Ok(()),
                },
                move |index, reason| {
                    let _ = lock(&tx).send(VmmEvent::VcpuExit(index, reason));
                },
            )?;
            running.vcpus.push(handle);
        }
        let vcpus = Arc::new(std::mem::take(&mut running.vcpus));

        let api_thread = match api {
            Some(server) => {
                let filter = filters.as_ref().map(|f| f.get(ThreadKind::Api));
                let ctl = crate::api::VmControl {
                    vcpus: vcpus.clone(),
                    events: Mutex::new(events_tx.clone()),
                    mem_mib: config.mem_size >> 20,
                    started,
                };
                Some(server.spawn(ctl, filter)?)
            }
            None => None,
        };
        drop(events_tx);

        if let Some(filters) = &filters {
            seccomp::apply(&filters.get(ThreadKind::Main))?;
        }

        let outcome = wait_for_end(&events_rx);
        tracing::info!("VM ended: {outcome:?}");

        for vcpu in vcpus.iter() {
            vcpu.stop();
        }
        running.stop_devices();
        if let Some(api) = api_thread {
            api.stop();
        }
        // Keep the VM and memory alive until every thread that uses them has ended.
        drop((io_bus, mmio_bus, vm, mem));
        Ok(outcome)
    }
}

/// Wait for the event that ends the VM (or a termination signal).
fn wait_for_end(events: &Receiver<VmmEvent>) -> Outcome {
    loop {
        let sig = TERMINATION_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            return Outcome::Signal(sig);
        }
        // Signals cannot wake a channel wait, so poll for them at a coarse interval; every
        // VM-originated event arrives through the channel immediately.
        match events.recv_timeout(Duration::from_millis(50)) {
            Ok(VmmEvent::GuestReset) => return Outcome::GuestReset,
            Ok(VmmEvent::ApiShutdown) => return Outcome::Shutdown,
            Ok(VmmEvent::VcpuExit(index, reason)) => {
                tracing::info!("vCPU {index} stopped: {reason:?}");
                return match reason {
                    VcpuExitReason::GuestPowerOff | VcpuExitReason::GuestHalted => {
                        Outcome::GuestPowerOff
                    }
                    VcpuExitReason::GuestReset => Outcome::GuestReset,
                    VcpuExitReason::GuestFailure(why) => Outcome::GuestFailure(why),
                    VcpuExitReason::HostError(why) => Outcome::HostError(why),
                    VcpuExitReason::Stopped => continue,
                };
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Outcome::HostError("every VM thread ended without an outcome".into())
            }
        }
    }
}

/// Threads to stop on the way out (also on error paths, via Drop).
struct Running {
    vcpus: Vec<VcpuHandle>,
    stopper: EventLoopStopper,
    event_thread: Option<JoinHandle<Result<(), EventLoopError>>>,
}

impl Running {
    fn stop_devices(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.event_thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("device event loop failed: {e}"),
                Err(_) => tracing::error!("device event loop panicked"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for v in &self.vcpus {
            v.stop();
        }
        self.stop_devices();
    }
}

/// Slot `i` of the virtio-mmio window area.
fn slot_for(i: usize) -> Result<MmioSlot, VmmError> {
    let gsi = IRQ_BASE
        .checked_add(u32::try_from(i).map_err(|_| VmmError::TooManyDevices)?)
        .filter(|&g| g <= layout::IRQ_MAX)
        .ok_or(VmmError::TooManyDevices)?;
    Ok(MmioSlot {
        base: MMIO_GAP_START + i as u64 * VIRTIO_MMIO_WINDOW,
        size: VIRTIO_MMIO_WINDOW,
        gsi,
    })
}

/// Wire a virtio-mmio device's ioeventfds, irqfd and event handler.
fn attach_virtio(
    vm: &Vm,
    event_loop: &mut EventLoop,
    slot: &MmioSlot,
    device: &mut dyn VirtioMmioDevice,
) -> Result<(), String> {
    for (queue, evt) in device.queue_notify_events().map_err(|e| e.to_string())? {
        vm.register_queue_notify(slot, queue, &evt)
            .map_err(|e| e.to_string())?;
        // KVM holds its own reference to the eventfd; the device keeps the original.
        drop(evt);
    }
    let irq = device.interrupt_event().map_err(|e| e.to_string())?;
    vm.register_irqfd(&irq, slot.gsi)
        .map_err(|e| e.to_string())?;
    if let Some(handler) = device.take_event_handler() {
        event_loop.add_handler(handler).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Adapts a boxed [`VirtioMmioDevice`] to the bus.
struct BoxedMmio(ExtraDevice);

impl crate::devices::BusDevice for BoxedMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data)
    }
}

fn set_nonblocking(fd: &impl std::os::unix::io::AsRawFd) -> Result<(), VmmError> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a valid fd with F_GETFL/F_SETFL has no memory effects.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(VmmError::EventFd(std::io::Error::last_os_error()))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn build_block(mem: &GuestMemoryMmap, spec: &BlockSpec) -> Result<ExtraDevice, VmmError> {
    let err = |reason: String| VmmError::Device {
        what: format!("virtio-blk {}", spec.path.display()),
        reason,
    };
    let device = BlockDevice::new(&BlockConfig {
        path: spec.path.clone(),
        read_only: spec.read_only,
        id: spec.id.clone(),
    })
    .map_err(|e| err(e.to_string()))?;
    let transport = MmioTransport::new(mem.clone(), device).map_err(|e| err(e.to_string()))?;
    Ok(Box::new(transport))
}

fn build_vsock(mem: &GuestMemoryMmap, spec: &VsockSpec) -> Result<ExtraDevice, VmmError> {
    let err = |reason: String| VmmError::Device {
        what: format!(
            "virtio-vsock (cid {}, {})",
            spec.guest_cid,
            spec.uds_path.display()
        ),
        reason,
    };
    let device = VsockDevice::new(&VsockConfig {
        guest_cid: u64::from(spec.guest_cid),
        uds_path: spec.uds_path.clone(),
    })
    .map_err(|e| err(e.to_string()))?;
    let transport = MmioTransport::new(mem.clone(), device).map_err(|e| err(e.to_string()))?;
    Ok(Box::new(transport))
}

fn build_net(mem: &GuestMemoryMmap, spec: &NetSpec) -> Result<ExtraDevice, VmmError> {
    let err = |reason: String| VmmError::Device {
        what: format!("virtio-net (tap {})", spec.tap),
        reason,
    };
    let device = NetDevice::new(&NetConfig {
        tap: spec.tap.clone(),
        mac: spec.mac,
        mtu: spec.mtu,
    })
    .map_err(|e| err(e.to_string()))?;
    let transport = MmioTransport::new(mem.clone(), device).map_err(|e| err(e.to_string()))?;
    Ok(Box::new(transport))
}
