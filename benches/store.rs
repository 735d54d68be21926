//! Store throughput and cold loads, on SQLite and PostgreSQL, through the same
//! group-commit path rooms use. Run with `benches/run store`; results are
//! appended to BENCHMARKS.md.
//!
//! - persisted updates/s: small text updates over 100 documents, submitted as
//!   fast as possible, until the final flush says all are durable.
//! - cold load: a document whose log holds 100,000 updates (100 chars each,
//!   about 10 MB of text), loaded (snapshot + log, applied to a fresh Doc)
//!   before and after compaction; written as prepends (every update its own
//!   block, the worst case) and as typing (runs of one writer, merged).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use concord::store::committer::{Committer, CompactionPolicy, Hooks, Settings};
use concord::store::{self, NewUpdate, Store};
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, Text, Transact};

const DOCS: usize = 100;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (updates, log) = if quick {
        (20_000, 10_000)
    } else {
        (200_000, 100_000)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
        let (postgres, postgres_name) = common::fresh_postgres("concord_bench_store").await;
        let mut report = format!(
            "\n## Store ({})\n\nCommand: `benches/run store{}`. Group commit as rooms use it; {updates} small text updates over {DOCS} documents; \
             a {log}-update log of 100-character inserts for the cold load (load = read snapshot + log and apply to a fresh Doc).\n\n\
             Cold loads give the total and, in brackets, the part spent reading from the database (the rest is decoding and applying).\n\n\
             | store | persisted updates/s | document | cold load, {log} log rows | after compaction | again | document size |\n| --- | --- | --- | --- | --- | --- | --- |\n",
            common::today(),
            if quick { " --quick" } else { "" }
        );
        for (name, url) in [("SQLite", sqlite), ("PostgreSQL", postgres)] {
            let store = store::open(&url).await.unwrap();
            store.migrate().await.unwrap();
            if name == "PostgreSQL" {
                common::checkpoint().await;
            }
            let rate = persisted_per_second(store.clone(), updates).await;
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            for shape in [Shape::Prepend, Shape::Typed] {
                let (before, after, again, size) = cold_load(store.clone(), log, shape).await;
                report.push_str(&format!(
                    "| {name} | {rate:.0} | {} | {:.0} ms ({:.0}) | {:.1} ms ({:.1}) | {:.1} ms ({:.1}) | {:.1} MB |\n",
                    shape.label(),
                    ms(before.0),
                    ms(before.1),
                    ms(after.0),
                    ms(after.1),
                    ms(again.0),
                    ms(again.1),
                    size as f64 / 1e6
                ));
            }
            store.close().await;
        }
        common::drop_postgres(&postgres_name).await;
        common::append_report(&report);
    });
}

/// Small updates, as a typing user produces them: one character each.
fn typing(n: usize) -> Vec<Bytes> {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    (0..n)
        .map(|i| {
            let before = doc.transact().state_vector();
            text.insert(&mut doc.transact_mut(), i as u32, "a");
            Bytes::from(doc.transact().encode_diff_v1(&before))
        })
        .collect()
}

async fn persisted_per_second(store: Arc<dyn Store>, n: usize) -> f64 {
    let policy = CompactionPolicy {
        max_entries: u64::MAX,
        max_bytes: u64::MAX,
    };
    let settings = Settings {
        compaction: policy,
        budget: usize::MAX / 2,
        interval: Duration::ZERO,
    };
    let (committer, _task) = Committer::spawn(store, Hooks::none(), settings);
    let per_doc = typing(n / DOCS);
    let docs: Vec<Arc<str>> = (0..DOCS)
        .map(|d| format!("persist-{}-{d}", std::process::id()).into())
        .collect();
    let started = Instant::now();
    for update in &per_doc {
        for doc in &docs {
            let reservation = committer.reserve(update.len()).unwrap();
            reservation.submit(
                NewUpdate {
                    doc: doc.clone(),
                    data: update.clone(),
                    user: None,
                },
                None,
            );
        }
        // Yield now and then, as rooms on other tasks would.
        tokio::task::yield_now().await;
    }
    committer.flush().await;
    (per_doc.len() * DOCS) as f64 / started.elapsed().as_secs_f64()
}

/// How the cold-load document was written.
#[derive(Clone, Copy)]
enum Shape {
    /// Every insert at the start: each stays its own block, the worst case.
    Prepend,
    /// Ten writers taking turns, a hundred appends each: what typing leaves,
    /// runs of one writer that yrs merges into one block.
    Typed,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::Prepend => "prepends (a block per update)",
            Shape::Typed => "typed (10 writers, runs of 100)",
        }
    }
}

/// Loads before compaction, after it, and after it again: (total, of which
/// the store read) each, and the compacted size. The first load after a
/// compaction on PostgreSQL also steps over the index entries of the rows it
/// deleted (until vacuum); the second finds them marked dead.
async fn cold_load(
    store: Arc<dyn Store>,
    n: usize,
    shape: Shape,
) -> (
    (Duration, Duration),
    (Duration, Duration),
    (Duration, Duration),
    usize,
) {
    let doc: Arc<str> = format!("cold-{}-{}", std::process::id(), shape as u8).into();
    let writers: Vec<Doc> = (0..10).map(|i| Doc::with_client_id(i + 1)).collect();
    let texts: Vec<_> = writers.iter().map(|w| w.get_or_insert_text("t")).collect();
    let chunk = "0123456789".repeat(10);
    let mut batch = Vec::new();
    for i in 0..n {
        let w = match shape {
            Shape::Prepend => 0,
            Shape::Typed => (i / 100) % writers.len(),
        };
        let (ydoc, text) = (&writers[w], &texts[w]);
        let before = ydoc.transact().state_vector();
        {
            let mut txn = ydoc.transact_mut();
            let at = match shape {
                Shape::Prepend => 0,
                Shape::Typed => text.len(&txn),
            };
            text.insert(&mut txn, at, &chunk);
        }
        let update = ydoc.transact().encode_diff_v1(&before);
        if matches!(shape, Shape::Typed) {
            for (j, other) in writers.iter().enumerate() {
                if j != w {
                    let update = yrs::Update::decode_v1(&update).unwrap();
                    other.transact_mut().apply_update(update).unwrap();
                }
            }
        }
        batch.push(NewUpdate {
            doc: doc.clone(),
            data: Bytes::from(update),
            user: None,
        });
        if batch.len() == 5000 {
            store.append(&batch).await.unwrap();
            batch.clear();
        }
    }
    store.append(&batch).await.unwrap();
    let load = || async {
        let started = Instant::now();
        let stored = store.load(&doc).await.unwrap();
        let read = started.elapsed();
        let fresh = concord::doc::build(&stored, false).unwrap();
        drop(fresh);
        let total = started.elapsed();
        ((total, read), stored.snapshot.map_or(0, |s| s.len()))
    };
    let (before, _) = load().await;
    store.compact(&doc).await.unwrap();
    let (after, size) = load().await;
    let (again, _) = load().await;
    (before, after, again, size)
}
