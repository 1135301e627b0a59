//! virtio-net on a tap interface (one receive and one transmit queue).
//!
//! - [`tap`]: the host end — an existing tap opened by name, and the [`Backend`] trait;
//! - [`frame`]: one frame between a descriptor chain and a buffer, header checks;
//! - this module: the device (features, config space with MAC/status/MTU, queues) and the
//!   event-loop side (bounded work per event, tap polling only while the guest has
//!   receive buffers).
//!
//! Features: `VERSION_1` (transport), `STATUS` (link always up), `MAC` and `MTU` when
//! configured, checksum and TCP segmentation offload both ways (`CSUM`, `HOST_TSO4/6`,
//! `GUEST_CSUM`, `GUEST_TSO4/6`), indirect descriptors. The tap's offloads (`TUNSETOFFLOAD`) follow what the
//! guest acknowledged; they are set on the device thread after activation, before the
//! first frame is read. No mergeable receive buffers: a Linux guest that acks GUEST_TSO
//! (or has an MTU above 1500) posts 64 KiB receive chains ("big packets").
//!
//! A guest cannot make this device hog the event loop: every transmit notification and
//! every tap wake-up moves at most [`TX_BUDGET`] / [`RX_BUDGET`] frames, then yields (a
//! self-notification resumes transmit after the other ready fds were served; the tap stays
//! readable). Without receive buffers the tap is taken off the event loop until the guest
//! posts some, so frames waiting in the tap cause no busy loop.

pub mod frame;
pub mod tap;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use tracing::{debug, info, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{copy_config, ActivateError, Activation, Interrupt, VirtioDevice};
use crate::event_loop::EventLoopCtl;
use crate::memory::GuestMemoryMmap;
use frame::{tun_offload, RxPlacement};
pub use frame::{FrameError, MAX_FRAME_LEN, VNET_HDR_LEN};
pub use tap::{Backend, Tap, TapError};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Frames moved from the transmit queue per event before yielding to other fds.
pub const TX_BUDGET: usize = 128;
/// Frames moved from the tap to the receive queue per event before yielding.
pub const RX_BUDGET: usize = 128;
/// Smallest MTU the device accepts (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Guest-caused warnings logged per device before they drop to debug level.
const GUEST_WARNING_BUDGET: u32 = 32;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The MTU is out of range.
    #[error("MTU {0} is not in {MIN_MTU}..=65535")]
    Mtu(u16),
    /// The MAC address is multicast or all zeroes.
    #[error("MAC address {0} is not a unicast address")]
    Mac(String),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// How to create a [`NetDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the existing tap interface in the VMM's network namespace.
    pub tap: String,
    /// The guest's MAC address (offered as `VIRTIO_NET_F_MAC`); without it the guest
    /// picks a random one.
    pub mac: Option<[u8; 6]>,
    /// The MTU offered to the guest (`VIRTIO_NET_F_MTU`).
    pub mtu: Option<u16>,
}

/// Frame counters (for tests and logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that reached the backend.
    pub tx_frames: u64,
    /// Guest frames dropped (malformed chain or header, backend refused).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Host frames dropped (too big for the guest's buffer, offload not negotiated).
    pub rx_dropped: u64,
}

struct ActiveState {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    rxq: Queue,
    txq: Queue,
    acked_features: u64,
    /// `TUNSETOFFLOAD` still to be issued (done on the device thread).
    offload_pending: bool,
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A virtio-net device.
pub struct NetDevice {
    backend: Box<dyn Backend>,
    mac: Option<[u8; 6]>,
    mtu: Option<u16>,
    avail_features: u64,
    queue_sizes: [u16; 2],
    /// Written when the transmit budget ran out with frames left; read on the event loop.
    tx_resume: EventFd,
    /// Whether the backend fd is registered with the event loop.
    backend_polled: bool,
    /// A frame read from the backend that still waits for a receive buffer.
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    stats: NetStats,
    guest_warnings: u32,
    activations: u32,
    active: Option<ActiveState>,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("backend_fd", &self.backend.as_raw_fd())
            .field("mac", &self.mac.as_ref().map(format_mac))
            .field("mtu", &self.mtu)
            .field("stats", &self.stats)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl NetDevice {
    /// Attach to the tap named in `config`.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        Self::with_backend(Box::new(tap), config.mac, config.mtu)
    }

    /// A device on any [`Backend`] (tests use a socket pair).
    pub fn with_backend(
        backend: Box<dyn Backend>,
        mac: Option<[u8; 6]>,
        mtu: Option<u16>,
    ) -> Result<Self, NetError> {
        if let Some(m) = mtu {
            if m < MIN_MTU {
                return Err(NetError::Mtu(m));
            }
        }
        if let Some(m) = &mac {
            if m[0] & 1 != 0 || m == &[0; 6] {
                return Err(NetError::Mac(format_mac(m)));
            }
        }
        let mut avail_features = 1u64 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            // A 64 KiB receive buffer or a TSO frame takes one ring slot instead of ~19
            // (virtio-queue follows and bounds-checks the tables).
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if mac.is_some() {
            avail_features |= 1 << VIRTIO_NET_F_MAC;
        }
        if mtu.is_some() {
            avail_features |= 1 << VIRTIO_NET_F_MTU;
        }
        Ok(NetDevice {
            backend,
            mac,
            mtu,
            avail_features,
            queue_sizes: [QUEUE_SIZE; 2],
            tx_resume: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
            backend_polled: false,
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            tx_buf: vec![0; MAX_FRAME_LEN],
            stats: NetStats::default(),
            guest_warnings: 0,
            activations: 0,
            active: None,
        })
    }

    /// Frame counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn config_space(&self) -> [u8; 12] {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs;
        // le16 mtu; ... }: later fields belong to features we do not offer.
        let mut config = [0u8; 12];
        if let Some(mac) = &self.mac {
            config[..6].copy_from_slice(mac);
        }
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        config
    }

    /// A warning the guest caused, within [`GUEST_WARNING_BUDGET`].
    fn guest_warn(&mut self, what: std::fmt::Arguments<'_>) {
        self.guest_warnings = self.guest_warnings.saturating_add(1);
        if self.guest_warnings <= GUEST_WARNING_BUDGET {
            warn!("virtio-net: {what}");
            if self.guest_warnings == GUEST_WARNING_BUDGET {
                warn!("virtio-net: warning budget spent; further guest errors are logged at debug level");
            }
        } else {
            debug!("virtio-net: {what}");
        }
    }

    /// Issue the `TUNSETOFFLOAD` for the acknowledged features, once per activation.
    fn apply_offload(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if !active.offload_pending {
            return;
        }
        active.offload_pending = false;
        let flags = tun_offload(active.acked_features);
        if let Err(e) = self.backend.set_offload(flags) {
            // The tap keeps its previous offloads (none after open). Safe either way: frames
            // needing an offload the guest did not ack are dropped in `frame::prepare_rx`.
            warn!("virtio-net: cannot set tap offloads {flags:#x}: {e}");
        }
    }

    fn poll_backend(&mut self, ctl: &mut dyn EventLoopCtl, on: bool) {
        if on == self.backend_polled {
            return;
        }
        let fd = self.backend.as_raw_fd();
        if on {
            match ctl.add(fd, EventSet::IN) {
                Ok(()) => self.backend_polled = true,
                Err(e) => warn!("virtio-net: cannot watch the tap: {e}"),
            }
        } else {
            ctl.remove(fd);
            self.backend_polled = false;
        }
    }

    /// Send up to [`TX_BUDGET`] frames from the transmit queue.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Err(e) = avail_index_sane(&active.txq, &active.mem) {
            self.guest_warn(format_args!("transmit queue: {e}"));
            return;
        }
        let mut completed = 0usize;
        let mut problems: Vec<(u16, FrameError)> = Vec::new();
        let mut backend_errors: Vec<io::Error> = Vec::new();
        while completed < TX_BUDGET {
            let Some(chain) = active.txq.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            match frame::read_tx(&active.mem, chain, active.acked_features, &mut self.tx_buf) {
                Ok(len) => match self.backend.write_frame(&self.tx_buf[..len]) {
                    Ok(()) => self.stats.tx_frames += 1,
                    Err(e) => {
                        self.stats.tx_dropped += 1;
                        // A full or down tap drops, like a real link; say why once in a
                        // while only.
                        if backend_errors.is_empty() {
                            backend_errors.push(e);
                        }
                    }
                },
                Err(e) => {
                    self.stats.tx_dropped += 1;
                    problems.push((head, e));
                }
            }
            if let Err(e) = active.txq.add_used(&active.mem, head, 0) {
                problems.push((head, FrameError::BadChain(e.to_string())));
            }
            completed += 1;
        }
        if completed == TX_BUDGET {
            // Maybe more: resume after the other ready fds had their turn.
            if let Err(e) = self.tx_resume.write(1) {
                warn!("virtio-net: cannot schedule more transmit work: {e}");
            }
        }
        if completed > 0 {
            active.interrupt.signal_used("virtio-net");
        }
        for (head, e) in problems.into_iter().take(4) {
            self.guest_warn(format_args!("dropped transmit chain {head}: {e}"));
        }
        for e in backend_errors {
            debug!("virtio-net: tap refused a frame: {e}");
        }
    }

    /// Move up to [`RX_BUDGET`] frames from the backend into receive buffers.
    fn process_rx(&mut self, ctl: &mut dyn EventLoopCtl) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Err(e) = avail_index_sane(&active.rxq, &active.mem) {
            self.guest_warn(format_args!("receive queue: {e}"));
            // Treat as "no buffers": stop watching the tap until the next notification.
            self.poll_backend(ctl, false);
            return;
        }
        // Frames taken from the backend this round (delivered or dropped).
        let mut delivered = 0usize;
        let mut completed = false;
        let mut problems: Vec<String> = Vec::new();
        let mut out_of_buffers = false;
        while delivered < RX_BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!("virtio-net: reading the tap failed: {e}");
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            let frame = &mut self.rx_buf[..len];
            if let Err(e) = frame::prepare_rx(frame, active.acked_features) {
                debug!("virtio-net: dropped host frame: {e}");
                self.stats.rx_dropped += 1;
                self.rx_pending = None;
                delivered += 1;
                continue;
            }
            let Some(chain) = active.rxq.pop_descriptor_chain(&active.mem) else {
                // Keep the frame; the guest's next receive notification resumes us.
                out_of_buffers = true;
                break;
            };
            let head = chain.head_index();
            match frame::write_rx(&active.mem, chain, frame) {
                RxPlacement::Written(used) => {
                    if let Err(e) = active.rxq.add_used(&active.mem, head, used) {
                        problems.push(format!("cannot return receive chain {head}: {e}"));
                    }
                    self.stats.rx_frames += 1;
                    self.rx_pending = None;
                    completed = true;
                }
                RxPlacement::BadChain(e) => {
                    problems.push(format!("unusable receive chain {head}: {e}"));
                    if let Err(e) = active.rxq.add_used(&active.mem, head, 0) {
                        problems.push(format!("cannot return receive chain {head}: {e}"));
                    }
                    completed = true;
                }
                RxPlacement::TooSmall(e) => {
                    debug!("virtio-net: dropped host frame: {e}");
                    active.rxq.go_to_previous_position();
                    self.stats.rx_dropped += 1;
                    self.rx_pending = None;
                }
            }
            delivered += 1;
        }
        if completed {
            active.interrupt.signal_used("virtio-net");
        }
        // Frames still waiting and no buffer: stop watching the tap (level-triggered, it
        // would wake us for nothing) until the guest posts buffers.
        self.poll_backend(ctl, !out_of_buffers);
        for p in problems.into_iter().take(4) {
            self.guest_warn(format_args!("{p}"));
        }
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        let s = self.stats;
        info!(
            "virtio-net: closed; tx {} frames ({} dropped), rx {} frames ({} dropped)",
            s.tx_frames, s.tx_dropped, s.rx_frames, s.rx_dropped
        );
    }
}

/// Whether the driver's available index is at most a ring ahead of what we consumed.
/// virtio-queue refuses such a ring too, but logs an error on every attempt; checking
/// first keeps a guest that corrupts its index within the warning budget.
fn avail_index_sane(queue: &Queue, mem: &GuestMemoryMmap) -> Result<(), String> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(|e| format!("cannot read the available index: {e}"))?;
    let pending = avail.0.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        return Err(format!(
            "available index {} is {pending} entries ahead of the device (queue size {})",
            avail.0,
            queue.size()
        ));
    }
    Ok(())
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config_space(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Activation {
            mem,
            interrupt,
            queues,
            acked_features,
        } = activation;
        let actual = queues.len();
        let Ok([rxq, txq]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount {
                expected: 2,
                actual,
            });
        };
        for (index, queue) in [(RX_QUEUE, &rxq), (TX_QUEUE, &txq)] {
            if !queue.ready() {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        // A driver resetting in a loop must not flood the log either.
        self.activations = self.activations.saturating_add(1);
        if self.activations <= GUEST_WARNING_BUDGET {
            info!(
                "virtio-net: driver ready (acked features {acked_features:#x}, tap offloads {:#x})",
                tun_offload(acked_features)
            );
        }
        self.active = Some(ActiveState {
            mem,
            interrupt,
            rxq,
            txq,
            acked_features,
            offload_pending: true,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        // Runs on a vCPU thread: no event-loop changes here. A still-registered tap is
        // taken off the loop on its next wake-up.
        self.active = None;
        self.rx_pending = None;
    }

    fn host_fds(&self) -> Vec<(RawFd, EventSet)> {
        // The tap joins when the device is active and has receive buffers.
        vec![(self.tx_resume.as_raw_fd(), EventSet::IN)]
    }

    fn process_queue(&mut self, queue_index: usize, ctl: &mut dyn EventLoopCtl) {
        if self.active.is_none() {
            return;
        }
        self.apply_offload();
        match queue_index {
            // New receive buffers: deliver what waits and watch the tap again.
            RX_QUEUE => self.process_rx(ctl),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }

    fn handle_host_event(&mut self, fd: RawFd, _events: EventSet, ctl: &mut dyn EventLoopCtl) {
        if fd == self.tx_resume.as_raw_fd() {
            let _ = self.tx_resume.read();
            if self.active.is_some() {
                self.apply_offload();
                self.process_tx();
            }
        } else if fd == self.backend.as_raw_fd() {
            if self.active.is_none() {
                self.poll_backend(ctl, false);
                return;
            }
            self.apply_offload();
            self.process_rx(ctl);
        }
    }
}

#[cfg(test)]
mod tests;
