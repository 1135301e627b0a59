//! `linux.cgroupsPath` semantics (as runc's cgroupfs driver):
//!
//! * absolute (`/a/b`): relative to the root of each hierarchy (as mounted in the caller's
//!   mount namespace);
//! * relative (`a/b`): relative to the caller's own cgroup in each hierarchy;
//! * absent: `/palisade/<id>` (an absolute default, so the result does not depend on which
//!   cgroup the CLI/shim happens to run in);
//! * `slice:prefix:name` (the systemd driver's syntax): rejected, the systemd driver is not
//!   implemented.
//!
//! `..` is resolved lexically and can never climb above the hierarchy root (absolute) or the
//! caller's cgroup (relative), and a path that resolves to the root itself is refused: the
//! container's cgroup is removed, with every process in it killed, on delete.

use std::path::{Path, PathBuf};

use super::CgroupError;

/// The parent of the default cgroup of a container without `linux.cgroupsPath`.
pub const DEFAULT_PARENT: &str = "palisade";

/// A cleaned `cgroupsPath`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupsPath {
    pub absolute: bool,
    /// Non-empty list of plain components (no `.`, `..` or empty ones).
    pub components: Vec<String>,
}

impl CgroupsPath {
    pub fn parse(cgroups_path: Option<&str>, container_id: &str) -> Result<Self, CgroupError> {
        let raw = match cgroups_path {
            Some(p) if !p.is_empty() => p.to_string(),
            _ => format!("/{DEFAULT_PARENT}/{container_id}"),
        };
        let invalid = |msg: &str| CgroupError::InvalidPath {
            path: raw.clone(),
            msg: msg.to_string(),
        };
        let absolute = raw.starts_with('/');
        if !absolute && raw.split(':').count() == 3 {
            return Err(CgroupError::Unsupported(format!(
                "the systemd cgroup driver (cgroupsPath {raw:?} in slice:prefix:name form)"
            )));
        }
        if raw.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        let mut components: Vec<String> = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    components.pop();
                }
                other => components.push(other.to_string()),
            }
        }
        if components.is_empty() {
            return Err(invalid(
                "resolves to the root cgroup; a container needs a cgroup of its own",
            ));
        }
        Ok(CgroupsPath {
            absolute,
            components,
        })
    }

    /// `/a/b` or `a/b`, for display and state.
    pub fn display(&self) -> String {
        let joined = self.components.join("/");
        if self.absolute {
            format!("/{joined}")
        } else {
            joined
        }
    }

    /// The container's directory in one hierarchy mounted at `mount_point` whose mounted
    /// root is the cgroup `mount_root`, given the caller's cgroup `own` there (from
    /// `/proc/self/cgroup`, if listed).
    pub fn dir_in(&self, mount_point: &Path, mount_root: &str, own: Option<&str>) -> PathBuf {
        let mut dir = mount_point.to_path_buf();
        if !self.absolute {
            let own = own.unwrap_or("/");
            // Our cgroup as seen from the mount: strip the mounted sub-tree's root. With a
            // cgroup namespace both are already relative to the namespace root.
            let rel = match own.strip_prefix(mount_root) {
                Some(rest) if mount_root != "/" => rest,
                _ => own,
            };
            for part in rel.split('/').filter(|p| !p.is_empty() && *p != "..") {
                dir.push(part);
            }
        }
        for part in &self.components {
            dir.push(part);
        }
        dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: Option<&str>) -> Result<CgroupsPath, CgroupError> {
        CgroupsPath::parse(path, "web")
    }

    #[test]
    fn default_is_absolute_palisade_id() {
        let c = p(None).unwrap();
        assert_eq!(c.display(), "/palisade/web");
        assert_eq!(p(Some("")).unwrap().display(), "/palisade/web");
        assert_eq!(
            c.dir_in(Path::new("/sys/fs/cgroup/memory"), "/", Some("/user/1")),
            PathBuf::from("/sys/fs/cgroup/memory/palisade/web")
        );
    }

    #[test]
    fn absolute_is_relative_to_the_hierarchy_root() {
        let c = p(Some("/kubepods/pod1/../pod2/./c1")).unwrap();
        assert_eq!(c.display(), "/kubepods/pod2/c1");
        assert_eq!(
            c.dir_in(Path::new("/sys/fs/cgroup"), "/", Some("/system.slice")),
            PathBuf::from("/sys/fs/cgroup/kubepods/pod2/c1")
        );
    }

    #[test]
    fn relative_is_under_the_callers_cgroup() {
        let c = p(Some("ctr/x")).unwrap();
        assert!(!c.absolute);
        assert_eq!(
            c.dir_in(
                Path::new("/sys/fs/cgroup/memory"),
                "/",
                Some("/process_api/a6")
            ),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/a6/ctr/x")
        );
        // Inside a container whose hierarchy is a bind mount of /docker/abc.
        assert_eq!(
            c.dir_in(
                Path::new("/sys/fs/cgroup/memory"),
                "/docker/abc",
                Some("/docker/abc/sub")
            ),
            PathBuf::from("/sys/fs/cgroup/memory/sub/ctr/x")
        );
    }

    #[test]
    fn dotdot_cannot_escape_and_root_is_refused() {
        assert_eq!(p(Some("/../../etc")).unwrap().display(), "/etc");
        assert_eq!(p(Some("../../x")).unwrap().display(), "x");
        for bad in ["/", "/..", "a/..", "."] {
            let e = p(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("root cgroup"), "{bad}: {e}");
        }
    }

    #[test]
    fn systemd_syntax_is_unsupported() {
        let e = p(Some("system.slice:docker:abc")).unwrap_err();
        assert!(matches!(e, CgroupError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("systemd cgroup driver"));
    }
}
