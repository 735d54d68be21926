//! The frames queued for one socket, and the requests to drop it from a room.
//!
//! Rooms push frames without waiting; the socket's task takes them all at
//! once and writes them in one go. The queue is bounded in frames and in
//! bytes: frames are shared between recipients, but a slow reader sitting on
//! many large ones would keep them alive without bound, so past the bounds a
//! push fails and the room lets the peer go as a slow consumer.
//!
//! A plain queue rather than a channel: a tokio channel allocates a block of
//! slots up front, about 1 KiB per socket even while it is idle, and idle
//! sockets are most of a server's sockets. This one holds no memory when empty.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::room::{ConnId, Leave};

/// The rooms' end of a socket's queue.
pub struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    ready: Notify,
    max_frames: usize,
    max_bytes: usize,
}

struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// Memberships the rooms dropped, with why; served before any frame.
    leaves: Vec<(ConnId, Leave)>,
    /// Live [`Outbox`] handles; at zero no room holds the socket any more.
    senders: usize,
    /// Whether the socket's task still reads the queue.
    receiving: bool,
}

/// Why a frame could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Overflow {
    /// A slow consumer: its room lets it go.
    Full,
    /// The socket has already ended.
    Gone,
}

impl Outbox {
    /// A queue of at most `max_frames` frames and `max_bytes` bytes (one frame
    /// always fits an empty queue: a large document's first step 2 can exceed
    /// the byte budget on its own), and the socket task's end of it.
    pub fn new(max_frames: usize, max_bytes: usize) -> (Outbox, Queued) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                leaves: Vec::new(),
                senders: 1,
                receiving: true,
            }),
            ready: Notify::new(),
            max_frames: max_frames.max(1),
            max_bytes,
        });
        let queued = Queued {
            shared: shared.clone(),
        };
        (Outbox { shared }, queued)
    }

    pub fn push(&self, frame: Bytes) -> Result<(), Overflow> {
        let mut state = self.shared.state.lock().expect("outbox lock");
        if !state.receiving {
            return Err(Overflow::Gone);
        }
        let over_bytes = state.bytes > 0 && state.bytes + frame.len() > self.shared.max_bytes;
        if over_bytes || state.frames.len() >= self.shared.max_frames {
            return Err(Overflow::Full);
        }
        let wake = state.frames.is_empty() && state.leaves.is_empty();
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        // One wake-up per batch: the task takes everything queued at once.
        if wake {
            self.shared.ready.notify_one();
        }
        Ok(())
    }

    /// Tells the socket that a room dropped its membership `conn`, ahead of
    /// anything queued.
    pub fn leave(&self, conn: ConnId, why: Leave) {
        let mut state = self.shared.state.lock().expect("outbox lock");
        if state.receiving {
            state.leaves.push((conn, why));
            drop(state);
            self.shared.ready.notify_one();
        }
    }

    /// Frames queued and not yet taken by the socket's task.
    pub fn queued(&self) -> usize {
        self.shared.state.lock().expect("outbox lock").frames.len()
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.state.lock().expect("outbox lock").senders += 1;
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().expect("outbox lock");
        state.senders -= 1;
        if state.senders == 0 {
            drop(state);
            self.shared.ready.notify_one();
        }
    }
}

/// The socket task's end of its [`Outbox`].
pub struct Queued {
    shared: Arc<Shared>,
}

/// What the rooms have for the socket next.
pub enum Next {
    /// A room dropped this membership.
    Leave(ConnId, Leave),
    /// Everything queued, oldest first.
    Frames(VecDeque<Bytes>),
    /// Every handle is gone without a leave request.
    Gone,
}

impl Queued {
    /// Leave requests first, then every queued frame at once. Cancel-safe:
    /// items are taken only in the poll that returns them.
    pub async fn next(&mut self) -> Next {
        loop {
            {
                let mut state = self.shared.state.lock().expect("outbox lock");
                if let Some((conn, why)) = state.leaves.pop() {
                    return Next::Leave(conn, why);
                }
                if !state.frames.is_empty() {
                    state.bytes = 0;
                    // The queue is handed over whole: an idle socket then keeps
                    // no slots, and a burst reallocates them cheaply.
                    return Next::Frames(std::mem::take(&mut state.frames));
                }
                if state.senders == 0 {
                    return Next::Gone;
                }
            }
            // A push between the check and this wait leaves a permit behind.
            self.shared.ready.notified().await;
        }
    }
}

#[cfg(test)]
impl Queued {
    /// Whether nothing is queued (for tests that check nothing was sent).
    pub fn is_empty(&self) -> bool {
        let state = self.shared.state.lock().expect("outbox lock");
        state.frames.is_empty() && state.leaves.is_empty()
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().expect("outbox lock");
        state.receiving = false;
        state.frames = VecDeque::new();
        state.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_come_out_in_one_batch_after_leaves_and_bounds_hold() {
        let (outbox, mut queued) = Outbox::new(3, 10);
        outbox.push(Bytes::from_static(b"12345678")).unwrap();
        // Over the byte budget once something is queued.
        assert_eq!(outbox.push(Bytes::from_static(b"abc")), Err(Overflow::Full));
        outbox.push(Bytes::from_static(b"ab")).unwrap();
        outbox.leave(7, Leave::SlowConsumer);
        assert!(matches!(
            queued.next().await,
            Next::Leave(7, Leave::SlowConsumer)
        ));
        match queued.next().await {
            Next::Frames(frames) => assert_eq!(frames.len(), 2),
            _ => panic!("frames expected"),
        }
        // A frame larger than the budget fits an empty queue, alone.
        outbox.push(Bytes::from(vec![0; 100])).unwrap();
        assert_eq!(outbox.push(Bytes::new()), Err(Overflow::Full));
        assert!(matches!(queued.next().await, Next::Frames(f) if f.len() == 1));
        // The frame count bounds too.
        for _ in 0..3 {
            outbox.push(Bytes::new()).unwrap();
        }
        assert_eq!(outbox.push(Bytes::new()), Err(Overflow::Full));
        assert!(matches!(queued.next().await, Next::Frames(f) if f.len() == 3));
        drop(outbox);
        assert!(matches!(queued.next().await, Next::Gone));
    }

    #[test]
    fn a_gone_socket_refuses_frames() {
        let (outbox, queued) = Outbox::new(3, 10);
        drop(queued);
        assert_eq!(outbox.push(Bytes::new()), Err(Overflow::Gone));
    }
}
