//! Prometheus metrics: names in one place, and the recorder installed once per process.
//! Labels stay low-cardinality (never a document name); the replica id is a global label.
//!
//! Every series is registered when the recorder is installed, at zero, so a
//! dashboard or an alert on a fresh server reads a value rather than "no data".

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "concord_connections";
pub const DOCUMENTS_LOADED: &str = "concord_documents_loaded";
pub const MESSAGES_RECEIVED: &str = "concord_messages_received_total";
pub const MESSAGES_SENT: &str = "concord_messages_sent_total";
pub const CONNECTIONS_REJECTED: &str = "concord_connections_rejected_total";
pub const CONNECTIONS_CLOSED: &str = "concord_connections_closed_total";
pub const CONNECTION_SECONDS: &str = "concord_connection_duration_seconds";
pub const MESSAGE_BYTES: &str = "concord_message_bytes";
pub const PERSIST_SECONDS: &str = "concord_persist_seconds";
pub const PERSIST_ERRORS: &str = "concord_persist_errors_total";
pub const PERSIST_PENDING_BYTES: &str = "concord_persist_pending_bytes";
pub const UPDATES_PERSISTED: &str = "concord_updates_persisted_total";
pub const STORE_LOADS: &str = "concord_store_loads_total";
pub const COMPACTIONS: &str = "concord_compactions_total";
pub const FANOUT_ERRORS: &str = "concord_fanout_errors_total";
pub const FANOUT_LAG_SECONDS: &str = "concord_fanout_lag_seconds";
pub const WEBHOOK_DELIVERIES: &str = "concord_webhook_deliveries_total";
pub const WEBHOOK_EVENTS_PENDING: &str = "concord_webhook_events_pending";
pub const WEBHOOK_OLDEST_PENDING_SECONDS: &str = "concord_webhook_oldest_pending_seconds";

/// The `outcome` label of [`WEBHOOK_DELIVERIES`].
pub const WEBHOOK_OUTCOMES: &[&str] = &["delivered", "failed", "dropped"];

/// The `type` label of the message counters: every kind either protocol has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    SyncStep1,
    SyncStep2,
    Update,
    Awareness,
    QueryAwareness,
    Auth,
    Stateless,
    SyncStatus,
    Close,
    Ping,
    Other,
}

impl MessageKind {
    const ALL: [MessageKind; 11] = [
        MessageKind::SyncStep1,
        MessageKind::SyncStep2,
        MessageKind::Update,
        MessageKind::Awareness,
        MessageKind::QueryAwareness,
        MessageKind::Auth,
        MessageKind::Stateless,
        MessageKind::SyncStatus,
        MessageKind::Close,
        MessageKind::Ping,
        MessageKind::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            MessageKind::SyncStep1 => "sync_step1",
            MessageKind::SyncStep2 => "sync_step2",
            MessageKind::Update => "update",
            MessageKind::Awareness => "awareness",
            MessageKind::QueryAwareness => "query_awareness",
            MessageKind::Auth => "auth",
            MessageKind::Stateless => "stateless",
            MessageKind::SyncStatus => "sync_status",
            MessageKind::Close => "close",
            MessageKind::Ping => "ping",
            MessageKind::Other => "other",
        }
    }
}

/// Handles of the series touched for every message: looking a series up by
/// name and labels costs a hash and a lock, once per delivery.
struct Hot {
    received: Vec<Counter>,
    sent: Vec<Counter>,
    bytes_in: Histogram,
    connections: Gauge,
    store_loads: Counter,
}

static HOT: OnceLock<Hot> = OnceLock::new();

fn hot() -> &'static Hot {
    HOT.get_or_init(|| Hot {
        received: MessageKind::ALL
            .iter()
            .map(|k| metrics::counter!(MESSAGES_RECEIVED, "type" => k.label()))
            .collect(),
        sent: MessageKind::ALL
            .iter()
            .map(|k| metrics::counter!(MESSAGES_SENT, "type" => k.label()))
            .collect(),
        bytes_in: metrics::histogram!(MESSAGE_BYTES, "direction" => "in"),
        connections: metrics::gauge!(CONNECTIONS),
        store_loads: metrics::counter!(STORE_LOADS),
    })
}

/// A message received, of `len` bytes.
pub fn received(kind: MessageKind, len: usize) {
    let hot = hot();
    hot.received[kind as usize].increment(1);
    hot.bytes_in.record(len as f64);
}

/// A message sent.
pub fn sent(kind: MessageKind) {
    hot().sent[kind as usize].increment(1);
}

/// A socket opened (`1.0`) or closed (`-1.0`).
pub fn connections(delta: f64) {
    hot().connections.increment(delta);
}

/// A document read from the store (a room's load, a resync, an API read).
pub fn store_loaded() {
    hot().store_loads.increment(1);
}

/// The `reason` label of [`CONNECTIONS_REJECTED`].
pub const REJECT_REASONS: &[&str] = &[
    "draining",
    "bad_name",
    "origin",
    "per_ip_limit",
    "unauthorized",
    "forbidden",
];

/// Installs the global recorder; the handle renders `/metrics`.
pub fn install(replica: &str) -> anyhow::Result<PrometheusHandle> {
    let latency = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ];
    let handle = PrometheusBuilder::new()
        .add_global_label("replica", replica)
        .set_buckets_for_metric(Matcher::Full(PERSIST_SECONDS.into()), latency)?
        .set_buckets_for_metric(Matcher::Full(FANOUT_LAG_SECONDS.into()), latency)?
        .set_buckets_for_metric(
            Matcher::Full(CONNECTION_SECONDS.into()),
            &[1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full(MESSAGE_BYTES.into()),
            &[
                16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
                16777216.0,
            ],
        )?
        .install_recorder()?;
    register_all();
    Ok(handle)
}

fn register_all() {
    for gauge in [
        CONNECTIONS,
        DOCUMENTS_LOADED,
        PERSIST_PENDING_BYTES,
        WEBHOOK_EVENTS_PENDING,
        WEBHOOK_OLDEST_PENDING_SECONDS,
    ] {
        metrics::gauge!(gauge).set(0.0);
    }
    for counter in [
        PERSIST_ERRORS,
        UPDATES_PERSISTED,
        STORE_LOADS,
        COMPACTIONS,
        FANOUT_ERRORS,
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for kind in MessageKind::ALL {
        metrics::counter!(MESSAGES_RECEIVED, "type" => kind.label()).absolute(0);
        metrics::counter!(MESSAGES_SENT, "type" => kind.label()).absolute(0);
    }
    for outcome in WEBHOOK_OUTCOMES {
        metrics::counter!(WEBHOOK_DELIVERIES, "outcome" => *outcome).absolute(0);
    }
    for reason in REJECT_REASONS {
        metrics::counter!(CONNECTIONS_REJECTED, "reason" => *reason).absolute(0);
    }
    // Histograms are rendered once they exist, with every bucket at zero.
    for histogram in [PERSIST_SECONDS, FANOUT_LAG_SECONDS, CONNECTION_SECONDS] {
        let _ = metrics::histogram!(histogram);
    }
}
