//! Container state on disk: one directory per container under the runtime root
//! (default `/run/palisade/<id>`), holding `state.json` (written atomically) and, between
//! create and start, the `exec.fifo` the init blocks on.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::{
    cgroups::Cgroup,
    error::{Context, Error, Result},
    utils,
};

/// Default runtime root, as `runc` uses `/run/runc`.
pub const DEFAULT_ROOT: &str = "/run/palisade";
/// The persisted state inside a container's directory.
pub const STATE_FILE: &str = "state.json";
/// The fifo the init blocks on (opening it for writing) until `start` reads it.
pub const EXEC_FIFO: &str = "exec.fifo";
/// OCI runtime-spec version this runtime implements.
pub const OCI_VERSION: &str = "1.2.0";

/// The lifecycle status of a container, as the OCI state reports it (`paused` is runc's
/// extension, which containerd understands).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// The OCI state of a container (what `palisade state` prints and hooks read on stdin).
/// Field names follow the runtime-spec plus runc's `rootfs`, `created` and `owner`, which
/// containerd's go-runc parses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// What the runtime keeps about a container between CLI invocations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Persisted {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// Host pid of the container's init (0 while creating).
    pub pid: i32,
    /// Start time of the init (clock ticks since boot), guards against pid reuse.
    pub pid_start_time: u64,
    pub created: String,
    pub paused: bool,
    pub cgroup: Cgroup,
    /// The spec as it was at create (plus `update`s), so that exec and update do not
    /// depend on the bundle staying unchanged.
    pub spec: Spec,
}

/// Checks a container id: it names a directory under the root, so it must not be able to
/// climb out of it or hide.
pub fn validate_id(id: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidId {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("must not be empty");
    }
    // It is a directory name: NAME_MAX bytes at most.
    if id.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if id == "." {
        return bad("must not be \".\"");
    }
    if id.contains("..") {
        return bad("must not contain \"..\"");
    }
    if id.contains('/') {
        return bad("must not contain \"/\"");
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+' | ':' | '@'))
    {
        return bad("may only contain [A-Za-z0-9_+.:@-]");
    }
    Ok(())
}

/// The state directory of one container.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path, id: &str) -> Self {
        Self {
            path: root.join(id),
        }
    }

    /// Creates the directory; fails with [`Error::AlreadyExists`] if it exists, which is
    /// what makes `create` of a duplicate id fail atomically.
    pub fn create(&self, id: &str) -> Result<()> {
        match fs::DirBuilder::new().mode(0o711).create(&self.path) {
            Ok(()) => {
                // The mode is masked by umask; the init (maybe non-root) needs to search it
                // to open the exec fifo.
                fs::set_permissions(&self.path, fs::Permissions::from_mode(0o711))
                    .context(|| format!("chmod {}", self.path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(Error::AlreadyExists(id.to_string()))
            }
            Err(e) => Err(e).context(|| format!("creating {}", self.path.display())),
        }
    }

    pub fn exists(&self) -> bool {
        self.path.join(STATE_FILE).exists()
    }

    pub fn fifo(&self) -> PathBuf {
        self.path.join(EXEC_FIFO)
    }

    pub fn save(&self, state: &Persisted) -> Result<()> {
        let data = serde_json::to_vec(state).context(|| "serializing state".into())?;
        utils::write_atomic(&self.path.join(STATE_FILE), &data)
    }

    pub fn load(&self, id: &str) -> Result<Persisted> {
        let path = self.path.join(STATE_FILE);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(id.to_string()))
            }
            Err(e) => return Err(e).context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&data).context(|| format!("parsing {}", path.display()))
    }

    pub fn remove(&self) -> Result<()> {
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).context(|| format!("removing {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_escape_are_rejected() {
        for id in ["", "..", "a/b", "../x", "a..b", "a b"] {
            assert!(validate_id(id).is_err(), "{id:?}");
        }
        for id in ["abc", "a-b_c.d", "k8s_pod:1@x+y"] {
            validate_id(id).unwrap();
        }
        assert_eq!(
            validate_id("a/b").unwrap_err().to_string(),
            "invalid container id \"a/b\": must not contain \"/\""
        );
        assert_eq!(
            validate_id(".").unwrap_err().to_string(),
            "invalid container id \".\": must not be \".\""
        );
        // A directory name: at most NAME_MAX (255) bytes, refused by name before mkdir.
        validate_id(&"x".repeat(255)).unwrap();
        assert!(validate_id(&"x".repeat(256))
            .unwrap_err()
            .to_string()
            .ends_with("longer than 255 bytes"));
    }

    #[test]
    fn duplicate_create_fails() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path(), "x");
        sd.create("x").unwrap();
        assert!(matches!(sd.create("x"), Err(Error::AlreadyExists(_))));
    }
}
