//! One virtio-blk request: parse the descriptor chain, do the I/O, write the status.
//!
//! Layout (virtio 1.2 §5.2.6): a device-readable 16-byte header (`type`, `reserved`,
//! `sector`), then data (device-writable for reads, device-readable for writes), then one
//! device-writable status byte — the last byte of the chain's writable part. The chain is
//! read through virtio-queue's [`Reader`]/[`Writer`], which validate every descriptor
//! against guest memory, so descriptor boundaries do not matter (`VIRTIO_F_ANY_LAYOUT`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use tracing::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::memory::GuestMemoryMmap;

/// Bytes per sector in the virtio-blk protocol, whatever the backing file's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header.
const HEADER_SIZE: usize = 16;
/// Largest bounce buffer used per request: big enough for the Linux default max request
/// size in a few rounds, small enough not to matter for the VMM's RSS.
const MAX_CHUNK: usize = 128 * 1024;

/// The backing store of a block device.
#[derive(Debug)]
pub(super) struct Disk {
    pub file: File,
    /// Usable size in bytes (a whole number of sectors).
    pub size: u64,
    pub read_only: bool,
    /// The answer to `VIRTIO_BLK_T_GET_ID`.
    pub id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Reused between requests; grows to at most `MAX_CHUNK`.
    pub bounce: Vec<u8>,
}

/// Why a request failed; mapped to a status byte.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("descriptor chain is malformed: {0}")]
    Malformed(String),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("sector {sector} + {len} bytes is beyond the disk end ({size} bytes)")]
    OutOfRange { sector: u64, len: usize, size: u64 },
    #[error("I/O on the backing file failed: {0}")]
    Io(#[source] io::Error),
    #[error("guest buffer access failed: {0}")]
    GuestBuffer(#[source] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Execute the request in `chain` and return the number of bytes written into the chain's
/// device-writable buffers (data + status), for the used ring. A chain without a writable
/// status byte cannot be answered: it is completed with length 0.
pub(super) fn process(
    disk: &mut Disk,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let mut data_writer = match chain.clone().writer(mem) {
        Ok(w) => w,
        Err(e) => {
            debug!("virtio-blk: unusable writable descriptors: {e}");
            return 0;
        }
    };
    let writable = data_writer.available_bytes();
    if writable == 0 {
        debug!("virtio-blk: request has no status descriptor");
        return 0;
    }
    let mut status_writer = match data_writer.split_at(writable - 1) {
        Ok(w) => w,
        Err(_) => return 0,
    };
    let status = match chain.reader(mem) {
        Ok(reader) => match execute(disk, reader, &mut data_writer) {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                debug!("virtio-blk: request failed: {e}");
                e.status()
            }
        },
        Err(e) => {
            debug!("virtio-blk: unusable readable descriptors: {e}");
            VIRTIO_BLK_S_IOERR as u8
        }
    };
    // Written last, after all data, as the driver may look at it as soon as it is set.
    if status_writer.write_all(&[status]).is_err() {
        return 0;
    }
    (data_writer.bytes_written() + 1) as u32
}

fn execute(
    disk: &mut Disk,
    mut reader: Reader<'_>,
    writer: &mut Writer<'_>,
) -> Result<(), RequestError> {
    if reader.available_bytes() < HEADER_SIZE {
        return Err(RequestError::Malformed(format!(
            "header needs {HEADER_SIZE} readable bytes, chain has {}",
            reader.available_bytes()
        )));
    }
    let mut header = [0u8; HEADER_SIZE];
    reader
        .read_exact(&mut header)
        .map_err(RequestError::GuestBuffer)?;
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    match request_type {
        VIRTIO_BLK_T_IN => {
            if reader.available_bytes() != 0 {
                return Err(RequestError::Malformed(
                    "read request carries device-readable data".into(),
                ));
            }
            let len = writer.available_bytes();
            let offset = checked_range(disk, sector, len)?;
            read_to_guest(disk, offset, len, writer)
        }
        VIRTIO_BLK_T_OUT => {
            if writer.available_bytes() != 0 {
                return Err(RequestError::Malformed(
                    "write request carries device-writable data".into(),
                ));
            }
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            let offset = checked_range(disk, sector, len)?;
            write_from_guest(disk, offset, len, &mut reader)
        }
        VIRTIO_BLK_T_FLUSH => {
            if disk.read_only {
                return Ok(());
            }
            disk.file.sync_data().map_err(RequestError::Io)
        }
        VIRTIO_BLK_T_GET_ID => {
            if writer.available_bytes() < disk.id.len() {
                return Err(RequestError::Malformed(format!(
                    "get-id buffer has {} bytes, needs {}",
                    writer.available_bytes(),
                    disk.id.len()
                )));
            }
            writer
                .write_all(&disk.id)
                .map_err(RequestError::GuestBuffer)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// The byte offset of `sector` if `[sector, sector + len)` lies inside the disk and `len` is
/// a whole number of sectors.
fn checked_range(disk: &Disk, sector: u64, len: usize) -> Result<u64, RequestError> {
    let out_of_range = || RequestError::OutOfRange {
        sector,
        len,
        size: disk.size,
    };
    if len as u64 % SECTOR_SIZE != 0 {
        return Err(RequestError::Malformed(format!(
            "data length {len} is not a multiple of {SECTOR_SIZE}"
        )));
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    let end = offset.checked_add(len as u64).ok_or_else(out_of_range)?;
    if end > disk.size {
        return Err(out_of_range());
    }
    Ok(offset)
}

fn read_to_guest(
    disk: &mut Disk,
    mut offset: u64,
    len: usize,
    writer: &mut Writer<'_>,
) -> Result<(), RequestError> {
    let mut remaining = len;
    while remaining > 0 {
        let chunk = bounce(&mut disk.bounce, remaining);
        disk.file
            .read_exact_at(chunk, offset)
            .map_err(RequestError::Io)?;
        writer.write_all(chunk).map_err(RequestError::GuestBuffer)?;
        offset += chunk.len() as u64;
        remaining -= chunk.len();
    }
    Ok(())
}

fn write_from_guest(
    disk: &mut Disk,
    mut offset: u64,
    len: usize,
    reader: &mut Reader<'_>,
) -> Result<(), RequestError> {
    let mut remaining = len;
    while remaining > 0 {
        let chunk = bounce(&mut disk.bounce, remaining);
        reader
            .read_exact(chunk)
            .map_err(RequestError::GuestBuffer)?;
        disk.file
            .write_all_at(chunk, offset)
            .map_err(RequestError::Io)?;
        offset += chunk.len() as u64;
        remaining -= chunk.len();
    }
    Ok(())
}

/// A slice of the bounce buffer for the next `remaining` bytes (at most `MAX_CHUNK`).
fn bounce(buf: &mut Vec<u8>, remaining: usize) -> &mut [u8] {
    let len = remaining.min(MAX_CHUNK);
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}
