//! Wires the parts together and runs `concord serve` until a signal, then
//! drains: readiness 503, sockets closed with 1012, pending updates flushed,
//! exit within ten seconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::config::{LogFormat, ServeArgs};
use crate::fanout::local::LocalFanout;
use crate::fanout::{Fanout, Published};
use crate::health::Health;
use crate::history::History;
use crate::http::{self, AppState, ClientAddrs};
use crate::room::{RoomContext, Rooms};
use crate::store::committer::{Committer, CompactionPolicy, Hooks, Settings};
use crate::store::{self, StoreError};
use crate::transport;
use crate::webhooks::Webhooks;

/// The whole shutdown, from signal to exit.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(10);
/// y-protocols drops awareness states not renewed for this long.
const AWARENESS_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let replica: Arc<str> = args
        .replica_id
        .clone()
        .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()))
        .into();
    // Refused before anything starts: a bad URL or a missing secret.
    let webhooks = Webhooks::from_args(&args.webhooks)?;
    let metrics = crate::metrics::install(&replica)?;
    let database = redact_url(&args.db.database_url);

    let store = store::open(&args.db.database_url)
        .await
        .with_context(|| format!("cannot open the database at {database}"))?;
    if args.auto_migrate() {
        for (version, description) in store.migrate().await? {
            tracing::info!(version, description, "applied migration");
        }
    } else {
        let pending = store.pending_migrations().await?;
        if !pending.is_empty() {
            let list = pending
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(StoreError::PendingMigrations(list).into());
        }
    }

    let fanout: Arc<dyn Fanout> = match &args.redis_url {
        Some(url) => Arc::new(
            crate::fanout::redis::RedisFanout::connect(
                url,
                replica.clone(),
                args.stream_max_len as usize,
            )
            .await
            .with_context(|| format!("cannot start Redis fan-out at {}", redact_url(url)))?,
        ),
        None => Arc::new(LocalFanout),
    };
    let health = Arc::new(Health::default());
    let limits = Arc::new(args.limits.clone());
    let hooks = Hooks {
        durable: {
            let fanout = fanout.clone();
            Box::new(move |batch| {
                for update in batch {
                    fanout.publish(&update.doc, Published::Update(update.data.clone()));
                }
            })
        },
        store_status: {
            let health = health.clone();
            Box::new(move |error| health.set_store_error(error))
        },
    };
    let (committer, commit_task) = Committer::spawn(
        store.clone(),
        hooks,
        Settings {
            compaction: CompactionPolicy {
                max_entries: limits.compact_after_updates,
                max_bytes: limits.compact_after_bytes,
            },
            budget: limits.persist_budget_bytes,
            interval: args.commit_interval(),
        },
    );
    let rooms = Rooms::new(RoomContext {
        store: store.clone(),
        committer: committer.clone(),
        fanout,
        unload_after: limits.unload_after,
        awareness_timeout: AWARENESS_TIMEOUT,
    });

    let verifier = Verifier::from_args(&args.auth)?.map(Arc::new);
    if verifier.is_none() {
        tracing::warn!("no CONCORD_JWT_SECRET or CONCORD_JWT_PUBLIC_KEY: auth is off, anyone can read and write every document");
    }

    let shutdown = CancellationToken::new();
    let webhooks_for_history = webhooks.clone();
    let webhook_task = match webhooks {
        Some(webhooks) => Some(crate::webhooks::spawn(
            store.clone(),
            webhooks,
            replica.clone(),
            shutdown.clone(),
        )?),
        None => None,
    };
    let connections = TaskTracker::new();
    let transport = Arc::new(transport::Context {
        limits: limits.clone(),
        heartbeat: transport::Heartbeat::start(limits.ping_interval, shutdown.clone()),
        bulk: Arc::new(tokio::sync::Semaphore::new(transport::BULK_PERMITS)),
    });
    let history = Arc::new(History::new(
        rooms.clone(),
        store.clone(),
        &args.history,
        webhooks_for_history,
    ));
    let history_task = history.clone().spawn(shutdown.clone());
    let state = AppState {
        rooms,
        history,
        health: health.clone(),
        limits,
        verifier,
        allowed_origins: args.allowed_origins.clone().map(Arc::new),
        client_addrs: ClientAddrs::new(
            args.trusted_proxies.clone().unwrap_or_default(),
            args.max_connections_per_ip,
        ),
        metrics,
        transport,
        connections: connections.clone(),
    };

    let listener = listen(args.bind).with_context(|| format!("cannot listen on {}", args.bind))?;
    let addr = listener.local_addr()?;
    // Every frame is written as soon as it is ready; Nagle's algorithm would
    // hold a small one back while an earlier one is unacknowledged.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    tracing::info!(%addr, replica = %replica, database, "concord listening");
    // Scripts that bind port 0 read the address from this line. In JSON mode
    // every line is JSON, so they read the event above instead. Not
    // `println!`: it panics when stdout is a closed pipe.
    if args.log_format == LogFormat::Pretty {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "concord listening on {addr}").and_then(|()| stdout.flush());
    }

    let drained = CancellationToken::new();
    let drain = tokio::spawn(drain_on_signal(
        health,
        shutdown,
        connections,
        committer,
        drained.clone(),
    ));
    axum::serve(
        listener,
        http::router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(drained.cancelled_owned())
    .await?;
    drain.await?;
    // The last committer clone lives in the rooms; the task ends with the process.
    drop(commit_task);
    if let Some(task) = history_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    if let Some(task) = webhook_task {
        // It stops on `shutdown`, giving back its leases.
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    store.close().await;
    tracing::info!("shut down");
    Ok(())
}

/// Connections the kernel queues for `accept` at most (capped by
/// `net.core.somaxconn`). At the default of 128, a join storm (150 clients
/// opening a document at once, as after a deploy) overflowed the queue, and
/// each dropped handshake cost its client a 1 s SYN retransmit.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn drain_on_signal(
    health: Arc<Health>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    committer: Committer,
    drained: CancellationToken,
) {
    // Whatever happens below, axum's graceful shutdown must be released.
    let _release = drained.drop_guard();
    wait_for_signal().await;
    watchdog();
    let deadline = tokio::time::Instant::now() + SHUTDOWN_BUDGET - Duration::from_secs(1);
    tracing::info!("shutting down: draining connections");
    health.start_draining();
    shutdown.cancel();
    connections.close();
    if tokio::time::timeout_at(deadline, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the shutdown deadline");
    }
    if tokio::time::timeout_at(deadline, committer.flush())
        .await
        .is_err()
    {
        tracing::error!("pending updates could not be stored before exit; clients will re-send them on reconnect");
    }
}

/// The last resort of the shutdown budget: a plain thread, so it fires even if
/// the runtime is wedged, that ends the process when the drain overran.
fn watchdog() {
    std::thread::spawn(|| {
        std::thread::sleep(SHUTDOWN_BUDGET);
        tracing::error!("shutdown overran its budget; exiting");
        std::process::exit(1);
    });
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A connection URL with its password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            super::redact_url("sqlite://concord.db"),
            "sqlite://concord.db"
        );
    }
}
