//! The i8042 keyboard controller.
//!
//! Why more than a reset line: Linux probes the controller at boot (read/write the
//! controller configuration byte, self-test, AUX port tests) and then the keyboard
//! (`GETID`, LEDs, scan-code set). A controller that never answers makes each of those
//! steps wait for its timeout (hundreds of ms of boot time, thousands of port exits). This
//! model answers like a real controller with a keyboard and no mouse, so the probe is fast
//! whatever the guest command line; keyboard replies raise IRQ 1 through an irqfd.
//!
//! The reason it exists at all: the guest kernel has no ACPI power-off, so a guest ends by
//! rebooting (`reboot=k`: command 0xFE, "pulse reset line") and the VMM turns that into a
//! clean exit. The 0xcf9 reset control register (`reboot=pci`) is handled the same way.

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// Called (on the vCPU thread) when the guest requests a CPU reset.
pub type ResetCallback = Arc<dyn Fn() + Send + Sync>;

/// Offsets within the device's port range (base 0x60).
const DATA: u64 = 0;
const COMMAND: u64 = 4;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Keyboard not inhibited (the "keylock" switch is off).
const STATUS_KBD_NOT_INHIBITED: u8 = 0x10;

/// Controller configuration byte (CTR) bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

/// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX_DEVICE: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

/// Replies.
const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// AUX interface test result "clock line stuck low": there is no mouse.
const AUX_ABSENT: u8 = 0x01;

/// Keyboard commands and replies.
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_GET_ID: u8 = 0xf2;
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ECHO: u8 = 0xee;
const KBD_SET_LEDS: u8 = 0xed;
const KBD_SET_REPEAT: u8 = 0xf3;
const KBD_SCANCODE_SET: u8 = 0xf0;

/// Output buffer depth (a real controller has one byte; the queue lets multi-byte keyboard
/// replies be read back to back).
const OUTPUT_MAX: usize = 16;

/// What the next write to the data port means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataWrite {
    KeyboardCommand,
    KeyboardParameter,
    Ctr,
    OutputPort,
    KeyboardBuffer,
    AuxBuffer,
    AuxDevice,
}

/// One byte waiting in the output buffer.
#[derive(Clone, Copy, Debug)]
struct Output {
    byte: u8,
    from_keyboard: bool,
}

/// i8042 on ports 0x60..=0x64.
pub struct I8042 {
    on_reset: ResetCallback,
    kbd_irq: Option<EventFd>,
    ctr: u8,
    output_port: u8,
    last_was_command: bool,
    next_data: DataWrite,
    output: VecDeque<Output>,
    last_read: u8,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("ctr", &self.ctr)
            .field("next_data", &self.next_data)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller calling `on_reset` on a CPU reset and raising the keyboard interrupt
    /// through `kbd_irq` (an irqfd on GSI 1), if given.
    pub fn new(on_reset: ResetCallback, kbd_irq: Option<EventFd>) -> Self {
        I8042 {
            on_reset,
            kbd_irq,
            ctr: CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_XLATE,
            // Bit 0: reset line inactive; bit 1: A20 enabled.
            output_port: 0x03,
            last_was_command: false,
            next_data: DataWrite::KeyboardCommand,
            output: VecDeque::new(),
            last_read: 0,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_KBD_NOT_INHIBITED;
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn push(&mut self, byte: u8, from_keyboard: bool) {
        if self.output.len() >= OUTPUT_MAX {
            return; // a real controller would overrun too; the guest is not reading
        }
        self.output.push_back(Output {
            byte,
            from_keyboard,
        });
        if from_keyboard && self.output.len() == 1 {
            self.raise_kbd_irq();
        }
    }

    fn raise_kbd_irq(&self) {
        if self.ctr & CTR_KBD_INT == 0 {
            return;
        }
        if let Some(irq) = &self.kbd_irq {
            if let Err(e) = irq.write(1) {
                tracing::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some(out) = self.output.pop_front() {
            self.last_read = out.byte;
            // One interrupt per byte: the guest handler reads one byte per IRQ.
            if self.output.front().is_some_and(|o| o.from_keyboard) {
                self.raise_kbd_irq();
            }
        }
        self.last_read
    }

    /// A real controller has a one-byte output buffer: a new command or keyboard command
    /// replaces a controller reply the guest did not read (Linux leaves the AUX loop-back
    /// byte unread when it sees the AUX flag missing). A stale reply must not sit in front
    /// of keyboard bytes, or their interrupt would never be raised.
    fn drop_unread_replies(&mut self) {
        self.output.retain(|o| o.from_keyboard);
    }

    fn write_command(&mut self, cmd: u8) {
        self.drop_unread_replies();
        self.last_was_command = true;
        self.next_data = DataWrite::KeyboardCommand;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, false),
            CMD_WRITE_CTR => self.next_data = DataWrite::Ctr,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.push(AUX_ABSENT, false),
            CMD_SELF_TEST => self.push(SELF_TEST_OK, false),
            CMD_KBD_TEST => self.push(INTERFACE_OK, false),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.push(self.output_port, false),
            CMD_WRITE_OUTPUT_PORT => self.next_data = DataWrite::OutputPort,
            CMD_WRITE_KBD_BUFFER => self.next_data = DataWrite::KeyboardBuffer,
            CMD_WRITE_AUX_BUFFER => self.next_data = DataWrite::AuxBuffer,
            CMD_WRITE_AUX_DEVICE => self.next_data = DataWrite::AuxDevice,
            CMD_PULSE_RESET => (self.on_reset)(),
            _ => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.last_was_command = false;
        let kind = std::mem::replace(&mut self.next_data, DataWrite::KeyboardCommand);
        match kind {
            DataWrite::Ctr => {
                let enabling = self.ctr & CTR_KBD_INT == 0 && byte & CTR_KBD_INT != 0;
                self.ctr = byte;
                // The IRQ line follows "keyboard byte waiting && interrupt enabled": a byte
                // that arrived while the interrupt was off is signalled once it is on.
                if enabling && self.output.front().is_some_and(|o| o.from_keyboard) {
                    self.raise_kbd_irq();
                }
            }
            DataWrite::OutputPort => {
                self.output_port = byte;
                // Bit 0 is the CPU reset line, active low.
                if byte & 0x01 == 0 {
                    (self.on_reset)();
                }
            }
            DataWrite::KeyboardBuffer => self.push(byte, true),
            // No mouse: loop-back data comes back without the AUX flag, which tells the
            // guest the AUX port does not work; bytes for the mouse go nowhere.
            DataWrite::AuxBuffer => self.push(byte, false),
            DataWrite::AuxDevice => {}
            DataWrite::KeyboardParameter => self.push(KBD_ACK, true),
            DataWrite::KeyboardCommand => self.keyboard_command(byte),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        self.drop_unread_replies();
        match cmd {
            KBD_RESET => {
                self.push(KBD_ACK, true);
                self.push(KBD_BAT_OK, true);
            }
            KBD_GET_ID => {
                self.push(KBD_ACK, true);
                for b in KBD_ID {
                    self.push(b, true);
                }
            }
            KBD_ECHO => self.push(KBD_ECHO, true),
            KBD_SET_LEDS | KBD_SET_REPEAT | KBD_SCANCODE_SET => {
                self.push(KBD_ACK, true);
                self.next_data = DataWrite::KeyboardParameter;
            }
            _ => self.push(KBD_ACK, true),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA, 1) => self.read_data(),
            (COMMAND, 1) => self.status(),
            _ => 0,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA, [byte]) => self.write_data(*byte),
            (COMMAND, [cmd]) => self.write_command(*cmd),
            _ => {}
        }
    }
}

/// The PCI reset control register at 0xcf9: bit 2 set requests a reset.
pub struct ResetControl {
    on_reset: ResetCallback,
}

impl std::fmt::Debug for ResetControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetControl")
    }
}

impl ResetControl {
    /// A register that calls `on_reset` when the guest requests a reset.
    pub fn new(on_reset: ResetCallback) -> Self {
        ResetControl { on_reset }
    }
}

/// "Reset CPU" bit of the reset control register.
const RST_CPU: u8 = 1 << 2;

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if matches!(data, [v] if v & RST_CPU != 0) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn counter() -> (Arc<AtomicUsize>, ResetCallback) {
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        (
            n,
            Arc::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    fn status(dev: &mut I8042) -> u8 {
        let mut b = [0];
        dev.read(COMMAND, &mut b);
        b[0]
    }

    fn data(dev: &mut I8042) -> u8 {
        let mut b = [0];
        dev.read(DATA, &mut b);
        b[0]
    }

    /// Issue a controller command and read its one-byte reply, as Linux's i8042_command.
    fn command(dev: &mut I8042, cmd: u8, param: Option<u8>) -> Option<u8> {
        dev.write(COMMAND, &[cmd]);
        if let Some(p) = param {
            dev.write(DATA, &[p]);
        }
        (status(dev) & STATUS_OUTPUT_FULL != 0).then(|| data(dev))
    }

    #[test]
    fn reset_command_signals_reset() {
        let (n, cb) = counter();
        let mut dev = I8042::new(cb, None);
        assert_eq!(
            status(&mut dev) & 0x03,
            0,
            "buffers empty: the guest never waits"
        );
        // Other commands, odd widths and offsets do nothing.
        dev.write(COMMAND, &[0xfd]);
        dev.write(COMMAND, &[0xfe, 0xfe]);
        dev.write(u64::MAX, &[0xfe]);
        assert_eq!(n.load(Ordering::SeqCst), 0, "no reset expected yet");
        dev.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        // Output-port write with the reset line (bit 0) low also resets.
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA, &[0x02]);
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn linux_controller_probe_sequence() {
        let (_, cb) = counter();
        let mut dev = I8042::new(cb, None);
        assert_eq!(command(&mut dev, CMD_SELF_TEST, None), Some(SELF_TEST_OK));
        let ctr = command(&mut dev, CMD_READ_CTR, None).unwrap();
        assert_eq!(ctr & CTR_KBD_INT, CTR_KBD_INT);
        assert_eq!(
            command(&mut dev, CMD_WRITE_CTR, Some(ctr & !CTR_KBD_INT)),
            None
        );
        assert_eq!(
            command(&mut dev, CMD_READ_CTR, None),
            Some(ctr & !CTR_KBD_INT)
        );
        // AUX loop-back answers without the AUX flag, and the AUX test says "no mouse".
        assert_eq!(
            command(&mut dev, CMD_WRITE_AUX_BUFFER, Some(0x5a)),
            Some(0x5a)
        );
        assert_eq!(status(&mut dev) & 0x20, 0);
        assert_eq!(command(&mut dev, CMD_AUX_TEST, None), Some(AUX_ABSENT));
        assert_eq!(command(&mut dev, CMD_KBD_TEST, None), Some(INTERFACE_OK));
        dev.write(COMMAND, &[CMD_KBD_DISABLE]);
        assert_ne!(
            command(&mut dev, CMD_READ_CTR, None).unwrap() & CTR_KBD_DISABLE,
            0
        );
    }

    #[test]
    fn keyboard_replies_raise_irq1_per_byte() {
        let (_, cb) = counter();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(cb, Some(irq.try_clone().unwrap()));
        dev.write(DATA, &[KBD_GET_ID]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(data(&mut dev), KBD_ACK);
        assert_eq!(irq.read().unwrap(), 1, "next byte, next interrupt");
        assert_eq!(data(&mut dev), 0xab);
        assert_eq!(data(&mut dev), 0x83);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
        // LEDs: ACK for the command and for its parameter.
        dev.write(DATA, &[KBD_SET_LEDS]);
        assert_eq!(data(&mut dev), KBD_ACK);
        dev.write(DATA, &[0x07]);
        assert_eq!(data(&mut dev), KBD_ACK);
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!((data(&mut dev), data(&mut dev)), (KBD_ACK, KBD_BAT_OK));
        // Empty buffer: the last byte is read again, no panic.
        assert_eq!(data(&mut dev), KBD_BAT_OK);
    }

    #[test]
    fn enabling_the_interrupt_signals_a_waiting_byte() {
        let (_, cb) = counter();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(cb, Some(irq.try_clone().unwrap()));
        let ctr = command(&mut dev, CMD_READ_CTR, None).unwrap();
        command(&mut dev, CMD_WRITE_CTR, Some(ctr & !CTR_KBD_INT));
        dev.write(DATA, &[KBD_ECHO]);
        assert!(irq.read().is_err(), "interrupt disabled");
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[ctr | CTR_KBD_INT]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(data(&mut dev), KBD_ECHO);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn unread_aux_loop_byte_does_not_block_keyboard_irq() {
        // The sequence Linux runs on a controller without a mouse, from its i8042.debug log.
        let (_, cb) = counter();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(cb, Some(irq.try_clone().unwrap()));
        dev.write(COMMAND, &[CMD_WRITE_AUX_BUFFER]);
        dev.write(DATA, &[0x5a]);
        // Linux sees no AUX flag and does not read the byte; the AUX test follows.
        assert_eq!(status(&mut dev) & 0x20, 0);
        assert_eq!(command(&mut dev, CMD_AUX_TEST, None), Some(AUX_ABSENT));
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x45]);
        dev.write(DATA, &[KBD_GET_ID]);
        assert_eq!(irq.read().unwrap(), 1, "GETID reply must interrupt");
        assert_eq!(data(&mut dev), KBD_ACK);
    }

    #[test]
    fn output_is_bounded() {
        let (_, cb) = counter();
        let mut dev = I8042::new(cb, None);
        for _ in 0..1000 {
            dev.write(DATA, &[KBD_RESET]);
        }
        assert_eq!(dev.output.len(), OUTPUT_MAX);
    }

    #[test]
    fn reset_control_needs_rst_cpu_bit() {
        let (n, cb) = counter();
        let mut dev = ResetControl::new(cb);
        dev.write(0, &[0x02]);
        dev.write(0, &[]);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        dev.write(0, &[0x06]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
