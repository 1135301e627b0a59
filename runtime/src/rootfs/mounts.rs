//! The spec's `mounts`: bind mounts, filesystems, and the `cgroup` pseudo-type.

use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::mount::{mount, MsFlags};
use oci_spec::runtime::Mount;

use super::{options, RootfsConfig};
use crate::utils::secure_join;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub super_options: String,
}

/// Parses `/proc/self/mountinfo`.
pub fn mountinfo() -> Result<Vec<MountInfo>, String> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

fn unescape(field: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    Some(MountInfo {
        root: unescape(left.get(3)?),
        mount_point: unescape(left.get(4)?),
        fs_type: right.next()?.to_string(),
        super_options: right.nth(1)?.to_string(),
    })
}

/// The mount point that contains `path` (the longest mount point prefix).
pub fn mount_point_of(path: &Path) -> Result<PathBuf, String> {
    let path = fs::canonicalize(path).map_err(|e| format!("resolving {}: {e}", path.display()))?;
    Ok(mountinfo()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|mp| path.starts_with(mp))
        .max_by_key(|mp| mp.as_os_str().len())
        .unwrap_or_else(|| PathBuf::from("/")))
}

fn sys(what: impl FnOnce() -> String) -> impl FnOnce(nix::Error) -> String {
    move |e| format!("{}: {}", what(), e.desc())
}

/// Creates the mount target: a directory, or an empty file when binding a non-directory.
fn create_target(dest: &Path, dir: bool) -> Result<(), String> {
    if dir {
        return fs::create_dir_all(dest).map_err(|e| format!("creating {}: {e}", dest.display()));
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    if fs::symlink_metadata(dest).is_err() {
        fs::File::create(dest).map_err(|e| format!("creating {}: {e}", dest.display()))?;
    }
    Ok(())
}

/// Performs one entry of `mounts`.
pub fn mount_entry(cfg: &RootfsConfig, m: &Mount) -> Result<(), String> {
    let dest = secure_join(cfg.rootfs, m.destination())
        .map_err(|e| format!("resolving destination: {e}"))?;
    let opts = options::parse(m.options().as_deref().unwrap_or_default());
    let typ = m.typ().as_deref().unwrap_or("");
    if typ == "cgroup" || typ == "cgroup2" {
        return mount_cgroup(cfg, &dest, &opts);
    }
    if opts.is_bind() {
        let source = m
            .source()
            .as_ref()
            .ok_or_else(|| "bind mount without a source".to_string())?;
        let source = if source.is_absolute() {
            source.clone()
        } else {
            cfg.bundle.join(source)
        };
        let meta =
            fs::metadata(&source).map_err(|e| format!("source {}: {e}", source.display()))?;
        create_target(&dest, meta.is_dir())?;
        mount(
            Some(&source),
            &dest,
            None::<&str>,
            opts.flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
            None::<&str>,
        )
        .map_err(sys(|| format!("bind-mounting {}", source.display())))?;
        // A bind mount ignores all other flags: they need a remount.
        let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra;
            mount(None::<&str>, &dest, None::<&str>, flags, None::<&str>)
                .or_else(|_| {
                    mount(
                        None::<&str>,
                        &dest,
                        None::<&str>,
                        flags | super::locked_flags(&dest),
                        None::<&str>,
                    )
                })
                .map_err(sys(|| format!("remounting with {extra:?}")))?;
        }
    } else {
        create_target(&dest, true)?;
        let source = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
        let data = opts.data();
        mount(Some(&source), &dest, Some(typ), opts.flags, data.as_deref())
            .map_err(sys(|| format!("mounting {typ} {}", source.display())))?;
    }
    for propagation in &opts.propagation {
        mount(
            None::<&str>,
            &dest,
            None::<&str>,
            *propagation,
            None::<&str>,
        )
        .map_err(sys(|| format!("setting propagation {propagation:?}")))?;
    }
    Ok(())
}

/// The container's view of its cgroups at `dest` (usually `/sys/fs/cgroup`).
///
/// On a pure cgroup v2 host this is a bind mount of the container's cgroup directory. On
/// v1 and hybrid hosts it is a
/// tmpfs with one directory per host hierarchy, each a bind mount of the container's own
/// cgroup directory in that hierarchy, like runc does. (A fresh v1 mount would need
/// CAP_SYS_ADMIN in the initial user namespace, so it fails in user-namespaced containers.)
fn mount_cgroup(
    cfg: &RootfsConfig,
    dest: &Path,
    opts: &options::MountOptions,
) -> Result<(), String> {
    let flags = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
    let host_cgroups = (cfg.cgroup_membership)()?;
    create_target(dest, true)?;
    let bind_readonly = |source: &Path, target: &Path| -> Result<(), String> {
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(|| format!("bind-mounting {}", source.display())))?;
        let extra = flags & !MsFlags::MS_REMOUNT;
        if extra.is_empty() {
            return Ok(());
        }
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
            None::<&str>,
        )
        .map_err(sys(|| format!("remounting {}", target.display())))
    };
    let hierarchies = match plan_cgroup_view(&mountinfo()?, &host_cgroups) {
        CgroupView::Unified { source } => return bind_readonly(&source, dest),
        CgroupView::Hierarchies(h) => h,
    };
    mount(
        Some("tmpfs"),
        dest,
        Some("tmpfs"),
        flags & !MsFlags::MS_RDONLY,
        Some("mode=755"),
    )
    .map_err(sys(|| "mounting tmpfs for cgroup hierarchies".into()))?;
    for (name, source) in &hierarchies {
        let target = dest.join(name);
        create_target(&target, true)?;
        bind_readonly(source, &target)?;
        // runc's compatibility links: cpu -> cpu,cpuacct and cpuacct -> cpu,cpuacct.
        let name = name.to_string_lossy();
        if name.contains(',') {
            for part in name.split(',') {
                let _ = std::os::unix::fs::symlink(&*name, dest.join(part));
            }
        }
    }
    if flags.contains(MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            dest,
            None::<&str>,
            MsFlags::MS_REMOUNT | flags,
            Some("mode=755"),
        )
        .map_err(sys(|| "remounting cgroup tmpfs read-only".into()))?;
    }
    Ok(())
}

/// What the container's `/sys/fs/cgroup` is made of.
#[derive(Debug, PartialEq, Eq)]
enum CgroupView {
    /// Pure cgroup v2: the container's cgroup directory, bound at the destination.
    Unified { source: PathBuf },
    /// v1 or hybrid: a tmpfs with one bind mount per host hierarchy, as (directory name,
    /// the container's cgroup directory in that hierarchy).
    Hierarchies(Vec<(std::ffi::OsString, PathBuf)>),
}

/// Plans the container's cgroup view from the host's mounts and the container's
/// `/proc/self/cgroup` (read before its cgroup namespace existed).
fn plan_cgroup_view(host: &[MountInfo], host_cgroups: &str) -> CgroupView {
    let root = Path::new("/sys/fs/cgroup");
    if host
        .iter()
        .any(|m| m.mount_point == root && m.fs_type == "cgroup2")
    {
        let path = own_cgroup_path(host_cgroups, "cgroup2", &[]).unwrap_or_default();
        return CgroupView::Unified {
            source: root.join(path.trim_start_matches('/')),
        };
    }
    let mut hierarchies = Vec::new();
    for m in host.iter().filter(|m| {
        (m.fs_type == "cgroup" || m.fs_type == "cgroup2") && m.mount_point.parent() == Some(root)
    }) {
        let Some(name) = m.mount_point.file_name() else {
            continue;
        };
        // v1: the controllers (or name=...) among the super options; v2: none.
        let controllers: Vec<&str> = m
            .super_options
            .split(',')
            .filter(|o| m.fs_type == "cgroup" && is_v1_controller_option(o))
            .collect();
        // A hierarchy we are not a member of is left out rather than exposing its root.
        if let Some(path) = own_cgroup_path(host_cgroups, &m.fs_type, &controllers) {
            hierarchies.push((
                name.to_os_string(),
                m.mount_point.join(path.trim_start_matches('/')),
            ));
        }
    }
    CgroupView::Hierarchies(hierarchies)
}

/// Whether a v1 cgroup super option names a controller (`memory`, `name=systemd`) rather
/// than a mount option (`rw`, `xattr`, `release_agent=...`).
fn is_v1_controller_option(option: &str) -> bool {
    if option.starts_with("name=") {
        return true;
    }
    !option.contains('=')
        && !matches!(
            option,
            "rw" | "ro"
                | "xattr"
                | "noprefix"
                | "clone_children"
                | "cpuset_v2_mode"
                | "none"
                | "all"
                | "favordynmods"
        )
}

/// The process's cgroup path in a hierarchy, from `/proc/self/cgroup`.
fn own_cgroup_path(proc_cgroup: &str, fs_type: &str, controllers: &[&str]) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if fs_type == "cgroup2" {
            ctrls.is_empty()
        } else {
            let mut a: Vec<&str> = ctrls.split(',').collect();
            let mut b: Vec<&str> = controllers.to_vec();
            a.sort_unstable();
            b.sort_unstable();
            !ctrls.is_empty() && a == b
        };
        matches.then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo_line(
            "36 35 98:0 /mnt1 /mnt\\040x rw,noatime master:1 - cgroup cgroup rw,cpu,cpuacct",
        )
        .unwrap();
        assert_eq!(m.mount_point, Path::new("/mnt x"));
        assert_eq!(m.fs_type, "cgroup");
        assert_eq!(m.super_options, "rw,cpu,cpuacct");
    }

    #[test]
    fn finds_own_cgroup_path() {
        let pc = "12:cpu,cpuacct:/a\n11:memory:/b\n1:name=systemd:/c\n0::/d\n";
        assert_eq!(
            own_cgroup_path(pc, "cgroup", &["cpuacct", "cpu"]).as_deref(),
            Some("/a")
        );
        assert_eq!(
            own_cgroup_path(pc, "cgroup", &["name=systemd"]).as_deref(),
            Some("/c")
        );
        assert_eq!(own_cgroup_path(pc, "cgroup2", &[]).as_deref(), Some("/d"));
    }

    fn info(mount_point: &str, fs_type: &str, super_options: &str) -> MountInfo {
        MountInfo {
            root: PathBuf::from("/"),
            mount_point: PathBuf::from(mount_point),
            fs_type: fs_type.into(),
            super_options: super_options.into(),
        }
    }

    #[test]
    fn pure_v2_binds_the_containers_own_cgroup() {
        let host = [
            info("/", "ext4", "rw"),
            info("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate"),
        ];
        assert_eq!(
            plan_cgroup_view(&host, "0::/palisade/web\n"),
            CgroupView::Unified {
                source: PathBuf::from("/sys/fs/cgroup/palisade/web")
            }
        );
    }

    #[test]
    fn hybrid_binds_each_hierarchy() {
        let host = [
            info("/sys/fs/cgroup", "tmpfs", "rw,mode=755"),
            info("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
            info("/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
            info("/sys/fs/cgroup/systemd", "cgroup", "rw,xattr,name=systemd"),
            info("/sys/fs/cgroup/unified", "cgroup2", "rw"),
            // Mounted, but we are not a member: left out.
            info("/sys/fs/cgroup/pids", "cgroup", "rw,pids"),
        ];
        let own = "4:memory:/palisade/web\n3:cpu,cpuacct:/palisade/web\n\
                   1:name=systemd:/user.slice\n0::/palisade/web\n";
        let CgroupView::Hierarchies(h) = plan_cgroup_view(&host, own) else {
            panic!("not hybrid");
        };
        let h: Vec<(String, String)> = h
            .into_iter()
            .map(|(n, p)| (n.to_string_lossy().into(), p.display().to_string()))
            .collect();
        assert_eq!(
            h,
            [
                (
                    "cpu,cpuacct".into(),
                    "/sys/fs/cgroup/cpu,cpuacct/palisade/web".into()
                ),
                ("memory".into(), "/sys/fs/cgroup/memory/palisade/web".into()),
                ("systemd".into(), "/sys/fs/cgroup/systemd/user.slice".into()),
                (
                    "unified".into(),
                    "/sys/fs/cgroup/unified/palisade/web".into()
                ),
            ]
        );
    }

    #[test]
    fn root_is_a_mount_point() {
        assert_eq!(mount_point_of(Path::new("/")).unwrap(), Path::new("/"));
    }
}
