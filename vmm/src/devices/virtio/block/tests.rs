use std::io::Write;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::test_utils::{
    activation, interrupt_fired, rd, test_memory, wr, RecordingCtl, TestQueue,
};

const SECTORS: u64 = 16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

/// A disk whose sector `n` is filled with byte `n`.
fn disk_image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for sector in 0..SECTORS {
        f.write_all(&[sector as u8; SECTOR_SIZE as usize]).unwrap();
    }
    f.flush().unwrap();
    f
}

fn write_header(mem: &GuestMemoryMmap<()>, request_type: u32, sector: u64) {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&request_type.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
}

fn status(mem: &GuestMemoryMmap<()>) -> u32 {
    u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
}

struct Harness {
    device: BlockDevice,
    interrupt: Interrupt,
    ctl: RecordingCtl,
}

fn start(mem: &GuestMemoryMmap<()>, q: &TestQueue, path: &Path, read_only: bool) -> Harness {
    let mut device = BlockDevice::open(path, read_only).unwrap();
    let (act, interrupt) = activation(mem, vec![q.queue()]);
    device.activate(act).unwrap();
    Harness {
        device,
        interrupt,
        ctl: RecordingCtl::default(),
    }
}

impl Harness {
    fn run(&mut self) {
        self.device.process_queue(0, &mut self.ctl);
    }
}

#[test]
fn reads_sectors_into_guest_memory() {
    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let mut q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), false);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();

    write_header(&mem, VIRTIO_BLK_T_IN, 2);
    let head = q.add_chain(&[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)]);
    h.run();

    assert_eq!(q.next_used(), Some((u32::from(head), 1025)));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    let mut data = [0u8; 1024];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data[..512].iter().all(|&b| b == 2));
    assert!(data[512..].iter().all(|&b| b == 3));
    assert!(interrupt_fired(&h.interrupt));
    assert_eq!(h.interrupt.status() & 1, 1);
}

#[test]
fn read_with_header_data_and_status_split_across_descriptors() {
    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let mut q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), false);

    // Header in two pieces, data scattered, status in its own descriptor.
    write_header(&mem, VIRTIO_BLK_T_IN, 5);
    let mut hdr = [0u8; 16];
    mem.read_slice(&mut hdr, GuestAddress(HDR)).unwrap();
    mem.write_slice(&hdr[8..], GuestAddress(HDR + 0x100))
        .unwrap();
    q.add_chain(&[
        rd(HDR, 8),
        rd(HDR + 0x100, 8),
        wr(DATA, 100),
        wr(DATA + 0x1000, 412),
        wr(STATUS, 1),
    ]);
    h.run();
    assert_eq!(q.next_used().map(|u| u.1), Some(513));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    let mut tail = [0u8; 412];
    mem.read_slice(&mut tail, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(tail.iter().all(|&b| b == 5));
}

#[test]
fn writes_and_flushes() {
    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let mut q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), false);

    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 7);
    q.add_chain(&[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]);
    h.run();
    assert_eq!(q.next_used().map(|u| u.1), Some(1));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    let content = std::fs::read(image.path()).unwrap();
    assert!(content[7 * 512..8 * 512].iter().all(|&b| b == 0xab));
    assert!(content[6 * 512..7 * 512].iter().all(|&b| b == 6));
    assert!(content[8 * 512..9 * 512].iter().all(|&b| b == 8));

    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    q.add_chain(&[rd(HDR, 16), wr(STATUS, 1)]);
    h.run();
    assert_eq!(q.next_used().map(|u| u.1), Some(1));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
}

#[test]
fn get_id_returns_twenty_bytes() {
    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let mut q = TestQueue::new(&mem, 0, 16);
    let mut device = BlockDevice::new(&BlockConfig {
        path: image.path().to_path_buf(),
        read_only: false,
        id: Some("rootfs-disk".into()),
    })
    .unwrap();
    let (act, _irq) = activation(&mem, vec![q.queue()]);
    device.activate(act).unwrap();

    write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    q.add_chain(&[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)]);
    device.process_queue(0, &mut RecordingCtl::default());
    assert_eq!(q.next_used().map(|u| u.1), Some(21));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"rootfs-disk");
    assert!(id[11..].iter().all(|&b| b == 0));

    // A buffer too small for the id is an error, not a short write.
    write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    q.add_chain(&[rd(HDR, 16), wr(DATA, 19), wr(STATUS, 1)]);
    device.process_queue(0, &mut RecordingCtl::default());
    assert_eq!(q.next_used().map(|u| u.1), Some(1));
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

    assert!(matches!(
        BlockDevice::new(&BlockConfig {
            path: image.path().to_path_buf(),
            read_only: false,
            id: Some("x".repeat(21)),
        }),
        Err(BlockError::IdTooLong(_))
    ));
}

#[test]
fn read_only_disk_offers_ro_and_rejects_writes() {
    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let mut q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), true);
    assert_ne!(h.device.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(h.device.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);

    mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 1);
    q.add_chain(&[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]);
    h.run();
    assert_eq!(q.next_used().map(|u| u.1), Some(1));
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    let content = std::fs::read(image.path()).unwrap();
    assert!(content[512..1024].iter().all(|&b| b == 1));

    // Reads still work.
    write_header(&mem, VIRTIO_BLK_T_IN, 1);
    q.add_chain(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    h.run();
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);

    let rw = BlockDevice::open(image.path(), false).unwrap();
    assert_eq!(rw.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn out_of_range_sectors_are_rejected() {
    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let mut q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), false);

    for (sector, len) in [
        (SECTORS, 512),
        (SECTORS - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512, 512),
    ] {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_IN, sector);
        q.add_chain(&[rd(HDR, 16), wr(DATA, len), wr(STATUS, 1)]);
        h.run();
        assert_eq!(q.next_used().map(|u| u.1), Some(1), "sector {sector}");
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR, "sector {sector}");
    }
    // The last sector itself is fine.
    write_header(&mem, VIRTIO_BLK_T_IN, SECTORS - 1);
    q.add_chain(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    h.run();
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
}

#[test]
fn malformed_chains_complete_with_error_or_zero_length() {
    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let mut q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), false);
    let beyond_memory = 0x40_0000 - 8;

    // (chain, expected used length, expected status or None if not written)
    let cases: Vec<(&str, Vec<_>, u32, Option<u32>)> = vec![
        (
            "short header",
            vec![rd(HDR, 8), wr(STATUS, 1)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "no status descriptor",
            vec![rd(HDR, 16), rd(DATA, 512)],
            0,
            None,
        ),
        (
            "read with device-readable data",
            vec![rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "data not a multiple of the sector size",
            vec![rd(HDR, 16), wr(DATA, 100), wr(STATUS, 1)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "writable buffer outside guest memory",
            vec![rd(HDR, 16), wr(beyond_memory, 512), wr(STATUS, 1)],
            0,
            None,
        ),
        (
            "header outside guest memory",
            vec![rd(u64::MAX - 8, 16), wr(STATUS, 1)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "read-only status descriptor",
            vec![rd(HDR, 16), rd(STATUS, 1)],
            0,
            None,
        ),
    ];
    for (name, chain, used_len, expected_status) in cases {
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let head = q.add_chain(&chain);
        h.run();
        assert_eq!(q.next_used(), Some((u32::from(head), used_len)), "{name}");
        assert_eq!(
            status(&mem),
            expected_status.unwrap_or(0xee),
            "{name}: status byte"
        );
    }

    // Write request with device-writable data descriptors.
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    q.add_chain(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    h.run();
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    q.next_used().unwrap();

    // Unknown request type.
    write_header(&mem, 0x77, 0);
    q.add_chain(&[rd(HDR, 16), wr(STATUS, 1)]);
    h.run();
    assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
    q.next_used().unwrap();

    // A `next` index beyond the queue ends the chain before the status descriptor.
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    q.store_desc(10, HDR, 16, VRING_DESC_F_NEXT as u16, 999);
    q.publish(10);
    h.run();
    assert_eq!(q.next_used(), Some((10, 0)));

    // A descriptor chain that loops back on itself terminates.
    q.store_desc(11, HDR, 16, VRING_DESC_F_NEXT as u16, 12);
    q.store_desc(12, DATA, 512, VRING_DESC_F_NEXT as u16, 11);
    q.publish(11);
    h.run();
    assert_eq!(q.next_used().map(|u| u.0), Some(11));

    // The file was never touched by any of these.
    let content = std::fs::read(image.path()).unwrap();
    assert!(content[..512].iter().all(|&b| b == 0));
}

#[test]
fn config_space_reports_capacity() {
    let image = disk_image();
    let device = BlockDevice::open(image.path(), false).unwrap();
    assert_eq!(device.capacity(), SECTORS);
    let mut buf = [0u8; 8];
    device.read_config(0, &mut buf);
    assert_eq!(u64::from_le_bytes(buf), SECTORS);
    let mut word = [0xffu8; 4];
    word.fill(0);
    device.read_config(4, &mut word);
    assert_eq!(word, [0; 4]);
    let mut seg_max = [0u8; 4];
    device.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
    assert_ne!(device.avail_features() & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
    let mut far = [0u8; 4];
    device.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);
    assert_eq!(device.device_type(), VIRTIO_ID_BLOCK);
}

#[test]
fn missing_image_is_a_clear_error_and_notification_before_activation_is_ignored() {
    let err = BlockDevice::open(Path::new("/nonexistent/disk.img"), true).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/disk.img"));

    let image = disk_image();
    let mut device = BlockDevice::open(image.path(), false).unwrap();
    device.process_queue(0, &mut RecordingCtl::default());
    assert!(!device.is_activated());
}

#[test]
fn reset_then_reactivate() {
    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), false);
    let (again, _) = activation(&mem, vec![q.queue()]);
    assert!(matches!(
        h.device.activate(again),
        Err(ActivateError::AlreadyActive)
    ));
    h.device.reset();
    assert!(!h.device.is_activated());
    let (again, _) = activation(&mem, vec![q.queue()]);
    h.device.activate(again).unwrap();
    let (none, _) = activation(&mem, vec![]);
    h.device.reset();
    assert!(matches!(
        h.device.activate(none),
        Err(ActivateError::QueueCount { .. })
    ));
}

#[test]
fn indirect_descriptor_tables_are_followed_and_checked() {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), false);
    let table = 0x38_0000u64;
    let write_table = |descs: &[(u64, u32, u32)]| {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next_flag = if i + 1 < descs.len() {
                VRING_DESC_F_NEXT
            } else {
                0
            };
            let d = SplitDescriptor::new(addr, len, (flags | next_flag) as u16, i as u16 + 1);
            mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
    };

    // header, two data segments, status: all in one indirect table.
    write_header(&mem, VIRTIO_BLK_T_IN, 9);
    write_table(&[
        (HDR, 16, 0),
        (DATA, 512, VRING_DESC_F_WRITE),
        (DATA + 0x1000, 512, VRING_DESC_F_WRITE),
        (STATUS, 1, VRING_DESC_F_WRITE),
    ]);
    q.store_desc(3, table, 4 * 16, VRING_DESC_F_INDIRECT as u16, 0);
    q.publish(3);
    h.run();
    let mut q = q;
    assert_eq!(q.next_used(), Some((3, 1025)));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    let mut second = [0u8; 512];
    mem.read_slice(&mut second, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(second.iter().all(|&b| b == 10));

    // A table whose length is not a multiple of 16, and one outside guest memory: the
    // chain yields nothing, so there is no status to write.
    for (addr, len) in [(table, 4 * 16 + 3), (0x40_0000 - 16, 4 * 16)] {
        q.store_desc(4, addr, len, VRING_DESC_F_INDIRECT as u16, 0);
        q.publish(4);
        h.run();
        assert_eq!(q.next_used(), Some((4, 0)));
    }
}

/// Thousands of random descriptor chains (addresses in and out of memory, random lengths,
/// flags including INDIRECT, `next` indices beyond the queue) and random headers: the
/// device completes or drops each without panicking, and still serves a valid request.
#[test]
fn random_chains_from_a_hostile_guest() {
    use crate::devices::virtio::test_utils::Rng;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};

    let mem = test_memory(0x40_0000);
    let image = disk_image();
    let mut q = TestQueue::new(&mem, 0, 16);
    let mut h = start(&mem, &q, image.path(), false);
    let rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut completed = 0;
    for _ in 0..3000 {
        let request_type = rng.pick(&[
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            rng.next() as u32,
        ]);
        let sector = rng.pick(&[0, 1, SECTORS - 1, SECTORS, rng.next()]);
        write_header(&mem, request_type, sector);
        let len = 1 + rng.next() % 5;
        for slot in 0..len as u16 {
            let addr = rng.pick(&[
                HDR,
                DATA,
                STATUS,
                0x40_0000 - 8,
                rng.next(),
                rng.next() % 0x40_0000,
            ]);
            let dlen = rng.pick(&[
                0,
                1,
                16,
                20,
                512,
                4096,
                rng.next() as u32 % 0x10_0000,
                u32::MAX,
            ]);
            let flags = (rng.next() as u16)
                & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;
            let next = (rng.next() % 20) as u16;
            q.store_desc(slot, addr, dlen, flags, next);
        }
        q.publish((rng.next() % 16) as u16);
        h.run();
        while q.next_used().is_some() {
            completed += 1;
        }
    }
    assert!(completed > 0);
    // The device is still healthy.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_IN, 4);
    q.add_chain(&[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    h.run();
    assert_eq!(q.next_used().map(|u| u.1), Some(513));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
}
