//! S3: sockets connected, synced, then idle; the server's resident memory
//! per socket.

use std::time::Duration;

use crate::client;
use crate::targets::{self, Running};

/// (baseline RSS KiB, KiB per idle socket), for `n` sockets in rooms of ten.
pub async fn run(server: &Running, n: usize) -> (f64, f64) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = targets::rss_kib(server.pid).0;
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("idle-{}-{}", std::process::id(), i / 10);
        sockets.push(
            client::connect(&server.socket_url(&name), &name, server.target.protocol()).await,
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = targets::rss_kib(server.pid).0;
    drop(sockets);
    (base, (after - base) / n as f64)
}
