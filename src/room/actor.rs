//! One document session: the task that owns a `yrs` Doc and its Awareness.
//!
//! Order of life: subscribe to the fan-out, load snapshot + log from the store
//! (single flight: joins queue meanwhile), then serve commands until the last
//! client has been gone for `unload_after`, flush, and retire.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::sync::{Awareness, Message};
use yrs::updates::decoder::Decode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

use super::{Command, ConnId, Peer, RoomError, Rooms, Snapshot, Write};
use crate::connection::{close, sleep_until, Overflow};
use crate::fanout::{Remote, Subscription};
use crate::guard::{self, ApplyError};
use crate::metrics as m;
use crate::protocol::{ywebsocket, Inbound};
use crate::store::{self, NewUpdate, Store};

/// A provider announces one awareness client per document; a few more leave
/// room for clients that multiplex. Past these limits awareness would be a way
/// to make every replica hold state without bound, so the socket is closed.
const MAX_AWARENESS_CLIENTS_PER_CONNECTION: usize = 16;
/// Cursors, names and colours take a few hundred bytes.
const MAX_AWARENESS_STATE_BYTES: usize = 64 * 1024;

struct Member {
    peer: Peer,
    /// Awareness client ids this connection announced; removed when it leaves.
    awareness_ids: HashSet<ClientID>,
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
}

pub(super) fn spawn(
    rooms: Rooms,
    doc: Arc<str>,
    generation: u64,
    rx: mpsc::Receiver<Command>,
    check: bool,
) {
    let room = Room {
        rooms,
        doc_name: doc,
        generation,
        awareness: Awareness::new(Doc::new()),
        members: HashMap::new(),
        idle_since: Some(Instant::now()),
        poisoned: false,
        check,
    };
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
    metrics::counter!(m::STORE_LOADS).increment(1);
    let exists = !stored.is_empty();
    let ydoc =
        store::build_doc(&stored, true).map_err(|e| RoomError::Unavailable(e.to_string()))?;
    let update = ydoc.transact().encode_diff_v1(since);
    Ok(Snapshot { update, exists })
}

impl Room {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let ctx = self.rooms.context();
        // Subscribe first: whatever is published from here on is delivered, and
        // everything published before is already in the store we load next.
        let subscription = match ctx.fanout.subscribe(&self.doc_name).await {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::warn!(doc = %self.doc_name, %error, "loading without fan-out; will resync");
                None
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
        metrics::counter!(m::STORE_LOADS).increment(1);
        let (entries, bytes) = (stored.updates.len() as u64, stored.log_bytes());
        self.awareness = Awareness::new(store::build_doc(&stored, self.check)?);
        ctx.committer.loaded(self.doc_name.clone(), entries, bytes);
        Ok(())
    }

    /// The load failed: answer everything queued, and leave the registry so
    /// the next join tries again.
    fn fail_all(&self, rx: &mut mpsc::Receiver<Command>, error: RoomError) {
        loop {
            while let Ok(cmd) = rx.try_recv() {
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

    async fn serve(&mut self, rx: &mut mpsc::Receiver<Command>, mut sub: Option<Subscription>) {
        let ctx = self.rooms.context();
        let unload_after = ctx.unload_after;
        let mut sweep = tokio::time::interval(ctx.awareness_timeout / 2);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let unload_at = self.idle_since.map(|t| t + unload_after);
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                Some(remote) = recv_remote(&mut sub) => self.handle_remote(remote).await,
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
            if self.poisoned {
                return self.reload(rx);
            }
        }
    }

    /// Gives the document up after an update broke it in memory. The update
    /// was not stored, so every client reconnects (1012) to a room loaded
    /// afresh from the store.
    fn reload(&mut self, rx: &mut mpsc::Receiver<Command>) {
        for member in self.members.values() {
            member
                .peer
                .outbox
                .close(close::RESTARTING, "document reloading");
        }
        self.members.clear();
        self.rooms.suspect(&self.doc_name);
        self.fail_all(rx, RoomError::Unavailable("document reloading".into()));
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Join { conn, peer, reply } => {
                self.join(conn, *peer);
                let _ = reply.send(Ok(()));
            }
            Command::Leave { conn } => self.leave(conn),
            Command::Inbound { conn, msg } => self.inbound(conn, *msg),
            Command::Read { since, reply } => {
                let exists = !self.awareness.doc().transact().state_vector().is_empty();
                let result = self
                    .encode_diff(&since)
                    .map(|update| Snapshot { update, exists });
                let _ = reply.send(result);
            }
            Command::Write(write) => {
                let Write { raw, update, reply } = *write;
                let (durable, stored) = oneshot::channel();
                let result = self
                    .apply_local(raw, update, None, Some(durable))
                    .map(|()| stored);
                let _ = reply.send(result);
            }
        }
    }

    fn join(&mut self, conn: ConnId, peer: Peer) {
        let sv = self.awareness.doc().transact().state_vector();
        send(&peer, ywebsocket::sync_step1(&sv));
        if let Some(states) = self.awareness_states() {
            send(&peer, states);
        }
        self.members.insert(
            conn,
            Member {
                peer,
                awareness_ids: HashSet::new(),
            },
        );
        self.idle_since = None;
    }

    fn leave(&mut self, conn: ConnId) {
        let Some(member) = self.members.remove(&conn) else {
            return;
        };
        if !member.awareness_ids.is_empty() {
            for id in &member.awareness_ids {
                self.awareness.remove_state(*id);
            }
            if let Ok(update) = self
                .awareness
                .update_with_clients(member.awareness_ids.iter().copied())
            {
                let frame = ywebsocket::awareness(update);
                self.rooms
                    .context()
                    .fanout
                    .publish_awareness(&self.doc_name, frame.clone());
                self.broadcast(frame, None);
            }
        }
        if self.members.is_empty() {
            self.idle_since = Some(Instant::now());
        }
    }

    fn inbound(&mut self, conn: ConnId, msg: Inbound) {
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        let can_write = member.peer.can_write;
        match msg {
            Inbound::SyncStep1(sv) => {
                let Ok(diff) = self.encode_diff(&sv) else {
                    return;
                };
                if !send(&self.members[&conn].peer, ywebsocket::sync_step2(diff)) {
                    self.leave(conn);
                }
            }
            Inbound::Update { raw, update } => {
                if !can_write {
                    return;
                }
                if let Err(error) = self.apply_local(raw, update, Some(conn), None) {
                    let member = &self.members[&conn];
                    let code = match error {
                        RoomError::BadUpdate(_) => close::PROTOCOL_ERROR,
                        _ => close::TRY_AGAIN,
                    };
                    tracing::info!(doc = %self.doc_name, %error, "update refused");
                    member.peer.outbox.close(code, error.to_string());
                    self.leave(conn);
                }
            }
            Inbound::Awareness { raw, update } => {
                if let Err(reason) = check_awareness(&member.awareness_ids, &update) {
                    tracing::info!(doc = %self.doc_name, reason, "awareness refused");
                    member.peer.outbox.close(close::POLICY, reason);
                    self.leave(conn);
                    return;
                }
                for (id, entry) in &update.clients {
                    if &*entry.json == "null" {
                        member.awareness_ids.remove(id);
                    } else {
                        member.awareness_ids.insert(*id);
                    }
                }
                let _ = self.awareness.apply_update(update);
                self.rooms
                    .context()
                    .fanout
                    .publish_awareness(&self.doc_name, raw.clone());
                // Including the sender: it is how an idle client alone in a
                // document keeps receiving something (y-websocket's 30 s timeout).
                self.broadcast(raw, None);
            }
            Inbound::QueryAwareness => {
                if let Some(states) = self.awareness_states() {
                    send(&self.members[&conn].peer, states);
                }
            }
            Inbound::Ignored => {}
        }
    }

    /// Applies an update from a client of this replica (socket or HTTP): in
    /// memory, to the other local clients at once, and to the group commit,
    /// which publishes it to other replicas once it is durable.
    fn apply_local(
        &mut self,
        raw: Bytes,
        update: Update,
        from: Option<ConnId>,
        durable: Option<oneshot::Sender<()>>,
    ) -> Result<(), RoomError> {
        if update.is_empty() {
            // Every client answers our step 1 with a step 2, mostly empty:
            // nothing to apply, store or broadcast.
            if let Some(durable) = durable {
                let _ = durable.send(());
            }
            return Ok(());
        }
        let committer = &self.rooms.context().committer;
        let reservation = committer
            .reserve(raw.len())
            .map_err(|e| RoomError::Unavailable(e.to_string()))?;
        self.apply(update)?;
        reservation.submit(
            NewUpdate {
                doc: self.doc_name.clone(),
                data: raw.clone(),
            },
            durable,
        );
        self.broadcast(ywebsocket::update(&raw), from);
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
        guard::apply(self.awareness.doc(), update).map_err(|error| {
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
                    self.broadcast(ywebsocket::update(&raw), None);
                }
            }
            Remote::Awareness(frame) => {
                if let Ok(Message::Awareness(update)) = Message::decode_v1(&frame) {
                    let _ = self.awareness.apply_update(update);
                    self.broadcast(frame, None);
                }
            }
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
        metrics::counter!(m::STORE_LOADS).increment(1);
        let before = self.awareness.doc().transact().state_vector();
        if let Err(error) = store::apply_stored(self.awareness.doc(), &stored) {
            tracing::error!(doc = %self.doc_name, %error, "resync found corrupt data; reloading");
            self.poisoned = true;
            return;
        }
        let Ok(diff) = self.encode_diff(&before) else {
            return;
        };
        if !is_empty_update(&diff) {
            self.broadcast(ywebsocket::update(&diff), None);
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
        if stale.is_empty() {
            return;
        }
        for id in &stale {
            self.awareness.remove_state(*id);
        }
        if let Ok(update) = self.awareness.update_with_clients(stale) {
            self.broadcast(ywebsocket::awareness(update), None);
        }
    }

    fn awareness_states(&self) -> Option<Bytes> {
        let update: AwarenessUpdate = self.awareness.update().ok()?;
        (!update.clients.is_empty()).then(|| ywebsocket::awareness(update))
    }

    /// Queues a frame for every member but `except`. A member whose queue is
    /// full is a slow consumer: it is closed with 1013, reconnects and resyncs.
    fn broadcast(&mut self, frame: Bytes, except: Option<ConnId>) {
        let mut dropped = Vec::new();
        for (conn, member) in &self.members {
            if Some(*conn) != except && !send(&member.peer, frame.clone()) {
                dropped.push(*conn);
            }
        }
        for conn in dropped {
            self.leave(conn);
        }
    }
}

/// Queues a frame for one peer; false when the peer is gone or too slow.
fn send(peer: &Peer, frame: Bytes) -> bool {
    match peer.outbox.push(frame) {
        Ok(()) => true,
        Err(Overflow::Full) => {
            peer.outbox
                .close(close::TRY_AGAIN, "slow consumer: outgoing queue overflowed");
            false
        }
        Err(Overflow::Gone) => false,
    }
}

/// Whether a connection's awareness update stays within the limits, judged
/// before any of it is applied.
fn check_awareness(
    owned: &HashSet<ClientID>,
    update: &AwarenessUpdate,
) -> Result<(), &'static str> {
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

async fn recv_remote(sub: &mut Option<Subscription>) -> Option<Remote> {
    match sub {
        Some(Subscription { rx: Some(rx), .. }) => rx.recv().await,
        _ => std::future::pending().await,
    }
}
