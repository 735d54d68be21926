//! Document sessions. [`Rooms`] is the registry of loaded documents; each
//! [`actor`] task owns one document's `yrs` Doc and Awareness and is the only
//! place they change.
//!
//! A room knows documents, not wire formats: it emits [`Outbound`] messages,
//! which each peer's [`Framer`] turns into frames for its protocol, and it
//! lets a peer go with a [`Leave`] reason, which the peer's session maps to
//! whatever its protocol does then (a close code, a per-document message).
//!
//! Control commands (joins, API reads and writes) reach a room while the
//! registry lock is held, and a room leaves the registry under that same lock
//! only when its queue is empty, so such a command never lands in a room that
//! is going away. Members' messages go straight to the room's queue: a room
//! with members does not retire. A full queue makes senders wait, so a socket
//! whose room cannot keep up stops being read and TCP slows its writer. A new
//! room loads before it reads its queue: clients joining a cold document at
//! once wait for that one load (single flight).

mod actor;
mod queue;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::{StateVector, Update};

use crate::fanout::Fanout;
use crate::store::committer::Committer;
use crate::store::Store;
use crate::transport::Outbox;

/// Commands a room holds before senders wait. Small, so that what waits in a
/// room's queue is milliseconds of work, not seconds.
const COMMAND_QUEUE: usize = 256;
/// A peer's message at least this large is handed to its room one at a time
/// (see [`Member::send`]). Edits and presence are far smaller; pastes and
/// offline catch-ups may be larger, and wait a few milliseconds each.
const LARGE_INBOUND: usize = 64 * 1024;

pub type ConnId = u64;

/// What a room sends to a peer, before any protocol frames it.
#[derive(Debug, Clone, Copy)]
pub enum Outbound<'a> {
    /// The room's state vector (encoded): the peer answers with what the room lacks.
    SyncStep1(&'a [u8]),
    /// What the peer lacks, answering its step 1 (a Yjs v1 update).
    SyncStep2(&'a [u8]),
    /// A document change (a Yjs v1 update).
    Update(&'a [u8]),
    /// An encoded awareness update.
    Awareness(&'a [u8]),
    /// An application message that is never stored.
    Stateless(&'a str),
    /// Whether the peer's document change is stored (`true`) or refused.
    SyncStatus(bool),
}

/// How a peer's protocol puts room messages on its wire.
pub trait Framer: Send + Sync {
    /// The frame carrying `msg`, or `None` when the protocol has no such message.
    fn frame(&self, msg: Outbound<'_>) -> Option<Bytes>;

    /// Peers whose framers have equal keys receive identical frames, so a
    /// broadcast encodes a message once per key in use. Framers of different
    /// protocols never share a key.
    fn key(&self) -> &[u8];
}

/// What a room needs from one peer (a document on a socket).
pub struct Peer {
    /// Frames for the socket; full means a slow consumer.
    pub outbox: Outbox,
    pub framer: Arc<dyn Framer>,
    /// Readers' document updates are refused; their awareness is not.
    pub can_write: bool,
    /// Who the peer is (the token's `sub`), for the record of who changed what.
    pub user: Option<Arc<str>>,
}

/// Why a room let a peer go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leave {
    /// The peer's queue overflowed: it does not keep up.
    SlowConsumer,
    /// yrs refused an update the peer sent.
    BadUpdate(String),
    /// The peer's awareness went past the limits.
    BadAwareness(&'static str),
    /// Updates cannot be accepted now (too many wait for storage).
    Overloaded(String),
    /// The document broke in memory and is loaded again from the store.
    Reloading,
}

/// A peer's message for its room, decoded and checked by its session.
#[derive(Debug)]
pub enum Inbound {
    /// The peer's state vector: answer with the diff.
    SyncStep1(StateVector),
    /// Document changes (a sync step 2 or an update): the raw bytes for
    /// broadcast and storage, and the decoded update.
    Update {
        raw: Bytes,
        update: Update,
    },
    /// An awareness update, decoded.
    Awareness {
        update: AwarenessUpdate,
    },
    QueryAwareness,
    Stateless(String),
}

impl Inbound {
    /// About what the message holds in memory, decoded.
    fn bytes(&self) -> usize {
        match self {
            Inbound::Update { raw, .. } => raw.len(),
            Inbound::Awareness { update } => update.clients.values().map(|e| e.json.len()).sum(),
            Inbound::Stateless(payload) => payload.len(),
            Inbound::SyncStep1(_) | Inbound::QueryAwareness => 0,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RoomError {
    #[error("document storage is unavailable: {0}")]
    Unavailable(String),
    #[error("update could not be applied: {0}")]
    BadUpdate(String),
}

/// The document as a Yjs update, for the HTTP API.
pub struct Snapshot {
    pub update: Bytes,
    /// False when the document holds nothing at all (never written).
    pub exists: bool,
}

/// What a room's queue carries. Large payloads are boxed: the queue allocates
/// its slots in blocks of 32 up front, so a command's size is paid 32 times
/// per loaded room.
pub(crate) enum Command {
    Join {
        conn: ConnId,
        peer: Box<Peer>,
        reply: oneshot::Sender<Result<(), RoomError>>,
    },
    Leave {
        conn: ConnId,
    },
    Inbound {
        conn: ConnId,
        msg: Box<Handed>,
    },
    Read {
        since: Box<StateVector>,
        reply: oneshot::Sender<Result<Snapshot, RoomError>>,
    },
    Write(Box<Write>),
}

/// A peer's message in the room's queue. A large one carries a sender the
/// room drops once the message is handled, which is what its socket waits for.
pub(crate) struct Handed {
    pub msg: Inbound,
    pub handled: Option<oneshot::Sender<()>>,
}

/// An update posted over HTTP.
pub(crate) struct Write {
    raw: Bytes,
    update: Update,
    user: Option<Arc<str>>,
    /// Answered with a receiver that fires once the update is durable.
    reply: oneshot::Sender<Result<oneshot::Receiver<()>, RoomError>>,
}

/// What every room shares.
pub struct RoomContext {
    pub store: Arc<dyn Store>,
    pub committer: Committer,
    pub fanout: Arc<dyn Fanout>,
    pub unload_after: Duration,
    /// States of clients on other replicas that are not renewed for this long are dropped.
    pub awareness_timeout: Duration,
}

#[derive(Clone)]
pub struct Rooms {
    inner: Arc<Inner>,
}

struct Inner {
    rooms: Mutex<HashMap<Arc<str>, Entry>>,
    ctx: RoomContext,
    next_id: AtomicU64,
    /// Documents whose state failed to encode: their next load checks it.
    suspect: Mutex<HashSet<Arc<str>>>,
}

struct Entry {
    tx: queue::Sender<Command>,
    generation: u64,
}

/// A peer's membership of a room.
pub struct Member {
    tx: queue::Sender<Command>,
    pub conn: ConnId,
}

impl Member {
    /// Hands a message to the room, waiting while its queue is full; false
    /// when the room is gone.
    ///
    /// A large message is also waited on until the room has handled it. The
    /// queue is bounded in commands, not bytes: a peer sending megabyte
    /// frames faster than its room handles them would otherwise park a
    /// queue's worth of them in memory. Waiting stops its socket being read,
    /// so TCP slows it to the room's pace.
    pub async fn send(&self, msg: Inbound) -> bool {
        let (handled, taken) = if msg.bytes() >= LARGE_INBOUND {
            let (handled, taken) = oneshot::channel();
            (Some(handled), Some(taken))
        } else {
            (None, None)
        };
        let cmd = Command::Inbound {
            conn: self.conn,
            msg: Box::new(Handed { msg, handled }),
        };
        if self.tx.send(cmd).await.is_err() {
            return false;
        }
        if let Some(taken) = taken {
            // Dropped, not sent: the room may also be gone by then.
            let _ = taken.await;
        }
        true
    }

    pub async fn leave(self) {
        let _ = self.tx.send(Command::Leave { conn: self.conn }).await;
    }
}

impl Rooms {
    pub fn new(ctx: RoomContext) -> Self {
        Self {
            inner: Arc::new(Inner {
                rooms: Mutex::new(HashMap::new()),
                ctx,
                next_id: AtomicU64::new(1),
                suspect: Mutex::default(),
            }),
        }
    }

    pub fn context(&self) -> &RoomContext {
        &self.inner.ctx
    }

    pub fn loaded(&self) -> usize {
        self.inner.rooms.lock().expect("rooms lock").len()
    }

    /// Joins the document's room (loading it if needed); the room sends its
    /// step 1 and the awareness states to the peer before answering.
    pub async fn join(&self, doc: &str, peer: Peer) -> Result<Member, RoomError> {
        let conn = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Join {
            conn,
            peer: Box::new(peer),
            reply,
        };
        let tx = self.dispatch(doc, true, cmd).await?.expect("spawned");
        answer
            .await
            .map_err(|_| RoomError::Unavailable("room stopped".into()))??;
        Ok(Member { tx, conn })
    }

    /// The document's current state (or the diff against `since`). Served from
    /// memory when loaded here, else straight from the store.
    pub async fn read(&self, doc: &str, since: StateVector) -> Result<Snapshot, RoomError> {
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Read {
            since: Box::new(since.clone()),
            reply,
        };
        match self.dispatch(doc, false, cmd).await? {
            Some(_) => answer
                .await
                .map_err(|_| RoomError::Unavailable("room stopped".into()))?,
            None => actor::read_stored(&*self.inner.ctx.store, doc, &since).await,
        }
    }

    /// Merges an update as if a client had sent it; resolves once it is durable.
    pub async fn write(
        &self,
        doc: &str,
        raw: Bytes,
        update: Update,
        user: Option<Arc<str>>,
    ) -> Result<(), RoomError> {
        let (reply, answer) = oneshot::channel();
        let write = Box::new(Write {
            raw,
            update,
            user,
            reply,
        });
        self.dispatch(doc, true, Command::Write(write)).await?;
        let durable = answer
            .await
            .map_err(|_| RoomError::Unavailable("room stopped".into()))??;
        durable
            .await
            .map_err(|_| RoomError::Unavailable("stopped before the update was stored".into()))
    }

    /// Queues a command for the document's room, spawning the room when
    /// `spawn` is set; `None` when it is not loaded and not spawned (the
    /// command is dropped). A full queue is waited on outside the registry
    /// lock; the command then goes in under the lock, into the room that
    /// is still registered, so it never lands in a room that retired.
    async fn dispatch(
        &self,
        doc: &str,
        spawn: bool,
        mut cmd: Command,
    ) -> Result<Option<queue::Sender<Command>>, RoomError> {
        loop {
            let (tx, generation) = {
                let mut rooms = self.inner.rooms.lock().expect("rooms lock");
                let (tx, generation) = match rooms.get(doc) {
                    Some(entry) => (entry.tx.clone(), entry.generation),
                    None if spawn => self.spawn(&mut rooms, doc),
                    None => return Ok(None),
                };
                match tx.try_send(cmd) {
                    Ok(()) => return Ok(Some(tx)),
                    Err(queue::TrySendError::Full(back)) => cmd = back,
                    Err(queue::TrySendError::Closed(_)) => {
                        return Err(RoomError::Unavailable("room stopped".into()))
                    }
                }
                (tx, generation)
            };
            let Ok(permit) = tx.reserve().await else {
                continue;
            };
            let rooms = self.inner.rooms.lock().expect("rooms lock");
            if rooms.get(doc).is_some_and(|e| e.generation == generation) {
                // Still registered, so not retired; but a room that panicked
                // is closed before it is forgotten.
                if permit.send(cmd).is_err() {
                    return Err(RoomError::Unavailable("room stopped".into()));
                }
                return Ok(Some(tx));
            }
        }
    }

    fn spawn(
        &self,
        rooms: &mut HashMap<Arc<str>, Entry>,
        doc: &str,
    ) -> (queue::Sender<Command>, u64) {
        let doc: Arc<str> = doc.into();
        let (tx, rx) = queue::channel(COMMAND_QUEUE);
        let generation = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        rooms.insert(
            doc.clone(),
            Entry {
                tx: tx.clone(),
                generation,
            },
        );
        let check = self
            .inner
            .suspect
            .lock()
            .expect("suspect lock")
            .remove(&doc);
        actor::spawn(self.clone(), doc, generation, rx, check);
        (tx, generation)
    }

    /// Marks a document whose state failed to encode, so that its next load
    /// checks it and leaves out what breaks it.
    fn suspect(&self, doc: &Arc<str>) {
        self.inner
            .suspect
            .lock()
            .expect("suspect lock")
            .insert(doc.clone());
    }

    /// Removes a room that ended abnormally from the registry.
    fn forget(&self, doc: &str, generation: u64) {
        let mut rooms = self.inner.rooms.lock().expect("rooms lock");
        remove_generation(&mut rooms, doc, generation);
    }

    /// Removes a room from the registry if it is still the one registered and
    /// nothing is queued for it. Called by the room itself.
    fn retire(&self, doc: &str, generation: u64, rx: &mut queue::Receiver<Command>) -> bool {
        let mut rooms = self.inner.rooms.lock().expect("rooms lock");
        if !rx.is_empty() {
            return false;
        }
        // Under the same lock as the emptiness check: `dispatch` queues under
        // it, so nothing can slip in between.
        remove_generation(&mut rooms, doc, generation);
        rx.close();
        true
    }
}

/// Removes `doc` if it is still the room of that generation (a newer room may
/// have taken its place).
fn remove_generation(rooms: &mut HashMap<Arc<str>, Entry>, doc: &str, generation: u64) {
    if rooms.get(doc).is_some_and(|e| e.generation == generation) {
        rooms.remove(doc);
    }
}
