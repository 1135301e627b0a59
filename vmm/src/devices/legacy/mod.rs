//! Legacy PC devices on the port-I/O bus: 8250 serial, i8042 (keyboard controller and reset line), the
//! 0xcf9 reset control register, and a sink for ports Linux pokes harmlessly.

mod i8042;
mod serial;

pub use i8042::{ResetCallback, ResetControl, I8042};
pub use serial::{EventFdTrigger, Serial, SerialInput, SerialOutput};

use super::BusDevice;

/// Legacy port ranges: `(base, len)`.
pub mod ports {
    /// COM1.
    pub const COM1: (u64, u64) = (0x3f8, 8);
    /// i8042 keyboard controller: data 0x60, command/status 0x64.
    pub const I8042: (u64, u64) = (0x60, 5);
    /// Reset control register (`reboot=pci` writes 0x6/0xe here).
    pub const RESET_CONTROL: (u64, u64) = (0xcf9, 1);
    /// POST diagnostic port; Linux writes it as an I/O delay.
    pub const POST: (u64, u64) = (0x80, 1);
}

/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042 keyboard interrupt line.
pub const KBD_IRQ: u32 = 1;

/// Accepts writes and reads as "nothing here" (all ones), without logging: for ports the
/// guest touches on every boot (port 0x80 I/O delays) where an unhandled-exit log line per
/// access would only be noise.
#[derive(Debug, Default)]
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
