//! The i8042 keyboard controller, reduced to what a microVM needs: the "pulse reset line"
//! command (0xFE to port 0x64) that Linux issues for `reboot=k`. The guest kernel has no
//! ACPI power-off, so a guest reboot is how a VM ends; the VMM turns it into a clean exit.
//! The 0xcf9 reset control register is handled the same way for `reboot=pci`.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::serial::EventFdTrigger;
use crate::devices::BusDevice;

/// i8042 on ports 0x60..=0x64; signals `reset_evt` on a CPU reset command.
#[derive(Debug)]
pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    /// A controller that writes to `reset_evt` when the guest resets the CPU.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042(I8042Device::new(EventFdTrigger(reset_evt)))
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
        if let Err(e) = self.0.write(offset, *value) {
            tracing::error!("i8042: cannot signal the reset event: {e:?}");
        }
    }
}

/// The PCI reset control register at 0xcf9: bit 2 set requests a reset.
#[derive(Debug)]
pub struct ResetControl {
    reset_evt: EventFd,
}

impl ResetControl {
    /// A register that writes to `reset_evt` when the guest requests a reset.
    pub fn new(reset_evt: EventFd) -> Self {
        ResetControl { reset_evt }
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
            if let Err(e) = self.reset_evt.write(1) {
                tracing::error!("reset control: cannot signal the reset event: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn evt() -> (EventFd, EventFd) {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        let c = e.try_clone().unwrap();
        (e, c)
    }

    #[test]
    fn reset_command_signals_reset() {
        let (e, c) = evt();
        let mut dev = I8042::new(c);
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0], "status must say 'input buffer empty'");
        // Other commands, the data port, and odd widths/offsets do nothing.
        dev.write(4, &[0xfd]);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfe, 0xfe]);
        dev.write(u64::MAX, &[0xfe]);
        assert!(e.read().is_err(), "no reset expected yet");
        dev.write(4, &[0xfe]);
        assert_eq!(e.read().unwrap(), 1);
    }

    #[test]
    fn reset_control_needs_rst_cpu_bit() {
        let (e, c) = evt();
        let mut dev = ResetControl::new(c);
        dev.write(0, &[0x02]);
        dev.write(0, &[]);
        assert!(e.read().is_err());
        dev.write(0, &[0x06]);
        assert_eq!(e.read().unwrap(), 1);
    }
}
