//! CopyFile: host bind mounts copied into the guest (there is no shared filesystem).
//!
//! Each copied mount is a tree at `<copies>/<container_id>/<name>`, built entry by entry
//! from CopyFile requests; the shim then points the container's bind mount at it. The
//! agent trusts nothing in a request: names and relative paths are checked component by
//! component, every existing path component is opened with `O_NOFOLLOW` relative to its
//! parent's descriptor (so a symlink — e.g. one a container planted in a writable copy —
//! is never followed), regular files are checked to be regular after opening, and sizes
//! are bounded per request, per file and per container.

use std::{
    collections::HashMap,
    fs,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::FileExt,
    },
    path::{Component, Path, PathBuf},
    sync::Mutex,
};

use nix::{
    errno::Errno,
    fcntl::{openat, AtFlags, OFlag},
    sys::stat::{fchmod, fstat, mkdirat, Mode, SFlag},
    unistd::{fchown, fchownat, symlinkat, Gid, Uid},
};
use palisade_agent_protocol::agent::{CopyFileRequest, FileKind};

use crate::{
    containers::validate_id,
    error::{AgentError, Context, Result},
    storage::is_name,
};

/// Data in one request.
pub const MAX_COPY_CHUNK: usize = 1 << 20;
/// Size of one copied file.
pub const MAX_COPY_FILE: u64 = 16 << 20;
/// Bytes copied for one container (all its mounts), counted as written.
pub const MAX_COPY_BYTES_PER_CONTAINER: u64 = 64 << 20;
/// Entries (files, directories, symlinks) copied for one container.
pub const MAX_COPY_ENTRIES_PER_CONTAINER: u64 = 16 << 10;
const MAX_PATH: usize = 4096;
const MAX_COMPONENT: usize = 255;
const MAX_NAME: usize = 64;

#[derive(Default, Clone, Copy)]
struct Usage {
    bytes: u64,
    entries: u64,
}

/// The copies of all containers of the sandbox.
pub struct Copies {
    dir: PathBuf,
    usage: Mutex<HashMap<String, Usage>>,
}

impl Copies {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            usage: Mutex::new(HashMap::new()),
        }
    }

    /// Applies one CopyFile request; returns the guest path of the copy's root. Blocking.
    pub fn copy(&self, req: &CopyFileRequest) -> Result<PathBuf> {
        validate_id("container_id", &req.container_id)?;
        if req.name.len() > MAX_NAME || !is_name(&req.name) || req.name.starts_with('.') {
            return Err(AgentError::invalid(
                "name",
                format!("{:?} is not a name ([A-Za-z0-9._-]{{1,64}})", req.name),
            ));
        }
        let components = relative_components(&req.path)?;
        let kind = req
            .kind
            .enum_value()
            .map_err(|v| AgentError::invalid("kind", format!("{v} is not a FileKind")))?;
        if req.mode & !0o7777 != 0 {
            return Err(AgentError::invalid(
                "mode",
                format!("{:#o} has bits beyond 07777", req.mode),
            ));
        }
        if req.data.len() > MAX_COPY_CHUNK {
            return Err(AgentError::invalid(
                "data",
                format!(
                    "{} bytes exceeds the {MAX_COPY_CHUNK}-byte limit",
                    req.data.len()
                ),
            ));
        }
        if kind != FileKind::REGULAR && (!req.data.is_empty() || req.offset != 0) {
            return Err(AgentError::invalid(
                "data",
                "only a regular file carries data",
            ));
        }
        if kind == FileKind::REGULAR
            && req.offset.saturating_add(req.data.len() as u64) > MAX_COPY_FILE
        {
            return Err(AgentError::invalid(
                "offset",
                format!("the file would exceed the {MAX_COPY_FILE}-byte limit"),
            ));
        }
        if kind == FileKind::SYMLINK {
            let target = &req.symlink_target;
            if components.is_empty() {
                return Err(AgentError::invalid(
                    "kind",
                    "the root of a copy cannot be a symlink",
                ));
            }
            if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
                return Err(AgentError::invalid(
                    "symlink_target",
                    format!("{target:?} is not a symlink target"),
                ));
            }
        } else if !req.symlink_target.is_empty() {
            return Err(AgentError::invalid(
                "symlink_target",
                "only a symlink has a target",
            ));
        }
        self.charge(&req.container_id, req.data.len() as u64)?;

        let base = self.dir.join(&req.container_id);
        fs::create_dir_all(&base).context(|| format!("creating {}", base.display()))?;
        let root = base.join(&req.name);
        let (parent, leaf) = match components.split_last() {
            None => {
                // A new root replaces what an earlier attempt left under this name.
                remove_any(&root)?;
                (open_dir(&base)?, req.name.as_str())
            }
            Some((leaf, dirs)) => {
                let mut dir = open_dir(&root)?;
                for (i, component) in dirs.iter().enumerate() {
                    dir = openat(
                        dir.as_fd(),
                        *component,
                        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| {
                        AgentError::invalid(
                            "path",
                            format!(
                                "{:?}: parent {:?} is not a copied directory ({e})",
                                req.path,
                                dirs[..=i].join("/")
                            ),
                        )
                    })?;
                }
                (dir, *leaf)
            }
        };
        let mode = Mode::from_bits_truncate(req.mode);
        let (uid, gid) = (Some(Uid::from_raw(req.uid)), Some(Gid::from_raw(req.gid)));
        let what = || {
            format!(
                "copy {:?} of {:?}: {:?}",
                req.name, req.container_id, req.path
            )
        };
        match kind {
            FileKind::DIRECTORY => {
                match mkdirat(parent.as_fd(), leaf, Mode::from_bits_truncate(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e).context(what),
                }
                let dir = openat(
                    parent.as_fd(),
                    leaf,
                    OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .context(what)?;
                fchown(dir.as_fd(), uid, gid).context(what)?;
                fchmod(dir.as_fd(), mode).context(what)?;
            }
            FileKind::REGULAR => {
                let mut flags =
                    OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
                if req.offset == 0 {
                    flags |= OFlag::O_CREAT | OFlag::O_TRUNC;
                }
                let fd = openat(parent.as_fd(), leaf, flags, Mode::from_bits_truncate(0o600))
                    .context(what)?;
                let stat = fstat(fd.as_fd()).context(what)?;
                if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                    return Err(AgentError::invalid(
                        "path",
                        format!("{:?} exists and is not a regular file", req.path),
                    ));
                }
                if stat.st_size as u64 != req.offset {
                    return Err(AgentError::invalid(
                        "offset",
                        format!(
                            "{} is not the end of {:?} ({} bytes)",
                            req.offset, req.path, stat.st_size
                        ),
                    ));
                }
                let file = fs::File::from(fd);
                file.write_all_at(&req.data, req.offset).context(what)?;
                fchown(file.as_fd(), uid, gid).context(what)?;
                fchmod(file.as_fd(), mode).context(what)?;
            }
            FileKind::SYMLINK => {
                symlinkat(req.symlink_target.as_str(), parent.as_fd(), leaf).context(what)?;
                fchownat(parent.as_fd(), leaf, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .context(what)?;
            }
        }
        Ok(root)
    }

    /// Counts one entry (a first chunk) and `bytes` against the container's bounds.
    fn charge(&self, container_id: &str, bytes: u64) -> Result<()> {
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let entry = usage.entry(container_id.to_owned()).or_default();
        let next = Usage {
            bytes: entry.bytes + bytes,
            entries: entry.entries + 1,
        };
        if next.bytes > MAX_COPY_BYTES_PER_CONTAINER
            || next.entries > MAX_COPY_ENTRIES_PER_CONTAINER
        {
            return Err(AgentError::FailedPrecondition(format!(
                "copies for container {container_id:?} exceed the limits \
                 ({MAX_COPY_BYTES_PER_CONTAINER} bytes, {MAX_COPY_ENTRIES_PER_CONTAINER} entries)"
            )));
        }
        *entry = next;
        Ok(())
    }

    /// Removes every copy made for `container_id` (best effort, logged). Blocking.
    pub fn remove(&self, container_id: &str) {
        if validate_id("container_id", container_id).is_err() {
            return;
        }
        self.usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(container_id);
        let base = self.dir.join(container_id);
        if let Err(e) = fs::remove_dir_all(&base) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", base.display());
            }
        }
    }

    /// Removes the copies of every container. Blocking.
    pub fn remove_all(&self) {
        self.usage.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.dir.display());
            }
        }
    }
}

/// The components of a relative path made only of plain names.
fn relative_components(path: &str) -> Result<Vec<&str>> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |why: &str| AgentError::invalid("path", format!("{path:?}: {why}"));
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(bad("too long or contains NUL"));
    }
    let mut out = Vec::new();
    for (component, raw) in Path::new(path).components().zip(path.split('/')) {
        match component {
            Component::Normal(_) if raw.len() <= MAX_COMPONENT && !raw.is_empty() => out.push(raw),
            _ => return Err(bad("not a relative path of plain names")),
        }
    }
    // `components()` drops empty and `.` parts silently; the split must agree.
    if out.len() != path.split('/').count() {
        return Err(bad("not a relative path of plain names"));
    }
    Ok(out)
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    openat(
        nix::fcntl::AT_FDCWD,
        path,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .context(|| format!("opening {}", path.display()))
}

/// Removes a file or a tree at `path` (symlinks are removed, not followed).
fn remove_any(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.context(|| format!("removing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_plain_names_only() {
        assert_eq!(relative_components("").unwrap(), Vec::<&str>::new());
        assert_eq!(relative_components("a/b.txt").unwrap(), ["a", "b.txt"]);
        assert_eq!(relative_components("..data").unwrap(), ["..data"]);
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "./a",
            "a/",
            "a\0b",
            &"x/".repeat(3000),
        ] {
            assert!(relative_components(bad).is_err(), "{bad:?} accepted");
        }
        assert!(relative_components(&"n".repeat(256)).is_err());
    }

    fn request(name: &str, path: &str, kind: FileKind, data: &[u8]) -> CopyFileRequest {
        CopyFileRequest {
            container_id: "c1".into(),
            name: name.into(),
            path: path.into(),
            kind: kind.into(),
            mode: 0o644,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            data: data.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn copies_a_tree_and_never_follows_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let copies = Copies::new(tmp.path().join("copies"));
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();

        let root = copies
            .copy(&request("m0", "", FileKind::DIRECTORY, b""))
            .unwrap();
        assert_eq!(root, tmp.path().join("copies/c1/m0"));
        copies
            .copy(&request("m0", "a.txt", FileKind::REGULAR, b"hello "))
            .unwrap();
        let mut next = request("m0", "a.txt", FileKind::REGULAR, b"world");
        next.offset = 6;
        copies.copy(&next).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("a.txt")).unwrap(),
            "hello world"
        );
        // A chunk that does not continue the file is refused.
        next.offset = 100;
        assert!(copies.copy(&next).is_err());

        let mut link = request("m0", "link", FileKind::SYMLINK, b"");
        link.symlink_target = outside.display().to_string();
        copies.copy(&link).unwrap();
        assert_eq!(fs::read_link(root.join("link")).unwrap(), outside);
        // Writing through the symlink, or into it as a directory, fails.
        let err = copies
            .copy(&request("m0", "link", FileKind::REGULAR, b"x"))
            .unwrap_err();
        assert!(err.to_string().contains("link"), "{err}");
        assert!(copies
            .copy(&request("m0", "link/evil", FileKind::REGULAR, b"x"))
            .is_err());
        assert!(copies
            .copy(&request("m0", "link", FileKind::DIRECTORY, b""))
            .is_err());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // A parent that was never copied.
        assert!(copies
            .copy(&request("m0", "missing/x", FileKind::REGULAR, b"x"))
            .is_err());

        // A new root replaces the old tree.
        copies
            .copy(&request("m0", "", FileKind::REGULAR, b"single"))
            .unwrap();
        assert_eq!(fs::read_to_string(&root).unwrap(), "single");

        copies.remove("c1");
        assert!(!tmp.path().join("copies/c1").exists());
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let copies = Copies::new(tmp.path().to_path_buf());
        let field = |req: CopyFileRequest| match copies.copy(&req) {
            Err(AgentError::InvalidArgument { field, .. }) => field,
            other => panic!("{req:?}: {other:?}"),
        };
        let mut r = request("m0", "", FileKind::REGULAR, b"");
        r.container_id = "../x".into();
        assert_eq!(field(r), "container_id");
        assert_eq!(field(request("../m", "", FileKind::REGULAR, b"")), "name");
        assert_eq!(field(request(".m", "", FileKind::REGULAR, b"")), "name");
        assert_eq!(field(request("m", "../x", FileKind::REGULAR, b"")), "path");
        let mut r = request("m", "", FileKind::REGULAR, b"");
        r.mode = 0o100644;
        assert_eq!(field(r), "mode");
        assert_eq!(
            field(request(
                "m",
                "",
                FileKind::REGULAR,
                &vec![0; MAX_COPY_CHUNK + 1]
            )),
            "data"
        );
        let mut r = request("m", "", FileKind::REGULAR, b"x");
        r.offset = MAX_COPY_FILE;
        assert_eq!(field(r), "offset");
        assert_eq!(field(request("m", "", FileKind::SYMLINK, b"")), "kind");
        assert_eq!(field(request("m", "", FileKind::DIRECTORY, b"x")), "data");
        let mut r = request("m", "", FileKind::REGULAR, b"");
        r.symlink_target = "/x".into();
        assert_eq!(field(r), "symlink_target");
    }
}
