//! virtio-blk backed by a raw disk image file.
//!
//! One request queue, served synchronously on the device event-loop thread (the guest's
//! page cache absorbs most reads; a thread pool or io_uring can come later behind the same
//! [`VirtioDevice`] interface). Offered features: `VIRTIO_BLK_F_FLUSH`, and
//! `VIRTIO_BLK_F_RO` for read-only disks (which also reject writes with `IOERR`).

mod request;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};

use super::device::{copy_config, ActivateError, Activation, Interrupt, VirtioDevice};
use crate::event_loop::EventLoopCtl;
use crate::memory::GuestMemoryMmap;
use request::Disk;
pub use request::SECTOR_SIZE;

/// Maximum descriptors in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise: a request also needs a header and a status
/// descriptor, and must fit the ring when the driver does not use indirect descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Errors opening a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image file cannot be opened or inspected.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The configured serial does not fit the 20-byte virtio-blk id.
    #[error("block device id {0:?} is longer than {VIRTIO_BLK_ID_BYTES} bytes")]
    IdTooLong(String),
}

/// How to create a [`BlockDevice`].
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Path of the raw image.
    pub path: PathBuf,
    /// Open read-only, offer `VIRTIO_BLK_F_RO` and reject writes.
    pub read_only: bool,
    /// Serial reported by `VIRTIO_BLK_T_GET_ID` (≤ 20 bytes; shows up as
    /// `/sys/block/vdX/serial`). Defaults to one derived from the image's device and inode.
    pub id: Option<String>,
}

struct ActiveState {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queue: Queue,
}

/// A virtio-blk device.
pub struct BlockDevice {
    disk: Disk,
    avail_features: u64,
    queue_sizes: [u16; 1],
    active: Option<ActiveState>,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("disk", &self.disk)
            .field("active", &self.active.is_some())
            .finish()
    }
}

fn default_id(file: &File) -> io::Result<[u8; VIRTIO_BLK_ID_BYTES as usize]> {
    let meta = file.metadata()?;
    let text = format!("{:x}-{:x}", meta.dev(), meta.ino());
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let n = text.len().min(id.len());
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    Ok(id)
}

impl BlockDevice {
    /// Open the image described by `config`.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: config.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let id = match &config.id {
            Some(text) => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                if text.len() > id.len() {
                    return Err(BlockError::IdTooLong(text.clone()));
                }
                id[..text.len()].copy_from_slice(text.as_bytes());
                id
            }
            None => default_id(&file).map_err(open_err)?,
        };
        if len % SECTOR_SIZE != 0 {
            warn!(
                "disk image {} is {len} bytes, not a whole number of sectors; the tail is ignored",
                config.path.display()
            );
        }
        // SEG_MAX: without it Linux sends one data segment per request. Indirect
        // descriptors let a large request take one ring slot (virtio-queue follows and
        // bounds-checks the indirect tables).
        let mut avail_features = 1u64 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if config.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(BlockDevice {
            disk: Disk {
                file,
                size: len - len % SECTOR_SIZE,
                read_only: config.read_only,
                id,
                bounce: Vec::new(),
            },
            avail_features,
            queue_sizes: [QUEUE_SIZE],
            active: None,
        })
    }

    /// Convenience for [`BlockDevice::new`] with the default id.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        Self::new(&BlockConfig {
            path: path.to_path_buf(),
            read_only,
            id: None,
        })
    }

    /// Disk capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }

    fn config_space(&self) -> [u8; 16] {
        // struct virtio_blk_config { le64 capacity; le32 size_max; le32 seg_max; ... }:
        // later fields are only read when their feature bits are offered, and none are.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity().to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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
            ..
        } = activation;
        let actual = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                actual,
            });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.active = Some(ActiveState {
            mem,
            interrupt,
            queue,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, queue_index: usize, _ctl: &mut dyn EventLoopCtl) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if queue_index != 0 {
            return;
        }
        let mut completed = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let used_len = request::process(&mut self.disk, &active.mem, chain);
            if let Err(e) = active.queue.add_used(&active.mem, head, used_len) {
                warn!("virtio-blk: cannot complete request {head}: {e}");
            }
            completed = true;
        }
        if completed {
            active.interrupt.signal_used("virtio-blk");
        }
    }
}

#[cfg(test)]
mod tests;
