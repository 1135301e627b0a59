//! Guest memory: anonymous private mappings around the 32-bit MMIO gap.

/// The guest memory type shared by the VMM core and the devices (cheap to clone: regions
/// are reference-counted).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
