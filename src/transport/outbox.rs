//! The bytes on their way to one socket, and the requests to drop it from a
//! room.
//!
//! A room hands a frame to a socket's outbox without waiting. When nothing is
//! queued ahead of it, the frame is written to the socket there and then, by
//! a non-blocking write from the room's own task: no wake-up of the socket's
//! task and no hand-off, one system call per delivery. A batch of deliveries
//! to many sockets, the usual case, costs the sockets' tasks nothing. What
//! the socket does not take at once is queued, in order, with every frame
//! after it, and the socket's task writes the queue as the socket drains.
//! The socket's own frames (pongs, pings, the close) join the same queue, so
//! no two writers ever interleave on the wire.
//!
//! The queue is bounded in frames and in bytes: frames are shared between
//! recipients, but a slow reader sitting on many large ones would keep them
//! alive without bound, so past the bounds a push fails and the room lets the
//! peer go as a slow consumer. A plain queue rather than a channel: a tokio
//! channel allocates a block of slots up front, about 1 KiB per socket even
//! while it is idle, and idle sockets are most of a server's sockets. This
//! one holds no memory when empty.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{self as m, MessageKind};
use crate::room::{ConnId, Leave};

/// An upgraded connection, before the WebSocket framing.
pub type Io = TokioIo<hyper::upgrade::Upgraded>;

/// A frame at least this large is not written by the room that sends it: a
/// whole document after a join goes out from the socket's own task, when the
/// socket takes its turn (see `transport::BULK_PERMITS`).
pub const BULK_BYTES: usize = 1 << 20;

/// Chunks gathered into one vectored write.
const GATHER: usize = 32;

/// The rooms' end of a socket's queue.
pub struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// The connection; `None` only in tests, where frames stay queued. The
    /// `Option` is inside the lock, where it costs no byte: a lock hides the
    /// connection's spare bit pattern from an `Option` around it.
    io: Mutex<Option<Io>>,
    max_frames: u32,
    max_bytes: usize,
    /// What a frame is, for the message counters.
    kind: fn(&[u8]) -> MessageKind,
}

struct State {
    /// Everything not yet written, in wire order; the front may be partly
    /// written.
    pending: VecDeque<Chunk>,
    /// Rooms' frames in `pending`, and their bytes (the bounds).
    frames: u32,
    bytes: usize,
    /// Memberships the rooms dropped, with why; served before any write.
    leaves: Vec<(ConnId, Leave)>,
    /// Live [`Outbox`] handles; at zero no room holds the socket any more.
    senders: u32,
    /// Whether rooms' frames are still taken (not once the socket closes).
    receiving: bool,
    /// A heartbeat came and is not yet served: `Some(true)` when it asks
    /// for a ping.
    beat: Option<bool>,
    /// The server is shutting down: the socket closes.
    shutting_down: bool,
    /// Where the heartbeat keeps this socket (see `transport::Heartbeat`).
    slot: u32,
    /// The socket's task, waiting in [`Queued::wait`]. A waker kept under
    /// the queue's own lock rather than a `Notify`: the wait then holds no
    /// waiter of its own, and its future is a few bytes of every idle
    /// socket's task instead of about 80.
    waker: Option<Waker>,
}

impl State {
    /// Wakes the socket's task, once the lock is released.
    fn wake(mut this: MutexGuard<'_, State>) {
        let waker = this.waker.take();
        drop(this);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// One frame on its way: the WebSocket header made here, the payload shared
/// with every other recipient.
struct Chunk {
    head: [u8; 10],
    head_at: u8,
    head_len: u8,
    body: Bytes,
    /// A room's frame, counted against the bounds.
    counted: bool,
    /// Part of it is on the wire already: it must be finished.
    begun: bool,
}

impl Chunk {
    /// A final binary frame, unmasked as a server's frames are.
    fn binary(body: Bytes) -> Chunk {
        Chunk::frame(0x2, body)
    }

    /// A final frame of `opcode`.
    fn frame(opcode: u8, body: Bytes) -> Chunk {
        let mut head = [0u8; 10];
        head[0] = 0x80 | opcode;
        let len = body.len();
        let head_len = if len < 126 {
            head[1] = len as u8;
            2
        } else if len <= u16::MAX as usize {
            head[1] = 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Chunk {
            head,
            head_at: 0,
            head_len,
            body,
            counted: true,
            begun: false,
        }
    }

    fn head(&self) -> &[u8] {
        &self.head[self.head_at as usize..self.head_len as usize]
    }

    /// Consumes up to `n` written bytes; returns what is left of `n`.
    fn advance(&mut self, mut n: usize) -> usize {
        self.begun |= n > 0;
        let head = self.head().len().min(n);
        self.head_at += head as u8;
        n -= head;
        let body = self.body.len().min(n);
        self.body.advance(body);
        n - body
    }

    fn done(&self) -> bool {
        self.head().is_empty() && self.body.is_empty()
    }
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
    /// The queue of a connection: at most `max_frames` frames and `max_bytes`
    /// bytes wait (one frame always fits an empty queue: a large document's
    /// first step 2 can exceed the byte budget on its own). Returns the
    /// rooms' end and the socket task's end.
    pub fn with_io(
        io: Io,
        max_frames: usize,
        max_bytes: usize,
        kind: fn(&[u8]) -> MessageKind,
    ) -> (Outbox, Queued) {
        let shared = Shared::new(Some(io), max_frames, max_bytes, kind);
        let queued = Queued {
            shared: shared.clone(),
        };
        (Outbox { shared }, queued)
    }

    /// A queue without a connection: frames stay queued for the test to take.
    #[cfg(test)]
    pub fn new(max_frames: usize, max_bytes: usize) -> (Outbox, Queued) {
        let shared = Shared::new(None, max_frames, max_bytes, |_| MessageKind::Other);
        let queued = Queued {
            shared: shared.clone(),
        };
        (Outbox { shared }, queued)
    }

    /// Queues a frame and, when nothing waits ahead of it, writes it now.
    pub fn push(&self, frame: Bytes) -> Result<(), Overflow> {
        self.put(frame, true)
    }

    /// Queues a frame for the socket's task to write. A room that has fallen
    /// behind sends this way: its own turn stays short, and the socket's task,
    /// running after it, writes everything that piled up in one call.
    pub fn queue(&self, frame: Bytes) -> Result<(), Overflow> {
        self.put(frame, false)
    }

    fn put(&self, frame: Bytes, write_now: bool) -> Result<(), Overflow> {
        let shared = &*self.shared;
        let mut state = shared.lock();
        if !state.receiving {
            return Err(Overflow::Gone);
        }
        let over_bytes = state.bytes > 0 && state.bytes + frame.len() > shared.max_bytes;
        if over_bytes || state.frames >= shared.max_frames {
            return Err(Overflow::Full);
        }
        m::sent((shared.kind)(&frame));
        let first = state.pending.is_empty();
        let large = frame.len() >= BULK_BYTES;
        let mut chunk = Chunk::binary(frame);
        if first && write_now && !large {
            if let Some(io) = shared.io.lock().expect("io lock").as_mut() {
                // Outside tokio's budget: a room writing to hundreds of
                // sockets in one turn would otherwise find all but the first
                // 128 "not ready". Nobody is registered to hear of the socket
                // draining here: what is left wakes the socket's task below.
                let write = tokio::task::unconstrained(std::future::poll_fn(|cx| {
                    write_chunk(io, &mut chunk, cx)
                }));
                let _ = pin!(write).poll(&mut Context::from_waker(Waker::noop()));
                if chunk.done() {
                    return Ok(());
                }
            }
        }
        state.frames += 1;
        state.bytes += chunk_len(&chunk);
        state.pending.push_back(chunk);
        // Something queued ahead means the socket's task is already on it.
        if first {
            State::wake(state);
        }
        Ok(())
    }

    /// Tells the socket that a room dropped its membership `conn`, ahead of
    /// anything queued.
    pub fn leave(&self, conn: ConnId, why: Leave) {
        let mut state = self.shared.lock();
        if state.receiving {
            state.leaves.push((conn, why));
            State::wake(state);
        }
    }
}

impl Shared {
    fn new(
        io: Option<Io>,
        max_frames: usize,
        max_bytes: usize,
        kind: fn(&[u8]) -> MessageKind,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                frames: 0,
                bytes: 0,
                leaves: Vec::new(),
                senders: 1,
                receiving: true,
                beat: None,
                shutting_down: false,
                slot: u32::MAX,
                waker: None,
            }),
            io: Mutex::new(io),
            max_frames: max_frames.clamp(1, u32::MAX as usize) as u32,
            max_bytes,
            kind,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("outbox lock")
    }

    fn io(&self) -> IoGuard<'_> {
        IoGuard(self.io.lock().expect("io lock"))
    }

    /// Writes until the queue is empty (`Ready(Ok(true))`), or until the
    /// socket takes no more after some progress (`Ready(Ok(false))`).
    fn poll_progress(&self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut state = self.lock();
        let mut wrote = false;
        match write_queue(&mut self.io(), &mut state, cx, &mut wrote) {
            Poll::Ready(result) => Poll::Ready(result.map(|()| true)),
            Poll::Pending if wrote => Poll::Ready(Ok(false)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The connection, locked; only a test's outbox has none.
struct IoGuard<'a>(MutexGuard<'a, Option<Io>>);

impl std::ops::Deref for IoGuard<'_> {
    type Target = Io;

    fn deref(&self) -> &Io {
        self.0.as_ref().expect("a connection's outbox")
    }
}

impl std::ops::DerefMut for IoGuard<'_> {
    fn deref_mut(&mut self) -> &mut Io {
        self.0.as_mut().expect("a connection's outbox")
    }
}

fn queued_bytes(state: &State) -> usize {
    state
        .pending
        .iter()
        .map(|c| c.head().len() + c.body.len())
        .sum()
}

/// Writes queued chunks, several per system call, until the queue is empty
/// or the socket would block (then `cx` hears when it drains); `wrote`
/// says whether any byte went out.
fn write_queue(
    io: &mut Io,
    state: &mut State,
    cx: &mut Context<'_>,
    wrote: &mut bool,
) -> Poll<io::Result<()>> {
    while !state.pending.is_empty() {
        let mut slices = [IoSlice::new(&[]); 2 * GATHER];
        let mut n = 0;
        for chunk in state.pending.iter().take(GATHER) {
            for part in [chunk.head(), &chunk.body[..]] {
                if !part.is_empty() {
                    slices[n] = IoSlice::new(part);
                    n += 1;
                }
            }
        }
        let mut written = match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(0)) if n > 0 => {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            Poll::Ready(Ok(written)) => written,
        };
        *wrote = true;
        while let Some(front) = state.pending.front_mut() {
            written = front.advance(written);
            if !front.done() {
                break;
            }
            let chunk = state.pending.pop_front().expect("a front chunk");
            if chunk.counted {
                state.frames -= 1;
                state.bytes -= chunk_len(&chunk);
            }
        }
    }
    // What a backlog grew is given back: an idle socket keeps no queue.
    state.pending = VecDeque::new();
    Poll::Ready(Ok(()))
}

/// Writes one chunk until it is done or the socket would block.
fn write_chunk(io: &mut Io, chunk: &mut Chunk, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    while !chunk.done() {
        let slices = [IoSlice::new(chunk.head()), IoSlice::new(&chunk.body)];
        match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))? {
            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            written => chunk.advance(written),
        };
    }
    Poll::Ready(Ok(()))
}

/// The payload length a counted chunk was pushed with, from its header.
fn chunk_len(chunk: &Chunk) -> usize {
    match chunk.head[1] {
        126 => u16::from_be_bytes([chunk.head[2], chunk.head[3]]) as usize,
        127 => u64::from_be_bytes(chunk.head[2..10].try_into().expect("8 bytes")) as usize,
        len => len as usize,
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        if state.senders == 0 {
            State::wake(state);
        }
    }
}

/// The socket task's end of its [`Outbox`].
pub struct Queued {
    shared: Arc<Shared>,
}

/// What the socket's task has to do next.
#[derive(Debug)]
pub enum Next {
    /// The server is shutting down.
    ShuttingDown,
    /// A heartbeat: send the protocol's keepalive, and a ping when `ping`.
    Beat { ping: bool },
    /// A room dropped this membership.
    Leave(ConnId, Leave),
    /// Bytes wait for the socket to take them: [`Queued::flush`].
    Write,
    /// Every handle is gone without a leave request.
    Gone,
}

impl Queued {
    /// Shutdown first, so even a socket that is always busy hears it; then
    /// leave requests, heartbeats, and whether anything waits to be written.
    /// Cancel-safe: a leave or a beat is taken only in the poll that returns
    /// it.
    pub fn wait(&self) -> impl Future<Output = Next> + '_ {
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            Poll::Ready(if state.shutting_down {
                Next::ShuttingDown
            } else if let Some((conn, why)) = state.leaves.pop() {
                Next::Leave(conn, why)
            } else if let Some(ping) = state.beat.take() {
                Next::Beat { ping }
            } else if !state.pending.is_empty() {
                Next::Write
            } else if state.senders == 0 {
                Next::Gone
            } else {
                // Kept under the lock the check held: whatever changes the
                // queue after it finds the waker.
                if !state
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    state.waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            })
        })
    }

    /// What the heartbeat keeps to reach this socket.
    pub(super) fn listener(&self) -> Listener {
        Listener(Arc::downgrade(&self.shared))
    }

    /// Where the heartbeat kept this socket, if it did; it no longer does.
    pub(super) fn take_slot(&self) -> u32 {
        std::mem::replace(&mut self.shared.lock().slot, u32::MAX)
    }

    pub(super) fn set_slot(&self, slot: u32) {
        self.shared.lock().slot = slot;
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        queued_bytes(&self.shared.lock())
    }

    /// Closes the connection's writing side.
    pub async fn shutdown(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| Pin::new(&mut *self.shared.io()).poll_shutdown(cx)).await
    }

    /// Writes what the socket takes; `Ok(true)` once the queue is empty,
    /// `Ok(false)` after some progress, pending while the socket is full.
    pub async fn progress(&self) -> io::Result<bool> {
        std::future::poll_fn(|cx| self.shared.poll_progress(cx)).await
    }

    /// Queues a frame of the socket's own (a keepalive), outside the bounds.
    pub fn send(&self, frame: Bytes) {
        m::sent((self.shared.kind)(&frame));
        self.send_frame(Chunk::binary(frame));
    }

    /// Queues a control frame (`frames::PING`, `PONG` or `CLOSE`).
    pub fn send_control(&self, opcode: u8, payload: Bytes) {
        self.send_frame(Chunk::frame(opcode, payload));
    }

    fn send_frame(&self, mut chunk: Chunk) {
        chunk.counted = false;
        let mut state = self.shared.lock();
        state.pending.push_back(chunk);
        State::wake(state);
    }

    /// The socket is closing: rooms' frames are refused from now on, and
    /// those not yet begun are dropped so the close frame goes out next.
    pub fn close(&self) {
        let mut state = self.shared.lock();
        state.receiving = false;
        let keep = state.pending.front().is_some_and(|c| c.begun) as usize;
        state.pending.truncate(keep);
        state.frames = 0;
        state.bytes = 0;
    }
}

#[cfg(test)]
impl Queued {
    /// Whether nothing is queued (for tests that check nothing was sent).
    pub fn is_empty(&self) -> bool {
        let state = self.shared.lock();
        state.pending.is_empty() && state.leaves.is_empty()
    }

    /// Takes the payloads of the rooms' frames queued so far.
    pub fn take_frames(&self) -> Vec<Bytes> {
        let mut state = self.shared.lock();
        state.frames = 0;
        state.bytes = 0;
        state.pending.drain(..).map(|c| c.body).collect()
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiving = false;
        state.pending = VecDeque::new();
        state.frames = 0;
        state.bytes = 0;
    }
}

/// How the heartbeat reaches a socket without keeping it alive: a socket
/// waits for its beats in the same wait as for its rooms' frames, so an idle
/// socket carries one wait, not two.
pub(super) struct Listener(Weak<Shared>);

impl Listener {
    /// Tells the socket a heartbeat came (a ping one when `ping`); `false`
    /// once the socket is gone.
    pub(super) fn beat(&self, ping: bool) -> bool {
        self.tell(|state| state.beat = Some(ping || state.beat == Some(true)))
    }

    /// Tells the socket the server is shutting down.
    pub(super) fn shut_down(&self) -> bool {
        self.tell(|state| state.shutting_down = true)
    }

    fn tell(&self, what: impl FnOnce(&mut State)) -> bool {
        let Some(shared) = self.0.upgrade() else {
            return false;
        };
        let mut state = shared.lock();
        what(&mut state);
        State::wake(state);
        true
    }
}

/// Reads go straight to the connection: only the socket's task reads.
impl AsyncRead for &Queued {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.shared.io()).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_wait_behind_leaves_and_bounds_hold() {
        let (outbox, queued) = Outbox::new(3, 10);
        outbox.push(Bytes::from_static(b"12345678")).unwrap();
        // Over the byte budget once something is queued.
        assert_eq!(outbox.push(Bytes::from_static(b"abc")), Err(Overflow::Full));
        outbox.push(Bytes::from_static(b"ab")).unwrap();
        outbox.leave(7, Leave::SlowConsumer);
        assert!(matches!(
            queued.wait().await,
            Next::Leave(7, Leave::SlowConsumer)
        ));
        assert!(matches!(queued.wait().await, Next::Write));
        assert_eq!(queued.take_frames().len(), 2);
        // A frame larger than the budget fits an empty queue, alone.
        outbox.push(Bytes::from(vec![0; 100])).unwrap();
        assert_eq!(outbox.push(Bytes::new()), Err(Overflow::Full));
        assert_eq!(queued.take_frames().len(), 1);
        // The frame count bounds too.
        for _ in 0..3 {
            outbox.push(Bytes::new()).unwrap();
        }
        assert_eq!(outbox.push(Bytes::new()), Err(Overflow::Full));
        assert_eq!(queued.take_frames().len(), 3);
        drop(outbox);
        assert!(matches!(queued.wait().await, Next::Gone));
    }

    #[tokio::test]
    async fn heartbeats_merge_wake_the_socket_and_stop_when_it_is_gone() {
        let (outbox, queued) = Outbox::new(3, 10);
        let listener = queued.listener();
        // Two beats before the socket looks are one, asking for a ping.
        assert!(listener.beat(true));
        assert!(listener.beat(false));
        assert!(matches!(queued.wait().await, Next::Beat { ping: true }));
        // A beat wakes a socket already waiting (the test's runtime has one
        // thread: the task waits once this one yields).
        let waiting = tokio::spawn(async move { (queued.wait().await, queued) });
        tokio::task::yield_now().await;
        assert!(listener.beat(false));
        let (next, queued) = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert!(matches!(next, Next::Beat { ping: false }));
        // Shutdown comes before anything queued.
        outbox.push(Bytes::from_static(b"x")).unwrap();
        assert!(listener.shut_down());
        assert!(matches!(queued.wait().await, Next::ShuttingDown));
        drop((outbox, queued));
        assert!(!listener.beat(true));
    }

    #[test]
    fn a_gone_socket_refuses_frames() {
        let (outbox, queued) = Outbox::new(3, 10);
        drop(queued);
        assert_eq!(outbox.push(Bytes::new()), Err(Overflow::Gone));
    }

    #[test]
    fn headers_carry_the_length_in_the_shortest_form() {
        for (len, head_len) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let chunk = Chunk::binary(Bytes::from(vec![0; len]));
            assert_eq!(chunk.head_len, head_len);
            assert_eq!(chunk_len(&chunk), len);
        }
    }

    #[test]
    fn a_partly_written_frame_resumes_where_it_stopped() {
        let mut chunk = Chunk::binary(Bytes::from_static(b"hello"));
        assert_eq!(chunk.advance(1), 0);
        assert!(chunk.begun);
        assert_eq!(chunk.head(), &[5]);
        assert_eq!(chunk.advance(3), 0);
        assert_eq!(&chunk.body[..], b"llo");
        assert_eq!(chunk.advance(10), 7);
        assert!(chunk.done());
    }
}
