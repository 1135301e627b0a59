//! A busybox OCI bundle built locally from Debian's busybox-static.
