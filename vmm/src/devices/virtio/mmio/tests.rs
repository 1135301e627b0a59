use std::os::unix::io::RawFd;

use vmm_sys_util::epoll::EventSet;

use super::*;
use crate::devices::virtio::test_utils::{test_memory, RecordingCtl, TestQueue};
use crate::event_loop::EventLoopCtl;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// A device-specific feature the dummy offers.
const DUMMY_FEATURE: u64 = 1 << 3;

/// Records what the transport asks of it.
#[derive(Default)]
struct Dummy {
    activations: usize,
    resets: usize,
    active: Option<Activation>,
    config: [u8; 8],
    processed: Vec<usize>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        DUMMY_FEATURE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::device::copy_config(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(dst) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config.get_mut(o..o.checked_add(data.len())?))
        {
            dst.copy_from_slice(data);
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.activations += 1;
        self.active = Some(activation);
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.active = None;
    }
    fn process_queue(&mut self, queue_index: usize, _ctl: &mut dyn EventLoopCtl) {
        self.processed.push(queue_index);
    }
}

struct Fixture {
    mem: GuestMemoryMmap,
    dummy: Arc<Mutex<Dummy>>,
    transport: MmioTransport,
}

fn fixture() -> Fixture {
    let mem = test_memory(0x10_0000);
    let dummy = Arc::new(Mutex::new(Dummy::default()));
    let transport = MmioTransport::with_shared_device(mem.clone(), dummy.clone()).unwrap();
    Fixture {
        mem,
        dummy,
        transport,
    }
}

impl Fixture {
    fn read(&mut self, offset: u64) -> u32 {
        let mut buf = [0xaau8; 4];
        self.transport.read(offset, &mut buf);
        u32::from_le_bytes(buf)
    }
    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }
    fn dummy(&self) -> std::sync::MutexGuard<'_, Dummy> {
        self.dummy.lock().unwrap()
    }

    fn negotiate(&mut self, features: u64) {
        self.write(REG_STATUS, ACK);
        self.write(REG_STATUS, ACK | DRIVER);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, features as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
        self.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    }

    fn setup_queue(&mut self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.write(REG_QUEUE_SEL, index);
        self.write(REG_QUEUE_NUM, size);
        self.write(REG_QUEUE_DESC_LOW, desc as u32);
        self.write(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(REG_QUEUE_AVAIL_LOW, avail as u32);
        self.write(REG_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.write(REG_QUEUE_USED_LOW, used as u32);
        self.write(REG_QUEUE_USED_HIGH, (used >> 32) as u32);
        self.write(REG_QUEUE_READY, 1);
    }

    fn setup_valid_queues(&mut self) {
        let q0 = TestQueue::new(&self.mem, 0x1000, 16);
        let q1 = TestQueue::new(&self.mem, 0x2000, 8);
        let addrs = |q: &TestQueue| {
            (
                q.mock.desc_table_addr().0,
                q.mock.avail_addr().0,
                q.mock.used_addr().0,
            )
        };
        let (d0, a0, u0) = addrs(&q0);
        let (d1, a1, u1) = addrs(&q1);
        self.setup_queue(0, 16, d0, a0, u0);
        self.setup_queue(1, 8, d1, a1, u1);
    }
}

#[test]
fn identification_registers() {
    let mut f = fixture();
    assert_eq!(f.read(REG_MAGIC), 0x7472_6976);
    assert_eq!(f.read(REG_VERSION), 2);
    assert_eq!(f.read(REG_DEVICE_ID), 42);
    assert_eq!(f.read(REG_VENDOR_ID), 0);
    f.write(REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(f.read(REG_DEVICE_FEATURES), DUMMY_FEATURE as u32);
    f.write(REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(f.read(REG_DEVICE_FEATURES), (VERSION_1 >> 32) as u32);
    f.write(REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(f.read(REG_DEVICE_FEATURES), 0);
    assert_eq!(f.read(REG_SHM_LEN_LOW), u32::MAX);
    assert_eq!(f.read(REG_SHM_LEN_HIGH), u32::MAX);
    // Queue sizes per selected queue; nonexistent queues report 0.
    for (sel, max) in [(0, 16), (1, 8), (2, 0), (u32::MAX, 0)] {
        f.write(REG_QUEUE_SEL, sel);
        assert_eq!(f.read(REG_QUEUE_NUM_MAX), max);
    }
}

#[test]
fn full_driver_initialisation_activates_and_kicks_queues() {
    let mut f = fixture();
    assert_eq!(f.read(REG_STATUS), 0);
    f.negotiate(VERSION_1 | DUMMY_FEATURE);
    assert_eq!(f.read(REG_STATUS), ACK | DRIVER | FEATURES_OK);
    f.setup_valid_queues();
    f.write(REG_QUEUE_SEL, 1);
    assert_eq!(f.read(REG_QUEUE_READY), 1);
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.read(REG_STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);

    {
        let dummy = f.dummy();
        assert_eq!(dummy.activations, 1);
        let act = dummy.active.as_ref().unwrap();
        assert_eq!(act.acked_features, VERSION_1 | DUMMY_FEATURE);
        assert_eq!(act.queues.len(), 2);
        assert!(act.queues.iter().all(|q| q.ready()));
        assert_eq!(act.queues[0].size(), 16);
        assert_eq!(act.queues[1].size(), 8);
        assert_eq!(act.queues[1].desc_table(), 0x2000);
    }

    // Activation kicked every queue so pre-DRIVER_OK notifications are not lost.
    let mut handler = f.transport.take_event_handler().unwrap();
    assert!(f.transport.take_event_handler().is_none());
    let mut ctl = RecordingCtl::default();
    let fds: Vec<(RawFd, EventSet)> = handler.fds();
    assert_eq!(fds.len(), 2);
    for (fd, _) in &fds {
        handler.handle(*fd, EventSet::IN, &mut ctl);
    }
    assert_eq!(f.dummy().processed, vec![0, 1]);

    // QueueNotify reaching the transport is forwarded to the queue's eventfd.
    let notify = f.transport.queue_notify_events().unwrap();
    assert_eq!(notify.len(), 2);
    assert_eq!(notify[1].0, 1);
    assert!(notify[1].1.read().is_err(), "no kick pending");
    f.write(REG_QUEUE_NOTIFY, 1);
    assert_eq!(notify[1].1.read().unwrap(), 1);
    f.write(REG_QUEUE_NOTIFY, 99); // nonexistent queue: ignored

    // Interrupt status and acknowledgement.
    let irq = f.transport.interrupt_event().unwrap();
    let interrupt = f.dummy().active.as_ref().unwrap().interrupt.clone();
    interrupt.trigger(InterruptKind::UsedRing).unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(f.read(REG_INTERRUPT_STATUS), 1);
    f.write(REG_INTERRUPT_ACK, 1);
    assert_eq!(f.read(REG_INTERRUPT_STATUS), 0);

    // Reset.
    f.write(REG_STATUS, 0);
    assert_eq!(f.read(REG_STATUS), 0);
    assert_eq!(f.dummy().resets, 1);
    assert!(!f.dummy().is_activated());
    f.write(REG_QUEUE_SEL, 0);
    assert_eq!(f.read(REG_QUEUE_READY), 0);

    // And the driver can initialise the device again.
    f.negotiate(VERSION_1);
    f.setup_valid_queues();
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.dummy().activations, 2);
}

#[test]
fn features_ok_requires_version_1_and_offered_bits() {
    let mut f = fixture();
    f.negotiate(DUMMY_FEATURE);
    assert_eq!(f.read(REG_STATUS), ACK | DRIVER, "legacy driver refused");

    let mut f = fixture();
    f.negotiate(VERSION_1 | 1 << 5);
    assert_eq!(f.read(REG_STATUS), ACK | DRIVER, "unoffered bit refused");

    let mut f = fixture();
    f.write(REG_STATUS, ACK);
    f.write(REG_STATUS, ACK | DRIVER);
    f.write(REG_DRIVER_FEATURES_SEL, 1);
    f.write(REG_DRIVER_FEATURES, 1);
    f.write(REG_DRIVER_FEATURES_SEL, 2);
    f.write(REG_DRIVER_FEATURES, 1);
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(f.read(REG_STATUS), ACK | DRIVER, "features page 2 refused");

    // Features are frozen after FEATURES_OK.
    let mut f = fixture();
    f.negotiate(VERSION_1);
    f.write(REG_DRIVER_FEATURES_SEL, 0);
    f.write(REG_DRIVER_FEATURES, DUMMY_FEATURE as u32);
    f.setup_valid_queues();
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.dummy().active.as_ref().unwrap().acked_features, VERSION_1);
}

#[test]
fn out_of_order_status_writes_are_ignored() {
    let mut f = fixture();
    // DRIVER before ACKNOWLEDGE, DRIVER_OK before FEATURES_OK.
    f.write(REG_STATUS, DRIVER);
    assert_eq!(f.read(REG_STATUS), 0);
    f.write(REG_STATUS, ACK);
    f.write(REG_STATUS, ACK | DRIVER | DRIVER_OK);
    assert_eq!(f.read(REG_STATUS), ACK);
    f.write(REG_STATUS, ACK | DRIVER);
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.read(REG_STATUS), ACK | DRIVER);
    // Clearing bits without a reset.
    f.write(REG_STATUS, ACK);
    assert_eq!(f.read(REG_STATUS), ACK | DRIVER);
    assert_eq!(f.dummy().activations, 0);
    // FAILED sticks until reset and blocks activation.
    f.write(REG_STATUS, ACK | DRIVER | VIRTIO_CONFIG_S_FAILED);
    assert_ne!(f.read(REG_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_ne!(f.read(REG_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    assert_eq!(f.read(REG_STATUS) & FEATURES_OK, 0);
    f.write(REG_STATUS, 0);
    assert_eq!(f.read(REG_STATUS), 0);
    // Reset of a never-activated device does not call the device's reset.
    assert_eq!(f.dummy().resets, 0);
}

#[test]
fn queue_registers_only_writable_between_features_ok_and_driver_ok() {
    let mut f = fixture();
    f.write(REG_STATUS, ACK);
    f.write(REG_STATUS, ACK | DRIVER);
    f.write(REG_QUEUE_SEL, 0);
    f.write(REG_QUEUE_READY, 1);
    assert_eq!(f.read(REG_QUEUE_READY), 0);
    f.write(REG_DRIVER_FEATURES_SEL, 1);
    f.write(REG_DRIVER_FEATURES, 1);
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK);
    f.setup_valid_queues();
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    // After DRIVER_OK the queue configuration is frozen.
    f.write(REG_QUEUE_SEL, 0);
    f.write(REG_QUEUE_READY, 0);
    assert_eq!(f.read(REG_QUEUE_READY), 1);
}

fn activation_refused(setup: impl FnOnce(&mut Fixture)) {
    let mut f = fixture();
    f.negotiate(VERSION_1);
    f.setup_valid_queues();
    setup(&mut f);
    let irq = f.transport.interrupt_event().unwrap();
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let status = f.read(REG_STATUS);
    assert_eq!(status & DRIVER_OK, 0, "status {status:#x}");
    assert_ne!(
        status & VIRTIO_CONFIG_S_NEEDS_RESET,
        0,
        "status {status:#x}"
    );
    assert_eq!(f.dummy().activations, 0);
    assert_eq!(f.read(REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG_BIT);
    assert_eq!(f.read(REG_CONFIG_GENERATION), 1);
    assert_eq!(irq.read().unwrap(), 1);
    // Only a reset gets out of NEEDS_RESET.
    f.write(REG_STATUS, status | DRIVER_OK);
    assert_eq!(f.read(REG_STATUS), status);
    f.write(REG_STATUS, 0);
    assert_eq!(f.read(REG_STATUS), 0);
}

const VIRTIO_MMIO_INT_CONFIG_BIT: u32 = 2;

#[test]
fn invalid_queue_configurations_set_needs_reset() {
    // Rings outside guest memory.
    activation_refused(|f| f.setup_queue(0, 16, 0x10_0000, 0x1100, 0x1200));
    activation_refused(|f| f.setup_queue(1, 8, 0x1000, 0x1100, u64::MAX - 0xff));
    activation_refused(|f| f.setup_queue(0, 16, 0xffff_ffff_0000_0000, 0x1100, 0x1200));
    // Size not a power of two, zero, larger than the maximum, larger than u16.
    activation_refused(|f| f.setup_queue(0, 12, 0x1000, 0x1100, 0x1200));
    activation_refused(|f| f.setup_queue(0, 0, 0x1000, 0x1100, 0x1200));
    activation_refused(|f| f.setup_queue(1, 16, 0x2000, 0x2100, 0x2200));
    activation_refused(|f| f.setup_queue(0, 0x1_0000, 0x1000, 0x1100, 0x1200));
    // Misaligned rings.
    activation_refused(|f| f.setup_queue(0, 16, 0x1008, 0x1100, 0x1200));
    activation_refused(|f| f.setup_queue(0, 16, 0x1000, 0x1101, 0x1200));
    activation_refused(|f| f.setup_queue(0, 16, 0x1000, 0x1100, 0x1202));
}

#[test]
fn queue_left_disabled_is_passed_not_ready() {
    let mut f = fixture();
    f.negotiate(VERSION_1);
    f.setup_valid_queues();
    f.write(REG_QUEUE_SEL, 1);
    f.write(REG_QUEUE_READY, 0);
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let dummy = f.dummy();
    let act = dummy.active.as_ref().unwrap();
    assert!(act.queues[0].ready());
    assert!(!act.queues[1].ready());
}

#[test]
fn config_space_access_any_width() {
    let mut f = fixture();
    f.dummy().config = [1, 2, 3, 4, 5, 6, 7, 8];
    let mut b = [0u8; 1];
    f.transport.read(REG_CONFIG + 3, &mut b);
    assert_eq!(b, [4]);
    let mut w = [0u8; 8];
    f.transport.read(REG_CONFIG, &mut w);
    assert_eq!(w, [1, 2, 3, 4, 5, 6, 7, 8]);
    // Partly beyond the end: the overlap is copied, the rest reads zero.
    let mut w = [0xffu8; 4];
    f.transport.read(REG_CONFIG + 6, &mut w);
    assert_eq!(w, [7, 8, 0, 0]);
    // Config writes need DRIVER.
    f.transport.write(REG_CONFIG, &[9]);
    assert_eq!(f.dummy().config[0], 1);
    f.write(REG_STATUS, ACK);
    f.write(REG_STATUS, ACK | DRIVER);
    f.transport.write(REG_CONFIG, &[9]);
    assert_eq!(f.dummy().config[0], 9);
}

#[test]
fn arbitrary_offsets_and_widths_never_panic() {
    let mut f = fixture();
    f.negotiate(VERSION_1);
    f.setup_valid_queues();
    f.write(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    for offset in (0..0x200u64).chain([0xfff, 0x1000, u64::MAX - 3, u64::MAX]) {
        for width in [0usize, 1, 2, 3, 4, 8, 16] {
            let mut buf = vec![0xa5u8; width];
            f.transport.read(offset, &mut buf);
            if offset < REG_CONFIG && (width != 4 || offset % 4 != 0) {
                assert!(buf.iter().all(|&b| b == 0), "{offset:#x}/{width}");
            }
            // Writes of junk to everything but the status register.
            if offset != REG_STATUS {
                f.transport.write(offset, &buf);
            }
        }
    }
    // Unknown registers read as zero.
    assert_eq!(f.read(0x0e0), 0);
    assert_eq!(f.read(REG_QUEUE_DESC_LOW), 0);
}

#[test]
fn invalid_device_queue_size_is_rejected_at_construction() {
    struct Bad;
    impl VirtioDevice for Bad {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[3]
        }
        fn avail_features(&self) -> u64 {
            0
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn activate(&mut self, _: Activation) -> Result<(), ActivateError> {
            Ok(())
        }
        fn is_activated(&self) -> bool {
            false
        }
        fn reset(&mut self) {}
        fn process_queue(&mut self, _: usize, _: &mut dyn EventLoopCtl) {}
    }
    assert!(matches!(
        MmioTransport::new(test_memory(0x1000), Bad),
        Err(MmioError::QueueMaxSize { index: 0, size: 3 })
    ));
}

/// A `tracing` writer that keeps what was logged.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn guest_caused_warnings_are_budgeted() {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    let mut f = fixture();
    tracing::subscriber::with_default(subscriber, || {
        // Queue registers before FEATURES_OK: each write is a driver error. A flood of them
        // must not keep logging at warn level.
        for _ in 0..10_000 {
            f.write(REG_QUEUE_NUM, 8);
        }
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let warnings = text.lines().filter(|l| l.contains("WARN")).count();
    // The budget, plus the one line saying the rest goes to debug level.
    assert_eq!(warnings, GUEST_WARNING_BUDGET as usize + 1, "{text}");
    assert!(text.contains("warning budget spent"));
    // The transport still works after the flood.
    assert_eq!(f.read(REG_MAGIC), MMIO_MAGIC_VALUE);
}
