//! The server's one heartbeat: a timer that reaches every socket, for pings
//! and protocol keepalives, and tells every socket when the server shuts
//! down.
//!
//! Each socket is kept here by a weak handle to its outbox, and a beat is a
//! flag set in the outbox and the wake-up the socket already waits for. A
//! shared channel would instead give every idle socket a second wait, about
//! 120 bytes of its task's future, and idle sockets are most of a server's.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use slab::Slab;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::outbox::{Listener, Queued};

/// The sockets the heartbeat reaches.
pub struct Heartbeat {
    registry: Mutex<Registry>,
}

struct Registry {
    sockets: Slab<Listener>,
    /// The server is shutting down: sockets that join are told at once.
    closed: bool,
}

impl Heartbeat {
    /// Starts the heartbeat: a beat every half ping interval (a ping every
    /// other beat, a keepalive every beat), until `shutdown`, when every
    /// socket is told.
    pub fn start(ping_interval: Duration, shutdown: CancellationToken) -> Arc<Heartbeat> {
        let heartbeat = Arc::new(Heartbeat {
            registry: Mutex::new(Registry {
                sockets: Slab::new(),
                closed: false,
            }),
        });
        let half = (ping_interval / 2).max(Duration::from_millis(10));
        let beats = heartbeat.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + half, half);
            let mut ping = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        ping = !ping;
                        beats.each(|socket| socket.beat(ping));
                    }
                    _ = shutdown.cancelled() => {
                        beats.lock().closed = true;
                        beats.each(Listener::shut_down);
                        return;
                    }
                }
            }
        });
        heartbeat
    }

    /// Keeps a socket until [`Heartbeat::leave`]; one that joins during
    /// shutdown hears it at once.
    pub(super) fn join(&self, queued: &Queued) {
        let mut registry = self.lock();
        let listener = queued.listener();
        if registry.closed {
            listener.shut_down();
            return;
        }
        let slot = registry.sockets.insert(listener);
        // Slots are reused, so they stay below the number of live sockets.
        queued.set_slot(u32::try_from(slot).expect("fewer than 2^32 sockets"));
    }

    pub(super) fn leave(&self, queued: &Queued) {
        let slot = queued.take_slot();
        if slot != u32::MAX {
            self.lock().sockets.try_remove(slot as usize);
        }
    }

    /// Tells every socket; those already gone (a task aborted before it left)
    /// are dropped.
    fn each(&self, tell: impl Fn(&Listener) -> bool) {
        self.lock().sockets.retain(|_, socket| tell(socket));
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().expect("heartbeat lock")
    }
}
