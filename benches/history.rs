//! What history costs in storage: bytes of versions per MB of text typed.
//! Run with `benches/run history`; results are appended to BENCHMARKS.md.
//!
//! One writer types 1 MB of prose-like text into one document through the
//! same write path as the HTTP API (room, group commit, SQLite): runs of 128
//! characters, nine in ten at the end and one in ten somewhere inside, and
//! every tenth run also deletes 32 characters. A version is recorded every
//! `cadence` bytes typed, as a pause in typing would. The figure is what
//! `document_versions` holds afterwards, next to what storing each version's
//! whole state (lz4-packed, as snapshots are) would have taken.

// Shared with the other benchmarks; this one needs only the report helpers.
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use concord::config::HistoryArgs;
use concord::fanout::local::LocalFanout;
use concord::history::History;
use concord::room::{RoomContext, Rooms};
use concord::store::committer::{Committer, CompactionPolicy, Hooks, Settings};
use concord::store::{self, Store};
use sqlx::Connection;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Text, Transact, Update};

const WORDS: &[&str] = &[
    "the",
    "document",
    "server",
    "keeps",
    "every",
    "version",
    "of",
    "what",
    "was",
    "typed",
    "and",
    "who",
    "changed",
    "it",
    "a",
    "restore",
    "brings",
    "back",
    "an",
    "earlier",
    "state",
    "without",
    "rewriting",
    "history",
    "editors",
    "stay",
    "connected",
    "while",
    "text",
    "merges",
];

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let typed_total = if quick { 200_000 } else { 1_000_000 };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut report = format!(
            "\n## History storage ({})\n\nCommand: `benches/run history{}`. One writer types {} KB of prose-like text through the room and group commit \
             (SQLite): runs of 128 characters, 9 in 10 appended, 1 in 10 inside the text, every 10th run also deleting 32 characters; \
             a version every `cadence` bytes typed. \"Chained\" is what `document_versions` holds (changes since the previous version, \
             a whole state when the chain outweighs it); \"whole\" is what storing each version's whole state, lz4-packed, would take.\n\n\
             | cadence | versions | final text | chained: bytes | per MB typed | whole states: bytes | per MB typed |\n| --- | --- | --- | --- | --- | --- | --- |\n",
            common::today(),
            if quick { " --quick" } else { "" },
            typed_total / 1000
        );
        for cadence in [2_000usize, 20_000] {
            let row = measure(typed_total, cadence).await;
            report.push_str(&row);
        }
        common::append_report(&report);
    });
}

async fn measure(typed_total: usize, cadence: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("history.db").display());
    let store: Arc<dyn Store> = store::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    let (committer, _task) = Committer::spawn(
        store.clone(),
        Hooks::none(),
        Settings {
            compaction: CompactionPolicy {
                max_entries: 1000,
                max_bytes: 8 << 20,
            },
            budget: 256 << 20,
            interval: Duration::ZERO,
        },
    );
    let rooms = Rooms::new(RoomContext {
        store: store.clone(),
        committer: committer.clone(),
        fanout: Arc::new(LocalFanout),
        unload_after: Duration::from_secs(30),
        awareness_timeout: Duration::from_secs(30),
    });
    let args = HistoryArgs {
        history_retention: Duration::from_secs(30 * 86_400),
        version_idle: Duration::from_secs(3600),
    };
    let history = Arc::new(History::new(rooms.clone(), store.clone(), &args, None));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = history.clone().spawn(shutdown.clone());

    let writer = Doc::new();
    let text = writer.get_or_insert_text("t");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut typed, mut since_version, mut versions, mut whole_bytes, mut run) = (0, 0, 0, 0, 0);
    while typed < typed_total {
        let mut chunk = String::new();
        while chunk.len() < 128 {
            chunk.push_str(WORDS[next() as usize % WORDS.len()]);
            chunk.push(' ');
        }
        chunk.truncate(128);
        let before = writer.transact().state_vector();
        {
            let mut txn = writer.transact_mut();
            let len = text.len(&txn);
            let at = if next() % 10 == 0 && len > 0 {
                next() as u32 % len
            } else {
                len
            };
            text.insert(&mut txn, at, &chunk);
            run += 1;
            if run % 10 == 0 && len > 64 {
                let from = next() as u32 % (len - 32);
                text.remove_range(&mut txn, from, 32);
            }
        }
        let update = writer.transact().encode_diff_v1(&before);
        let decoded = Update::decode_v1(&update).unwrap();
        rooms
            .write("doc", Bytes::from(update), decoded, None)
            .await
            .unwrap();
        typed += chunk.len();
        since_version += chunk.len();
        if since_version >= cadence {
            since_version = 0;
            history.create("doc", None).await.unwrap();
            versions += 1;
            let state = rooms.read("doc", StateVector::default()).await.unwrap();
            whole_bytes += lz4_flex::compress_prepend_size(&state.update).len();
        }
    }
    shutdown.cancel();
    if let Some(task) = task {
        let _ = task.await;
    }
    let final_text = text.len(&writer.transact()) as usize;
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let (chained,): (i64,) =
        sqlx::query_as("SELECT COALESCE(SUM(LENGTH(data) + LENGTH(sv)), 0) FROM document_versions")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let per_mb = |bytes: f64| bytes / (typed as f64 / 1e6);
    format!(
        "| {} KB | {versions} | {:.0} KB | {:.2} MB | {:.2} MB | {:.1} MB | {:.1} MB |\n",
        cadence / 1000,
        final_text as f64 / 1000.0,
        chained as f64 / 1e6,
        per_mb(chained as f64) / 1e6,
        whole_bytes as f64 / 1e6,
        per_mb(whole_bytes as f64) / 1e6,
    )
}
