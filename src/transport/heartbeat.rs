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

/// Slots visited under one hold of the registry's lock.
const SLOTS_AT_A_TIME: usize = 1024;

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
    /// are dropped. A few slots at a time: sockets open and close meanwhile,
    /// and with a hundred thousand of them one pass under the lock would
    /// hold their upgrades and ends for milliseconds.
    fn each(&self, tell: impl Fn(&Listener) -> bool) {
        let mut from = 0;
        loop {
            let mut registry = self.lock();
            let to = registry.sockets.capacity().min(from + SLOTS_AT_A_TIME);
            if from >= to {
                return;
            }
            for slot in from..to {
                if registry
                    .sockets
                    .get(slot)
                    .is_some_and(|socket| !tell(socket))
                {
                    registry.sockets.remove(slot);
                }
            }
            from = to;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().expect("heartbeat lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::outbox::{Next, Outbox};

    /// The next thing a socket hears that is not a beat, within a bound.
    async fn past_beats(queued: &Queued) -> Next {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match queued.wait().await {
                    Next::Beat { .. } => {}
                    other => return other,
                }
            }
        })
        .await
        .expect("within the wait")
    }

    #[tokio::test]
    async fn every_socket_hears_beats_and_shutdown_and_gone_ones_are_dropped() {
        let shutdown = CancellationToken::new();
        let heartbeat = Heartbeat::start(Duration::from_millis(20), shutdown.clone());
        // More sockets than one hold of the lock visits.
        let mut sockets: Vec<_> = (0..2 * SLOTS_AT_A_TIME + 5)
            .map(|_| Outbox::new(1, 1))
            .collect();
        for (_, queued) in &sockets {
            heartbeat.join(queued);
        }
        for (_, queued) in &sockets {
            let next = tokio::time::timeout(Duration::from_secs(5), queued.wait()).await;
            assert!(matches!(next, Ok(Next::Beat { .. })), "{next:?}");
        }
        // One leaves; one ends without leaving, and the next beats drop it.
        let (_outbox, left) = sockets.pop().unwrap();
        heartbeat.leave(&left);
        drop(sockets.pop());
        tokio::time::timeout(Duration::from_secs(5), async {
            while heartbeat.lock().sockets.len() != sockets.len() {
                sockets[0].1.wait().await;
            }
        })
        .await
        .expect("the gone socket dropped");

        shutdown.cancel();
        for (_, queued) in &sockets {
            assert!(matches!(past_beats(queued).await, Next::ShuttingDown));
        }
        // A socket that opens during shutdown hears it at once.
        let (_outbox, late) = Outbox::new(1, 1);
        heartbeat.join(&late);
        assert!(matches!(late.wait().await, Next::ShuttingDown));
    }
}
