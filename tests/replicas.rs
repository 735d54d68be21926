//! Several `concord serve` processes sharing one PostgreSQL database and one
//! Redis: fan-out through Redis Streams, with no gap and no loss.

mod common;

use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use yrs::Doc;

async fn pair(redis_url: &str) -> (Server, Server) {
    pair_with(redis_url, &[]).await
}

/// Two replicas, `r1` and `r2`, on a fresh database, both started with `args`.
async fn pair_with(redis_url: &str, args: &[&str]) -> (Server, Server) {
    let db = fresh_postgres().await;
    let start = |id: &str| {
        Server::replica(&db, redis_url, id)
            .args(args.iter().copied())
            .start()
    };
    (start("r1"), start("r2"))
}

#[tokio::test]
async fn clients_on_two_replicas_converge_both_ways() {
    let (r1, r2) = pair(&shared_redis_url()).await;
    let doc = unique("replicas/notes");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    let mut b = Client::connect(&r2.ws_url(&doc)).await;
    a.insert("t", 0, "from r1").await;
    b.wait_text("t", "from r1").await;
    b.insert("t", 7, ", from r2").await;
    a.wait_text("t", "from r1, from r2").await;
    // Every update was stored once, by the replica whose client sent it.
    let pool = sqlx::PgPool::connect(&r1.database_url).await.unwrap();
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM document_updates WHERE doc = $1")
        .bind(&doc)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

#[tokio::test]
async fn awareness_crosses_replicas_and_is_removed() {
    let (r1, r2) = pair(&shared_redis_url()).await;
    let doc = unique("replicas/presence");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    let mut b = Client::connect(&r2.ws_url(&doc)).await;
    a.set_awareness(1, r#"{"user":"ada"}"#).await;
    let id = a.client_id();
    b.pump_until(|c| c.awareness.get(&id).is_some_and(Option::is_some))
        .await;
    a.close().await;
    b.pump_until(|c| c.awareness.get(&id) == Some(&None)).await;
}

#[tokio::test]
async fn a_late_joiner_on_replica_2_gets_what_was_written_on_replica_1() {
    let (r1, r2) = pair(&shared_redis_url()).await;
    let doc = unique("replicas/late");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    for i in 0..30 {
        a.insert("t", i, "w").await;
    }
    // A client on r1 that has seen everything proves r1 applied it; r2 loads
    // from the database plus the stream.
    let mut check = Client::connect(&r1.ws_url(&doc)).await;
    check.wait_text("t", &"w".repeat(30)).await;
    let mut late = Client::connect(&r2.ws_url(&doc)).await;
    late.wait_text("t", &"w".repeat(30)).await;
}

/// Replica 1 writes continuously while replica 2 loads the document (made
/// slow by a long update log): nothing written during the load is missed.
#[tokio::test]
async fn updates_written_while_a_replica_loads_are_not_missed() {
    let (r1, r2) = pair(&shared_redis_url()).await;
    let doc = unique("replicas/loading");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    // A long log makes r2's load take a while.
    let chunk = "l".repeat(64);
    for i in 0..600 {
        a.insert("t", i * 64, &chunk).await;
    }
    let url2 = r2.ws_url(&doc);
    let joiner = tokio::spawn(async move { Client::connect(&url2).await });
    // Keep writing through r2's load.
    for i in 0..200 {
        a.insert("u", i, "x").await;
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut b = joiner.await.unwrap();
    b.wait_text("u", &"x".repeat(200)).await;
    assert_eq!(b.text("t").len(), 600 * 64);
}

/// A replica killed right after its client's update reached another
/// replica's clients: the update is stored (it was published, so it was stored first).
#[tokio::test]
async fn an_update_seen_on_another_replica_survives_sigkill_of_its_origin() {
    let (mut r1, r2) = pair(&shared_redis_url()).await;
    let doc = unique("replicas/published");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    let mut b = Client::connect(&r2.ws_url(&doc)).await;
    a.insert("t", 0, "published").await;
    b.wait_text("t", "published").await;
    r1.kill();
    drop(r2);
    let fresh = r1.start_again();
    let c = Client::connect(&fresh.ws_url(&doc)).await;
    assert_eq!(c.text("t"), "published");
}

/// SIGKILL of a replica while its client edits: the client re-pointed at the
/// other replica re-sends what was lost, and a fresh client after restarting
/// everything has it all.
#[tokio::test]
async fn sigkill_while_editing_loses_nothing() {
    let (mut r1, r2) = pair(&shared_redis_url()).await;
    let doc = unique("replicas/kill");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    for i in 0..100 {
        a.insert("t", i, "k").await;
    }
    r1.kill();
    a.local_insert("t", 100, "-after"); // typed while the socket is dead
    let a_doc = std::mem::replace(&mut a.doc, Doc::new());
    let a = Client::connect_with(&r2.ws_url(&doc), a_doc).await;
    let want = a.text("t");
    assert_eq!(want, format!("{}-after", "k".repeat(100)));
    // Give r2 its 100 ms to store what a re-sent, then restart everything.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut r2 = r2;
    r2.kill();
    let fresh = r2.start_again();
    let c = Client::connect(&fresh.ws_url(&doc)).await;
    assert_eq!(c.text("t"), want);
}

/// The replica that reads an update from Redis measures how long it took
/// from being stored on its origin; the origin skips its own entries and
/// measures nothing.
#[tokio::test]
async fn the_reading_replica_measures_the_fanout_lag() {
    let (r1, r2) = pair(&shared_redis_url()).await;
    let doc = unique("replicas/lag");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    let mut b = Client::connect(&r2.ws_url(&doc)).await;
    a.insert("t", 0, "x").await;
    b.wait_text("t", "x").await;
    a.insert("t", 1, "y").await;
    b.wait_text("t", "xy").await;

    let read = r2.metric("concord_fanout_lag_seconds_count").await;
    assert_eq!(read, 2.0, "the reading replica measured {read} entries");
    // The publish time and the clock it is compared with are in one unit:
    // on one machine the lag is well under a second.
    let mean = r2.metric("concord_fanout_lag_seconds_sum").await / read;
    assert!((0.0..1.0).contains(&mean), "mean fan-out lag {mean} s");
    assert_eq!(r1.metric("concord_fanout_lag_seconds_count").await, 0.0);
}

/// Redis stopped and restarted while both sides edit: they converge without reconnecting.
#[tokio::test]
async fn redis_outage_converges_without_reconnecting() {
    let mut redis = PrivateRedis::start();
    let (r1, r2) = pair(&redis.url()).await;
    let doc = unique("replicas/redis-outage");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    let mut b = Client::connect(&r2.ws_url(&doc)).await;
    a.insert("a", 0, "1").await;
    b.wait_text("a", "1").await;

    redis.stop();
    // Both sides keep editing; local clients of each replica still converge.
    a.insert("a", 1, "2").await;
    b.insert("b", 0, "x").await;
    let mut a2 = Client::connect(&r1.ws_url(&doc)).await;
    a2.wait_text("a", "12").await;
    wait_status(&r1, "/readyz", 503).await;

    let redis = PrivateRedis::start_on(redis.port);
    a.wait_text("b", "x").await;
    b.wait_text("a", "12").await;
    wait_status(&r1, "/readyz", 200).await;
    // The stream works again after the outage.
    a.insert("a", 2, "3").await;
    b.wait_text("a", "123").await;
    assert!(a.closed.is_none() && b.closed.is_none());
    drop(redis);
}

/// A replica stalled while another writes more than a stream keeps: once it
/// runs again it notices the trim and catches up from the database, and its
/// client converges without reconnecting. Streams stay bounded and expire.
#[tokio::test]
async fn a_replica_behind_a_trimmed_stream_resyncs_from_the_database() {
    let redis_url = shared_redis_url();
    let (r1, r2) = pair_with(&redis_url, &["--stream-max-len", "100"]).await;
    let doc = unique("replicas/trimmed");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    let mut b = Client::connect(&r2.ws_url(&doc)).await;
    a.insert("t", 0, "x").await;
    b.wait_text("t", "x").await;

    signal(&r2.child, "STOP");
    for i in 1..=600 {
        a.insert("t", i, "x").await;
    }
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let key = format!("concord:{{{doc}}}:updates");
    // Every update is in the stream (so r2 has fallen behind it) before r2 resumes.
    let deadline = std::time::Instant::now() + WAIT;
    while stream_field(&mut conn, &key, "entries-added").await < 601 {
        assert!(
            std::time::Instant::now() < deadline,
            "updates not published"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let len: i64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(len < 300, "the stream holds {len} entries");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "the stream has no expiry ({ttl})");

    signal(&r2.child, "CONT");
    b.wait_text("t", &"x".repeat(601)).await;
    assert!(b.closed.is_none());
}

async fn stream_field(conn: &mut redis::aio::MultiplexedConnection, key: &str, field: &str) -> i64 {
    let info: std::collections::HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    redis::from_redis_value(&info[field]).unwrap()
}

async fn wait_status(server: &Server, path: &str, want: u16) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = reqwest::get(server.http(path))
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} stuck at {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Several clients over two replicas, random edits and disconnects: all final
/// states are identical, and equal to the stored state after a restart.
#[tokio::test]
async fn randomized_convergence_over_two_replicas() {
    let (r1, r2) = pair(&shared_redis_url()).await;
    let doc = unique("replicas/random");
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let urls = [r1.ws_url(&doc), r2.ws_url(&doc)];
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(Client::connect(&urls[i % 2]).await);
    }
    for _ in 0..150 {
        let i = rng.random_range(0..clients.len());
        if rng.random_ratio(1, 12) {
            // Disconnect, edit offline, reconnect to a random replica.
            let mut c = clients.swap_remove(i);
            let d = std::mem::replace(&mut c.doc, Doc::new());
            c.close().await;
            let mut offline = Client::open(&urls[0], d).await.unwrap();
            let len = offline.text("t").chars().count() as u32;
            offline.local_insert("t", rng.random_range(0..=len), "o");
            let d = std::mem::replace(&mut offline.doc, Doc::new());
            offline.close().await;
            let url = &urls[rng.random_range(0..2)];
            clients.push(Client::connect_with(url, d).await);
        } else {
            let c = &mut clients[i];
            let len = c.text("t").chars().count() as u32;
            let pos = rng.random_range(0..=len);
            let ch = ["a", "b", "c", "d"][rng.random_range(0..4)];
            c.insert("t", pos, ch).await;
        }
    }
    // Converge: wait until every client holds the same text as client 0 and
    // that text contains all 150 characters.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        for c in clients.iter_mut() {
            let _ = c.stays_open(Duration::from_millis(20)).await;
        }
        let first = clients[0].text("t");
        if first.chars().count() == 150 && clients.iter().all(|c| c.text("t") == first) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no convergence (seed {seed})"
        );
    }
    let want = clients[0].text("t");
    for c in clients {
        c.close().await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(r1);
    let r2 = r2.restart();
    let fresh = Client::connect(&r2.ws_url(&doc)).await;
    assert_eq!(fresh.text("t"), want, "seed {seed}");
}
