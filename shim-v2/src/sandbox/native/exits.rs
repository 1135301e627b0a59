//! Routes reaped exits to the processes they belong to.
//!
//! A process is registered once the runtime has returned its pid and its stdio copies
//! are running. Its exit may be reaped before that (a fast `echo` under a slow runtime
//! call), so exits of unknown pids are kept for a while and claimed at registration.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use super::process::Process;
use crate::reaper::Exit;

/// Exits of unknown pids kept for a later registration (logging binaries, the
/// runtime's helpers and reparented grandchildren are reaped here too).
const UNCLAIMED_LIMIT: usize = 1024;

#[derive(Default)]
pub struct ExitTable {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: HashMap<i32, Arc<Process>>,
    unclaimed: HashMap<i32, u32>,
    unclaimed_order: VecDeque<i32>,
}

impl ExitTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `process` under `pid`; returns its exit status if it already exited.
    pub fn register(&self, pid: i32, process: Arc<Process>) -> Option<u32> {
        let mut inner = self.lock();
        if let Some(status) = inner.unclaimed.remove(&pid) {
            inner.unclaimed_order.retain(|p| *p != pid);
            return Some(status);
        }
        inner.running.insert(pid, process);
        None
    }

    /// Forgets `pid` (its process was deleted).
    pub fn unregister(&self, pid: i32) {
        self.lock().running.remove(&pid);
    }

    /// The process `exit` belongs to, or `None` (then the exit is kept for a later
    /// registration).
    pub fn claim(&self, exit: Exit) -> Option<Arc<Process>> {
        let mut inner = self.lock();
        if let Some(process) = inner.running.remove(&exit.pid) {
            return Some(process);
        }
        if inner.unclaimed.insert(exit.pid, exit.status).is_none() {
            inner.unclaimed_order.push_back(exit.pid);
        }
        while inner.unclaimed_order.len() > UNCLAIMED_LIMIT {
            if let Some(old) = inner.unclaimed_order.pop_front() {
                inner.unclaimed.remove(&old);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::StdioUris;

    fn process() -> Arc<Process> {
        Arc::new(Process::new("c", "", StdioUris::default(), None))
    }

    #[test]
    fn exit_before_registration_is_claimed_at_registration() {
        let table = ExitTable::default();
        assert!(table.claim(Exit { pid: 7, status: 3 }).is_none());
        assert_eq!(table.register(7, process()), Some(3));
        // and only once
        assert_eq!(table.register(7, process()), None);
        assert!(table.claim(Exit { pid: 7, status: 0 }).is_some());
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let table = ExitTable::default();
        for pid in 0..(UNCLAIMED_LIMIT as i32 + 10) {
            table.claim(Exit { pid, status: 0 });
        }
        assert_eq!(table.register(0, process()), None, "oldest was evicted");
        assert_eq!(
            table.register(UNCLAIMED_LIMIT as i32 + 9, process()),
            Some(0)
        );
    }
}
