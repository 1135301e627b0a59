//! The device event loop: one thread, one epoll instance, many handlers.
//!
//! Devices whose work is driven by host file descriptors (queue-notify ioeventfds, vsock's
//! Unix sockets, the serial input, timers) register an [`EventHandler`]. Each handler owns
//! the fds it registers; when one becomes ready the loop calls that handler's
//! [`EventHandler::handle`] with an [`EventLoopCtl`] through which the handler can add,
//! modify and remove its own fds (vsock connections come and go at run time).
//!
//! Why a plain epoll loop rather than `event-manager`: it is ~200 lines, it has no extra
//! dependency, and dynamic registration from inside a callback is the common case here.

use std::collections::HashMap;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::thread;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Maximum number of ready events taken from epoll per wake-up.
const EVENT_BATCH: usize = 64;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// Creating the epoll instance or the stop eventfd failed.
    #[error("cannot create the event loop: {0}")]
    Create(#[source] io::Error),
    /// `epoll_ctl` refused a registration.
    #[error("cannot register fd {fd} with the event loop: {source}")]
    Register {
        /// The fd the handler asked for.
        fd: RawFd,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The fd is already registered by another handler.
    #[error("fd {0} is already registered with the event loop")]
    AlreadyRegistered(RawFd),
    /// `epoll_wait` failed with something other than EINTR.
    #[error("epoll_wait failed: {0}")]
    Wait(#[source] io::Error),
    /// The loop thread could not be started.
    #[error("cannot spawn the event loop thread: {0}")]
    Spawn(#[source] io::Error),
}

/// Registration operations available to a handler while it handles an event.
///
/// All operations act on fds owned by the calling handler: events on an fd added here are
/// delivered to that same handler.
pub trait EventLoopCtl {
    /// Start watching `fd` for `events`.
    fn add(&mut self, fd: RawFd, events: EventSet) -> Result<(), EventLoopError>;
    /// Change the events watched on an fd this handler registered.
    fn modify(&mut self, fd: RawFd, events: EventSet) -> Result<(), EventLoopError>;
    /// Stop watching an fd. Call it *before* closing the fd. Unknown fds are ignored.
    fn remove(&mut self, fd: RawFd);
}

/// A device (or part of one) driven by host file descriptors.
pub trait EventHandler: Send {
    /// The fds to watch from the moment the handler is added to the loop.
    fn fds(&self) -> Vec<(RawFd, EventSet)>;
    /// One of this handler's fds is ready. `events` may include `HANG_UP`/`ERROR`; a handler
    /// that closes an fd must `ctl.remove` it first.
    fn handle(&mut self, fd: RawFd, events: EventSet, ctl: &mut dyn EventLoopCtl);
}

/// Handle to stop a running [`EventLoop`] from another thread.
#[derive(Debug)]
pub struct EventLoopStopper(EventFd);

impl EventLoopStopper {
    /// Ask the loop to return from [`EventLoop::run`] after its current iteration.
    pub fn stop(&self) {
        // An eventfd write only fails when the counter would overflow, i.e. when a stop is
        // already pending; either way the loop will see it.
        let _ = self.0.write(1);
    }
}

/// Index of a handler in [`EventLoop::handlers`].
type HandlerId = usize;

/// The epoll-based device event loop.
pub struct EventLoop {
    epoll: Epoll,
    handlers: Vec<Box<dyn EventHandler>>,
    owners: HashMap<RawFd, HandlerId>,
    stop_evt: EventFd,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("handlers", &self.handlers.len())
            .field("fds", &self.owners.len())
            .finish()
    }
}

/// The [`EventLoopCtl`] given to one handler: registrations are attributed to it.
struct HandlerCtl<'a> {
    epoll: &'a Epoll,
    owners: &'a mut HashMap<RawFd, HandlerId>,
    id: HandlerId,
}

impl EventLoopCtl for HandlerCtl<'_> {
    fn add(&mut self, fd: RawFd, events: EventSet) -> Result<(), EventLoopError> {
        register(self.epoll, self.owners, self.id, fd, events)
    }

    fn modify(&mut self, fd: RawFd, events: EventSet) -> Result<(), EventLoopError> {
        if self.owners.get(&fd) != Some(&self.id) {
            return Err(EventLoopError::Register {
                fd,
                source: io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        self.epoll
            .ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(events, fd as u64),
            )
            .map_err(|source| EventLoopError::Register { fd, source })
    }

    fn remove(&mut self, fd: RawFd) {
        if self.owners.get(&fd) == Some(&self.id) {
            self.owners.remove(&fd);
            // ENOENT/EBADF here means the fd was already closed: nothing left to undo.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }
}

fn register(
    epoll: &Epoll,
    owners: &mut HashMap<RawFd, HandlerId>,
    id: HandlerId,
    fd: RawFd,
    events: EventSet,
) -> Result<(), EventLoopError> {
    match epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(events, fd as u64),
    ) {
        Ok(()) => {
            // A stale entry can exist if a handler closed an fd without removing it and the
            // number was reused; epoll itself forgot the old fd, so the new owner wins.
            owners.insert(fd, id);
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            Err(EventLoopError::AlreadyRegistered(fd))
        }
        Err(source) => Err(EventLoopError::Register { fd, source }),
    }
}

impl EventLoop {
    /// A new, empty event loop.
    pub fn new() -> Result<Self, EventLoopError> {
        let epoll = Epoll::new().map_err(EventLoopError::Create)?;
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Create)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop_evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, stop_evt.as_raw_fd() as u64),
            )
            .map_err(EventLoopError::Create)?;
        Ok(EventLoop {
            epoll,
            handlers: Vec::new(),
            owners: HashMap::new(),
            stop_evt,
        })
    }

    /// Add a handler and register the fds it reports in [`EventHandler::fds`].
    pub fn add_handler(&mut self, handler: Box<dyn EventHandler>) -> Result<(), EventLoopError> {
        let id = self.handlers.len();
        let fds = handler.fds();
        for (i, &(fd, events)) in fds.iter().enumerate() {
            if fd == self.stop_evt.as_raw_fd() {
                return Err(EventLoopError::AlreadyRegistered(fd));
            }
            if let Err(e) = register(&self.epoll, &mut self.owners, id, fd, events) {
                // Leave no half-registered handler behind.
                for &(done, _) in &fds[..i] {
                    self.owners.remove(&done);
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, done, EpollEvent::default());
                }
                return Err(e);
            }
        }
        self.handlers.push(handler);
        Ok(())
    }

    /// A handle that makes [`EventLoop::run`] return.
    pub fn stopper(&self) -> Result<EventLoopStopper, EventLoopError> {
        self.stop_evt
            .try_clone()
            .map(EventLoopStopper)
            .map_err(EventLoopError::Create)
    }

    /// Number of fds currently registered by handlers.
    pub fn registered_fds(&self) -> usize {
        self.owners.len()
    }

    /// Wait up to `timeout_ms` (-1: forever) and dispatch the ready events.
    /// Returns `false` once a stop was requested.
    pub fn run_once(&mut self, timeout_ms: i32) -> Result<bool, EventLoopError> {
        let mut ready = [EpollEvent::default(); EVENT_BATCH];
        let count = match self.epoll.wait(timeout_ms, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(EventLoopError::Wait(e)),
        };
        let stop_fd = self.stop_evt.as_raw_fd();
        let mut keep_running = true;
        for event in &ready[..count] {
            let fd = event.fd();
            if fd == stop_fd {
                let _ = self.stop_evt.read();
                keep_running = false;
                continue;
            }
            // Look the owner up per event: an earlier handler call in this batch may have
            // removed the fd.
            let Some(&id) = self.owners.get(&fd) else {
                continue;
            };
            let mut ctl = HandlerCtl {
                epoll: &self.epoll,
                owners: &mut self.owners,
                id,
            };
            self.handlers[id].handle(fd, event.event_set(), &mut ctl);
        }
        Ok(keep_running)
    }

    /// Dispatch events until stopped.
    pub fn run(&mut self) -> Result<(), EventLoopError> {
        while self.run_once(-1)? {}
        Ok(())
    }

    /// Run the loop on its own thread named `name`. `on_start` runs first on that thread
    /// (the VMM installs the thread's seccomp filter there).
    pub fn spawn<F>(
        mut self,
        name: &str,
        on_start: F,
    ) -> Result<thread::JoinHandle<Result<(), EventLoopError>>, EventLoopError>
    where
        F: FnOnce() -> Result<(), EventLoopError> + Send + 'static,
    {
        thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                on_start()?;
                self.run()
            })
            .map_err(EventLoopError::Spawn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts events on one eventfd; on the first event registers a second eventfd.
    struct Counter {
        evt: EventFd,
        extra: Option<EventFd>,
        extra_registered: bool,
        hits: Arc<AtomicUsize>,
        extra_hits: Arc<AtomicUsize>,
    }

    impl EventHandler for Counter {
        fn fds(&self) -> Vec<(RawFd, EventSet)> {
            vec![(self.evt.as_raw_fd(), EventSet::IN)]
        }
        fn handle(&mut self, fd: RawFd, _events: EventSet, ctl: &mut dyn EventLoopCtl) {
            if fd == self.evt.as_raw_fd() {
                let _ = self.evt.read();
                self.hits.fetch_add(1, Ordering::SeqCst);
                if let (false, Some(extra)) = (self.extra_registered, &self.extra) {
                    ctl.add(extra.as_raw_fd(), EventSet::IN).unwrap();
                    self.extra_registered = true;
                }
            } else if let Some(extra) = &self.extra {
                assert_eq!(fd, extra.as_raw_fd());
                let _ = extra.read();
                self.extra_hits.fetch_add(1, Ordering::SeqCst);
                ctl.remove(fd);
            }
        }
    }

    fn counter() -> (Counter, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let extra_hits = Arc::new(AtomicUsize::new(0));
        (
            Counter {
                evt: EventFd::new(EFD_NONBLOCK).unwrap(),
                extra: Some(EventFd::new(EFD_NONBLOCK).unwrap()),
                extra_registered: false,
                hits: hits.clone(),
                extra_hits: extra_hits.clone(),
            },
            hits,
            extra_hits,
        )
    }

    #[test]
    fn dispatches_and_registers_dynamically() {
        let mut el = EventLoop::new().unwrap();
        let (c, hits, extra_hits) = counter();
        let trigger = c.evt.try_clone().unwrap();
        let extra = c.extra.as_ref().unwrap().try_clone().unwrap();
        el.add_handler(Box::new(c)).unwrap();
        assert_eq!(el.registered_fds(), 1);

        // Nothing ready: a zero timeout returns without dispatching.
        assert!(el.run_once(0).unwrap());
        assert_eq!(hits.load(Ordering::SeqCst), 0);

        trigger.write(1).unwrap();
        assert!(el.run_once(1000).unwrap());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(el.registered_fds(), 2);

        extra.write(1).unwrap();
        assert!(el.run_once(1000).unwrap());
        assert_eq!(extra_hits.load(Ordering::SeqCst), 1);
        // The handler removed the extra fd: further writes are not delivered.
        assert_eq!(el.registered_fds(), 1);
        extra.write(1).unwrap();
        assert!(el.run_once(0).unwrap());
        assert_eq!(extra_hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn duplicate_fd_is_rejected_and_rolled_back() {
        let mut el = EventLoop::new().unwrap();
        let (c, _, _) = counter();
        let fd = c.evt.as_raw_fd();
        el.add_handler(Box::new(c)).unwrap();

        struct Two(RawFd, RawFd);
        impl EventHandler for Two {
            fn fds(&self) -> Vec<(RawFd, EventSet)> {
                vec![(self.0, EventSet::IN), (self.1, EventSet::IN)]
            }
            fn handle(&mut self, _: RawFd, _: EventSet, _: &mut dyn EventLoopCtl) {}
        }
        let fresh = EventFd::new(EFD_NONBLOCK).unwrap();
        let err = el
            .add_handler(Box::new(Two(fresh.as_raw_fd(), fd)))
            .unwrap_err();
        assert!(matches!(err, EventLoopError::AlreadyRegistered(f) if f == fd));
        // The first fd of the failed handler was rolled back.
        assert_eq!(el.registered_fds(), 1);
        el.add_handler(Box::new(Two(fresh.as_raw_fd(), fresh.as_raw_fd())))
            .unwrap_err();
    }

    #[test]
    fn stopper_ends_spawned_loop() {
        let el = EventLoop::new().unwrap();
        let stopper = el.stopper().unwrap();
        let handle = el.spawn("test-evloop", || Ok(())).unwrap();
        stopper.stop();
        handle.join().unwrap().unwrap();
    }
}
