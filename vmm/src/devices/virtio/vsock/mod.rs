//! virtio-vsock in hybrid mode.
