//! The virtio-mmio transport, version 2 ("modern"; virtio 1.2 §4.2.2).
//!
//! The transport owns everything the driver configures through registers (feature
//! selection, the status state machine, per-queue size/addresses/ready) and only hands the
//! device validated, ready-to-use [`Queue`]s at `DRIVER_OK`. Every register access comes
//! from the guest: unknown offsets and widths are ignored (reads return zero) and an
//! unusable queue configuration sets `DEVICE_NEEDS_RESET` instead of activating.

use std::io;
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

/// Guest-triggered warnings logged per transport before they drop to debug level: a
/// misbehaving (or hostile) driver must not be able to fill the host's VMM log.
const GUEST_WARNING_BUDGET: u32 = 32;

/// `warn!` for conditions the guest caused, within [`GUEST_WARNING_BUDGET`].
macro_rules! guest_warn {
    ($transport:expr, $($arg:tt)*) => {{
        let count = &mut $transport.guest_warnings;
        *count = count.saturating_add(1);
        if *count <= GUEST_WARNING_BUDGET {
            warn!($($arg)*);
            if *count == GUEST_WARNING_BUDGET {
                warn!("virtio-mmio: warning budget spent; further driver errors are logged at debug level");
            }
        } else {
            debug!($($arg)*);
        }
    }};
}
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{
    lock_device, ActivateError, Activation, Interrupt, InterruptKind, VirtioDevice,
    VirtioEventHandler,
};
use crate::devices::{BusDevice, VirtioMmioDevice};
use crate::event_loop::EventHandler;
use crate::memory::GuestMemoryMmap;

/// "virt" in little endian.
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern (non-legacy) virtio-mmio.
const MMIO_VERSION: u32 = 2;
/// We are nobody's PCI vendor; Firecracker and Cloud Hypervisor report 0 too.
const VENDOR_ID: u32 = 0;
/// Size of the register window the VMM should map (one page).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

// Register offsets (virtio 1.2 table 4.1).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Device-specific configuration space starts here.
const REG_CONFIG: u64 = 0x100;

/// Features the transport offers on behalf of every device. `VIRTIO_RING_F_EVENT_IDX` is
/// left to devices that implement its notification-suppression protocol.
const TRANSPORT_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for the virtio-mmio transport: {0}")]
    EventFd(#[source] io::Error),
    /// The device reported a queue size the split-ring format cannot have.
    #[error(
        "device queue {index} has invalid maximum size {size} (must be a power of two <= 32768)"
    )]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The reported size.
        size: u16,
    },
}

/// What the driver wrote for one queue; turned into a [`Queue`] only at activation.
#[derive(Clone, Copy, Debug, Default)]
struct QueueConfig {
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & !0xffff_ffff) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device exposed to the guest through a virtio-mmio register window.
///
/// # Wiring (done by the VMM)
/// ```text
/// let transport = MmioTransport::new(mem.clone(), vsock_device)?;
/// for (index, evt) in transport.queue_notify_events()? {   // KVM_IOEVENTFD
///     vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + 0x50), index)?;
/// }
/// vm.register_irqfd(&transport.interrupt_event()?, gsi)?;    // KVM_IRQFD
/// event_loop.add_handler(transport.take_event_handler().unwrap())?;
/// mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
/// cmdline += "virtio_mmio.device=4K@<base>:<gsi>";
/// ```
/// Queue notifications that do reach the transport (no ioeventfd registered) are
/// forwarded to the same eventfds, so the device works either way.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queue_evts: Vec<EventFd>,
    queue_max_sizes: Vec<u16>,
    queues: Vec<QueueConfig>,
    avail_features: u64,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    event_handler: Option<Box<dyn EventHandler>>,
    /// Warnings the guest's driver caused so far (see [`GUEST_WARNING_BUDGET`]).
    guest_warnings: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wrap `device`; `mem` is the guest memory its queues will live in.
    pub fn new<D: VirtioDevice + 'static>(
        mem: GuestMemoryMmap,
        device: D,
    ) -> Result<Self, MmioError> {
        Self::with_shared_device(mem, Arc::new(Mutex::new(device)))
    }

    /// Like [`MmioTransport::new`], for a device the caller keeps a handle to (tests,
    /// control-plane queries).
    pub fn with_shared_device(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let (queue_max_sizes, device_features) = {
            let dev = lock_device(&device);
            (dev.queue_max_sizes().to_vec(), dev.avail_features())
        };
        for (index, &size) in queue_max_sizes.iter().enumerate() {
            if let Err(e) = Queue::new(size) {
                debug!("queue {index} max size {size}: {e}");
                return Err(MmioError::QueueMaxSize { index, size });
            }
        }
        let queue_evts = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioError::EventFd)?;
        let handler_evts = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioError::EventFd)?;
        let event_handler: Box<dyn EventHandler> =
            Box::new(VirtioEventHandler::new(device.clone(), handler_evts));
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new().map_err(MmioError::EventFd)?,
            queue_evts,
            queues: vec![QueueConfig::default(); queue_max_sizes.len()],
            queue_max_sizes,
            avail_features: device_features | TRANSPORT_FEATURES,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            guest_warnings: 0,
            event_handler: Some(event_handler),
        })
    }

    /// The device's interrupt (status bits + irqfd).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The current `Status` register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Tell the driver the device configuration changed (bumps `ConfigGeneration` and
    /// raises a configuration-change interrupt).
    pub fn notify_config_change(&mut self) -> io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.trigger(InterruptKind::ConfigChange)
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        // Queue registers are only writable between FEATURES_OK and DRIVER_OK.
        if !self.has_status(
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET,
        ) {
            guest_warn!(
                self,
                "virtio-mmio: queue register written in status {:#x}",
                self.status
            );
            return None;
        }
        let sel = self.queue_sel as usize;
        self.queues.get_mut(sel)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => lock_device(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            // 0 means "this queue does not exist" to the driver.
            REG_QUEUE_NUM_MAX => self
                .queue_max_sizes
                .get(self.queue_sel as usize)
                .map_or(0, |&max| u32::from(max)),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            // All ones: no shared memory regions.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if !self.has_status(
                    VIRTIO_CONFIG_S_DRIVER,
                    VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
                ) {
                    guest_warn!(
                        self,
                        "virtio-mmio: features written in status {:#x}",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.acked_features, value),
                    1 => set_high(&mut self.acked_features, value),
                    // Pages beyond 64 bits: nothing can be offered there.
                    _ if value != 0 => {
                        guest_warn!(
                            self,
                            "virtio-mmio: driver acked unknown features page {}",
                            self.driver_features_sel
                        );
                        // Remember the violation so FEATURES_OK is refused.
                        self.acked_features |= 1 << 63;
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.size = value;
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.ready = value == 1;
                }
            }
            REG_QUEUE_DESC_LOW => {
                if let Some(q) = self.selected_queue() {
                    set_low(&mut q.desc, value);
                }
            }
            REG_QUEUE_DESC_HIGH => {
                if let Some(q) = self.selected_queue() {
                    set_high(&mut q.desc, value);
                }
            }
            REG_QUEUE_AVAIL_LOW => {
                if let Some(q) = self.selected_queue() {
                    set_low(&mut q.avail, value);
                }
            }
            REG_QUEUE_AVAIL_HIGH => {
                if let Some(q) = self.selected_queue() {
                    set_high(&mut q.avail, value);
                }
            }
            REG_QUEUE_USED_LOW => {
                if let Some(q) = self.selected_queue() {
                    set_low(&mut q.used, value);
                }
            }
            REG_QUEUE_USED_HIGH => {
                if let Some(q) = self.selected_queue() {
                    set_high(&mut q.used, value);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally caught by a KVM ioeventfd; this is the slow path.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        guest_warn!(self, "virtio-mmio: cannot signal queue {value}: {e}");
                    }
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => debug!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    /// The driver-side status state machine (virtio 1.2 §3.1.1).
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            // The driver gave up; the device stays inert until reset.
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let old = self.status;
        if value & old != old {
            guest_warn!(
                self,
                "virtio-mmio: driver cleared status bits ({old:#x} -> {value:#x}) without reset"
            );
            return;
        }
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
        const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
        const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
        match (old, value & !old) {
            (_, 0) => {}
            (0, ACK) => self.status = value,
            (ACK, DRIVER) => self.status = value,
            (s, FEATURES_OK) if s == ACK | DRIVER => {
                let unknown = self.acked_features & !self.avail_features;
                if unknown != 0 {
                    guest_warn!(
                        self,
                        "virtio-mmio: driver acked features {unknown:#x} the device does not offer"
                    );
                } else if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                    guest_warn!(
                        self,
                        "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1"
                    );
                } else {
                    self.status = value;
                }
                // Without FEATURES_OK set, the driver reads back the status and fails.
            }
            (s, DRIVER_OK) if s == ACK | DRIVER | FEATURES_OK => match self.activate() {
                Ok(()) => self.status = value,
                Err(e) => {
                    guest_warn!(self, "virtio-mmio: device activation refused: {e}");
                    self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                    if let Err(e) = self.notify_config_change() {
                        guest_warn!(self, "virtio-mmio: cannot raise config interrupt: {e}");
                    }
                }
            },
            _ => guest_warn!(
                self,
                "virtio-mmio: invalid status transition {old:#x} -> {value:#x}"
            ),
        }
    }

    fn build_queue(&self, index: usize, config: &QueueConfig) -> Result<Queue, ActivateError> {
        let invalid = |reason: String| ActivateError::InvalidQueue { index, reason };
        let max = self.queue_max_sizes[index];
        let mut queue = Queue::new(max).map_err(|e| invalid(e.to_string()))?;
        if !config.ready {
            return Ok(queue);
        }
        let size = u16::try_from(config.size)
            .map_err(|_| invalid(format!("size {} out of range", config.size)))?;
        queue
            .try_set_size(size)
            .map_err(|e| invalid(format!("size {size} (max {max}): {e}")))?;
        queue
            .try_set_desc_table_address(GuestAddress(config.desc))
            .map_err(|e| invalid(format!("descriptor table {:#x}: {e}", config.desc)))?;
        queue
            .try_set_avail_ring_address(GuestAddress(config.avail))
            .map_err(|e| invalid(format!("available ring {:#x}: {e}", config.avail)))?;
        queue
            .try_set_used_ring_address(GuestAddress(config.used))
            .map_err(|e| invalid(format!("used ring {:#x}: {e}", config.used)))?;
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        if !queue.is_valid(&self.mem) {
            return Err(invalid(format!(
                "rings (desc {:#x}, avail {:#x}, used {:#x}, size {size}) are not inside guest memory",
                config.desc, config.avail, config.used
            )));
        }
        Ok(queue)
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, config)| self.build_queue(index, config))
            .collect::<Result<Vec<_>, _>>()?;
        lock_device(&self.device).activate(Activation {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            acked_features: self.acked_features,
        })?;
        // Drivers may have filled (and notified) queues before DRIVER_OK; make the event
        // loop look at every queue once now that the device can serve them.
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                guest_warn!(self, "virtio-mmio: cannot kick queue after activation: {e}");
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        {
            let mut dev = lock_device(&self.device);
            if dev.is_activated() {
                dev.reset();
            }
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.queues
            .iter_mut()
            .for_each(|q| *q = QueueConfig::default());
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= REG_CONFIG {
            lock_device(&self.device).read_config(offset - REG_CONFIG, data);
            return;
        }
        // Registers below the config space are 32 bits wide and aligned (§4.2.2.2).
        if data.len() != 4 || offset % 4 != 0 {
            guest_warn!(
                self,
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.has_status(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FAILED) {
                lock_device(&self.device).write_config(offset - REG_CONFIG, data);
            } else {
                guest_warn!(
                    self,
                    "virtio-mmio: config written in status {:#x}",
                    self.status
                );
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                self,
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            guest_warn!(self, "virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl VirtioMmioDevice for MmioTransport {
    fn queue_notify_events(&self) -> io::Result<Vec<(u32, EventFd)>> {
        self.queue_evts
            .iter()
            .enumerate()
            .map(|(index, evt)| Ok((index as u32, evt.try_clone()?)))
            .collect()
    }

    fn interrupt_event(&self) -> io::Result<EventFd> {
        self.interrupt.event().try_clone()
    }

    fn take_event_handler(&mut self) -> Option<Box<dyn EventHandler>> {
        self.event_handler.take()
    }
}

#[cfg(test)]
mod tests;
