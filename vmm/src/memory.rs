//! Guest memory: anonymous private mappings around the 32-bit MMIO gap.
//!
//! Memory is a [`vm_memory::GuestMemoryMmap`] so that devices use the same bounds-checked
//! accessors as the loader. Anonymous mappings are populated on first touch, so an idle
//! guest costs the host only what it used. (A memfd-backed variant — needed to share memory
//! with vhost-user back-ends such as virtiofsd — would build the regions with
//! `GuestMemoryMmap::from_ranges_with_files` from the same [`ram_regions`] list.)

use vm_memory::GuestAddress;

use crate::arch::x86_64::layout::{ram_regions, LayoutError};

/// The guest memory type shared by the VMM core and the devices (cheap to clone: regions
/// are reference-counted).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size does not fit the layout.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// mmap failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest memory of `mem_size` bytes laid out by [`ram_regions`], and those regions.
pub fn create(mem_size: u64) -> Result<(GuestMemoryMmap, Vec<(GuestAddress, u64)>), MemoryError> {
    let regions = ram_regions(mem_size)?;
    let ranges: Vec<(GuestAddress, usize)> =
        regions.iter().map(|&(a, s)| (a, s as usize)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Mmap)?;
    Ok((mem, regions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn creates_regions_and_bounds_accesses() {
        let (mem, regions) = create(32 << 20).unwrap();
        assert_eq!(regions.len(), 1);
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress((32 << 20) - 4))
            .unwrap();
        // One byte past the end is refused, not a crash.
        assert!(mem.write_obj(0u32, GuestAddress((32 << 20) - 3)).is_err());
        assert!(create(1 << 20).is_err());
    }
}
