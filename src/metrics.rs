//! Prometheus metrics: names in one place, and the recorder installed once per process.
//! Labels stay low-cardinality (never a document name); the replica id is a global label.
//!
//! Every series is registered when the recorder is installed, at zero, so a
//! dashboard or an alert on a fresh server reads a value rather than "no data".

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

/// The `type` label of the message counters: every kind a protocol names.
pub const MESSAGE_TYPES: &[&str] = &[
    "sync_step1",
    "sync_step2",
    "update",
    "awareness",
    "query_awareness",
    "auth",
    "stateless",
    "sync_status",
    "close",
    "other",
];

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
    for gauge in [CONNECTIONS, DOCUMENTS_LOADED, PERSIST_PENDING_BYTES] {
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
    for kind in MESSAGE_TYPES {
        metrics::counter!(MESSAGES_RECEIVED, "type" => *kind).absolute(0);
        metrics::counter!(MESSAGES_SENT, "type" => *kind).absolute(0);
    }
    for reason in REJECT_REASONS {
        metrics::counter!(CONNECTIONS_REJECTED, "reason" => *reason).absolute(0);
    }
    // Histograms are rendered once they exist, with every bucket at zero.
    for histogram in [PERSIST_SECONDS, FANOUT_LAG_SECONDS, CONNECTION_SECONDS] {
        let _ = metrics::histogram!(histogram);
    }
}
