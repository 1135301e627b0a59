//! The i8042 keyboard controller, reduced to what a microVM needs: the "pulse reset line"
//! command (0xFE to port 0x64) that Linux issues for `reboot=k`. The guest kernel has no
//! ACPI power-off, so a guest reboot is how a VM ends; the VMM turns it into a clean exit.
//! The 0xcf9 reset control register is handled the same way for `reboot=pci`.

use std::convert::Infallible;
use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::devices::BusDevice;

/// Called (on the vCPU thread) when the guest requests a CPU reset.
pub type ResetCallback = Arc<dyn Fn() + Send + Sync>;

struct CallbackTrigger(ResetCallback);

impl std::fmt::Debug for CallbackTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackTrigger")
    }
}

impl Trigger for CallbackTrigger {
    type E = Infallible;
    fn trigger(&self) -> Result<(), Infallible> {
        (self.0)();
        Ok(())
    }
}

/// i8042 on ports 0x60..=0x64; calls `on_reset` on a CPU reset command.
#[derive(Debug)]
pub struct I8042(I8042Device<CallbackTrigger>);

impl I8042 {
    /// A controller that calls `on_reset` when the guest resets the CPU.
    pub fn new(on_reset: ResetCallback) -> Self {
        I8042(I8042Device::new(CallbackTrigger(on_reset)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty and input buffer empty, so the guest never waits.
        let value = u8::try_from(offset).map_or(0, |o| self.0.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        let Ok(()) = self.0.write(offset, *value);
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

    #[test]
    fn reset_command_signals_reset() {
        let (n, cb) = counter();
        let mut dev = I8042::new(cb);
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0], "status must say 'input buffer empty'");
        // Other commands, the data port, and odd widths/offsets do nothing.
        dev.write(4, &[0xfd]);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfe, 0xfe]);
        dev.write(u64::MAX, &[0xfe]);
        assert_eq!(n.load(Ordering::SeqCst), 0, "no reset expected yet");
        dev.write(4, &[0xfe]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
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
