//! Host bind mounts of a VM-mode container: copied into the guest.
//!
//! The VM has no shared filesystem, so a bind mount's source (a file or a small
//! directory: Kubernetes' /etc/hosts, /etc/resolv.conf, /etc/hostname,
//! /dev/termination-log, secrets, config maps, `ctr run --mount type=bind`) is read on the
//! host when the container is created and sent to the agent with CopyFile; the mount's
//! source in the guest's spec is rewritten to the guest copy. Options (`ro`, ...) stay as
//! they are, so a read-only mount stays read-only.
//!
//! What this means, and what is refused (the create fails with an error naming the mount,
//! rather than a container silently running without data it asked for):
//! - A copy is a snapshot: later changes on the host (a config map update) do not reach
//!   the guest, and writes in the guest (a termination message) do not reach the host.
//! - Directories are copied recursively; symlinks inside them are copied as symlinks
//!   (never followed on the host), so Kubernetes' `..data` layout keeps working; a
//!   symlinked source itself is followed, as a bind mount would.
//! - Sockets, devices and FIFOs cannot be copied: refused.
//! - Bounded: [`MAX_FILE_BYTES`] per file, [`MAX_TOTAL_BYTES`] and [`MAX_ENTRIES`] for
//!   all mounts of a container; bigger trees are refused.

use std::{
    fs,
    io::Read,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use palisade_agent_protocol::{
    agent::{CopyFileRequest, FileKind},
    agent_ttrpc::AgentClient,
};

use super::{agent::deadline, agent_error};
use crate::sandbox::{TaskError, TaskResult};

/// Largest file copied.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// All copied bytes of one container.
pub const MAX_TOTAL_BYTES: u64 = 16 << 20;
/// All copied entries (files, directories, symlinks) of one container.
pub const MAX_ENTRIES: usize = 4096;
/// Data per CopyFile request (the agent's limit).
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("mounts[{index}] (bind {source_path} -> {destination}): {why}")]
pub struct MountError {
    pub index: usize,
    pub source_path: String,
    pub destination: String,
    pub why: String,
}

/// One entry of a copied mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative path inside the copy; empty for its root.
    pub path: String,
    pub kind: FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub data: Vec<u8>,
    pub symlink_target: String,
}

/// A bind mount of the spec and its host content.
#[derive(Debug)]
pub struct MountCopy {
    /// Index in the spec's `mounts`.
    pub index: usize,
    /// The copy's name in the guest (`m<index>`).
    pub name: String,
    pub entries: Vec<Entry>,
}

/// Whether an OCI mount (JSON) is a bind mount.
pub fn is_bind(mount: &serde_json::Value) -> bool {
    mount.get("type").and_then(|t| t.as_str()) == Some("bind")
        || mount
            .get("options")
            .and_then(|o| o.as_array())
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Reads the host side of every bind mount in `spec` (relative sources are relative to
/// `bundle`), within the bounds. Blocking.
pub fn collect(spec: &serde_json::Value, bundle: &Path) -> Result<Vec<MountCopy>, MountError> {
    let Some(mounts) = spec.get("mounts").and_then(|m| m.as_array()) else {
        return Ok(Vec::new());
    };
    let mut budget = Budget::default();
    let mut copies = Vec::new();
    for (index, mount) in mounts.iter().enumerate() {
        if !is_bind(mount) {
            continue;
        }
        let text = |key: &str| {
            mount
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let (source, destination) = (text("source"), text("destination"));
        let error = |why: String| MountError {
            index,
            source_path: source.clone(),
            destination: destination.clone(),
            why,
        };
        if source.is_empty() {
            return Err(error("no source".into()));
        }
        let host = bundle.join(&source);
        let entries = read_tree(&host, &mut budget).map_err(error)?;
        copies.push(MountCopy {
            index,
            name: format!("m{index}"),
            entries,
        });
    }
    Ok(copies)
}

#[derive(Default)]
struct Budget {
    bytes: u64,
    entries: usize,
}

impl Budget {
    fn take(&mut self, bytes: u64) -> Result<(), String> {
        self.entries += 1;
        self.bytes += bytes;
        if self.entries > MAX_ENTRIES {
            return Err(format!(
                "more than {MAX_ENTRIES} files and directories in the container's bind \
                 mounts: too big to copy into the VM"
            ));
        }
        if self.bytes > MAX_TOTAL_BYTES {
            return Err(format!(
                "more than {} MiB in the container's bind mounts: too big to copy into the VM",
                MAX_TOTAL_BYTES >> 20
            ));
        }
        Ok(())
    }
}

/// The entries of the tree at `root` (parents before children), with file contents.
fn read_tree(root: &Path, budget: &mut Budget) -> Result<Vec<Entry>, String> {
    // The root is followed like a bind mount follows its source.
    let meta = fs::metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut entries = Vec::new();
    let mut stack: Vec<(PathBuf, String, fs::Metadata)> =
        vec![(root.to_path_buf(), String::new(), meta)];
    while let Some((host, rel, meta)) = stack.pop() {
        let shown = if rel.is_empty() { "the source" } else { &rel };
        let ft = meta.file_type();
        let mut entry = Entry {
            path: rel.clone(),
            kind: FileKind::REGULAR,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            data: Vec::new(),
            symlink_target: String::new(),
        };
        if ft.is_dir() {
            entry.kind = FileKind::DIRECTORY;
            budget.take(0)?;
            let mut children: Vec<_> = fs::read_dir(&host)
                .and_then(|dir| dir.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", host.display()))?;
            children.sort_by_key(|c| c.file_name());
            // Reversed onto the stack: popped in name order, after this directory.
            for child in children.into_iter().rev() {
                let name = child.file_name();
                let name = name.to_str().ok_or_else(|| {
                    format!("{}: a file name that is not UTF-8", child.path().display())
                })?;
                let meta = fs::symlink_metadata(child.path())
                    .map_err(|e| format!("{}: {e}", child.path().display()))?;
                let rel = if rel.is_empty() {
                    name.to_owned()
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((child.path(), rel, meta));
            }
        } else if ft.is_symlink() {
            entry.kind = FileKind::SYMLINK;
            let target = fs::read_link(&host).map_err(|e| format!("{}: {e}", host.display()))?;
            entry.symlink_target = target
                .to_str()
                .ok_or_else(|| format!("{}: a symlink target that is not UTF-8", host.display()))?
                .to_owned();
            budget.take(0)?;
        } else if ft.is_file() {
            entry.data = read_file(&host, !rel.is_empty())?;
            budget.take(entry.data.len() as u64)?;
        } else {
            let what = if ft.is_socket() {
                "a socket"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_block_device() || ft.is_char_device() {
                "a device"
            } else {
                "a special file"
            };
            return Err(format!(
                "{shown} is {what}, which cannot be copied into the VM (VM mode has no \
                 shared filesystem; use native mode for this container)"
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Reads a regular file (bounded); `nofollow` for entries found inside a directory.
fn read_file(path: &Path, nofollow: bool) -> Result<Vec<u8>, String> {
    let shown = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut flags = libc::O_NONBLOCK;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(shown)?;
    // It may have changed since it was listed.
    if !file.metadata().map_err(shown)?.is_file() {
        return Err(format!("{}: no longer a regular file", path.display()));
    }
    let mut data = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(shown)?;
    if data.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "{}: larger than {} MiB, too big to copy into the VM",
            path.display(),
            MAX_FILE_BYTES >> 20
        ));
    }
    Ok(data)
}

/// Sends every copy to the agent for `container_id`; returns (mount index, guest path).
pub async fn copy_into_guest(
    agent: &AgentClient,
    timeout: Duration,
    container_id: &str,
    copies: &[MountCopy],
) -> TaskResult<Vec<(usize, String)>> {
    let mut sources = Vec::with_capacity(copies.len());
    for copy in copies {
        let mut root = None;
        for entry in &copy.entries {
            let mut offset = 0usize;
            // Empty files are one request too.
            loop {
                let end = (offset + CHUNK).min(entry.data.len());
                let request = CopyFileRequest {
                    container_id: container_id.to_owned(),
                    name: copy.name.clone(),
                    path: entry.path.clone(),
                    kind: entry.kind.into(),
                    mode: entry.mode,
                    uid: entry.uid,
                    gid: entry.gid,
                    data: entry.data[offset..end].to_vec(),
                    offset: offset as u64,
                    symlink_target: entry.symlink_target.clone(),
                    ..Default::default()
                };
                let response = agent
                    .copy_file(deadline(timeout), &request)
                    .await
                    .map_err(|e| {
                        agent_error(
                            &format!("CopyFile mounts[{}] {:?}", copy.index, entry.path),
                            e,
                        )
                    })?;
                root.get_or_insert(response.guest_path);
                offset = end;
                if offset >= entry.data.len() {
                    break;
                }
            }
        }
        let root = root.ok_or_else(|| {
            TaskError::Internal(format!("mounts[{}]: nothing was copied", copy.index))
        })?;
        sources.push((copy.index, root));
    }
    Ok(sources)
}

/// Points the copied mounts of `spec` at their guest copies.
pub fn rewrite(spec: &mut serde_json::Value, sources: &[(usize, String)]) {
    let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
        return;
    };
    for (index, guest_path) in sources {
        if let Some(source) = mounts.get_mut(*index).and_then(|m| m.as_object_mut()) {
            source.insert("source".into(), guest_path.clone().into());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn spec(mounts: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "ociVersion": "1.0.2", "mounts": mounts })
    }

    #[test]
    fn files_and_trees_are_read_with_symlinks_kept() {
        let host = tempfile::tempdir().unwrap();
        let file = host.path().join("hosts");
        fs::write(&file, "127.0.0.1 localhost\n").unwrap();
        let secret = host.path().join("secret");
        fs::create_dir_all(secret.join("..2024_01/sub")).unwrap();
        fs::write(secret.join("..2024_01/token"), "s3cr3t").unwrap();
        fs::write(secret.join("..2024_01/sub/x"), "").unwrap();
        symlink("..2024_01", secret.join("..data")).unwrap();
        symlink("..data/token", secret.join("token")).unwrap();
        // A symlink pointing outside is copied as a link, its target never read.
        symlink("/etc/shadow", secret.join("evil")).unwrap();

        let spec = spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "ro"]},
            {"destination": "/var/run/secrets", "source": secret, "options": ["rbind"]},
        ]));
        let copies = collect(&spec, host.path()).unwrap();
        assert_eq!(copies.len(), 2);
        assert_eq!((copies[0].index, copies[0].name.as_str()), (1, "m1"));
        assert_eq!(copies[0].entries.len(), 1);
        assert_eq!(copies[0].entries[0].kind, FileKind::REGULAR);
        assert_eq!(copies[0].entries[0].data, b"127.0.0.1 localhost\n");
        assert_eq!(copies[0].entries[0].path, "");

        let tree: Vec<(&str, FileKind)> = copies[1]
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind))
            .collect();
        assert_eq!(
            tree,
            [
                ("", FileKind::DIRECTORY),
                ("..2024_01", FileKind::DIRECTORY),
                ("..2024_01/sub", FileKind::DIRECTORY),
                ("..2024_01/sub/x", FileKind::REGULAR),
                ("..2024_01/token", FileKind::REGULAR),
                ("..data", FileKind::SYMLINK),
                ("evil", FileKind::SYMLINK),
                ("token", FileKind::SYMLINK),
            ]
        );
        let evil = &copies[1].entries[6];
        assert_eq!(evil.symlink_target, "/etc/shadow");
        assert!(evil.data.is_empty());
    }

    #[test]
    fn the_rewrite_points_sources_at_the_guest_and_keeps_options() {
        let mut spec = spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/host/hosts", "options": ["rbind", "ro"]},
        ]));
        rewrite(&mut spec, &[(1, "/run/palisade/copies/c/m1".into())]);
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(spec["mounts"][1]["source"], "/run/palisade/copies/c/m1");
        assert_eq!(
            spec["mounts"][1]["options"],
            serde_json::json!(["rbind", "ro"])
        );
        assert_eq!(spec["mounts"][1]["destination"], "/etc/hosts");
    }

    #[test]
    fn what_cannot_be_copied_fails_naming_the_mount() {
        let host = tempfile::tempdir().unwrap();
        let sock = host.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let in_dir = host.path().join("d");
        fs::create_dir(&in_dir).unwrap();
        nix::unistd::mkfifo(&in_dir.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let big = host.path().join("big");
        fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let many = host.path().join("many");
        fs::create_dir(&many).unwrap();
        for i in 0..=MAX_ENTRIES {
            fs::write(many.join(i.to_string()), "").unwrap();
        }
        let cases = [
            (sock.display().to_string(), "a socket"),
            ("/dev/null".to_string(), "a device"),
            (in_dir.display().to_string(), "fifo is a FIFO"),
            (big.display().to_string(), "too big"),
            (many.display().to_string(), "more than 4096"),
            ("/nonexistent/x".to_string(), "No such file"),
        ];
        for (source, needle) in cases {
            let spec = spec(serde_json::json!([
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": source},
            ]));
            let err = collect(&spec, host.path()).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("mounts[1] (bind {source} -> /data): ")),
                "{err}"
            );
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }

    #[test]
    fn the_total_is_bounded_across_mounts() {
        let host = tempfile::tempdir().unwrap();
        let file = host.path().join("f");
        fs::File::create(&file)
            .unwrap()
            .set_len(MAX_TOTAL_BYTES / 2 + 1)
            .unwrap();
        let spec = spec(serde_json::json!([
            {"destination": "/a", "type": "bind", "source": file},
            {"destination": "/b", "type": "bind", "source": file},
        ]));
        let err = collect(&spec, host.path()).unwrap_err().to_string();
        assert!(err.starts_with("mounts[1]"), "{err}");
        assert!(err.contains("MiB"), "{err}");
    }
}
