//! Reading and writing cgroup files, with errors that name the controller, file and value.
//!
//! Controllers turn resources into [`Setting`]s with pure functions (unit tested without a
//! cgroup); the few decisions that depend on the live cgroup (does `blkio.weight` exist, what
//! is the current limit) go through the [`Probe`] trait.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use super::CgroupError;

/// One value to write into one file of a controller's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setting {
    pub file: String,
    pub value: String,
}

impl Setting {
    pub fn new(file: impl Into<String>, value: impl ToString) -> Self {
        Setting {
            file: file.into(),
            value: value.to_string(),
        }
    }
}

/// What controllers may ask about the cgroup they configure.
pub(crate) trait Probe {
    /// Whether `file` exists in the cgroup directory.
    fn exists(&self, file: &str) -> bool;
    /// The numeric content of `file` (`max` as `i64::MAX`), if readable.
    fn read_i64(&self, file: &str) -> Option<i64>;
}

/// [`Probe`] of a real cgroup directory.
pub(crate) struct DirProbe<'a>(pub &'a Path);

impl Probe for DirProbe<'_> {
    fn exists(&self, file: &str) -> bool {
        self.0.join(file).exists()
    }

    fn read_i64(&self, file: &str) -> Option<i64> {
        let text = fs::read_to_string(self.0.join(file)).ok()?;
        let text = text.trim();
        if text == "max" {
            Some(i64::MAX)
        } else {
            text.parse().ok()
        }
    }
}

/// Writes `value` to `dir/file` in a single `write(2)` (cgroup files take one value per
/// write) without creating or truncating anything.
pub(crate) fn write(
    controller: &'static str,
    dir: &Path,
    file: &str,
    value: &str,
) -> Result<(), CgroupError> {
    let path = dir.join(file);
    tracing::debug!(path = %path.display(), value, "cgroup write");
    let result = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    result.map_err(|source| CgroupError::Write {
        controller,
        path,
        value: value.to_string(),
        source,
    })
}

/// Applies settings in order.
pub(crate) fn write_all(
    controller: &'static str,
    dir: &Path,
    settings: &[Setting],
) -> Result<(), CgroupError> {
    settings
        .iter()
        .try_for_each(|s| write(controller, dir, &s.file, &s.value))
}

pub(crate) fn read(
    controller: &'static str,
    dir: &Path,
    file: &str,
) -> Result<String, CgroupError> {
    let path = dir.join(file);
    fs::read_to_string(&path).map_err(|source| CgroupError::Read {
        controller,
        path,
        source,
    })
}

/// Like [`read`] but a missing file is `None` (optional kernel features).
pub(crate) fn read_optional(
    controller: &'static str,
    dir: &Path,
    file: &str,
) -> Result<Option<String>, CgroupError> {
    match read(controller, dir, file) {
        Ok(s) => Ok(Some(s)),
        Err(CgroupError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Parses a single number; `max` (v2's "unlimited") is `u64::MAX`.
pub(crate) fn parse_u64(path: &Path, text: &str) -> Result<u64, CgroupError> {
    let text = text.trim();
    if text == "max" {
        return Ok(u64::MAX);
    }
    // v1 reports "unlimited" as a huge value, and a few files can be -1.
    if text == "-1" {
        return Ok(u64::MAX);
    }
    text.parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        msg: format!("expected a number, found {text:?}"),
    })
}

/// Reads an optional numeric file: missing → `None`.
pub(crate) fn read_u64_optional(
    controller: &'static str,
    dir: &Path,
    file: &str,
) -> Result<Option<u64>, CgroupError> {
    read_optional(controller, dir, file)?
        .map(|t| parse_u64(&dir.join(file), &t))
        .transpose()
}

/// Parses "key value" lines (memory.stat, cpu.stat, memory.events, ...). Lines that do not
/// have a numeric value are skipped.
pub(crate) fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(char::is_whitespace)?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Reads a flat-keyed file; a missing file is an empty map.
pub(crate) fn read_flat_keyed(
    controller: &'static str,
    dir: &Path,
    file: &str,
) -> Result<BTreeMap<String, u64>, CgroupError> {
    Ok(read_optional(controller, dir, file)?
        .map(|t| parse_flat_keyed(&t))
        .unwrap_or_default())
}

/// Pids listed in `dir/cgroup.procs`.
pub(crate) fn procs(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read {
        controller: "cgroup",
        path: path.clone(),
        source,
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse().map_err(|_| CgroupError::Parse {
                path: path.clone(),
                msg: format!("bad pid {l:?}"),
            })
        })
        .collect()
}

/// `dir` and all its descendant cgroup directories, parents before children.
pub(crate) fn subtree(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let current = out[i].clone();
        let entries = match fs::read_dir(&current) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                i += 1;
                continue;
            }
            Err(source) => {
                return Err(CgroupError::Io {
                    context: format!("read directory {}", current.display()),
                    source,
                })
            }
        };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(entry.path());
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Pids of `dir` and of every cgroup below it (a container may create nested cgroups).
pub(crate) fn procs_recursive(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let mut pids = Vec::new();
    for d in subtree(dir)? {
        match procs(&d) {
            Ok(p) => pids.extend(p),
            // Removed between listing and reading.
            Err(CgroupError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// `mkdir -p`, mode 0755.
pub(crate) fn create_dir_all(dir: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(dir).map_err(|source| CgroupError::Io {
        context: format!("create {}", dir.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_parses_numbers_only() {
        let m = parse_flat_keyed(
            "cache 10\nrss 20\nbogus x\nhierarchical_memory_limit 9223372036854771712\n",
        );
        assert_eq!(m["cache"], 10);
        assert_eq!(m["rss"], 20);
        assert!(!m.contains_key("bogus"));
        assert_eq!(m["hierarchical_memory_limit"], 9223372036854771712);
    }

    #[test]
    fn max_is_unlimited() {
        assert_eq!(parse_u64(Path::new("x"), "max\n").unwrap(), u64::MAX);
        assert_eq!(parse_u64(Path::new("x"), "42\n").unwrap(), 42);
        assert!(parse_u64(Path::new("x"), "nope").is_err());
    }
}

/// A [`Probe`] over an in-memory set of files, for unit tests of the controllers.
#[cfg(test)]
pub(crate) mod tests_support {
    use std::collections::BTreeMap;

    use super::Probe;

    pub(crate) struct FakeProbe(BTreeMap<String, String>);

    impl FakeProbe {
        pub fn new(files: &[(&str, &str)]) -> Self {
            FakeProbe(
                files
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        }
    }

    impl Probe for FakeProbe {
        fn exists(&self, file: &str) -> bool {
            self.0.contains_key(file)
        }

        fn read_i64(&self, file: &str) -> Option<i64> {
            let v = self.0.get(file)?;
            if v == "max" {
                Some(i64::MAX)
            } else {
                v.parse().ok()
            }
        }
    }
}
