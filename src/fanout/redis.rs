//! Fan-out through Redis Streams: one stream per document,
//! `concord:{doc}:updates` (hash-tagged so Redis Cluster keeps a document's
//! keys together), entries `k` (kind), `r` (origin replica), `t` (when it was
//! handed to the publisher, for an update once it is durable; µs since the
//! Unix epoch, for the lag metric) and `d` (payload). The kinds: `u` an
//! update, `w` an awareness update, `s` a stateless message, and `a`, an
//! awareness update inside a y-websocket frame, which replicas of earlier
//! versions publish (read during a rolling upgrade, never written; earlier
//! versions skip the kinds they do not know).
//!
//! Loaded documents are hashed over a fixed set of reader tasks, each reading
//! the streams of its documents with one `XREAD` on its own connection, from
//! the last id it saw of each, so a new subscription (which notes the stream's
//! tip before its room loads from the store) misses nothing. Redis re-registers
//! a blocked `XREAD` on every key it names each time it is served, so with
//! one reader for all documents each delivery would cost Redis work in
//! proportion to every document the replica holds.
//!
//! Streams are capped in length, so a reader that falls further behind than
//! the cap (a stalled process, a flood) would silently skip what was trimmed.
//! Only a read that comes back full can follow such a gap, so after one the
//! reader asks Redis whether anything past its position was trimmed, and if
//! so the document's rooms resync from the store. A room whose queue is full
//! is likewise owed a resync rather than sent a partial stream.
//!
//! One publisher task pipelines `XADD`s, one pipeline at a time: what
//! arrives while one is on its way goes in the next (several in flight at
//! once made the lag longer under load, BENCHMARKS.md). When Redis goes
//! away, the publisher and the readers retry with backoff; once back, every
//! room resyncs from the store (which holds everything that was ever
//! published) and the streams resume from where they were, so clients
//! converge without reconnecting.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadReply};
use redis::{AsyncCommands, FromRedisValue, Value};
use tokio::sync::mpsc;

use super::{Fanout, FanoutError, Published, Remote, Subscription};
use crate::metrics as m;

/// A stream untouched this long expires (its document is idle everywhere).
const STREAM_TTL_SECS: i64 = 24 * 3600;
/// A document's stream TTL is renewed at most this often, not on every publish.
const TTL_RENEWAL: Duration = Duration::from_secs(3600);
/// How long one XREAD blocks; also how soon a new subscription is read.
const BLOCK_MS: usize = 100;
const READ_COUNT: usize = 1024;
/// Per-room queue; a room this far behind is told to resync instead.
const ROOM_QUEUE: usize = 4096;
/// Publishes held while Redis is away; past it they are dropped, and the other
/// replicas' resync after the outage recovers them from the database.
const MAX_UNPUBLISHED: usize = 100_000;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Reader connections per replica; documents are hashed over them.
const READERS: usize = 8;

pub fn stream_key(doc: &str) -> String {
    format!("concord:{{{doc}}}:updates")
}

struct DocSubscription {
    key: String,
    /// Last stream id delivered for this document.
    last_id: String,
    rooms: Vec<RoomQueue>,
}

struct RoomQueue {
    id: u64,
    tx: mpsc::Sender<Remote>,
    /// The room missed something and gets nothing more until it has been
    /// told to resync (its queue was full, or the stream was trimmed past it).
    owes_resync: bool,
}

impl DocSubscription {
    fn deliver(&mut self, remote: &Remote) {
        for room in &mut self.rooms {
            if !room.owes_resync && room.tx.try_send(remote.clone()).is_err() {
                room.owes_resync = true;
            }
        }
    }

    fn resync(&mut self) {
        for room in &mut self.rooms {
            room.owes_resync = true;
        }
        self.settle();
    }

    /// Sends owed resyncs to rooms with space for them. A room reloads from
    /// the store when it takes the resync, after everything it skipped was
    /// published and so stored: the reload covers all of it.
    fn settle(&mut self) {
        for room in &mut self.rooms {
            if room.owes_resync && room.tx.try_send(Remote::Resync).is_ok() {
                room.owes_resync = false;
            }
        }
    }
}

/// The documents one reader task reads, and why it cannot, if it cannot.
#[derive(Default)]
struct Shard {
    docs: Mutex<HashMap<Arc<str>, DocSubscription>>,
    down: Mutex<Option<String>>,
}

struct Shared {
    shards: Vec<Shard>,
    /// Entries each stream keeps (at least: Redis trims whole nodes).
    max_len: usize,
    /// Why the publisher cannot publish, if it cannot.
    publish_down: Mutex<Option<String>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn new(max_len: usize) -> Self {
        Self {
            shards: (0..READERS).map(|_| Shard::default()).collect(),
            max_len,
            publish_down: Mutex::new(None),
            next_id: Default::default(),
        }
    }

    fn shard(&self, doc: &str) -> &Shard {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(doc);
        &self.shards[hash as usize % self.shards.len()]
    }
}

fn set(reason: &Mutex<Option<String>>, value: Option<String>) {
    *reason.lock().expect("degraded lock") = value;
}

struct Publish {
    doc: Arc<str>,
    kind: &'static str,
    payload: Bytes,
    /// When it was handed over (µs since the Unix epoch). The lag metric
    /// counts from here, so time spent queued behind a pipeline in flight
    /// shows in it.
    at: u64,
}

pub struct RedisFanout {
    client: redis::Client,
    shared: Arc<Shared>,
    publish: mpsc::UnboundedSender<Publish>,
}

impl RedisFanout {
    /// Connects (failing fast if Redis is unreachable at start) and starts
    /// the reader and publisher tasks. Streams keep at least `max_len` entries.
    pub async fn connect(
        url: &str,
        replica: Arc<str>,
        max_len: usize,
    ) -> Result<Self, FanoutError> {
        let client = redis::Client::open(url).map_err(|e| FanoutError(e.to_string()))?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| FanoutError(e.to_string()))?;
        let shared = Arc::new(Shared::new(max_len));
        let (publish, queue) = mpsc::unbounded_channel();
        tokio::spawn(publisher(
            client.clone(),
            conn,
            replica.clone(),
            shared.clone(),
            queue,
        ));
        for shard in 0..READERS {
            tokio::spawn(reader(
                client.clone(),
                replica.clone(),
                Arc::downgrade(&shared),
                shard,
            ));
        }
        Ok(Self {
            client,
            shared,
            publish,
        })
    }

    async fn stream_tip(&self, key: &str) -> redis::RedisResult<String> {
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        Ok(newest_id(&mut conn, key)
            .await?
            .unwrap_or_else(|| "0-0".into()))
    }
}

struct Unsubscribe {
    shared: Arc<Shared>,
    doc: Arc<str>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut docs = self.shared.shard(&self.doc).docs.lock().expect("docs lock");
        if let Some(sub) = docs.get_mut(&self.doc) {
            sub.rooms.retain(|room| room.id != self.id);
            if sub.rooms.is_empty() {
                docs.remove(&self.doc);
            }
        }
    }
}

#[async_trait]
impl Fanout for RedisFanout {
    async fn subscribe(&self, doc: &Arc<str>) -> Result<Subscription, FanoutError> {
        let (tx, rx) = mpsc::channel(ROOM_QUEUE);
        let key = stream_key(doc);
        // Note the tip before the room loads: every entry up to it was stored
        // before it was published, so the load covers it.
        let tip = match self.stream_tip(&key).await {
            Ok(tip) => tip,
            Err(error) => {
                // Redis is away: start from the beginning of whatever the stream
                // holds once it is back, and resync from the store then.
                let _ = tx.try_send(Remote::Resync);
                tracing::warn!(doc = %doc, %error, "subscribing while Redis is unavailable");
                "0-0".into()
            }
        };
        let id = self
            .shared
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared
            .shard(doc)
            .docs
            .lock()
            .expect("docs lock")
            .entry(doc.clone())
            .or_insert_with(|| DocSubscription {
                key,
                last_id: tip,
                rooms: Vec::new(),
            })
            .rooms
            .push(RoomQueue {
                id,
                tx,
                owes_resync: false,
            });
        let guard = Unsubscribe {
            shared: self.shared.clone(),
            doc: doc.clone(),
            id,
        };
        Ok(Subscription::new(rx, Box::new(guard)))
    }

    fn publish(&self, doc: &Arc<str>, message: Published) {
        let (kind, payload) = match message {
            Published::Update(update) => ("u", update),
            Published::Awareness(update) => ("w", update),
            Published::Stateless(payload) => ("s", Bytes::copy_from_slice(payload.as_bytes())),
        };
        let _ = self.publish.send(Publish {
            doc: doc.clone(),
            kind,
            payload,
            at: now_us(),
        });
    }

    fn degraded(&self) -> Option<String> {
        let shared = &self.shared;
        std::iter::once(&shared.publish_down)
            .chain(shared.shards.iter().map(|s| &s.down))
            .find_map(|reason| reason.lock().expect("degraded lock").clone())
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

async fn publisher(
    client: redis::Client,
    mut conn: MultiplexedConnection,
    replica: Arc<str>,
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<Publish>,
) {
    let mut unpublished: VecDeque<Publish> = VecDeque::new();
    let mut received = Vec::new();
    let mut backoff = BACKOFF_START;
    // When each document's stream TTL was last renewed (pruned once per renewal period).
    let mut renewed: HashMap<Arc<str>, Instant> = HashMap::new();
    let mut pruned = Instant::now();
    let mut renewing = Vec::new();
    loop {
        if unpublished.is_empty() {
            if queue.recv_many(&mut received, READ_COUNT).await == 0 {
                return;
            }
        } else {
            while let Ok(p) = queue.try_recv() {
                received.push(p);
            }
        }
        unpublished.extend(received.drain(..));
        if unpublished.len() > MAX_UNPUBLISHED {
            let dropped = unpublished.len() - MAX_UNPUBLISHED;
            unpublished.drain(..dropped);
            metrics::counter!(m::FANOUT_ERRORS).increment(dropped as u64);
            tracing::warn!(
                dropped,
                "fan-out backlog full; other replicas will resync from the database"
            );
        }
        let batch = unpublished.len().min(READ_COUNT);
        let mut pipe = redis::pipe();
        let now = Instant::now();
        for p in unpublished.iter().take(batch) {
            let key = stream_key(&p.doc);
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(shared.max_len)
                .arg("*")
                .arg("k")
                .arg(p.kind)
                .arg("r")
                .arg(&*replica)
                .arg("t")
                .arg(p.at)
                .arg("d")
                .arg(&p.payload[..])
                .ignore();
            let due = renewed
                .get(&p.doc)
                .is_none_or(|at| now.duration_since(*at) >= TTL_RENEWAL);
            if due {
                pipe.expire(&key, STREAM_TTL_SECS).ignore();
                renewed.insert(p.doc.clone(), now);
                renewing.push(p.doc.clone());
            }
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => {
                unpublished.drain(..batch);
                renewing.clear();
                if now.duration_since(pruned) >= TTL_RENEWAL {
                    renewed.retain(|_, at| now.duration_since(*at) < TTL_RENEWAL);
                    pruned = now;
                }
                if backoff != BACKOFF_START {
                    set(&shared.publish_down, None);
                    backoff = BACKOFF_START;
                }
            }
            Err(error) => {
                for doc in renewing.drain(..) {
                    renewed.remove(&doc);
                }
                metrics::counter!(m::FANOUT_ERRORS).increment(1);
                tracing::warn!(%error, pending = unpublished.len(), "publishing to Redis failed");
                set(
                    &shared.publish_down,
                    Some(format!("redis publish failed: {error}")),
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if let Ok(fresh) = client.get_multiplexed_async_connection().await {
                    conn = fresh;
                }
            }
        }
    }
}

/// Reads the streams of one shard's documents until the fan-out is dropped.
async fn reader(
    client: redis::Client,
    replica: Arc<str>,
    shared: std::sync::Weak<Shared>,
    shard: usize,
) {
    let mut backoff = BACKOFF_START;
    let mut failed = false;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let shard = &strong.shards[shard];
        match read_loop(&client, &replica, &strong, shard, &mut failed).await {
            Ok(()) => return,
            Err(error) => {
                metrics::counter!(m::FANOUT_ERRORS).increment(1);
                if !failed {
                    tracing::warn!(%error, "lost Redis; local editing goes on, retrying");
                }
                failed = true;
                set(&shard.down, Some(format!("redis unavailable: {error}")));
                drop(strong);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn read_loop(
    client: &redis::Client,
    replica: &str,
    shared: &Arc<Shared>,
    shard: &Shard,
    failed: &mut bool,
) -> redis::RedisResult<()> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    if std::mem::take(failed) {
        recover(&mut conn, shard).await?;
        tracing::info!("Redis is back; documents resynced from the database");
    }
    set(&shard.down, None);
    let read_count = READ_COUNT.min(shared.max_len);
    let mut cmd = redis::Cmd::new();
    loop {
        if Arc::strong_count(shared) == 1 {
            return Ok(());
        }
        // Built in place under the lock: this runs once per delivery.
        cmd.clear();
        cmd.arg("XREAD")
            .arg("COUNT")
            .arg(read_count)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS");
        let streams = {
            let docs = shard.docs.lock().expect("docs lock");
            for sub in docs.values() {
                cmd.arg(&sub.key);
            }
            for sub in docs.values() {
                cmd.arg(&sub.last_id);
            }
            docs.len()
        };
        if streams == 0 {
            tokio::time::sleep(Duration::from_millis(BLOCK_MS as u64)).await;
            continue;
        }
        let reply: Option<StreamReadReply> = cmd.query_async(&mut conn).await?;
        // Streams whose read came back full, with the position it started from.
        let mut full = Vec::new();
        {
            let now = now_us();
            let mut docs = shard.docs.lock().expect("docs lock");
            for stream in reply.map(|r| r.keys).unwrap_or_default() {
                let Some(sub) = docs.get_mut(doc_of(&stream.key)) else {
                    continue;
                };
                if stream.ids.len() >= read_count {
                    full.push((stream.key.clone(), sub.last_id.clone()));
                }
                for entry in stream.ids {
                    sub.last_id = entry.id.clone();
                    if let Some(remote) = remote_of(&entry.map, replica, now) {
                        sub.deliver(&remote);
                    }
                }
            }
            for sub in docs.values_mut() {
                sub.settle();
            }
        }
        for (key, from) in full {
            if trimmed_past(&mut conn, &key, &from).await? {
                tracing::warn!(
                    doc = doc_of(&key),
                    "stream trimmed past this replica's position; resyncing from the database"
                );
                if let Some(sub) = shard.docs.lock().expect("docs lock").get_mut(doc_of(&key)) {
                    sub.resync();
                }
            }
        }
    }
}

/// What an entry carries for this replica: nothing for its own entries.
fn remote_of(map: &HashMap<String, Value>, replica: &str, now: u64) -> Option<Remote> {
    if field_str(map, "r").as_deref() == Some(replica) {
        return None;
    }
    let payload = field_bytes(map, "d")?;
    if let Some(sent) = field_str(map, "t").and_then(|t| t.parse::<u64>().ok()) {
        metrics::histogram!(m::FANOUT_LAG_SECONDS).record(now.saturating_sub(sent) as f64 / 1e6);
    }
    match field_str(map, "k").as_deref() {
        Some("u") => Some(Remote::Update(payload)),
        Some("w") => Some(Remote::Awareness(payload)),
        Some("s") => Some(Remote::Stateless(String::from_utf8_lossy(&payload).into())),
        Some("a") => legacy_awareness(&payload).map(Remote::Awareness),
        _ => None,
    }
}

/// The awareness update inside a y-websocket awareness frame (type 1, then
/// the update as a length-prefixed buffer), as earlier versions published it.
fn legacy_awareness(frame: &[u8]) -> Option<Bytes> {
    use yrs::encoding::read::{Cursor, Read};
    let mut cursor = Cursor::new(frame);
    let kind: u32 = cursor.read_var().ok()?;
    (kind == 1).then_some(())?;
    cursor.read_buf().ok().map(Bytes::copy_from_slice)
}

/// Whether Redis may have trimmed entries of the stream newer than `from`,
/// which a reader starting there never saw: trimming drops the oldest entries
/// first, so it did if `from` itself is gone (older than the first entry the
/// stream still holds, which Redis 7 reports; an older server does not, and
/// then a trim is assumed).
async fn trimmed_past(
    conn: &mut MultiplexedConnection,
    key: &str,
    from: &str,
) -> redis::RedisResult<bool> {
    let reply: redis::RedisResult<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(conn)
        .await;
    match reply {
        Ok(info) => Ok(info
            .get("recorded-first-entry-id")
            .and_then(|v| String::from_redis_value(v).ok())
            .is_none_or(|first| id_less(from, &first))),
        Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => Err(e),
        // The stream is gone (expired or deleted): whatever it held is lost to us.
        Err(_) => Ok(true),
    }
}

/// After an outage: a stream that is gone or was recreated behind our last
/// id is read from its start, and every room catches up from the store.
async fn recover(conn: &mut MultiplexedConnection, shard: &Shard) -> redis::RedisResult<()> {
    let docs: Vec<(Arc<str>, String, String)> = shard
        .docs
        .lock()
        .expect("docs lock")
        .iter()
        .map(|(doc, sub)| (doc.clone(), sub.key.clone(), sub.last_id.clone()))
        .collect();
    for (doc, key, last_id) in docs {
        let tip = newest_id(conn, &key).await?;
        let behind = tip.as_deref().is_none_or(|tip| id_less(tip, &last_id));
        let mut subs = shard.docs.lock().expect("docs lock");
        if let Some(sub) = subs.get_mut(&doc) {
            if behind {
                sub.last_id = "0-0".into();
            }
            sub.resync();
        }
    }
    Ok(())
}

/// The id of a stream's newest entry; `None` when it holds none.
async fn newest_id(
    conn: &mut MultiplexedConnection,
    key: &str,
) -> redis::RedisResult<Option<String>> {
    let reply: StreamRangeReply = conn.xrevrange_count(key, "+", "-", 1).await?;
    Ok(reply.ids.into_iter().next().map(|e| e.id))
}

/// Stream ids are `ms-seq`; compare numerically.
fn id_less(a: &str, b: &str) -> bool {
    let parse = |id: &str| -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    parse(a) < parse(b)
}

fn doc_of(key: &str) -> &str {
    key.strip_prefix("concord:{")
        .and_then(|k| k.strip_suffix("}:updates"))
        .unwrap_or(key)
}

fn field_bytes(map: &HashMap<String, Value>, field: &str) -> Option<Bytes> {
    match map.get(field)? {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        _ => None,
    }
}

fn field_str(map: &HashMap<String, Value>, field: &str) -> Option<String> {
    match map.get(field)? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let key = stream_key("team-a/notes");
        assert_eq!(key, "concord:{team-a/notes}:updates");
        assert_eq!(doc_of(&key), "team-a/notes");
        assert!(id_less("1-5", "2-0"));
        assert!(id_less("2-1", "2-10"));
        assert!(!id_less("3-0", "2-99"));
    }

    #[test]
    fn a_room_with_a_full_queue_is_owed_a_resync_and_gets_it_once_it_has_space() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut sub = DocSubscription {
            key: stream_key("d"),
            last_id: "0-0".into(),
            rooms: vec![RoomQueue {
                id: 0,
                tx,
                owes_resync: false,
            }],
        };
        let update = |n: u8| Remote::Update(Bytes::from(vec![n]));
        for n in 1..=4 {
            sub.deliver(&update(n));
        }
        sub.settle(); // still full: the resync waits
        assert!(matches!(rx.try_recv(), Ok(Remote::Update(b)) if b[..] == [1]));
        sub.deliver(&update(5)); // skipped: the resync will cover it
        sub.settle();
        assert!(matches!(rx.try_recv(), Ok(Remote::Update(b)) if b[..] == [2]));
        assert!(matches!(rx.try_recv(), Ok(Remote::Resync)));
        sub.deliver(&update(6));
        assert!(matches!(rx.try_recv(), Ok(Remote::Update(b)) if b[..] == [6]));
        assert!(rx.try_recv().is_err());
    }
}
