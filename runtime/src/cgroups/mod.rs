//! cgroup management: v1, v2 and hybrid hierarchies.
