//! One document session: the task that owns a `yrs` Doc and its Awareness.
//!
//! Order of life: subscribe to the fan-out, load snapshot + log from the store
//! (single flight: joins queue meanwhile), then serve commands until the last
//! client has been gone for `unload_after`, flush, and retire.
//!
//! Commands are taken in batches: after one wakes the room, what else is
//! queued is handled too, and the awareness changes of the whole batch go out
//! as one merged update.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::sync::Awareness;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

use super::{
    queue, Command, ConnId, Handed, Inbound, Leave, Outbound, Peer, RoomError, Rooms, Snapshot,
    Write,
};
use crate::doc::guard::{self, ApplyError};
use crate::fanout::{Published, Remote, Subscription};
use crate::metrics as m;
use crate::store::committer::{Ack, LogSize};
use crate::store::{self, NewUpdate, Store};
use crate::transport::Overflow;

/// A provider announces one awareness client per document; a few more leave
/// room for clients that multiplex. Past these limits awareness would be a way
/// to make every replica hold state without bound, so the peer is let go.
const MAX_AWARENESS_CLIENTS_PER_CONNECTION: usize = 16;
/// Cursors, names and colours take a few hundred bytes.
const MAX_AWARENESS_STATE_BYTES: usize = 64 * 1024;
/// Commands handled per wake-up before the room yields to the sockets it feeds.
const BATCH: usize = 64;

struct Member {
    peer: Peer,
    /// Awareness client ids this peer announced; removed when it leaves. A
    /// provider announces one, so a list: a set's table and hasher would be
    /// carried by every idle member.
    awareness_ids: Vec<ClientID>,
}

/// The last diff computed for a step 1, with its frames: a join storm asks
/// for the same diff (the whole document) many times over.
struct DiffCache {
    version: u64,
    since: StateVector,
    update: Bytes,
    frames: Vec<(Box<[u8]>, Option<Bytes>)>,
}

struct Room {
    rooms: Rooms,
    doc_name: Arc<str>,
    generation: u64,
    awareness: Awareness,
    members: HashMap<ConnId, Member>,
    idle_since: Option<Instant>,
    /// An update broke the in-memory document: serve no more, reload.
    poisoned: bool,
    /// Check the stored state on load (it failed to encode before).
    check: bool,
    /// Bumped on every change to the document.
    version: u64,
    diff_cache: Option<DiffCache>,
    /// Awareness clients changed in this batch, sent merged at its end.
    awareness_changed: HashSet<ClientID>,
    /// Whether the room keeps up (no command waits behind the one in hand):
    /// only then does it write to its members' sockets itself.
    direct: bool,
}

pub(super) fn spawn(
    rooms: Rooms,
    doc: Arc<str>,
    generation: u64,
    rx: queue::Receiver<Command>,
    check: bool,
) {
    let room = Box::new(Room {
        rooms,
        doc_name: doc,
        generation,
        awareness: Awareness::new(Doc::new()),
        members: HashMap::new(),
        idle_since: Some(Instant::now()),
        poisoned: false,
        check,
        version: 0,
        diff_cache: None,
        awareness_changed: HashSet::new(),
        direct: true,
    });
    let (rooms, doc) = (room.rooms.clone(), room.doc_name.clone());
    tokio::spawn(async move {
        if AssertUnwindSafe(room.run(rx)).catch_unwind().await.is_err() {
            // A bug, not a client's doing: the next join loads a fresh room
            // instead of finding this one's queue closed for ever. The clients
            // see their room go (1012) and reconnect.
            tracing::error!(doc = %doc, "room panicked; unloading it");
            rooms.forget(&doc, generation);
        }
    });
}

/// Serves an API read of a document no room holds, straight from the store.
pub(super) async fn read_stored(
    store: &dyn Store,
    doc: &str,
    since: &StateVector,
) -> Result<Snapshot, RoomError> {
    let stored = store
        .load(doc)
        .await
        .map_err(|e| RoomError::Unavailable(e.to_string()))?;
    m::store_loaded();
    let exists = !stored.is_empty();
    let ydoc =
        crate::doc::build(&stored, true).map_err(|e| RoomError::Unavailable(e.to_string()))?;
    let update = guard::encode_diff(&ydoc, since)
        .map_err(|e| RoomError::Unavailable(e.to_string()))?
        .into();
    guard::discard(ydoc);
    Ok(Snapshot { update, exists })
}

impl Room {
    /// Boxed: an async fn that takes a value keeps room for it twice, and the
    /// room's task holds this future for as long as the document is loaded.
    async fn run(mut self: Box<Self>, mut rx: queue::Receiver<Command>) {
        let ctx = self.rooms.context();
        // Subscribe first: whatever is published from here on is delivered, and
        // everything published before is already in the store we load next.
        let subscription = match ctx.fanout.subscribe(&self.doc_name).await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(doc = %self.doc_name, %error, "loading without fan-out; will resync");
                Subscription::none()
            }
        };
        if let Err(error) = self.load().await {
            tracing::error!(doc = %self.doc_name, %error, "failed to load document");
            self.fail_all(&mut rx, RoomError::Unavailable(error.to_string()));
            return;
        }
        self.serve(&mut rx, subscription).await;
        self.rooms.context().committer.forget(self.doc_name.clone());
    }

    async fn load(&mut self) -> Result<(), store::StoreError> {
        let ctx = self.rooms.context();
        let stored = ctx.store.load(&self.doc_name).await?;
        m::store_loaded();
        let log = LogSize {
            entries: stored.updates.len() as u64,
            bytes: stored.log_bytes(),
            snapshot: stored.snapshot_bytes(),
        };
        self.awareness = Awareness::new(crate::doc::build(&stored, self.check)?);
        ctx.committer.loaded(self.doc_name.clone(), log);
        Ok(())
    }

    /// The load failed: answer everything queued, and leave the registry so
    /// the next join tries again.
    fn fail_all(&self, rx: &mut queue::Receiver<Command>, error: RoomError) {
        loop {
            while let Some(cmd) = rx.try_recv() {
                match cmd {
                    Command::Join { reply, .. } => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    Command::Read { reply, .. } => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    Command::Write(write) => {
                        let _ = write.reply.send(Err(error.clone()));
                    }
                    Command::Leave { .. } | Command::Inbound { .. } => {}
                }
            }
            if self.rooms.retire(&self.doc_name, self.generation, rx) {
                return;
            }
        }
    }

    async fn serve(&mut self, rx: &mut queue::Receiver<Command>, mut sub: Subscription) {
        let ctx = self.rooms.context();
        let unload_after = ctx.unload_after;
        let mut sweep = tokio::time::interval(ctx.awareness_timeout / 2);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let unload_at = self.idle_since.map(|t| t + unload_after);
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        self.direct = rx.is_empty();
                        self.handle(cmd);
                        for _ in 1..BATCH {
                            let Some(cmd) = rx.try_recv() else { break };
                            self.direct = rx.is_empty();
                            self.handle(cmd);
                        }
                    }
                    None => return,
                },
                Some(remote) = sub.recv() => self.handle_remote(remote).await,
                _ = sleep_until(unload_at) => {
                    // Flush first: once retired, a new room may load this document
                    // from the store, which must then hold everything.
                    self.rooms.context().committer.flush().await;
                    if self.members.is_empty() && self.rooms.retire(&self.doc_name, self.generation, rx) {
                        tracing::debug!(doc = %self.doc_name, "unloaded idle document");
                        return;
                    }
                    self.idle_since = self.members.is_empty().then(Instant::now);
                }
                _ = sweep.tick() => self.expire_remote_awareness(),
            }
            self.flush_awareness();
            if self.poisoned {
                return self.reload(rx);
            }
        }
    }

    /// Gives the document up after an update broke it in memory. The update
    /// was not stored, so every client reconnects to a room loaded afresh
    /// from the store.
    fn reload(&mut self, rx: &mut queue::Receiver<Command>) {
        for (conn, member) in self.members.drain() {
            member.peer.outbox.leave(conn, Leave::Reloading);
        }
        self.rooms.suspect(&self.doc_name);
        self.fail_all(rx, RoomError::Unavailable("document reloading".into()));
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Join { conn, peer, reply } => {
                self.join(conn, *peer);
                let _ = reply.send(Ok(()));
            }
            Command::Leave { conn } => self.remove(conn),
            Command::Inbound { conn, msg } => {
                let Handed { msg, handled } = *msg;
                self.inbound(conn, msg);
                drop(handled);
            }
            Command::Read { since, reply } => {
                let exists = !self.awareness.doc().transact().state_vector().is_empty();
                let result = self.encode_diff(&since).map(|update| Snapshot {
                    update: update.into(),
                    exists,
                });
                let _ = reply.send(result);
            }
            Command::Write(write) => {
                let Write {
                    raw,
                    update,
                    user,
                    reply,
                } = *write;
                let (durable, stored) = oneshot::channel();
                let ack: Ack = Box::new(move || {
                    let _ = durable.send(());
                });
                let result = self
                    .apply_local(raw, update, None, user, Some(ack))
                    .map(|()| stored);
                let _ = reply.send(result);
            }
        }
    }

    fn join(&mut self, conn: ConnId, peer: Peer) {
        let sv = self.awareness.doc().transact().state_vector().encode_v1();
        let member = Member {
            peer,
            awareness_ids: Vec::new(),
        };
        let mut ok = send(&member.peer, conn, Outbound::SyncStep1(&sv));
        if let Some(states) = awareness_states(&self.awareness) {
            ok &= send(&member.peer, conn, Outbound::Awareness(&states));
        }
        if ok {
            self.members.insert(conn, member);
            self.idle_since = None;
        }
    }

    /// Drops a member: its awareness states go with it, for everyone.
    fn remove(&mut self, conn: ConnId) {
        let Some(member) = self.members.remove(&conn) else {
            return;
        };
        for id in &member.awareness_ids {
            self.awareness.remove_state(*id);
            self.awareness_changed.insert(*id);
        }
        if self.members.is_empty() {
            self.idle_since = Some(Instant::now());
        }
    }

    /// Lets a member go, telling its socket why.
    fn evict(&mut self, conn: ConnId, why: Leave) {
        if let Some(member) = self.members.get(&conn) {
            member.peer.outbox.leave(conn, why);
        }
        self.remove(conn);
    }

    fn inbound(&mut self, conn: ConnId, msg: Inbound) {
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        match msg {
            Inbound::SyncStep1(sv) => {
                let Some(frame) = self.step2_frame(conn, &sv) else {
                    return;
                };
                let member = &self.members[&conn];
                if let Some(frame) = frame {
                    if !push(&member.peer, conn, frame) {
                        self.remove(conn);
                    }
                }
            }
            Inbound::Update { raw, update } => {
                if !member.peer.can_write {
                    // Read access: nothing of it is applied, stored or sent on.
                    // A peer that tracks sync status hears whether it had
                    // anything to say.
                    let status = Outbound::SyncStatus(update.is_empty());
                    if let Some(frame) = member.peer.framer.frame(status) {
                        if !push(&member.peer, conn, frame) {
                            self.remove(conn);
                        }
                    }
                    return;
                }
                // Framed per update rather than kept per member: every idle
                // member would carry the frames.
                let stored = member.peer.framer.frame(Outbound::SyncStatus(true));
                let ack = stored.map(|frame| {
                    let outbox = member.peer.outbox.clone();
                    Box::new(move || {
                        // The frame goes straight to the socket: a peer too
                        // slow for it is let go by the next broadcast.
                        let _ = outbox.push(frame);
                    }) as Ack
                });
                let user = member.peer.user.clone();
                if let Err(error) = self.apply_local(raw, update, Some(conn), user, ack) {
                    tracing::info!(doc = %self.doc_name, %error, "update refused");
                    let why = match error {
                        RoomError::BadUpdate(why) => Leave::BadUpdate(why),
                        RoomError::Unavailable(why) => Leave::Overloaded(why),
                    };
                    self.evict(conn, why);
                }
            }
            Inbound::Awareness { update } => {
                if let Err(reason) = check_awareness(&member.awareness_ids, &update) {
                    tracing::info!(doc = %self.doc_name, reason, "awareness refused");
                    self.evict(conn, Leave::BadAwareness(reason));
                    return;
                }
                for (id, entry) in &update.clients {
                    if &*entry.json == "null" {
                        member.awareness_ids.retain(|owned| owned != id);
                    } else if !member.awareness_ids.contains(id) {
                        member.awareness_ids.push(*id);
                    }
                    self.awareness_changed.insert(*id);
                }
                let _ = self.awareness.apply_update(update);
            }
            Inbound::QueryAwareness => {
                if let Some(states) = awareness_states(&self.awareness) {
                    if !send(&member.peer, conn, Outbound::Awareness(&states)) {
                        self.remove(conn);
                    }
                }
            }
            Inbound::Stateless(payload) => {
                let fanout = &self.rooms.context().fanout;
                fanout.publish(&self.doc_name, Published::Stateless(payload.clone().into()));
                self.broadcast(Outbound::Stateless(&payload), Some(conn));
            }
        }
    }

    /// The step 2 frame answering `sv` for `conn`'s protocol: `None` when the
    /// document cannot be encoded, `Some(None)` when the protocol has no such
    /// frame. Frames of the last diff are kept while the document is unchanged.
    fn step2_frame(&mut self, conn: ConnId, sv: &StateVector) -> Option<Option<Bytes>> {
        let hit = self
            .diff_cache
            .as_ref()
            .is_some_and(|c| c.version == self.version && &c.since == sv);
        if !hit {
            let mut update = self.encode_diff(sv).ok()?;
            // The encoder reserves ahead, and the cache keeps the diff for as
            // long as the document is unchanged: it keeps only what it holds.
            update.shrink_to_fit();
            self.diff_cache = Some(DiffCache {
                version: self.version,
                since: sv.clone(),
                update: update.into(),
                frames: Vec::new(),
            });
        }
        let cache = self.diff_cache.as_mut().expect("just filled");
        let framer = &self.members[&conn].peer.framer;
        if let Some((_, frame)) = cache.frames.iter().find(|(k, _)| **k == *framer.key()) {
            return Some(frame.clone());
        }
        let frame = framer.frame(Outbound::SyncStep2(&cache.update));
        cache.frames.push((framer.key().into(), frame.clone()));
        Some(frame)
    }

    /// Applies an update from a client of this replica (socket or HTTP): in
    /// memory, to the other local clients at once, and to the group commit,
    /// which publishes it to other replicas once it is durable and then acks.
    fn apply_local(
        &mut self,
        raw: Bytes,
        update: Update,
        from: Option<ConnId>,
        user: Option<Arc<str>>,
        ack: Option<Ack>,
    ) -> Result<(), RoomError> {
        if update.is_empty() {
            // Every client answers our step 1 with a step 2, mostly empty:
            // nothing to apply, store or broadcast.
            if let Some(ack) = ack {
                ack();
            }
            return Ok(());
        }
        let committer = &self.rooms.context().committer;
        let reservation = committer
            .reserve(raw.len())
            .map_err(|e| RoomError::Unavailable(e.to_string()))?;
        self.apply(update)?;
        self.broadcast(Outbound::Update(&raw), from);
        reservation.submit(
            NewUpdate {
                doc: self.doc_name.clone(),
                data: raw,
                user,
            },
            ack,
        );
        Ok(())
    }

    /// The document's state since `since`. A failure to encode means an
    /// update broke the document: the room is then reloaded, with a check.
    fn encode_diff(&mut self, since: &StateVector) -> Result<Vec<u8>, RoomError> {
        guard::encode_diff(self.awareness.doc(), since).map_err(|error| {
            tracing::error!(doc = %self.doc_name, %error, "document cannot be encoded; reloading it");
            self.poisoned = true;
            RoomError::Unavailable("document reloading".into())
        })
    }

    fn apply(&mut self, update: Update) -> Result<(), RoomError> {
        let applied = guard::apply(self.awareness.doc(), update);
        // Even a refused update may have changed something before yrs gave up.
        self.version += 1;
        applied.map_err(|error| {
            if let ApplyError::Poisoned(why) = error {
                tracing::error!(doc = %self.doc_name, why, "document state broken by an update; reloading it");
                self.poisoned = true;
            }
            RoomError::BadUpdate(error.to_string())
        })
    }

    async fn handle_remote(&mut self, remote: Remote) {
        match remote {
            Remote::Update(raw) => {
                let Ok(update) = Update::decode_v1(&raw) else {
                    tracing::warn!(doc = %self.doc_name, "undecodable update from another replica");
                    return;
                };
                if self.apply(update).is_ok() {
                    self.broadcast(Outbound::Update(&raw), None);
                }
            }
            Remote::Awareness(raw) => {
                if let Ok(update) = AwarenessUpdate::decode_v1(&raw) {
                    let _ = self.awareness.apply_update(update);
                    self.broadcast(Outbound::Awareness(&raw), None);
                }
            }
            Remote::Stateless(payload) => self.broadcast(Outbound::Stateless(&payload), None),
            Remote::Resync => self.resync().await,
        }
    }

    /// Catches up from the store after the fan-out lost messages.
    async fn resync(&mut self) {
        let store = self.rooms.context().store.clone();
        let stored = match store.load(&self.doc_name).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(doc = %self.doc_name, %error, "resync from store failed");
                return;
            }
        };
        m::store_loaded();
        let before = self.awareness.doc().transact().state_vector();
        self.version += 1;
        if let Err(error) = crate::doc::apply_stored(self.awareness.doc(), &stored) {
            tracing::error!(doc = %self.doc_name, %error, "resync found corrupt data; reloading");
            self.poisoned = true;
            return;
        }
        let Ok(diff) = self.encode_diff(&before) else {
            return;
        };
        if !is_empty_update(&diff) {
            self.broadcast(Outbound::Update(&diff), None);
        }
    }

    /// Drops states of clients on other replicas that stopped renewing them
    /// (their replica died); local clients are removed when they leave.
    fn expire_remote_awareness(&mut self) {
        let timeout = self.rooms.context().awareness_timeout.as_millis() as u64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let local: HashSet<ClientID> = self
            .members
            .values()
            .flat_map(|m| m.awareness_ids.iter().copied())
            .collect();
        let stale: Vec<ClientID> = self
            .awareness
            .iter()
            .filter(|(id, state)| {
                state.data.is_some()
                    && !local.contains(id)
                    && now.saturating_sub(state.last_updated) > timeout
            })
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            self.awareness.remove_state(id);
            self.awareness_changed.insert(id);
        }
    }

    /// Sends the awareness changes of the batch as one update: to every local
    /// member, the sender included (it is how an idle client alone in a
    /// document keeps receiving something, for y-websocket's 30 s timeout),
    /// and to the other replicas.
    fn flush_awareness(&mut self) {
        if self.awareness_changed.is_empty() {
            return;
        }
        let changed = std::mem::take(&mut self.awareness_changed);
        let Ok(update) = self.awareness.update_with_clients(changed) else {
            return;
        };
        let encoded = Bytes::from(update.encode_v1());
        self.rooms
            .context()
            .fanout
            .publish(&self.doc_name, Published::Awareness(encoded.clone()));
        self.broadcast(Outbound::Awareness(&encoded), None);
    }

    /// Queues a message for every member but `except`, framed once per
    /// framer in use. A member whose queue is full is let go as a slow
    /// consumer: it reconnects and resyncs.
    fn broadcast(&mut self, msg: Outbound<'_>, except: Option<ConnId>) {
        let mut frames: Vec<(&[u8], Option<Bytes>)> = Vec::new();
        let mut dropped = Vec::new();
        for (conn, member) in &self.members {
            if Some(*conn) == except {
                continue;
            }
            let framer = &member.peer.framer;
            let key = framer.key();
            let frame = match frames.iter().find(|(k, _)| *k == key) {
                Some((_, frame)) => frame.clone(),
                None => {
                    let frame = framer.frame(msg);
                    frames.push((key, frame.clone()));
                    frame
                }
            };
            let Some(frame) = frame else { continue };
            let queued = match self.direct {
                true => member.peer.outbox.push(frame),
                false => member.peer.outbox.queue(frame),
            };
            if !pushed(&member.peer, *conn, queued) {
                dropped.push(*conn);
            }
        }
        for conn in dropped {
            self.remove(conn);
        }
    }
}

/// Every awareness state the room holds, encoded; `None` when there is none.
fn awareness_states(awareness: &Awareness) -> Option<Vec<u8>> {
    let update: AwarenessUpdate = awareness.update().ok()?;
    (!update.clients.is_empty()).then(|| update.encode_v1())
}

/// Frames and queues one message for one peer; false when the peer is gone
/// or too slow (it has then been told to leave).
fn send(peer: &Peer, conn: ConnId, msg: Outbound<'_>) -> bool {
    match peer.framer.frame(msg) {
        Some(frame) => push(peer, conn, frame),
        None => true,
    }
}

fn push(peer: &Peer, conn: ConnId, frame: Bytes) -> bool {
    pushed(peer, conn, peer.outbox.push(frame))
}

/// Whether a frame was queued; a peer too slow for it is told to leave.
fn pushed(peer: &Peer, conn: ConnId, queued: Result<(), Overflow>) -> bool {
    match queued {
        Ok(()) => true,
        Err(Overflow::Full) => {
            peer.outbox.leave(conn, Leave::SlowConsumer);
            false
        }
        Err(Overflow::Gone) => false,
    }
}

/// Whether a peer's awareness update stays within the limits, judged before
/// any of it is applied.
fn check_awareness(owned: &[ClientID], update: &AwarenessUpdate) -> Result<(), &'static str> {
    if update
        .clients
        .values()
        .any(|entry| entry.json.len() > MAX_AWARENESS_STATE_BYTES)
    {
        return Err("awareness state too large");
    }
    let added = update
        .clients
        .iter()
        .filter(|(id, entry)| &*entry.json != "null" && !owned.contains(id))
        .count();
    if owned.len() + added > MAX_AWARENESS_CLIENTS_PER_CONNECTION {
        return Err("too many awareness clients");
    }
    Ok(())
}

/// A Yjs v1 update with no structs and no deletions: two zero varints.
fn is_empty_update(update: &[u8]) -> bool {
    update == [0, 0]
}

/// Sleeps until `deadline`, or forever without one (a disabled `select!` timer).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
