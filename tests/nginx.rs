//! The deployment topology on loopback: nginx (Debian's, with the repository's
//! `deploy/nginx.conf`) in front of two `concord` replicas sharing PostgreSQL
//! and Redis; real clients connect through nginx.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: the master stops its workers too (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        if wait_exit(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs nginx with deploy/nginx.conf, its upstreams pointed at `replicas`.
fn nginx(replicas: &[&Server]) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf")).unwrap();
    let conf = conf
        .replace(
            "server concord-1:8080",
            &format!("server {}", replicas[0].addr),
        )
        .replace(
            "server concord-2:8080",
            &format!("server {}", replicas[1].addr),
        )
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        .replace(
            "/dev/stdout",
            &dir.path().join("access.log").display().to_string(),
        );
    assert!(
        conf.contains(&replicas[1].addr.to_string()),
        "deploy/nginx.conf upstreams changed"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-g")
        .arg(format!(
            "daemon off; pid {};",
            dir.path().join("nginx.pid").display()
        ))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx must be installed (scripts/test installs nginx-light)");
    wait_for_port(port, "nginx");
    Nginx {
        child,
        port,
        _dir: dir,
    }
}

#[tokio::test]
async fn clients_through_nginx_reach_both_replicas_and_converge() {
    let db = fresh_postgres().await;
    let redis = shared_redis_url();
    let start = |id: &str| {
        Server::replica(&db, &redis, id)
            .args([
                "--trusted-proxies",
                "127.0.0.1/32",
                "--max-connections-per-ip",
                "2",
            ])
            .start()
    };
    let (r1, r2) = (start("n1"), start("n2"));
    let proxy = nginx(&[&r1, &r2]);
    let through = |doc: &str| format!("ws://127.0.0.1:{}/ws/{doc}", proxy.port);

    // Clients of one document through nginx, and a client straight on each replica.
    let doc = unique("nginx/notes");
    let mut a = Client::connect(&through(&doc)).await;
    let mut direct1 = Client::connect(&r1.ws_url(&doc)).await;
    let mut direct2 = Client::connect(&r2.ws_url(&doc)).await;
    a.insert("t", 0, "via nginx").await;
    direct1.wait_text("t", "via nginx").await;
    direct2.wait_text("t", "via nginx").await;
    direct2.insert("t", 9, "!").await;
    a.wait_text("t", "via nginx!").await;

    // The document API goes through nginx too.
    let resp = reqwest::get(format!(
        "http://127.0.0.1:{}/api/docs/{}",
        proxy.port,
        percent_encode(&doc)
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        reqwest::get(format!("http://127.0.0.1:{}/readyz", proxy.port))
            .await
            .unwrap()
            .status(),
        200
    );
}
