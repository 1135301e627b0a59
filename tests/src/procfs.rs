//! The process table as `/proc` shows it, for the tests' process and leak checks.

use std::path::PathBuf;

/// Pids of the processes alive now (the numeric entries of `/proc`), ascending, each with
/// its `/proc/<pid>` directory. Empty if `/proc` cannot be read.
pub fn pids() -> Vec<(i32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<(i32, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            Some((pid, entry.path()))
        })
        .collect();
    pids.sort_unstable_by_key(|(pid, _)| *pid);
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_this_process_with_its_directory() {
        let me = std::process::id() as i32;
        let all = pids();
        let (_, dir) = all
            .iter()
            .find(|(pid, _)| *pid == me)
            .expect("this process is in /proc");
        assert_eq!(*dir, PathBuf::from(format!("/proc/{me}")));
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
