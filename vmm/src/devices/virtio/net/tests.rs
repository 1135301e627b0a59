use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::test_utils::{
    activation, interrupt_fired, rd, test_memory, wr, RecordingCtl, Rng, TestQueue,
};

const MEM_SIZE: usize = 0x40_0000;
const RXQ: u64 = 0;
const TXQ: u64 = 0x1_0000;
const DATA: u64 = 0x10_0000;
const DATA2: u64 = 0x20_0000;
const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

/// A [`Backend`] on one end of a datagram socket pair (one datagram = one frame), with
/// the offloads it was asked for recorded.
struct PairBackend {
    sock: UnixDatagram,
    offloads: Arc<Mutex<Vec<u32>>>,
}

impl AsRawFd for PairBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Backend for PairBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame).map(|_| ())
    }
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(tun_flags);
        Ok(())
    }
}

struct Harness {
    device: NetDevice,
    interrupt: Interrupt,
    ctl: RecordingCtl,
    /// The host side of the "tap".
    peer: UnixDatagram,
    offloads: Arc<Mutex<Vec<u32>>>,
}

fn device() -> (NetDevice, UnixDatagram, Arc<Mutex<Vec<u32>>>) {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    // Room for a flood of big frames in the pair.
    for s in [&ours, &peer] {
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with a valid int option value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
    }
    let offloads = Arc::new(Mutex::new(Vec::new()));
    let backend = PairBackend {
        sock: ours,
        offloads: offloads.clone(),
    };
    let device = NetDevice::with_backend(Box::new(backend), Some(MAC), Some(1500)).unwrap();
    (device, peer, offloads)
}

fn start(mem: &GuestMemoryMmap<()>, rx: &TestQueue, tx: &TestQueue, acked: u64) -> Harness {
    let (mut device, peer, offloads) = device();
    let (mut act, interrupt) = activation(mem, vec![rx.queue(), tx.queue()]);
    act.acked_features |= acked;
    device.activate(act).unwrap();
    Harness {
        device,
        interrupt,
        ctl: RecordingCtl::default(),
        peer,
        offloads,
    }
}

impl Harness {
    fn kick(&mut self, queue: usize) {
        self.device.process_queue(queue, &mut self.ctl);
    }
    fn backend_fd(&self) -> RawFd {
        self.device.backend.as_raw_fd()
    }
    fn backend_ready(&mut self) {
        let fd = self.backend_fd();
        self.device
            .handle_host_event(fd, EventSet::IN, &mut self.ctl);
    }
    fn tx_resume(&mut self) -> bool {
        let fd = self.device.tx_resume.as_raw_fd();
        if self.device.tx_resume.read().is_err() {
            return false;
        }
        // Put the count back: the handler reads it itself.
        self.device.tx_resume.write(1).unwrap();
        self.device
            .handle_host_event(fd, EventSet::IN, &mut self.ctl);
        true
    }
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME_LEN + 100];
        match self.peer.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }
}

fn header(flags: u32, gso: u32) -> Vec<u8> {
    let mut h = vec![0u8; VNET_HDR_LEN];
    h[0] = flags as u8;
    h[1] = gso as u8;
    h[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    h[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    h
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

const TX_OFFLOADS: u64 =
    1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6;
const RX_OFFLOADS: u64 =
    1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6;

#[test]
fn features_and_config_space() {
    let (device, _peer, _) = device();
    let f = device.avail_features();
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ] {
        assert!(f & (1 << bit) != 0, "feature {bit} missing");
    }
    // Never offered: mergeable buffers, control queue, multiqueue, UFO.
    for bit in [15u32, 17, 22, 10, 14] {
        assert!(f & (1 << bit) == 0, "feature {bit} offered");
    }
    assert_eq!(device.device_type(), VIRTIO_ID_NET);
    assert_eq!(device.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let mut config = [0u8; 12];
    device.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1500);
    // Partial and out-of-range reads.
    let mut two = [0u8; 2];
    device.read_config(10, &mut two);
    assert_eq!(u16::from_le_bytes(two), 1500);
    let mut far = [0xffu8; 4];
    device.read_config(64, &mut far);
    assert_eq!(far, [0xff; 4], "untouched beyond the structure");

    let (ours, _peer) = UnixDatagram::pair().unwrap();
    let plain = NetDevice::with_backend(
        Box::new(PairBackend {
            sock: ours,
            offloads: Arc::default(),
        }),
        None,
        None,
    )
    .unwrap();
    let f = plain.avail_features();
    assert!(f & (1 << VIRTIO_NET_F_MAC) == 0 && f & (1 << VIRTIO_NET_F_MTU) == 0);
}

#[test]
fn bad_mac_and_mtu_are_refused() {
    for (mac, mtu) in [
        (Some([1u8, 0, 0, 0, 0, 1]), None),
        (Some([0u8; 6]), None),
        (None, Some(67u16)),
    ] {
        let (ours, _peer) = UnixDatagram::pair().unwrap();
        let backend = Box::new(PairBackend {
            sock: ours,
            offloads: Arc::default(),
        });
        assert!(NetDevice::with_backend(backend, mac, mtu).is_err());
    }
}

#[test]
fn tx_frame_reaches_the_backend_with_its_header() {
    let mem = test_memory(MEM_SIZE);
    let rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let mut tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, TX_OFFLOADS);

    // A TSO frame: the header split over two descriptors, the payload in a third.
    let hdr = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
    let body = payload(3000, 1);
    mem.write_slice(&hdr, GuestAddress(DATA)).unwrap();
    mem.write_slice(&body, GuestAddress(DATA2)).unwrap();
    let head = tx.add_chain(&[rd(DATA, 5), rd(DATA + 5, 7), rd(DATA2, 3000)]);
    h.kick(TX_QUEUE);

    let frame = h.recv().expect("frame at the backend");
    assert_eq!(&frame[..VNET_HDR_LEN], &hdr[..], "header passed through");
    assert_eq!(&frame[VNET_HDR_LEN..], &body[..]);
    assert!(h.recv().is_none(), "exactly one frame");
    assert_eq!(tx.next_used(), Some((u32::from(head), 0)));
    assert!(interrupt_fired(&h.interrupt));
    assert_eq!(h.device.stats().tx_frames, 1);
    // The tap offloads follow the guest's (receive-side) features: none acked here.
    assert_eq!(*h.offloads.lock().unwrap(), vec![0]);
}

#[test]
fn tap_offloads_set_once_per_activation() {
    let mem = test_memory(MEM_SIZE);
    let rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, RX_OFFLOADS);
    h.kick(RX_QUEUE);
    h.kick(TX_QUEUE);
    let want = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(*h.offloads.lock().unwrap(), vec![want]);

    // A new driver with fewer features: the tap follows at the next activation.
    h.device.reset();
    let (mut act, _irq) = activation(&mem, vec![rx.queue(), tx.queue()]);
    act.acked_features |= 1 << VIRTIO_NET_F_GUEST_CSUM;
    h.device.activate(act).unwrap();
    h.kick(RX_QUEUE);
    assert_eq!(
        *h.offloads.lock().unwrap(),
        vec![want, libc::TUN_F_CSUM],
        "offloads re-negotiated"
    );
}

#[test]
fn rx_frame_lands_in_guest_buffers() {
    let mem = test_memory(MEM_SIZE);
    let mut rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, 0);

    // The tap leaves num_buffers untouched and may report DATA_VALID.
    let mut frame = header(VIRTIO_NET_HDR_F_DATA_VALID, 0);
    frame[10] = 0xaa;
    frame[11] = 0xbb;
    let body = payload(1400, 2);
    frame.extend_from_slice(&body);
    h.peer.send(&frame).unwrap();

    // Header and data in separate buffers, as older drivers post them.
    let head = rx.add_chain(&[wr(DATA, 12), wr(DATA2, 1514)]);
    h.kick(RX_QUEUE);
    assert_eq!(rx.next_used(), Some((u32::from(head), 1412)));
    assert!(interrupt_fired(&h.interrupt));
    let mut got = vec![0u8; 12];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got[0], 0, "flags cleared: GUEST_CSUM not negotiated");
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    let mut data = vec![0u8; 1400];
    mem.read_slice(&mut data, GuestAddress(DATA2)).unwrap();
    assert_eq!(data, body);
    assert_eq!(h.device.stats().rx_frames, 1);
    // The tap is watched while buffers remain.
    assert!(h.ctl.fds.contains_key(&h.backend_fd()));
}

#[test]
fn rx_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_reused() {
    let mem = test_memory(MEM_SIZE);
    let mut rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, RX_OFFLOADS);
    let mut big = header(0, 0);
    big.extend_from_slice(&payload(4000, 3));
    let mut small = header(0, 0);
    small.extend_from_slice(&payload(60, 4));
    h.peer.send(&big).unwrap();
    h.peer.send(&small).unwrap();
    let head = rx.add_chain(&[wr(DATA, 1526)]);
    h.kick(RX_QUEUE);
    assert_eq!(rx.next_used(), Some((u32::from(head), 72)));
    assert_eq!(rx.next_used(), None);
    let stats = h.device.stats();
    assert_eq!((stats.rx_frames, stats.rx_dropped), (1, 1));
}

#[test]
fn rx_frame_with_unnegotiated_offload_is_dropped() {
    let mem = test_memory(MEM_SIZE);
    let mut rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    // GUEST_CSUM only: no TSO frames, no UDP fragmentation.
    let mut h = start(&mem, &rx, &tx, 1 << VIRTIO_NET_F_GUEST_CSUM);
    for gso in [VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP] {
        let mut f = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso);
        f.extend_from_slice(&payload(100, 5));
        h.peer.send(&f).unwrap();
    }
    let mut ok = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
    ok.extend_from_slice(&payload(100, 6));
    h.peer.send(&ok).unwrap();
    let head = rx.add_chain(&[wr(DATA, 1526)]);
    h.kick(RX_QUEUE);
    assert_eq!(rx.next_used(), Some((u32::from(head), 112)));
    assert_eq!(h.device.stats().rx_dropped, 2);
    let mut flags = [0u8; 1];
    mem.read_slice(&mut flags, GuestAddress(DATA)).unwrap();
    assert_eq!(
        flags[0], VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        "kept with GUEST_CSUM"
    );
}

#[test]
fn malformed_tx_chains_are_dropped_and_completed() {
    let mem = test_memory(MEM_SIZE);
    let rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let mut tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, 0);
    let gso = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
    mem.write_slice(&gso, GuestAddress(DATA2)).unwrap();
    let heads = [
        // Shorter than the header.
        tx.add_chain(&[rd(DATA, 8)]),
        // A device-writable buffer in a transmit chain.
        tx.add_chain(&[rd(DATA, 60), wr(DATA + 60, 60)]),
        // Outside guest memory.
        tx.add_chain(&[rd(MEM_SIZE as u64 - 16, 64)]),
        tx.add_chain(&[rd(u64::MAX - 8, 64)]),
        // Larger than any frame.
        tx.add_chain(&[rd(DATA, MAX_FRAME_LEN as u32 + 1)]),
        tx.add_chain(&[rd(DATA, 40_000), rd(DATA, 40_000)]),
        // TSO without HOST_TSO4/CSUM negotiated.
        tx.add_chain(&[rd(DATA2, 100)]),
        // Finally a good one.
        tx.add_chain(&[rd(DATA, 60)]),
    ];
    h.kick(TX_QUEUE);
    for head in heads {
        assert_eq!(tx.next_used(), Some((u32::from(head), 0)), "head {head}");
    }
    let frame = h.recv().expect("the good frame");
    assert_eq!(frame.len(), 60);
    assert!(h.recv().is_none(), "nothing else reached the backend");
    let stats = h.device.stats();
    assert_eq!((stats.tx_frames, stats.tx_dropped), (1, 7));

    // A descriptor loop (next pointing at itself) and a next index beyond the table:
    // virtio-queue ends a chain after queue-size descriptors, so the loop is at most a
    // bounded frame made of the same buffer; both chains complete.
    tx.store_desc(20, DATA, 60, VRING_DESC_F_NEXT as u16, 20);
    tx.publish(20);
    tx.store_desc(21, DATA, 60, VRING_DESC_F_NEXT as u16, QUEUE_SIZE + 5);
    tx.publish(21);
    h.kick(TX_QUEUE);
    assert_eq!(tx.next_used(), Some((20, 0)));
    assert_eq!(tx.next_used(), Some((21, 0)));
    while let Some(frame) = h.recv() {
        assert!(
            frame.len() <= usize::from(QUEUE_SIZE) * 60,
            "{}",
            frame.len()
        );
    }
}

#[test]
fn malformed_rx_chains_are_completed_empty() {
    let mem = test_memory(MEM_SIZE);
    let mut rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, 0);
    let mut f = header(0, 0);
    f.extend_from_slice(&payload(100, 7));
    h.peer.send(&f).unwrap();
    let bad = [
        rx.add_chain(&[wr(MEM_SIZE as u64 - 8, 2000)]),
        rx.add_chain(&[wr(DATA, 8)]),
        rx.add_chain(&[rd(DATA, 2000)]),
    ];
    let good = rx.add_chain(&[wr(DATA2, 2000)]);
    h.kick(RX_QUEUE);
    for head in bad {
        assert_eq!(rx.next_used(), Some((u32::from(head), 0)));
    }
    assert_eq!(rx.next_used(), Some((u32::from(good), 112)));
    assert_eq!(h.device.stats().rx_frames, 1);
}

#[test]
fn no_rx_buffers_stops_polling_the_tap_until_the_guest_adds_some() {
    let mem = test_memory(MEM_SIZE);
    let mut rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, 0);
    // Activation kick with an empty receive queue: nothing waits, the tap is watched.
    h.kick(RX_QUEUE);
    assert!(h.ctl.fds.contains_key(&h.backend_fd()));

    for seed in 0..3 {
        let mut f = header(0, 0);
        f.extend_from_slice(&payload(64, seed));
        h.peer.send(&f).unwrap();
    }
    h.backend_ready();
    assert!(
        !h.ctl.fds.contains_key(&h.backend_fd()),
        "tap still watched without receive buffers"
    );
    assert_eq!(h.device.stats().rx_frames, 0);
    assert!(!interrupt_fired(&h.interrupt));

    // Two buffers: two frames delivered, then out of buffers again.
    rx.add_chain(&[wr(DATA, 1526)]);
    rx.add_chain(&[wr(DATA2, 1526)]);
    h.kick(RX_QUEUE);
    assert_eq!(h.device.stats().rx_frames, 2);
    assert!(!h.ctl.fds.contains_key(&h.backend_fd()));
    rx.add_chain(&[wr(DATA + 0x1000, 1526)]);
    h.kick(RX_QUEUE);
    assert_eq!(h.device.stats().rx_frames, 3);
    assert!(h.ctl.fds.contains_key(&h.backend_fd()), "watched again");
    let mut seen = Vec::new();
    while let Some((_, len)) = rx.next_used() {
        seen.push(len);
    }
    assert_eq!(seen, vec![76, 76, 76]);
}

#[test]
fn tx_flood_is_served_in_budgeted_rounds() {
    let mem = test_memory(MEM_SIZE);
    let rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let mut tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, 0);
    for _ in 0..QUEUE_SIZE {
        tx.add_chain(&[rd(DATA, 60)]);
    }
    h.kick(TX_QUEUE);
    assert_eq!(h.device.stats().tx_frames, TX_BUDGET as u64);
    // The device asked to be resumed instead of finishing the ring in one go.
    assert!(h.tx_resume(), "no resume scheduled after a full budget");
    assert_eq!(h.device.stats().tx_frames, 2 * TX_BUDGET as u64);
    assert_eq!(2 * TX_BUDGET, usize::from(QUEUE_SIZE));
    // The last round used its whole budget too: one more (empty) resume, then none.
    assert!(h.tx_resume());
    assert!(!h.tx_resume(), "resume scheduled with an empty ring");
    assert_eq!(h.device.stats().tx_frames, u64::from(QUEUE_SIZE));
    let mut frames = 0;
    while h.recv().is_some() {
        frames += 1;
    }
    assert_eq!(frames, QUEUE_SIZE);
}

#[test]
fn rx_flood_is_served_in_budgeted_rounds() {
    let mem = test_memory(MEM_SIZE);
    let mut rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, 0);
    for i in 0..QUEUE_SIZE {
        rx.add_chain(&[wr(DATA + u64::from(i) * 0x800, 0x800)]);
    }
    for seed in 0..200u32 {
        let mut f = header(0, 0);
        f.extend_from_slice(&payload(100, seed as u8));
        h.peer.send(&f).unwrap();
    }
    h.kick(RX_QUEUE);
    assert_eq!(h.device.stats().rx_frames, RX_BUDGET as u64);
    // The tap stays readable and watched: the loop comes back after the other fds.
    assert!(h.ctl.fds.contains_key(&h.backend_fd()));
    h.backend_ready();
    assert_eq!(h.device.stats().rx_frames, 200);
}

#[test]
fn inactive_or_reset_device_leaves_the_tap_alone() {
    let mem = test_memory(MEM_SIZE);
    let mut rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, 0);
    rx.add_chain(&[wr(DATA, 1526)]);
    h.kick(RX_QUEUE);
    assert!(h.ctl.fds.contains_key(&h.backend_fd()));
    h.device.reset();
    let mut f = header(0, 0);
    f.extend_from_slice(&payload(64, 9));
    h.peer.send(&f).unwrap();
    h.backend_ready();
    assert!(
        !h.ctl.fds.contains_key(&h.backend_fd()),
        "unwatched after reset"
    );
    h.kick(RX_QUEUE);
    h.kick(TX_QUEUE);
    assert_eq!(h.device.stats(), NetStats::default());
    // The frame is still in the tap for the next driver.
    assert!(rx.next_used().is_none());
}

#[test]
fn random_hostile_chains_never_panic() {
    // Random descriptors (addresses inside and outside memory, random lengths, flags and
    // next links) in both queues, with frames waiting in the backend.
    let mem = test_memory(MEM_SIZE);
    let rx = TestQueue::new(&mem, RXQ, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TXQ, QUEUE_SIZE);
    let mut h = start(&mem, &rx, &tx, TX_OFFLOADS | RX_OFFLOADS);
    let rng = Rng::new(0x6e65_7476);
    let addrs = [
        0,
        DATA,
        DATA2,
        MEM_SIZE as u64 - 1,
        MEM_SIZE as u64,
        u64::MAX - 100,
    ];
    let lens = [0u32, 1, 11, 12, 13, 60, 1514, 65_562, 65_563, u32::MAX];
    for round in 0..200u64 {
        let frame_len = (rng.next() % 2000) as usize;
        let mut f = vec![0u8; frame_len];
        for b in f.iter_mut() {
            *b = rng.next() as u8;
        }
        let _ = h.peer.send(&f);
        for q in [&rx, &tx] {
            for _ in 0..(rng.next() % 8) {
                let index = (rng.next() % u64::from(QUEUE_SIZE)) as u16;
                let flags =
                    (rng.next() as u16) & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | 4) as u16;
                q.store_desc(
                    index,
                    rng.pick(&addrs) + rng.next() % 64,
                    rng.pick(&lens),
                    flags,
                    rng.next() as u16,
                );
                q.publish(index);
            }
        }
        h.kick(RX_QUEUE);
        h.kick(TX_QUEUE);
        h.backend_ready();
        let _ = h.tx_resume();
        while h.recv().is_some() {}
        assert!(h.device.is_activated(), "round {round}");
    }
}
