//! The room and the group commit in process: real rooms and a real committer
//! on an in-memory SQLite store, the single-node fan-out, and peers whose
//! framer records what the room sent them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::{ClientID, Doc, GetString, StateVector, Text, Transact, Update};

use super::*;
use crate::fanout::local::LocalFanout;
use crate::store::committer::{CompactionPolicy, Hooks, Settings};
use crate::store::{NewUpdate, StoreError, StoredDoc};
use crate::transport::{Outbox, Queued};

/// What a peer received, decoded from the test framer's frames.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Step1,
    Step2(Vec<u8>),
    Update(Vec<u8>),
    Awareness(Vec<u8>),
    Stateless(String),
    Status(bool),
}

/// Frames a room message as a tag and its payload.
struct TestFramer {
    key: Vec<u8>,
    status: bool,
}

impl Framer for TestFramer {
    fn frame(&self, msg: Outbound<'_>) -> Option<Bytes> {
        let (tag, payload): (u8, &[u8]) = match msg {
            Outbound::SyncStep1(sv) => (1, sv),
            Outbound::SyncStep2(u) => (2, u),
            Outbound::Update(u) => (3, u),
            Outbound::Awareness(a) => (4, a),
            Outbound::Stateless(s) => (5, s.as_bytes()),
            Outbound::SyncStatus(_) if !self.status => return None,
            Outbound::SyncStatus(true) => (6, &[1]),
            Outbound::SyncStatus(false) => (6, &[0]),
        };
        Some([&[tag][..], payload].concat().into())
    }

    fn key(&self) -> &[u8] {
        &self.key
    }
}

fn seen(frame: &[u8]) -> Seen {
    let payload = frame[1..].to_vec();
    match frame[0] {
        1 => Seen::Step1,
        2 => Seen::Step2(payload),
        3 => Seen::Update(payload),
        4 => Seen::Awareness(payload),
        5 => Seen::Stateless(String::from_utf8(payload).unwrap()),
        _ => Seen::Status(payload == [1]),
    }
}

/// A store that counts loads and can hold appends back until released.
struct Gated {
    inner: Arc<dyn Store>,
    loads: AtomicUsize,
    gate: tokio::sync::Semaphore,
}

#[async_trait]
impl Store for Gated {
    async fn load(&self, doc: &str) -> Result<StoredDoc, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load(doc).await
    }
    async fn append(&self, batch: &[NewUpdate]) -> Result<(), StoreError> {
        let _permit = self.gate.acquire().await.expect("gate open");
        self.inner.append(batch).await
    }
    async fn compact(&self, doc: &str) -> Result<crate::store::Folded, StoreError> {
        self.inner.compact(doc).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        self.inner.pending_migrations().await
    }
    async fn migrate(&self) -> Result<Vec<(i64, String)>, StoreError> {
        self.inner.migrate().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

struct World {
    rooms: Rooms,
    store: Arc<Gated>,
    committer: Committer,
    durable: Arc<Mutex<Vec<NewUpdate>>>,
}

async fn world(budget: usize) -> World {
    world_with(budget, Duration::ZERO).await
}

async fn world_with(budget: usize, interval: Duration) -> World {
    static N: AtomicUsize = AtomicUsize::new(0);
    let url = format!(
        "sqlite:file:concord-room-test-{}-{}?mode=memory&cache=shared",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let inner = crate::store::open(&url).await.unwrap();
    inner.migrate().await.unwrap();
    let store = Arc::new(Gated {
        inner,
        loads: AtomicUsize::new(0),
        gate: tokio::sync::Semaphore::new(1_000_000),
    });
    let durable = Arc::new(Mutex::new(Vec::new()));
    let hooks = Hooks {
        durable: {
            let durable = durable.clone();
            Box::new(move |batch| durable.lock().unwrap().extend(batch.iter().cloned()))
        },
        store_status: Box::new(|_| {}),
    };
    let policy = CompactionPolicy {
        max_entries: 1000,
        max_bytes: 1 << 30,
    };
    let settings = Settings {
        compaction: policy,
        budget,
        interval,
    };
    let (committer, _task) = Committer::spawn(store.clone(), hooks, settings);
    let rooms = Rooms::new(RoomContext {
        store: store.clone(),
        committer: committer.clone(),
        fanout: Arc::new(LocalFanout),
        unload_after: Duration::from_secs(30),
        awareness_timeout: Duration::from_secs(30),
    });
    World {
        rooms,
        store,
        committer,
        durable,
    }
}

struct TestPeer {
    member: Member,
    queued: Queued,
    seen: Vec<Seen>,
}

impl TestPeer {
    async fn join(world: &World, doc: &str, key: &str, status: bool, can_write: bool) -> Self {
        let (outbox, queued) = Outbox::new(1024, 1 << 20);
        let peer = Peer {
            outbox,
            framer: Arc::new(TestFramer {
                key: key.as_bytes().to_vec(),
                status,
            }),
            can_write,
            user: Some("u".into()),
        };
        let member = world.rooms.join(doc, peer).await.unwrap();
        let mut peer = TestPeer {
            member,
            queued,
            seen: Vec::new(),
        };
        peer.until(|s| s.contains(&Seen::Step1)).await;
        peer
    }

    /// Reads what the room queued until `pred` holds (bounded).
    async fn until(&mut self, pred: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !pred(&self.seen) {
                match self.queued.wait().await {
                    crate::transport::Next::Write => self
                        .seen
                        .extend(self.queued.take_frames().iter().map(|f| seen(f))),
                    other => panic!("the room let the peer go: {:?}", other.leave()),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("waited in vain; saw {:?}", self.seen));
        self.seen.clone()
    }

    async fn send(&self, msg: Inbound) {
        assert!(self.member.send(msg).await);
    }
}

fn insert(doc: &Doc, at: u32, text: &str) -> Inbound {
    let t = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    t.insert(&mut txn, at, text);
    let raw = txn.encode_update_v1();
    Inbound::Update {
        update: Update::decode_v1(&raw).unwrap(),
        raw: raw.into(),
    }
}

fn text_of(updates: &[Vec<u8>]) -> String {
    let doc = Doc::new();
    let t = doc.get_or_insert_text("t");
    for u in updates {
        doc.transact_mut()
            .apply_update(Update::decode_v1(u).unwrap())
            .unwrap();
    }
    let text = t.get_string(&doc.transact());
    text
}

fn awareness(client: ClientID, clock: u32, json: &str) -> Inbound {
    let update = AwarenessUpdate {
        clients: [(
            client,
            AwarenessUpdateEntry {
                clock,
                json: json.into(),
            },
        )]
        .into(),
    };
    Inbound::Awareness { update }
}

#[tokio::test]
async fn an_update_reaches_the_others_not_its_sender_and_is_stored_once() {
    let w = world(1 << 30).await;
    let mut a = TestPeer::join(&w, "d", "k", false, true).await;
    let mut b = TestPeer::join(&w, "d", "k", false, true).await;
    let client = Doc::new();
    a.send(insert(&client, 0, "hello")).await;
    let got = b
        .until(|s| s.iter().any(|x| matches!(x, Seen::Update(_))))
        .await;
    let updates: Vec<Vec<u8>> = got
        .iter()
        .filter_map(|s| match s {
            Seen::Update(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(text_of(&updates), "hello");
    w.committer.flush().await;
    let stored = w.store.load("d").await.unwrap();
    assert_eq!(text_of(&stored.updates), "hello");
    assert_eq!(w.durable.lock().unwrap().len(), 1);
    assert_eq!(w.durable.lock().unwrap()[0].user.as_deref(), Some("u"));
    // A's own update never comes back to it.
    a.send(Inbound::QueryAwareness).await;
    b.send(insert(&Doc::new(), 0, "x")).await;
    let seen = a
        .until(|s| s.iter().any(|x| matches!(x, Seen::Update(_))))
        .await;
    assert_eq!(
        seen.iter().filter(|x| matches!(x, Seen::Update(_))).count(),
        1
    );
}

#[tokio::test]
async fn a_sync_status_waits_for_the_store() {
    let w = world(1 << 30).await;
    let mut a = TestPeer::join(&w, "d", "k", true, true).await;
    // Hold every append back.
    let held = w.store.gate.acquire_many(1_000_000).await.unwrap();
    a.send(insert(&Doc::new(), 0, "saved?")).await;
    // An empty update (a step 2 with nothing new) is acknowledged at once.
    a.send(Inbound::Update {
        raw: Bytes::from_static(&[0, 0]),
        update: Update::decode_v1(&[0, 0]).unwrap(),
    })
    .await;
    a.until(|s| s.contains(&Seen::Status(true))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(a.queued_is_empty(), "acknowledged before it was stored");
    drop(held);
    let seen = a
        .until(|s| s.iter().filter(|x| **x == Seen::Status(true)).count() == 2)
        .await;
    assert_eq!(
        w.store.inner.load("d").await.unwrap().updates.len(),
        1,
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_reader_changes_nothing_and_hears_so() {
    let w = world(1 << 30).await;
    let writer = TestPeer::join(&w, "d", "k", false, true).await;
    let mut reader = TestPeer::join(&w, "d", "k", true, false).await;
    reader.send(insert(&Doc::new(), 0, "nope")).await;
    reader.until(|s| s.contains(&Seen::Status(false))).await;
    writer.send(insert(&Doc::new(), 0, "yes")).await;
    reader
        .until(|s| s.iter().any(|x| matches!(x, Seen::Update(_))))
        .await;
    w.committer.flush().await;
    assert_eq!(text_of(&w.store.load("d").await.unwrap().updates), "yes");
    assert!(!writer.seen.iter().any(|x| matches!(x, Seen::Update(_))));
}

#[tokio::test]
async fn awareness_reaches_everyone_and_leaves_with_its_peer() {
    let w = world(1 << 30).await;
    let mut a = TestPeer::join(&w, "d", "k", false, true).await;
    let mut b = TestPeer::join(&w, "d", "k", false, true).await;
    a.send(awareness(ClientID::new(7), 1, r#"{"name":"ada"}"#))
        .await;
    for peer in [&mut a, &mut b] {
        let seen = peer
            .until(|s| s.iter().any(|x| matches!(x, Seen::Awareness(_))))
            .await;
        let Some(Seen::Awareness(raw)) = seen.iter().find(|x| matches!(x, Seen::Awareness(_)))
        else {
            unreachable!()
        };
        let update = AwarenessUpdate::decode_v1(raw).unwrap();
        assert!(update.clients[&ClientID::new(7)].json.contains("ada"));
    }
    a.member.leave().await;
    let seen = b
        .until(|s| s.iter().filter(|x| matches!(x, Seen::Awareness(_))).count() == 2)
        .await;
    let Some(Seen::Awareness(raw)) = seen.iter().rev().find(|x| matches!(x, Seen::Awareness(_)))
    else {
        unreachable!()
    };
    assert_eq!(
        &*AwarenessUpdate::decode_v1(raw).unwrap().clients[&ClientID::new(7)].json,
        "null"
    );
}

#[tokio::test]
async fn stateless_messages_reach_the_others_only() {
    let w = world(1 << 30).await;
    let a = TestPeer::join(&w, "d", "k", false, true).await;
    let mut b = TestPeer::join(&w, "d", "k", false, true).await;
    a.send(Inbound::Stateless("ping".into())).await;
    b.until(|s| s.contains(&Seen::Stateless("ping".into())))
        .await;
    assert!(a.queued_is_empty());
}

#[tokio::test]
async fn a_large_message_is_handled_before_its_sender_goes_on() {
    let w = world(1 << 30).await;
    let a = TestPeer::join(&w, "d", "k", false, true).await;
    let b = TestPeer::join(&w, "d", "k", false, true).await;
    let frames = |peer: &TestPeer| -> Vec<Seen> {
        peer.queued.take_frames().iter().map(|f| seen(f)).collect()
    };
    // One thread: a small message is queued and its sender goes on before
    // the room has run; a large one has been handled when its send returns.
    a.send(Inbound::Stateless("small".into())).await;
    assert_eq!(frames(&b), Vec::<Seen>::new());
    let large = "x".repeat(LARGE_INBOUND);
    a.send(Inbound::Stateless(large.clone())).await;
    assert_eq!(
        frames(&b),
        vec![Seen::Stateless("small".into()), Seen::Stateless(large)]
    );
}

#[tokio::test]
async fn joiners_with_one_state_vector_share_one_encoding_and_one_load() {
    let w = world(1 << 30).await;
    let writer = TestPeer::join(&w, "d", "k", false, true).await;
    writer
        .send(insert(&Doc::new(), 0, &"x".repeat(10_000)))
        .await;
    w.committer.flush().await;
    let mut frames = Vec::new();
    for _ in 0..3 {
        let peer = TestPeer::join(&w, "d", "k", false, true).await;
        peer.send(Inbound::SyncStep1(StateVector::default())).await;
        let frame = loop {
            match peer.queued.wait().await {
                crate::transport::Next::Write => {
                    if let Some(f) = peer.queued.take_frames().into_iter().find(|f| f[0] == 2) {
                        break f;
                    }
                }
                _ => panic!("let go"),
            }
        };
        frames.push(frame);
    }
    assert!(frames.windows(2).all(|w| w[0].as_ptr() == w[1].as_ptr()));
    assert_eq!(text_of(&[frames[0][1..].to_vec()]).len(), 10_000);
    assert_eq!(w.store.loads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_slow_consumer_is_let_go_and_the_room_goes_on() {
    let w = world(1 << 30).await;
    let (outbox, queued) = Outbox::new(2, 1 << 20);
    let peer = Peer {
        outbox,
        framer: Arc::new(TestFramer {
            key: b"k".to_vec(),
            status: false,
        }),
        can_write: true,
        user: None,
    };
    let slow = w.rooms.join("d", peer).await.unwrap();
    let mut writer = TestPeer::join(&w, "d", "k", false, true).await;
    let client = Doc::new();
    for i in 0..5 {
        writer.send(insert(&client, i, "s")).await;
    }
    let left = left(&queued).await;
    assert_eq!(left, (slow.conn, Leave::SlowConsumer));
    writer
        .send(Inbound::SyncStep1(StateVector::default()))
        .await;
    writer
        .until(|s| {
            s.iter()
                .any(|x| matches!(x, Seen::Step2(u) if text_of(std::slice::from_ref(u)) == "sssss"))
        })
        .await;
}

#[tokio::test]
async fn past_the_memory_budget_updates_are_refused_and_nothing_is_applied() {
    let w = world(64).await;
    let held = w.store.gate.acquire_many(1_000_000).await.unwrap();
    let a = TestPeer::join(&w, "d", "k", false, true).await;
    let mut b = TestPeer::join(&w, "d", "k", false, true).await;
    a.send(insert(&Doc::new(), 0, &"y".repeat(100))).await;
    let left = left(&a.queued).await;
    assert!(matches!(left.1, Leave::Overloaded(_)));
    drop(held);
    b.send(Inbound::SyncStep1(StateVector::default())).await;
    b.until(|s| {
        s.iter()
            .any(|x| matches!(x, Seen::Step2(u) if text_of(std::slice::from_ref(u)).is_empty()))
    })
    .await;
}

#[tokio::test]
async fn the_committer_publishes_in_order_and_flush_waits_for_everything() {
    let w = world(1 << 30).await;
    let client = Doc::new();
    let a = TestPeer::join(&w, "d", "k", false, true).await;
    for i in 0..200u32 {
        a.send(insert(&client, i, "z")).await;
    }
    w.committer.flush().await;
    let durable = w.durable.lock().unwrap().clone();
    assert_eq!(durable.len(), 200);
    let updates: Vec<Vec<u8>> = durable.iter().map(|u| u.data.to_vec()).collect();
    assert_eq!(text_of(&updates), "z".repeat(200));
    assert_eq!(w.store.load("d").await.unwrap().updates.len(), 200);
}

#[tokio::test]
async fn a_flush_does_not_wait_out_the_commit_interval() {
    let w = world_with(1 << 30, Duration::from_secs(3600)).await;
    let client = Doc::new();
    let a = TestPeer::join(&w, "d", "k", false, true).await;
    for round in 0..2u32 {
        for i in 0..10 {
            a.send(insert(&client, round * 10 + i, "z")).await;
        }
        tokio::time::timeout(Duration::from_secs(10), w.committer.flush())
            .await
            .expect("the flush is not held back by the interval");
        assert_eq!(w.durable.lock().unwrap().len(), (round as usize + 1) * 10);
    }
}

impl TestPeer {
    fn queued_is_empty(&self) -> bool {
        self.queued.is_empty()
    }
}

/// Waits for the room to let the peer go, taking what it queued meanwhile.
async fn left(queued: &Queued) -> (ConnId, Leave) {
    loop {
        match queued.wait().await {
            crate::transport::Next::Leave(conn, why) => return (conn, why),
            crate::transport::Next::Write => drop(queued.take_frames()),
            // Rooms' tests run without a heartbeat.
            other => panic!("{other:?} without a leave"),
        }
    }
}

impl crate::transport::Next {
    fn leave(self) -> Option<(ConnId, Leave)> {
        match self {
            crate::transport::Next::Leave(conn, why) => Some((conn, why)),
            _ => None,
        }
    }
}
