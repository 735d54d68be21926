//! A room's command queue: bounded, many senders, one receiver (the room).
//!
//! Why not tokio's `mpsc`: its channel allocates its slots 32 at a time and
//! keeps the first block for as long as it lives, about 1.5 KiB for every
//! loaded document, busy or idle. In documents of ten idle sockets that was
//! 150 bytes of every socket's cost. This queue owns no buffer while it is
//! empty; the commands of a burst are held for as long as it lasts.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Poll, Waker};

use tokio::sync::{Semaphore, TryAcquireError};
use tokio::task::coop;

/// A queue holding at most `capacity` commands before senders wait.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            waker: None,
            closed: false,
        }),
        slots: Semaphore::new(capacity),
        senders: AtomicUsize::new(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Free places in the queue: a sender takes one for each command, the
    /// receiver gives it back when the command is taken. Waiting senders are
    /// served in order.
    slots: Semaphore,
    senders: AtomicUsize,
}

struct State<T> {
    items: VecDeque<T>,
    /// The receiver, waiting for a command.
    waker: Option<Waker>,
    closed: bool,
}

impl<T> Shared<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        // A panic under this lock cannot leave the queue half-changed.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a command whose slot is already taken; gives it back when the
    /// receiver has closed.
    fn push(&self, value: T) -> Result<(), T> {
        let mut state = self.state();
        if state.closed {
            return Err(value);
        }
        state.items.push_back(value);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// Why a command could not be queued at once.
pub enum TrySendError<T> {
    Full(T),
    Closed(T),
}

/// The receiver closed.
#[derive(Debug)]
pub struct Closed;

/// A reserved place in the queue; given back if unused.
pub struct Permit<'a, T> {
    shared: &'a Shared<T>,
}

impl<T> Sender<T> {
    /// Queues a command, waiting while the queue is full; gives it back when
    /// the receiver has closed.
    pub async fn send(&self, value: T) -> Result<(), T> {
        match self.reserve().await {
            Ok(permit) => permit.send(value),
            Err(Closed) => Err(value),
        }
    }

    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        match self.shared.slots.try_acquire() {
            Ok(slot) => slot.forget(),
            Err(TryAcquireError::NoPermits) => return Err(TrySendError::Full(value)),
            Err(TryAcquireError::Closed) => return Err(TrySendError::Closed(value)),
        }
        self.shared.push(value).map_err(TrySendError::Closed)
    }

    /// Waits for a place in the queue.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, Closed> {
        let slot = self.shared.slots.acquire().await.map_err(|_| Closed)?;
        slot.forget();
        Ok(Permit {
            shared: &self.shared,
        })
    }
}

impl<T> Permit<'_, T> {
    pub fn send(self, value: T) -> Result<(), T> {
        let shared = self.shared;
        std::mem::forget(self);
        shared.push(value)
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        self.shared.slots.add_permits(1);
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The receiver sees no senders once woken (it checks under the
            // lock taken here after the count fell).
            let waker = self.shared.state().waker.take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next command; `None` once every sender is gone, or the queue is
    /// closed, and nothing is left.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            // A room always busy still yields to the sockets it feeds, as it
            // did on tokio's channels, which count against the same budget.
            let coop = ready!(coop::poll_proceed(cx));
            let mut state = self.shared.state();
            if let Some(value) = self.take(&mut state) {
                coop.made_progress();
                return Poll::Ready(Some(value));
            }
            if state.closed || self.shared.senders.load(Ordering::Acquire) == 0 {
                return Poll::Ready(None);
            }
            match &mut state.waker {
                Some(waker) => waker.clone_from(cx.waker()),
                none => *none = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    pub fn try_recv(&mut self) -> Option<T> {
        let mut state = self.shared.state();
        self.take(&mut state)
    }

    pub fn is_empty(&self) -> bool {
        self.shared.state().items.is_empty()
    }

    /// Refuses new commands and wakes the senders waiting; what is queued
    /// can still be taken.
    pub fn close(&mut self) {
        self.shared.state().closed = true;
        self.shared.slots.close();
    }

    fn take(&self, state: &mut State<T>) -> Option<T> {
        let value = state.items.pop_front()?;
        if state.items.is_empty() {
            // The burst is over: an idle room keeps no buffer.
            state.items = VecDeque::new();
        }
        self.shared.slots.add_permits(1);
        Some(value)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn commands_come_out_in_order_and_a_full_queue_makes_senders_wait() {
        let (tx, mut rx) = channel(2);
        tx.send(1).await.unwrap();
        assert!(tx.try_send(2).is_ok());
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(3).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a full queue took another command");
        assert_eq!(rx.recv().await, Some(1));
        waiting.await.unwrap().unwrap();
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert!(rx.is_empty());
        assert_eq!(
            rx.shared.state().items.capacity(),
            0,
            "an empty queue keeps a buffer"
        );
    }

    #[tokio::test]
    async fn an_unused_permit_gives_its_place_back() {
        let (tx, mut rx) = channel(1);
        drop(tx.reserve().await.unwrap());
        tx.try_send(7).ok().unwrap();
        assert_eq!(rx.recv().await, Some(7));
    }

    #[tokio::test]
    async fn the_receiver_hears_the_last_sender_go() {
        let (tx, mut rx) = channel::<u8>(4);
        let other = tx.clone();
        let recv = tokio::spawn(async move { rx.recv().await });
        drop(tx);
        tokio::task::yield_now().await;
        assert!(!recv.is_finished());
        drop(other);
        let got = tokio::time::timeout(Duration::from_secs(5), recv).await;
        assert_eq!(got.unwrap().unwrap(), None);
    }

    #[tokio::test]
    async fn closing_refuses_new_commands_and_releases_waiting_senders() {
        let (tx, mut rx) = channel(1);
        tx.send(1).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(2).await }
        });
        tokio::task::yield_now().await;
        rx.close();
        let refused = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(refused.unwrap().unwrap(), Err(2));
        assert!(matches!(tx.try_send(3), Err(TrySendError::Closed(3))));
        assert_eq!(rx.recv().await, Some(1), "what was queued is still taken");
        assert_eq!(rx.recv().await, None);
    }
}
