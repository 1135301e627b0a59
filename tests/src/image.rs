//! A busybox OCI image built locally and `ctr image import`ed.
