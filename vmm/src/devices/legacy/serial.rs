//! 8250/16550A UART (vm-superio) on COM1, output to a file, stdout, or nowhere.

use std::io::{self, Write};
use std::os::unix::io::{AsRawFd, RawFd};

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::event_loop::{EventHandler, EventLoopCtl};

/// An eventfd as a vm-superio interrupt/reset trigger (the eventfd is an irqfd or is
/// watched by the VMM).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// COM1: a vm-superio UART behind the [`BusDevice`] interface.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART raising its interrupt through `irq_evt` and writing guest output to `out`.
    pub fn new(irq_evt: EventFd, out: SerialOutput) -> Self {
        Serial {
            uart: vm_superio::Serial::new(EventFdTrigger(irq_evt), out),
        }
    }

    /// Queue host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial: input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read as zero.
        let value = match (u8::try_from(offset), data.len()) {
            (Ok(o), 1) => self.uart.read(o),
            _ => 0,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        // A failing output (full disk, closed pipe) must not stop the guest: log and go on.
        if let Err(e) = self.uart.write(offset, *value) {
            tracing::debug!("serial: output error: {e:?}");
        }
    }
}

/// Feeds host input (e.g. stdin) into the UART from the device event loop.
pub struct SerialInput<R: io::Read + AsRawFd + Send> {
    input: R,
    uart: std::sync::Arc<std::sync::Mutex<Serial>>,
}

impl<R: io::Read + AsRawFd + Send> SerialInput<R> {
    /// Serve `input` into `uart`, which is mapped on the bus as `serial`.
    pub fn new(input: R, uart: std::sync::Arc<std::sync::Mutex<Serial>>) -> Self {
        SerialInput { input, uart }
    }
}

impl<R: io::Read + AsRawFd + Send> EventHandler for SerialInput<R> {
    fn fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.input.as_raw_fd(), EventSet::IN)]
    }

    fn handle(&mut self, fd: RawFd, events: EventSet, ctl: &mut dyn EventLoopCtl) {
        let mut uart = self.uart.lock().unwrap_or_else(|p| p.into_inner());
        let room = uart.input_room();
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        if want == 0 {
            // FIFO full: drop nothing, the guest will drain it; try again on the next event.
            return;
        }
        match self.input.read(&mut buf[..want]) {
            Ok(0) => ctl.remove(fd),
            Ok(n) => {
                uart.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("serial: input closed: {e}");
                ctl.remove(fd);
            }
        }
        if events.contains(EventSet::HANG_UP) {
            ctl.remove(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A cloneable in-memory output.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_thre_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = Capture::default();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        // Enable the THR-empty interrupt, then transmit.
        s.write(1, &[0x02]);
        assert_eq!(irq.read().unwrap(), 1);
        // Reading IIR acknowledges the pending THRE interrupt, re-arming it.
        let mut iir = [0];
        s.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02);
        s.write(0, b"O");
        s.write(0, b"K");
        assert_eq!(&*out.0.lock().unwrap(), b"OK");
        assert!(irq.read().unwrap() >= 1, "THRE interrupt expected");
        // Line status: transmitter empty.
        let mut lsr = [0];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = Capture::default();
        let mut s = Serial::new(irq, Box::new(out.clone()));
        s.write(0, b"ab");
        s.write(1 << 40, b"x");
        s.write(0, &[]);
        let mut wide = [0xffu8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn input_is_received() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(io::sink()));
        assert_eq!(s.enqueue_input(b"hi"), 2);
        let mut b = [0];
        s.read(0, &mut b);
        assert_eq!(b, *b"h");
        s.read(0, &mut b);
        assert_eq!(b, *b"i");
    }
}
