//! Shared helpers of the runtime's integration tests. They run real containers and need
//! root (namespaces, mounts, cgroups); CI runs them as root.

#![allow(dead_code, unused_imports)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

pub use palisade_tests::bundle::{default_config, Bundle};
pub use serde_json::{json, Value};

/// A private state root and helpers to drive the `palisade` binary.
pub struct Palisade {
    root: tempfile::TempDir,
}

impl Palisade {
    pub fn new() -> Self {
        assert_eq!(nix::unistd::geteuid().as_raw(), 0, "these tests need root");
        Self {
            root: tempfile::Builder::new()
                .prefix("palisade-root-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade"));
        cmd.arg("--root").arg(self.root.path());
        cmd
    }

    /// Runs `palisade <args>` and returns its output. stdout/stderr go through files, not
    /// pipes: a created container inherits them and would keep pipes open until it exits.
    pub fn run(&self, args: &[&str]) -> Output {
        let stdout = tempfile::tempfile().unwrap();
        let stderr = tempfile::tempfile().unwrap();
        let status = self
            .cmd()
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(stdout.try_clone().unwrap())
            .stderr(stderr.try_clone().unwrap())
            .status()
            .unwrap();
        let read = |mut f: std::fs::File| {
            use std::io::{Read, Seek};
            let mut buf = Vec::new();
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut buf).unwrap();
            buf
        };
        Output {
            status,
            stdout: read(stdout),
            stderr: read(stderr),
        }
    }

    /// Runs `palisade <args>`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "palisade {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `palisade <args>`, asserting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "palisade {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `palisade run` of a bundle: (exit code, stdout, stderr).
    pub fn run_bundle(&self, id: &str, bundle: &Bundle) -> (i32, String, String) {
        let out = self.run(&["run", "--bundle", bundle.path().to_str().unwrap(), id]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    pub fn status(&self, id: &str) -> String {
        self.state(id)["status"].as_str().unwrap().to_string()
    }

    /// Asserts that nothing of container `id` is left: no state directory, no cgroup
    /// directory in any hierarchy, no mount of the bundle's rootfs.
    pub fn assert_no_leftovers(&self, id: &str, bundle: &Bundle) {
        assert!(
            !self.root().join(id).exists(),
            "state directory of {id} left behind"
        );
        let leaked = cgroup_dirs_named(id);
        assert!(leaked.is_empty(), "cgroups of {id} left behind: {leaked:?}");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let rootfs = bundle.rootfs();
        assert!(
            !mountinfo.contains(rootfs.to_str().unwrap()),
            "mounts of {} left behind",
            rootfs.display()
        );
    }
}

impl Drop for Palisade {
    fn drop(&mut self) {
        // Tests that failed half-way: remove what is left of their containers.
        if let Ok(entries) = std::fs::read_dir(self.root.path()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                let _ = self.run(&["delete", "--force", &id]);
            }
        }
    }
}

/// Directories named `name` in the cgroup hierarchies (up to 4 levels deep).
pub fn cgroup_dirs_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = e.path();
            if e.file_name().to_string_lossy() == name {
                found.push(p.clone());
            }
            if depth > 0 {
                walk(&p, name, depth - 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 4, &mut found);
    found
}

/// A unique container id for a test.
pub fn id(test: &str) -> String {
    format!("pt-{test}-{}", std::process::id())
}
