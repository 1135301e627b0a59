//! virtio-vsock in hybrid mode: the guest's AF_VSOCK peer is a Unix socket on the host.
//!
//! - [`packet`]: wire constants and tx parsing;
//! - [`connection`]: one stream and its credit-based flow control;
//! - [`muxer`]: the host listener (`CONNECT <port>\n` / `OK <port>\n`), guest-initiated
//!   connections to `<uds_path>_<port>`, RSTs, and the rx scheduling;
//! - this module: the virtio device (config space with the guest CID; rx, tx and event
//!   queues).
//!
//! Packets are parsed with `virtio-vsock`'s [`virtio_vsock::packet::VsockPacket`]: rx
//! buffers are one descriptor (Linux ≥ 6.2) or header + data; tx packets are header +
//! data, and since Linux 6.12.y payloads over ~32 KiB come as one descriptor per page
//! fragment, which [`packet::TxPacket`] gathers.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::path::{Path, PathBuf};

use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::EventSet;

use super::device::{copy_config, ActivateError, Activation, Interrupt, VirtioDevice};
use crate::event_loop::EventLoopCtl;
use crate::memory::GuestMemoryMmap;
use muxer::Muxer;
pub use muxer::MuxerError;
use packet::{TxPacket, HEADER_SIZE, MAX_PKT_DATA};

/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 and `u32::MAX` are reserved; guest CIDs are 32-bit in practice.
    #[error("invalid guest CID {0}: must be between 3 and 4294967294")]
    InvalidCid(u64),
    /// The host socket cannot be created.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
}

/// How to create a [`VsockDevice`].
#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// The guest's context id.
    pub guest_cid: u64,
    /// The host Unix socket: host peers connect here; guest connections to host port `P`
    /// go to `<uds_path>_P`. Must not exist yet; removed when the device is dropped.
    pub uds_path: PathBuf,
}

struct ActiveState {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    rxq: Queue,
    txq: Queue,
    // Only used for transport-reset events (snapshot restore), which never happen here;
    // kept so the guest's buffers stay posted.
    _evq: Queue,
}

/// A virtio-vsock device in hybrid mode.
pub struct VsockDevice {
    guest_cid: u64,
    queue_sizes: [u16; 3],
    muxer: Muxer,
    active: Option<ActiveState>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("guest_cid", &self.guest_cid)
            .field("muxer", &self.muxer)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl VsockDevice {
    /// Create the device and start listening on `config.uds_path`.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid < 3 || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        Ok(VsockDevice {
            guest_cid: config.guest_cid,
            queue_sizes: [QUEUE_SIZE; 3],
            muxer: Muxer::new(config.guest_cid, &config.uds_path)?,
            active: None,
        })
    }

    /// Convenience for [`VsockDevice::new`].
    pub fn with_socket(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        Self::new(&VsockConfig {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
        })
    }

    /// The guest CID in config space.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Move packets both ways until nothing more can move: guest tx first (it may queue
    /// replies), then rx; repeat while a full reply backlog was holding tx back.
    fn pump(&mut self, ctl: &mut dyn EventLoopCtl) {
        loop {
            let tx_blocked = self.process_tx(ctl);
            let rx_progress = self.process_rx(ctl);
            if !(tx_blocked && rx_progress) {
                break;
            }
        }
    }

    /// Consume the tx queue. Returns true if it stopped because of backpressure.
    fn process_tx(&mut self, ctl: &mut dyn EventLoopCtl) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut completed = false;
        let mut blocked = false;
        loop {
            if self.muxer.tx_backpressure() {
                blocked = true;
                break;
            }
            let Some(chain) = active.txq.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            match TxPacket::parse(&active.mem, chain) {
                Ok(pkt) => self.muxer.handle_guest_packet(&pkt, ctl),
                Err(e) => {
                    debug!("vsock: malformed tx packet: {e}");
                    if let Some(header) = e.header() {
                        self.muxer.handle_bad_packet(header, ctl);
                    }
                }
            }
            if let Err(e) = active.txq.add_used(&active.mem, head, 0) {
                warn!("vsock: cannot return tx buffer {head}: {e}");
            }
            completed = true;
        }
        if completed {
            active.interrupt.signal_used("vsock");
        }
        blocked
    }

    /// Fill rx buffers with pending packets. Returns true if any packet was delivered.
    fn process_rx(&mut self, ctl: &mut dyn EventLoopCtl) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut completed = false;
        let mut delivered = false;
        while self.muxer.has_rx_work() {
            let Some(mut chain) = active.rxq.pop_descriptor_chain(&active.mem) else {
                // Out of buffers: the guest's next rx notification resumes us.
                break;
            };
            let head = chain.head_index();
            let used_len =
                match VsockPacket::from_rx_virtq_chain(&active.mem, &mut chain, MAX_PKT_DATA) {
                    Ok(mut pkt) => match self.muxer.fill_rx(&mut pkt, ctl) {
                        Some(len) => {
                            delivered = true;
                            HEADER_SIZE as u32 + len
                        }
                        None => {
                            // Nothing to send after all: give the buffer back.
                            let next = active.rxq.next_avail().wrapping_sub(1);
                            active.rxq.set_next_avail(next);
                            break;
                        }
                    },
                    Err(e) => {
                        debug!("vsock: unusable rx buffer {head}: {e}");
                        0
                    }
                };
            if let Err(e) = active.rxq.add_used(&active.mem, head, used_len) {
                warn!("vsock: cannot return rx buffer {head}: {e}");
            }
            completed = true;
        }
        if completed {
            active.interrupt.signal_used("vsock");
        }
        delivered
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        // Stream sockets only (no VIRTIO_VSOCK_F_SEQPACKET); VERSION_1 comes from the
        // transport.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        copy_config(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Activation {
            mem,
            interrupt,
            queues,
            ..
        } = activation;
        let actual = queues.len();
        let Ok([rxq, txq, evq]) = <[Queue; 3]>::try_from(queues) else {
            return Err(ActivateError::QueueCount {
                expected: 3,
                actual,
            });
        };
        for (index, queue) in [(RX_QUEUE, &rxq), (TX_QUEUE, &txq)] {
            if !queue.ready() {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        self.active = Some(ActiveState {
            mem,
            interrupt,
            rxq,
            txq,
            _evq: evq,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn process_queue(&mut self, queue_index: usize, ctl: &mut dyn EventLoopCtl) {
        if self.active.is_none() {
            return;
        }
        self.muxer.ensure_listening(ctl);
        match queue_index {
            RX_QUEUE | TX_QUEUE => self.pump(ctl),
            EVENT_QUEUE => {}
            _ => {}
        }
    }

    fn handle_host_event(&mut self, fd: i32, events: EventSet, ctl: &mut dyn EventLoopCtl) {
        let active = self.active.is_some();
        self.muxer.handle_host_event(fd, events, ctl, active);
        if active {
            self.pump(ctl);
        }
    }
}

#[cfg(test)]
mod tests;
