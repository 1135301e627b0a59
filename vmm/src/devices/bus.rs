//! Address-range buses (one for port I/O, one for MMIO) routing guest accesses to devices.
//!
//! The bus is built before the vCPUs start and is immutable afterwards, so vCPU threads
//! share it without locking; each device sits behind its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::BusDevice;

/// A device shared between the bus and whoever else drives it (e.g. its event handler).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero cannot be mapped.
    #[error("device range at {0:#x} has zero length")]
    ZeroLength(u64),
    /// `base + len` does not fit in 64 bits.
    #[error("device range at {base:#x} with length {len:#x} wraps around the address space")]
    Overflow {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range intersects one that is already mapped.
    #[error("device range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
        /// Start of the range it collides with.
        other: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping `[base, base + len)` ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for (base, e) in &self.ranges {
            list.entry(&format_args!("{:#x}+{:#x}", base, e.len));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Map `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // The closest range starting at or below `base` must end at or before it...
        if let Some((&other, e)) = self.ranges.range(..=base).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        // ...and no range may start inside `[base, end)`.
        if let Some((&other, _)) = self.ranges.range(base..end).next() {
            return Err(BusError::Overlap { base, len, other });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose range fully contains `[addr, addr + size)`, and the offset of `addr`
    /// in it. Accesses straddling a range boundary are not routed.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then_some((entry, offset))
    }

    /// Route a guest read. Returns `false` (and leaves `data` untouched) if no device
    /// serves the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Route a guest write. Returns `false` if no device serves the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering from poisoning: a panic on another thread already ended the
/// VMM's useful life (release builds abort on panic), and refusing to serve the guest here
/// would only hide that first error.
pub fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedDevice) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let shared: SharedDevice = p.clone();
        (p, shared)
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let (a, a_dev) = probe();
        let (b, b_dev) = probe();
        bus.insert(a_dev, 0x3f8, 8).unwrap();
        bus.insert(b_dev, 0x1000, 0x100).unwrap();

        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x1010, &[1, 2, 3, 4]));
        assert_eq!(b.lock().unwrap().last_write, Some((0x10, vec![1, 2, 3, 4])));
        assert!(a.lock().unwrap().last_write.is_none());

        // Holes and the byte after a range are unrouted.
        assert!(!bus.read(0x3f7, &mut buf));
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.write(0x1100, &[0]));
        assert!(!bus.write(u64::MAX, &[0]));
    }

    #[test]
    fn straddling_access_is_not_routed() {
        let mut bus = Bus::new();
        let (p, dev) = probe();
        bus.insert(dev, 0x1000, 0x10).unwrap();
        assert!(!bus.write(0x100e, &[0; 4]));
        assert!(p.lock().unwrap().last_write.is_none());
        assert!(bus.write(0x100c, &[0; 4]));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(probe().1, 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x9), (0x10f, 1), (0x0, 0x1000)] {
            assert_eq!(
                bus.insert(probe().1, base, len),
                Err(BusError::Overlap {
                    base,
                    len,
                    other: 0x100
                })
            );
        }
        assert_eq!(
            bus.insert(probe().1, 0x50, 0),
            Err(BusError::ZeroLength(0x50))
        );
        assert!(matches!(
            bus.insert(probe().1, u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        // Adjacent ranges are fine.
        bus.insert(probe().1, 0xf0, 0x10).unwrap();
        bus.insert(probe().1, 0x110, 0x10).unwrap();
    }
}
