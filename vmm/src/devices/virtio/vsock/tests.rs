//! End-to-end tests of the vsock device: a mock guest driver (virtio-queue's
//! `MockSplitQueue` rings in a small `GuestMemoryMmap`) on one side, real Unix sockets on
//! the other, the real `MmioTransport` and device `EventLoop` in between.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::connection::CONN_BUF_SIZE;
use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::{driver_init, rd, test_memory, wr, Buf, TestQueue};
use crate::devices::virtio::MmioTransport;
use crate::devices::{BusDevice, VirtioMmioDevice};
use crate::event_loop::EventLoop;

const GUEST_CID: u64 = 3;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x40_0000;
const TX_BUF_STRIDE: u64 = 0x2_0000;
const MEM_SIZE: usize = 0x100_0000;
const RX_DATA: u32 = 4096;

/// A packet as the guest sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Pkt {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: Vec<u8>,
}

impl Pkt {
    /// A guest → host packet on the guest port `src` to host port `dst`.
    fn guest(op: u16, src_port: u32, dst_port: u32) -> Self {
        Pkt {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Default::default()
        }
    }

    fn with_data(mut self, data: &[u8]) -> Self {
        self.len = data.len() as u32;
        self.data = data.to_vec();
        self
    }

    fn header(&self) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        h[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        h[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        h[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        h[24..28].copy_from_slice(&self.len.to_le_bytes());
        h[28..30].copy_from_slice(&self.type_.to_le_bytes());
        h[30..32].copy_from_slice(&self.op.to_le_bytes());
        h[32..36].copy_from_slice(&self.flags.to_le_bytes());
        h[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        h[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        h
    }

    fn parse(h: &[u8]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(h[o..o + 2].try_into().unwrap());
        Pkt {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
            data: Vec::new(),
        }
    }
}

/// Where the device will write a posted rx buffer.
#[derive(Clone, Copy)]
struct RxBuf {
    header: u64,
    data: u64,
}

/// A mock guest driver plus the device under test.
struct Harness {
    mem: &'static GuestMemoryMmap<()>,
    rxq: TestQueue<'static>,
    txq: TestQueue<'static>,
    evq: TestQueue<'static>,
    transport: MmioTransport,
    device: Arc<Mutex<VsockDevice>>,
    /// The device event loop, driven by the test thread; `None` once it runs on its own
    /// (seccomp-filtered) thread.
    el: Option<EventLoop>,
    el_thread: Option<(
        crate::event_loop::EventLoopStopper,
        std::thread::JoinHandle<Result<(), crate::event_loop::EventLoopError>>,
    )>,
    rx_posted: HashMap<u32, RxBuf>,
    rx_slot: u64,
    tx_slot: u64,
    /// Keep this many rx buffers posted.
    rx_target: usize,
    split_rx: bool,
    inbox: VecDeque<Pkt>,
    _dir: tempfile::TempDir,
    uds: std::path::PathBuf,
}

impl Harness {
    fn new() -> Self {
        let mut h = Self::inactive();
        h.activate();
        h
    }

    fn inactive() -> Self {
        let mem: &'static GuestMemoryMmap<()> = Box::leak(Box::new(test_memory(MEM_SIZE)));
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let device = Arc::new(Mutex::new(
            VsockDevice::with_socket(GUEST_CID, &uds).unwrap(),
        ));
        let mut transport = MmioTransport::with_shared_device(mem.clone(), device.clone()).unwrap();
        let mut el = EventLoop::new().unwrap();
        el.add_handler(transport.take_event_handler().unwrap())
            .unwrap();
        Harness {
            mem,
            rxq: TestQueue::new(mem, 0x0, 64),
            txq: TestQueue::new(mem, 0x1_0000, 64),
            evq: TestQueue::new(mem, 0x2_0000, 64),
            transport,
            device,
            el: Some(el),
            el_thread: None,
            rx_posted: HashMap::new(),
            rx_slot: 0,
            tx_slot: 0,
            rx_target: 16,
            split_rx: false,
            inbox: VecDeque::new(),
            _dir: dir,
            uds,
        }
    }

    /// Like [`Harness::new`], with the event loop on its own thread under the VMM's
    /// event-loop seccomp filter, as in production.
    fn with_seccomp() -> Self {
        let mut h = Self::inactive();
        let filters = crate::seccomp::Filters::compile().unwrap();
        let filter = filters.get(crate::seccomp::ThreadKind::EventLoop);
        let el = h.el.take().unwrap();
        let stopper = el.stopper().unwrap();
        let thread = el
            .spawn("vsock-test-evloop", move || {
                crate::seccomp::apply(&filter).unwrap();
                Ok(())
            })
            .unwrap();
        h.el_thread = Some((stopper, thread));
        h.activate();
        h
    }

    /// One round of device work (or a short wait for the device thread), then collect.
    fn step(&mut self) {
        match self.el.as_mut() {
            Some(el) => {
                el.run_once(5).unwrap();
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
        self.collect();
    }

    fn activate(&mut self) {
        driver_init(&mut self.transport, &[&self.rxq, &self.txq, &self.evq]);
        self.evq.add_chain(&[wr(0x30_0000, 8)]);
        self.refill_rx();
        self.spin(Duration::from_millis(20));
    }

    fn notify(&mut self, queue: u32) {
        self.transport.write(
            crate::devices::VIRTIO_MMIO_QUEUE_NOTIFY,
            &queue.to_le_bytes(),
        );
    }

    fn refill_rx(&mut self) {
        let mut added = false;
        while self.rx_posted.len() < self.rx_target {
            let base = RX_BUFS + (self.rx_slot % 64) * 0x2000;
            self.rx_slot += 1;
            let (head, buf) = if self.split_rx {
                let buf = RxBuf {
                    header: base,
                    data: base + 0x100,
                };
                let head = self
                    .rxq
                    .add_chain(&[wr(buf.header, HEADER_SIZE as u32), wr(buf.data, RX_DATA)]);
                (head, buf)
            } else {
                let buf = RxBuf {
                    header: base,
                    data: base + HEADER_SIZE as u64,
                };
                let head = self
                    .rxq
                    .add_chain(&[wr(base, HEADER_SIZE as u32 + RX_DATA)]);
                (head, buf)
            };
            self.rx_posted.insert(u32::from(head), buf);
            added = true;
        }
        if added {
            self.notify(0);
        }
    }

    /// Run the event loop for up to `d`, collecting what the device sends the guest.
    fn spin(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        // At least one round, however late this thread gets scheduled.
        self.step();
        while Instant::now() < deadline {
            self.step();
        }
    }

    fn collect(&mut self) {
        while let Some((head, len)) = self.rxq.next_used() {
            let buf = self.rx_posted.remove(&head).expect("unknown rx head");
            if len == 0 {
                continue;
            }
            let mut hdr = [0u8; HEADER_SIZE];
            self.mem
                .read_slice(&mut hdr, GuestAddress(buf.header))
                .unwrap();
            let mut pkt = Pkt::parse(&hdr);
            assert_eq!(
                len,
                HEADER_SIZE as u32 + pkt.len,
                "used length vs header len"
            );
            pkt.data = vec![0; pkt.len as usize];
            self.mem
                .read_slice(&mut pkt.data, GuestAddress(buf.data))
                .unwrap();
            self.inbox.push_back(pkt);
        }
        self.refill_rx();
    }

    /// Wait for the next packet the device sends.
    fn recv(&mut self) -> Pkt {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.inbox.is_empty() && Instant::now() < deadline {
            self.step();
        }
        self.inbox.pop_front().expect("no packet from the device")
    }

    /// Wait for a packet with `op`, skipping credit updates.
    fn recv_op(&mut self, op: u16) -> Pkt {
        loop {
            let p = self.recv();
            if p.op == op || p.op != OP_CREDIT_UPDATE {
                assert_eq!(p.op, op, "unexpected packet {p:?}");
                return p;
            }
        }
    }

    /// Wait (running the device) until it closed the host stream `s`: EOF, or
    /// ECONNRESET if it left bytes unread.
    fn assert_closed(&mut self, s: &mut UnixStream) {
        let deadline = Instant::now() + Duration::from_secs(5);
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "host stream still open");
                    self.step();
                }
                other => panic!("expected the host stream to be closed, got {other:?}"),
            }
        }
        s.set_nonblocking(false).unwrap();
    }

    fn expect_silence(&mut self) {
        self.spin(Duration::from_millis(50));
        assert!(
            self.inbox.is_empty(),
            "unexpected packets: {:?}",
            self.inbox
        );
    }

    fn tx_addr(&mut self) -> u64 {
        let addr = TX_BUFS + (self.tx_slot % 32) * TX_BUF_STRIDE;
        self.tx_slot += 1;
        addr
    }

    /// Send `pkt` with header and data in one descriptor (Linux ≥ 6.2).
    fn send(&mut self, pkt: &Pkt) {
        let addr = self.tx_addr();
        self.mem
            .write_slice(&pkt.header(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(&pkt.data, GuestAddress(addr + HEADER_SIZE as u64))
            .unwrap();
        self.send_chain(&[rd(addr, HEADER_SIZE as u32 + pkt.data.len() as u32)]);
    }

    /// Send `pkt` with header and data in separate descriptors (older Linux).
    fn send_split(&mut self, pkt: &Pkt) {
        let addr = self.tx_addr();
        self.mem
            .write_slice(&pkt.header(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(&pkt.data, GuestAddress(addr + 0x1000))
            .unwrap();
        self.send_chain(&[
            rd(addr, HEADER_SIZE as u32),
            rd(addr + 0x1000, pkt.data.len() as u32),
        ]);
    }

    fn send_chain(&mut self, chain: &[Buf]) {
        self.txq.add_chain(chain);
        self.notify(1);
        self.spin(Duration::from_millis(5));
    }

    fn connections(&self) -> usize {
        self.device.lock().unwrap().connection_count()
    }

    /// Host peer connects to the device socket and asks for guest port `port`.
    fn host_connect(&mut self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        s
    }

    /// Full host-initiated handshake; returns (host stream, host-side port).
    fn established_host_connection(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut host = self.host_connect(guest_port);
        let req = self.recv_op(OP_REQUEST);
        assert_eq!(req.dst_port, guest_port);
        let local = req.src_port;
        self.send(&Pkt::guest(OP_RESPONSE, guest_port, local));
        let line = read_line(&mut host);
        assert_eq!(line, format!("OK {local}\n"));
        (host, local)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some((stopper, thread)) = self.el_thread.take() {
            stopper.stop();
            // A seccomp violation would have ended the process; a panic shows here.
            thread.join().unwrap().unwrap();
        }
    }
}

/// Read one `\n`-terminated line (one byte at a time, so nothing after it is consumed).
fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn config_space_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let dev = VsockDevice::with_socket(0x1234_5678, &dir.path().join("v.sock")).unwrap();
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
    let mut hi = [0u8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);

    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            VsockDevice::with_socket(bad, &dir.path().join("x.sock")),
            Err(VsockError::InvalidCid(_))
        ));
    }
    // The socket path is taken: a second device cannot steal it.
    let err = VsockDevice::with_socket(5, &dir.path().join("v.sock")).unwrap_err();
    assert!(err.to_string().contains("v.sock"), "{err}");
    // Dropping the device removes its socket file.
    drop(dev);
    assert!(!dir.path().join("v.sock").exists());

    // A stale socket file (its VMM was killed -9) is replaced...
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let dev = VsockDevice::with_socket(5, &stale).unwrap();
    UnixStream::connect(&stale).unwrap();
    drop(dev);
    // ...but a regular file at the path is an error and stays untouched.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    assert!(VsockDevice::with_socket(5, &file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

#[test]
fn host_connect_handshake_and_data_both_ways() {
    let mut h = Harness::new();
    let mut host = h.host_connect(1024);
    let req = h.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    let local = req.src_port;

    h.send(&Pkt::guest(OP_RESPONSE, 1024, local));
    assert_eq!(read_line(&mut host), format!("OK {local}\n"));
    assert_eq!(h.connections(), 1);

    // Host → guest.
    host.write_all(b"hello from the host").unwrap();
    let rw = h.recv_op(OP_RW);
    assert_eq!(rw.data, b"hello from the host");
    assert_eq!((rw.src_port, rw.dst_port), (local, 1024));
    assert_eq!(rw.len, 19);

    // Guest → host, both descriptor layouts.
    h.send(&Pkt::guest(OP_RW, 1024, local).with_data(b"single descriptor "));
    h.send_split(&Pkt::guest(OP_RW, 1024, local).with_data(b"split descriptors"));
    assert_eq!(
        read_exactly(&mut host, 35),
        b"single descriptor split descriptors"
    );

    // Every packet to the guest carries our forward count.
    host.write_all(b"x").unwrap();
    let rw = h.recv_op(OP_RW);
    assert_eq!(rw.fwd_cnt, 35);
    h.expect_silence();
}

#[test]
fn split_rx_buffers_receive_data() {
    let mut h = Harness::inactive();
    h.split_rx = true;
    h.rx_target = 8;
    h.activate();
    let (mut host, _local) = h.established_host_connection(7000);
    let payload: Vec<u8> = (0..RX_DATA as usize * 2 + 100).map(|i| i as u8).collect();
    host.write_all(&payload).unwrap();
    let mut got = Vec::new();
    while got.len() < payload.len() {
        let p = h.recv_op(OP_RW);
        assert!(p.len <= RX_DATA);
        got.extend(p.data);
    }
    assert_eq!(got, payload);
}

#[test]
fn host_peer_connecting_before_activation_is_served_after() {
    let mut h = Harness::inactive();
    let mut host = h.host_connect(1024);
    h.spin(Duration::from_millis(20));
    assert!(h.inbox.is_empty());
    h.activate();
    let req = h.recv_op(OP_REQUEST);
    h.send(&Pkt::guest(OP_RESPONSE, 1024, req.src_port));
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
}

#[test]
fn guest_refusing_the_connection_closes_the_host_peer() {
    let mut h = Harness::new();
    let mut host = h.host_connect(2000);
    let req = h.recv_op(OP_REQUEST);
    h.send(&Pkt::guest(OP_RST, 2000, req.src_port));
    h.assert_closed(&mut host);
    assert_eq!(h.connections(), 0);
}

#[test]
fn bad_connect_lines_are_dropped() {
    let mut h = Harness::new();
    for line in [
        &b"CONNECT\n"[..],
        b"HELLO 5\n",
        b"CONNECT 99999999999\n",
        &[b'A'; 64],
    ] {
        let mut s = UnixStream::connect(&h.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(line).unwrap();
        h.spin(Duration::from_millis(20));
        h.assert_closed(&mut s);
    }
    // A peer that connects and hangs up without a line leaves nothing behind either.
    drop(UnixStream::connect(&h.uds).unwrap());
    h.expect_silence();
    assert_eq!(h.connections(), 0);
}

#[test]
fn guest_initiated_connection_to_uds_port() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_52", h.uds.display())).unwrap();
    h.send(&Pkt::guest(OP_REQUEST, 5000, 52));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let resp = h.recv_op(OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (52, 5000));
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));

    h.send(&Pkt::guest(OP_RW, 5000, 52).with_data(b"ping"));
    assert_eq!(read_exactly(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    assert_eq!(h.recv_op(OP_RW).data, b"pong");

    // Guest half-closes its sending side: the host peer sees EOF but can still write.
    let mut shut = Pkt::guest(OP_SHUTDOWN, 5000, 52);
    shut.flags = SHUTDOWN_SEND;
    h.send(&shut);
    h.assert_closed(&mut host);
    host.write_all(b"late").unwrap();
    assert_eq!(h.recv_op(OP_RW).data, b"late");

    // Full shutdown is answered with RST and the connection is gone.
    shut.flags = SHUTDOWN_BOTH;
    h.send(&shut);
    let rst = h.recv_op(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (52, 5000));
    assert_eq!(h.connections(), 0);
}

#[test]
fn rst_for_unknown_ports_and_connections() {
    let mut h = Harness::new();
    // Nobody listens on <uds>_99.
    h.send(&Pkt::guest(OP_REQUEST, 6000, 99));
    let rst = h.recv_op(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (99, 6000));
    assert_eq!(rst.src_cid, HOST_CID);
    // Data, credit and shutdown for connections that do not exist.
    for op in [
        OP_RW,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
        OP_SHUTDOWN,
        OP_RESPONSE,
    ] {
        h.send(&Pkt::guest(op, 6001, 98).with_data(b"zz"));
        let rst = h.recv_op(OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (98, 6001), "op {op}");
    }
    // An RST for an unknown connection is not answered.
    h.send(&Pkt::guest(OP_RST, 6002, 97));
    // Nor is a packet with a spoofed source CID.
    let mut spoofed = Pkt::guest(OP_REQUEST, 6003, 96);
    spoofed.src_cid = 77;
    h.send(&spoofed);
    h.expect_silence();
    // A packet for another CID gets an RST that appears to come from that CID.
    let mut other = Pkt::guest(OP_REQUEST, 6004, 95);
    other.dst_cid = 9;
    h.send(&other);
    let rst = h.recv_op(OP_RST);
    assert_eq!(rst.src_cid, 9);
    // Non-stream socket types are refused.
    let mut seqpacket = Pkt::guest(OP_REQUEST, 6005, 94);
    seqpacket.type_ = 2;
    h.send(&seqpacket);
    assert_eq!(h.recv_op(OP_RST).dst_port, 6005);
}

#[test]
fn host_close_sends_shutdown_and_guest_rst_removes() {
    let mut h = Harness::new();
    let (host, local) = h.established_host_connection(1024);
    drop(host);
    let shut = h.recv_op(OP_SHUTDOWN);
    assert_eq!(shut.flags, SHUTDOWN_BOTH);
    assert_eq!(h.connections(), 1);
    h.send(&Pkt::guest(OP_RST, 1024, local));
    h.spin(Duration::from_millis(10));
    assert_eq!(h.connections(), 0);
    h.expect_silence();
}

#[test]
fn host_half_close_still_delivers_the_guest_answer() {
    let mut h = Harness::new();
    let (mut host, local) = h.established_host_connection(1024);
    host.write_all(b"request").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(h.recv_op(OP_RW).data, b"request");
    let shut = h.recv_op(OP_SHUTDOWN);
    assert_eq!(shut.flags, SHUTDOWN_SEND);
    h.send(&Pkt::guest(OP_RW, 1024, local).with_data(b"answer"));
    assert_eq!(read_exactly(&mut host, 6), b"answer");
    // The guest closes: full SHUTDOWN, answered with RST; the host peer sees EOF.
    let mut close = Pkt::guest(OP_SHUTDOWN, 1024, local);
    close.flags = SHUTDOWN_BOTH;
    h.send(&close);
    assert_eq!(h.recv_op(OP_RST).dst_port, 1024);
    h.assert_closed(&mut host);
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut h = Harness::new();
    let mut host = h.host_connect(1024);
    let req = h.recv_op(OP_REQUEST);
    let local = req.src_port;
    let mut resp = Pkt::guest(OP_RESPONSE, 1024, local);
    resp.buf_alloc = 8;
    h.send(&resp);
    assert_eq!(read_line(&mut host), format!("OK {local}\n"));

    host.write_all(b"0123456789abcdefghij").unwrap();
    let first = h.recv_op(OP_RW);
    assert_eq!(first.data, b"01234567");
    // Out of credit: the device asks once and then waits.
    let ask = h.recv_op(OP_CREDIT_REQUEST);
    assert_eq!(ask.dst_port, 1024);
    h.expect_silence();

    // The guest consumed the 8 bytes.
    let mut update = Pkt::guest(OP_CREDIT_UPDATE, 1024, local);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    h.send(&update);
    assert_eq!(h.recv_op(OP_RW).data, b"89abcdef");
    h.recv_op(OP_CREDIT_REQUEST);
    update.fwd_cnt = 16;
    h.send(&update);
    assert_eq!(h.recv_op(OP_RW).data, b"ghij");

    // A credit request from the guest gets our credit.
    h.send(&Pkt::guest(OP_CREDIT_REQUEST, 1024, local));
    let credit = h.recv_op(OP_CREDIT_UPDATE);
    assert_eq!(credit.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(credit.fwd_cnt, 0);
}

#[test]
fn guest_to_host_credit_updates_and_overrun_reset() {
    let mut h = Harness::new();
    let (mut host, local) = h.established_host_connection(1024);
    let chunk = vec![0x5au8; MAX_PKT_DATA as usize];

    // 3 x 64 KiB: more than half the window is forwarded, so a CREDIT_UPDATE follows.
    let reader = std::thread::spawn(move || {
        let data = read_exactly(&mut host, 3 * MAX_PKT_DATA as usize);
        (host, data)
    });
    for _ in 0..3 {
        h.send(&Pkt::guest(OP_RW, 1024, local).with_data(&chunk));
    }
    let (mut host, data) = reader.join().unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    h.spin(Duration::from_millis(20));
    let update = loop {
        let p = h.recv();
        if p.op == OP_CREDIT_UPDATE {
            break p;
        }
    };
    assert!(update.fwd_cnt >= CONN_BUF_SIZE / 2, "{update:?}");
    assert_eq!(update.fwd_cnt % MAX_PKT_DATA, 0);

    // The host stops reading; a guest ignoring its credit is reset once the bounded
    // buffer (plus the socket's own buffer) is full, instead of growing memory.
    let mut reset = None;
    for _ in 0..64 {
        h.send(&Pkt::guest(OP_RW, 1024, local).with_data(&chunk));
        h.collect();
        if let Some(p) = h.inbox.iter().find(|p| p.op == OP_RST) {
            reset = Some(p.clone());
            break;
        }
        let dev = h.device.lock().unwrap();
        if let Some(conn) = dev.muxer.connection(connection::ConnKey {
            local_port: local,
            peer_port: 1024,
        }) {
            assert!(conn.buffered_to_host() <= CONN_BUF_SIZE as usize);
        }
    }
    let reset = reset.expect("flooding guest was not reset");
    assert_eq!((reset.src_port, reset.dst_port), (local, 1024));
    assert_eq!(h.connections(), 0);
    // The host peer sees the connection end after draining what was delivered.
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    while host.read(&mut sink).unwrap() > 0 {}
}

#[test]
fn slow_host_peer_gets_buffered_data_later() {
    let mut h = Harness::new();
    let (mut host, local) = h.established_host_connection(1024);
    // More than a Unix socket buffer holds, within our credit window.
    let total = 4 * MAX_PKT_DATA as usize;
    let payload: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(MAX_PKT_DATA as usize) {
        h.send(&Pkt::guest(OP_RW, 1024, local).with_data(chunk));
    }
    let reader = std::thread::spawn(move || read_exactly(&mut host, total));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() && Instant::now() < deadline {
        h.spin(Duration::from_millis(5));
    }
    assert_eq!(reader.join().unwrap(), payload);
    assert_eq!(h.connections(), 1);
}

#[test]
fn malformed_tx_packets_never_panic_and_are_reset_when_addressable() {
    let mut h = Harness::new();
    let (_host, local) = h.established_host_connection(1024);

    // Header shorter than 44 bytes: unreadable, dropped silently.
    let addr = h.tx_addr();
    h.mem
        .write_slice(&Pkt::guest(OP_RW, 1024, local).header(), GuestAddress(addr))
        .unwrap();
    h.send_chain(&[rd(addr, 20)]);
    h.expect_silence();
    assert_eq!(h.connections(), 1);

    // Header outside guest memory.
    h.send_chain(&[rd(MEM_SIZE as u64 - 8, HEADER_SIZE as u32)]);
    h.send_chain(&[rd(u64::MAX - 8, HEADER_SIZE as u32)]);
    // Device-writable tx descriptor.
    h.send_chain(&[wr(addr, HEADER_SIZE as u32)]);
    h.expect_silence();
    assert_eq!(h.connections(), 1);

    // `len` says 1000 but the descriptor holds 10 bytes: reset that connection.
    let mut lying = Pkt::guest(OP_RW, 1024, local).with_data(&[1; 10]);
    lying.len = 1000;
    let addr = h.tx_addr();
    h.mem
        .write_slice(&lying.header(), GuestAddress(addr))
        .unwrap();
    h.send_chain(&[rd(addr, HEADER_SIZE as u32 + 10)]);
    let rst = h.recv_op(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (local, 1024));
    assert_eq!(h.connections(), 0);

    let (_host, local) = h.established_host_connection(1025);
    // `len` larger than any packet may be.
    let mut huge = Pkt::guest(OP_RW, 1025, local);
    huge.len = MAX_PKT_DATA + 1;
    let addr = h.tx_addr();
    h.mem
        .write_slice(&huge.header(), GuestAddress(addr))
        .unwrap();
    h.send_chain(&[
        rd(addr, HEADER_SIZE as u32),
        rd(addr + 0x1000, MAX_PKT_DATA + 1),
    ]);
    assert_eq!(h.recv_op(OP_RST).dst_port, 1025);

    let (_host, local) = h.established_host_connection(1026);
    // Split packet whose data descriptor points outside guest memory.
    let pkt = Pkt::guest(OP_RW, 1026, local).with_data(&[0; 16]);
    let addr = h.tx_addr();
    h.mem
        .write_slice(&pkt.header(), GuestAddress(addr))
        .unwrap();
    h.send_chain(&[rd(addr, HEADER_SIZE as u32), rd(MEM_SIZE as u64 - 4, 16)]);
    assert_eq!(h.recv_op(OP_RST).dst_port, 1026);

    let (_host, local) = h.established_host_connection(1027);
    // Data descriptor that is device-writable.
    h.mem
        .write_slice(&pkt.header(), GuestAddress(addr))
        .unwrap();
    let mut p = Pkt::guest(OP_RW, 1027, local).with_data(&[0; 16]);
    p.src_port = 1027;
    h.mem.write_slice(&p.header(), GuestAddress(addr)).unwrap();
    h.send_chain(&[rd(addr, HEADER_SIZE as u32), wr(addr + 0x1000, 16)]);
    assert_eq!(h.recv_op(OP_RST).dst_port, 1027);

    let (_host, local) = h.established_host_connection(1028);
    // Unknown op on a live connection.
    h.send(&Pkt::guest(99, 1028, local));
    assert_eq!(h.recv_op(OP_RST).dst_port, 1028);
    // REQUEST on a live connection is a protocol error too.
    let (_host, local) = h.established_host_connection(1029);
    h.send(&Pkt::guest(OP_REQUEST, 1029, local));
    assert_eq!(h.recv_op(OP_RST).dst_port, 1029);
    // Data before the guest accepted a host-initiated connection.
    let _host = h.host_connect(1030);
    let req = h.recv_op(OP_REQUEST);
    h.send(&Pkt::guest(OP_RW, 1030, req.src_port).with_data(b"early"));
    assert_eq!(h.recv_op(OP_RST).dst_port, 1030);
    assert_eq!(h.connections(), 0);

    // A descriptor `next` beyond the queue: the chain ends before the data the header
    // announces; the connection the header names is reset.
    h.txq.store_desc(40, addr, HEADER_SIZE as u32, 1, 500);
    h.txq.publish(40);
    h.notify(1);
    assert_eq!(h.recv_op(OP_RST).dst_port, 1027);

    // After all that, the device still works.
    let (mut host, local) = h.established_host_connection(1031);
    h.send(&Pkt::guest(OP_RW, 1031, local).with_data(b"alive"));
    assert_eq!(read_exactly(&mut host, 5), b"alive");
}

#[test]
fn malformed_rx_buffers_are_skipped() {
    let mut h = Harness::inactive();
    h.rx_target = 0;
    h.activate();
    // A read-only rx buffer, one too small for a header, one outside memory, then a good one.
    let bad = [
        rd(RX_BUFS, 4096),
        wr(RX_BUFS + 0x2000, 10),
        wr(MEM_SIZE as u64 - 16, 4096),
    ];
    for b in bad {
        let head = h.rxq.add_chain(&[b]);
        h.rx_posted.insert(
            u32::from(head),
            RxBuf {
                header: b.addr,
                data: b.addr,
            },
        );
    }
    h.rx_target = 4;
    let _host = h.host_connect(1024);
    h.spin(Duration::from_millis(10));
    h.refill_rx();
    let req = h.recv_op(OP_REQUEST);
    assert_eq!(req.dst_port, 1024);
}

#[test]
fn rx_starvation_resumes_when_buffers_arrive() {
    let mut h = Harness::inactive();
    h.rx_target = 0;
    h.activate();
    let mut host = h.host_connect(1024);
    h.expect_silence();
    h.rx_target = 4;
    h.refill_rx();
    let req = h.recv_op(OP_REQUEST);
    h.send(&Pkt::guest(OP_RESPONSE, 1024, req.src_port));
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
}

#[test]
fn device_reset_closes_connections() {
    let mut h = Harness::new();
    let (mut host, _) = h.established_host_connection(1024);
    assert_eq!(h.connections(), 1);
    h.transport.write(0x70, &0u32.to_le_bytes());
    assert_eq!(h.connections(), 0);
    h.assert_closed(&mut host);
    // While the driver is down, host peers are turned away.
    let mut s = h.host_connect(1024);
    h.spin(Duration::from_millis(20));
    h.assert_closed(&mut s);
}

#[test]
fn queue_notify_events_and_irq_are_exposed() {
    let h = Harness::new();
    let evts = h.transport.queue_notify_events().unwrap();
    assert_eq!(evts.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    h.transport.interrupt_event().unwrap();
}

/// The vsock paths (accept, CONNECT parsing, connect to `<uds>_<port>`, non-blocking
/// setup, reads/writes, shutdown, close) under the event-loop thread's real seccomp
/// filter. A syscall missing from the allow-list kills the test process with
/// "palisade-vmm: seccomp: blocked syscall N".
#[test]
fn works_under_the_event_loop_seccomp_filter() {
    let mut h = Harness::with_seccomp();
    let (mut host, local) = h.established_host_connection(1024);
    host.write_all(b"to guest").unwrap();
    assert_eq!(h.recv_op(OP_RW).data, b"to guest");
    h.send(&Pkt::guest(OP_RW, 1024, local).with_data(b"to host"));
    assert_eq!(read_exactly(&mut host, 7), b"to host");
    drop(host);
    assert_eq!(h.recv_op(OP_SHUTDOWN).flags, SHUTDOWN_BOTH);
    h.send(&Pkt::guest(OP_RST, 1024, local));

    let listener = UnixListener::bind(format!("{}_77", h.uds.display())).unwrap();
    h.send(&Pkt::guest(OP_REQUEST, 4000, 77));
    let (mut peer, _) = listener.accept().unwrap();
    assert_eq!(h.recv_op(OP_RESPONSE).dst_port, 4000);
    let mut shut = Pkt::guest(OP_SHUTDOWN, 4000, 77);
    shut.flags = SHUTDOWN_BOTH;
    h.send(&Pkt::guest(OP_RW, 4000, 77).with_data(b"bye"));
    h.send(&shut);
    assert_eq!(h.recv_op(OP_RST).dst_port, 4000);
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_exactly(&mut peer, 3), b"bye");
    h.assert_closed(&mut peer);

    h.send(&Pkt::guest(OP_REQUEST, 4001, 78));
    assert_eq!(h.recv_op(OP_RST).dst_port, 4001);
    let mut bad = UnixStream::connect(&h.uds).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(b"CONNECT nope\n").unwrap();
    h.assert_closed(&mut bad);
}

#[test]
fn guest_connect_to_a_host_listener_with_a_full_backlog_is_refused_not_blocking() {
    let mut h = Harness::new();
    let path = format!("{}_60", h.uds.display());
    let _listener = UnixListener::bind(&path).unwrap();
    // Nobody accepts: fill the listener's backlog.
    let mut queued = Vec::new();
    loop {
        match super::muxer::connect_nonblocking(std::path::Path::new(&path)) {
            Ok(s) => queued.push(s),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                break;
            }
        }
        assert!(queued.len() < 100_000, "backlog never filled");
    }
    let started = Instant::now();
    h.send(&Pkt::guest(OP_REQUEST, 4100, 60));
    assert_eq!(h.recv_op(OP_RST).dst_port, 4100);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Paths that cannot be Unix socket addresses are refused too.
    let long = std::path::PathBuf::from("/".repeat(200));
    assert!(super::muxer::connect_nonblocking(&long).is_err());
}

/// Linux 6.12.y sends payloads above ~32 KiB as page fragments: header descriptor plus
/// one descriptor per fragment.
#[test]
fn payload_scattered_over_several_descriptors() {
    let mut h = Harness::new();
    let (mut host, local) = h.established_host_connection(1024);
    let payload: Vec<u8> = (0..60_000).map(|i| (i % 253) as u8).collect();
    let pkt = Pkt::guest(OP_RW, 1024, local).with_data(&payload);
    let addr = h.tx_addr();
    h.mem
        .write_slice(&pkt.header(), GuestAddress(addr))
        .unwrap();
    // Fragments at scattered addresses: 32768 + 20000 + 7232 bytes.
    let frags = [(0x1000u64, 32768usize), (0x10000, 20000), (0x18000, 7232)];
    let mut off = 0;
    let mut chain = vec![rd(addr, HEADER_SIZE as u32)];
    for (at, len) in frags {
        h.mem
            .write_slice(&payload[off..off + len], GuestAddress(addr + at))
            .unwrap();
        chain.push(rd(addr + at, len as u32));
        off += len;
    }
    h.send_chain(&chain);
    assert_eq!(read_exactly(&mut host, payload.len()), payload);

    // Header and the first bytes in one descriptor, the rest in another.
    let pkt = Pkt::guest(OP_RW, 1024, local).with_data(b"0123456789");
    let addr = h.tx_addr();
    h.mem
        .write_slice(&pkt.header(), GuestAddress(addr))
        .unwrap();
    h.mem
        .write_slice(b"0123", GuestAddress(addr + HEADER_SIZE as u64))
        .unwrap();
    h.mem
        .write_slice(b"456789", GuestAddress(addr + 0x1000))
        .unwrap();
    h.send_chain(&[rd(addr, HEADER_SIZE as u32 + 4), rd(addr + 0x1000, 6)]);
    assert_eq!(read_exactly(&mut host, 10), b"0123456789");

    // Fragments that do not add up to `len`, or include a device-writable one: RST.
    let pkt = Pkt::guest(OP_RW, 1024, local).with_data(&[7; 9000]);
    let addr = h.tx_addr();
    h.mem
        .write_slice(&pkt.header(), GuestAddress(addr))
        .unwrap();
    h.send_chain(&[
        rd(addr, HEADER_SIZE as u32),
        rd(addr + 0x1000, 4000),
        rd(addr + 0x3000, 4000),
    ]);
    assert_eq!(h.recv_op(OP_RST).dst_port, 1024);
    let (_host, local) = h.established_host_connection(1025);
    let pkt = Pkt::guest(OP_RW, 1025, local).with_data(&[7; 9000]);
    h.mem
        .write_slice(&pkt.header(), GuestAddress(addr))
        .unwrap();
    h.send_chain(&[
        rd(addr, HEADER_SIZE as u32),
        rd(addr + 0x1000, 4000),
        wr(addr + 0x3000, 5000),
    ]);
    assert_eq!(h.recv_op(OP_RST).dst_port, 1025);
    let (_host, local) = h.established_host_connection(1026);
    let pkt = Pkt::guest(OP_RW, 1026, local).with_data(&[7; 9000]);
    h.mem
        .write_slice(&pkt.header(), GuestAddress(addr))
        .unwrap();
    h.send_chain(&[
        rd(addr, HEADER_SIZE as u32),
        rd(addr + 0x1000, 4000),
        rd(MEM_SIZE as u64 - 100, 5000),
    ]);
    assert_eq!(h.recv_op(OP_RST).dst_port, 1026);
}

#[test]
fn connection_churn_without_rx_buffers_stays_bounded() {
    let mut h = Harness::inactive();
    h.rx_target = 0;
    h.activate();
    let _listener = UnixListener::bind(format!("{}_70", h.uds.display())).unwrap();
    // The guest posts no rx buffers and opens/resets connections in a loop.
    for round in 0..50u32 {
        // 16 REQUEST/RST pairs per notification (32 of the 64 tx descriptors).
        for i in 0..16 {
            for op in [OP_REQUEST, OP_RST] {
                let pkt = Pkt::guest(op, 10_000 + (round * 16 + i) % 64, 70);
                let addr = h.tx_addr();
                h.mem
                    .write_slice(&pkt.header(), GuestAddress(addr))
                    .unwrap();
                h.txq.add_chain(&[rd(addr, HEADER_SIZE as u32)]);
            }
        }
        h.notify(1);
        h.spin(Duration::from_millis(1));
    }
    let dev = h.device.lock().unwrap();
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.muxer.rx_ready_len(), 0);
}

/// Random tx chains (random header fields, lengths, flags, addresses) and random rx
/// buffers from a hostile guest: no panic, memory stays bounded, and a normal connection
/// still works afterwards.
#[test]
fn random_packets_from_a_hostile_guest() {
    use crate::devices::virtio::test_utils::Rng;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    let mut h = Harness::new();
    let _listener = UnixListener::bind(format!("{}_80", h.uds.display())).unwrap();
    let rng = Rng::new(0xdead_beef_cafe_f00d);
    let base = TX_BUFS;
    for round in 0..400 {
        // 8 random chains per round in descriptor slots 0..40 of the tx queue.
        for c in 0..8u16 {
            let pkt = Pkt {
                src_cid: rng.pick(&[GUEST_CID, GUEST_CID, rng.next()]),
                dst_cid: rng.pick(&[HOST_CID, HOST_CID, rng.next()]),
                src_port: rng.pick(&[5000, 5001, rng.next() as u32]),
                dst_port: rng.pick(&[80, 81, rng.next() as u32]),
                len: rng.pick(&[0, 1, 100, MAX_PKT_DATA, MAX_PKT_DATA + 1, rng.next() as u32]),
                type_: rng.pick(&[TYPE_STREAM, TYPE_STREAM, rng.next() as u16]),
                op: (rng.next() % 9) as u16,
                flags: rng.next() as u32,
                buf_alloc: rng.pick(&[0, 4096, 1 << 18, u32::MAX]),
                fwd_cnt: rng.next() as u32,
                data: Vec::new(),
            };
            let addr = base + u64::from(c) * 0x2_0000;
            h.mem
                .write_slice(&pkt.header(), GuestAddress(addr))
                .unwrap();
            let n = 1 + (rng.next() % 4) as u16;
            for i in 0..n {
                let slot = c * 5 + i;
                let daddr = if i == 0 {
                    rng.pick(&[addr, addr, rng.next(), MEM_SIZE as u64 - 20])
                } else {
                    rng.pick(&[addr + 0x1000 * u64::from(i), rng.next()])
                };
                let dlen = rng.pick(&[HEADER_SIZE as u32, 10, 100, 70_000, rng.next() as u32]);
                let mut flags =
                    (rng.next() as u16) & (VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;
                let mut next = slot + 1;
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT as u16;
                    if rng.next() % 8 == 0 {
                        next = (rng.next() % 80) as u16;
                    }
                }
                h.txq.store_desc(slot, daddr, dlen, flags, next);
            }
            h.txq.publish(c * 5);
        }
        // Sometimes a malformed rx buffer too (keeping well within the 64-entry ring).
        if round % 4 == 0 && h.rx_posted.len() < 40 {
            let b = rng.pick(&[rd(RX_BUFS, 4096), wr(RX_BUFS, 10), wr(rng.next(), 4096)]);
            let head = h.rxq.add_chain(&[b]);
            h.rx_posted.insert(
                u32::from(head),
                RxBuf {
                    header: b.addr,
                    data: b.addr,
                },
            );
        }
        h.notify(1);
        h.spin(Duration::from_millis(1));
        h.inbox.clear();
    }
    {
        let dev = h.device.lock().unwrap();
        assert!(dev.connection_count() <= super::muxer::MAX_CONNECTIONS);
    }
    // Still healthy: a fresh host connection works end to end.
    h.spin(Duration::from_millis(20));
    h.inbox.clear();
    let (mut host, local) = h.established_host_connection(1024);
    h.send(&Pkt::guest(OP_RW, 1024, local).with_data(b"still fine"));
    assert_eq!(read_exactly(&mut host, 10), b"still fine");
}
