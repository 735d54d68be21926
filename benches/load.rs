//! Load generator speaking the y-websocket protocol (and Hocuspocus's framing
//! of it), measuring Concord side by side with the reference server
//! (`@y/websocket-server`) and Hocuspocus (`@hocuspocus/server`) in one run.
//! Servers are pinned to core 0, this generator to core 1 (`taskset`).
//!
//! Run with `benches/run` (it installs the peers and raises the fd limit);
//! results are appended to BENCHMARKS.md.
//!
//! Scenarios:
//! - fan-out: ROOMS rooms × CLIENTS clients, one writer per room sending
//!   RATE updates/s; latency from the writer's send to each reader's receipt.
//! - idle: IDLE clients connected and synced, then idle; server RSS growth per connection.
//! - cross-replica: the fan-out scenario with writers on replica 1 and readers
//!   on replica 2 (PostgreSQL + Redis), next to a single replica on the same
//!   stores; `--rounds N` repeats the pair, since one run says little of a p99.
//! - the floor: the fan-out scenario against a relay that only forwards each
//!   frame to the other sockets of its path (this binary run with `--relay`),
//!   so the table shows what this generator measures for a server that does
//!   nothing at all.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, Map, Out, ReadTxn, Transact, Update};

/// A server measured by the fan-out and idle scenarios.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Concord,
    Reference,
    Hocuspocus,
    Relay,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Concord => "concord",
            Target::Reference => "y-websocket reference",
            Target::Hocuspocus => "hocuspocus",
            Target::Relay => "no-op relay (floor)",
        }
    }
}

struct Config {
    rooms: usize,
    clients: usize,
    rate: u64,
    seconds: u64,
    idle: usize,
}

fn main() {
    if let Some(port) = std::env::args().skip_while(|a| a != "--relay").nth(1) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(relay(port.parse().expect("--relay PORT")));
        return;
    }
    // Pin before the runtime starts, so every worker thread inherits it.
    let pid = std::process::id().to_string();
    let pinned = Command::new("taskset")
        .args(["-p", "-c", "1", &pid])
        .stdout(Stdio::null())
        .status();
    assert!(
        pinned.is_ok_and(|s| s.success()),
        "taskset (util-linux) is required"
    );
    let quick = std::env::args().any(|a| a == "--quick");
    let config = if quick {
        Config {
            rooms: 10,
            clients: 5,
            rate: 10,
            seconds: 3,
            idle: 300,
        }
    } else {
        Config {
            rooms: 100,
            clients: 10,
            rate: 10,
            seconds: 20,
            idle: 5000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(config));
}

/// Scenarios named on the command line (`local`, `cross`); none means all.
fn wanted(scenario: &str) -> bool {
    let named: Vec<String> = std::env::args()
        .filter(|a| a == "local" || a == "cross")
        .collect();
    named.is_empty() || named.iter().any(|a| a == scenario)
}

async fn run(c: Config) {
    let mut report = String::new();
    let cmd = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect::<Vec<_>>()
        .join(" ");
    report.push_str(&format!(
        "\n## {} ({})\n\nCommand: `benches/run{}{}`. Servers pinned to core 0, generator to core 1. \
         Fan-out: {} rooms × {} clients (1 writer + {} readers per room), {} updates/s per writer, {} s measured. \
         Concord runs with `--max-connections-per-ip 100000` since every generated client comes from 127.0.0.1.",
        if wanted("local") {
            "Fan-out and idle memory"
        } else {
            "Cross-replica"
        },
        common::today(),
        if cmd.is_empty() { "" } else { " " },
        cmd,
        c.rooms,
        c.clients,
        c.clients - 1,
        c.rate,
        c.seconds,
    ));
    if wanted("local") {
        report.push_str(&format!(
            " Idle: {} clients, synced then idle. Concord runs on embedded SQLite (every update persisted); \
             the reference server and Hocuspocus (no extensions) keep documents in memory only; the no-op relay only forwards frames.",
            c.idle
        ));
        report.push_str("\n\n| server | fan-out p50 | fan-out p99 | deliveries | generator CPU | RSS idle baseline | RSS per idle connection |\n");
        report.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    } else {
        report.push_str("\n\n");
    }

    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    let targets: &[Target] = if wanted("local") {
        &[
            Target::Concord,
            Target::Reference,
            Target::Hocuspocus,
            Target::Relay,
        ]
    } else {
        &[]
    };
    for &target in targets {
        let (mut server, url) = start(target, &dir, "fanout");
        let fan = fanout(&url, &url, target, &c).await;
        stop(&mut server);
        let memory = if target == Target::Relay {
            None
        } else {
            let (mut server, url) = start(target, &dir, "idle");
            let memory = idle(&url, server.id(), c.idle, target).await;
            stop(&mut server);
            Some(memory)
        };
        rows.push((target.label(), fan, memory));
    }
    for (target, fan, memory) in &rows {
        let (base, per) = match memory {
            Some((base, per)) => (format!("{:.1} MiB", base / 1024.0), format!("{per:.1} KiB")),
            None => ("–".into(), "–".into()),
        };
        report.push_str(&format!(
            "| {target} | {:.2} ms | {:.2} ms | {} | {:.0}% | {base} | {per} |\n",
            fan.p50, fan.p99, fan.deliveries, fan.cpu,
        ));
    }

    if !wanted("cross") {
        common::append_report(&report);
        return;
    }
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .map(|n| n.parse().expect("--rounds N"))
        .unwrap_or(1);
    report.push_str(
        "\nCross-replica (PostgreSQL + Redis Streams; both replicas on core 0, PostgreSQL and Redis unpinned; \
         each round measures one replica, then the writer on replica 1 and the readers on replica 2, \
         on a fresh database with a PostgreSQL `CHECKPOINT` before each):\n\n\
         | round | one replica p50 | one replica p99 | cross p50 | cross p99 | p99 gap | deliveries (one / cross) | generator CPU (one / cross) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut met = 0;
    let (mut worst, mut widest) = (0f64, 0f64);
    for round in 1..=rounds {
        let (solo, cross) = cross_round(&c).await;
        let gap = cross.p99 - solo.p99;
        if cross.p99 < 5.0 && gap <= 2.0 {
            met += 1;
        }
        worst = worst.max(cross.p99);
        widest = widest.max(gap);
        report.push_str(&format!(
            "| {round} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {gap:.2} ms | {} / {} | {:.0}% / {:.0}% |\n",
            solo.p50, solo.p99, cross.p50, cross.p99, solo.deliveries, cross.deliveries, solo.cpu, cross.cpu
        ));
    }
    report.push_str(&format!(
        "\nTarget (cross p99 under 5 ms and within 2 ms of one replica's) met in {met} of {rounds} rounds; \
         worst cross p99 {worst:.2} ms, widest gap {widest:.2} ms.\n"
    ));
    common::append_report(&report);
}

/// Cross-replica through Redis, next to one replica on the same stores.
async fn cross_round(c: &Config) -> (FanoutResult, FanoutResult) {
    let (db, db_name) = common::fresh_postgres("concord_bench").await;
    let replica = |id: &'static str| {
        start_concord(
            &db,
            &["--redis-url", "redis://127.0.0.1:6379", "--replica-id", id],
        )
    };
    common::checkpoint().await;
    let (mut single, single_url) = replica("solo");
    let solo = fanout(&single_url, &single_url, Target::Concord, c).await;
    stop(&mut single);
    common::checkpoint().await;
    let (mut r1, url1) = replica("b1");
    let (mut r2, url2) = replica("b2");
    let cross = fanout(&url1, &url2, Target::Concord, c).await;
    if std::env::var("BENCH_DEBUG").is_ok() {
        for url in [&url1, &url2] {
            let http = url.replace("ws://", "http://").replace("/ws", "/metrics");
            let body = reqwest::get(http).await.unwrap().text().await.unwrap();
            for line in body
                .lines()
                .filter(|l| l.contains("persist_seconds") || l.contains("lag_seconds"))
            {
                eprintln!("{line}");
            }
        }
    }
    stop(&mut r1);
    stop(&mut r2);
    common::drop_postgres(&db_name).await;
    (solo, cross)
}

fn start(target: Target, dir: &tempfile::TempDir, tag: &str) -> (Child, String) {
    let script = match target {
        Target::Concord => {
            let db = format!(
                "sqlite://{}",
                dir.path().join(format!("{tag}.db")).display()
            );
            return start_concord(&db, &[]);
        }
        Target::Relay => {
            let port = free_port();
            let child = Command::new("taskset")
                .args(["-c", "0"])
                .arg(std::env::current_exe().unwrap())
                .args(["--relay", &port.to_string()])
                .spawn()
                .expect("relay");
            wait_port(port);
            return (child, format!("ws://127.0.0.1:{port}"));
        }
        Target::Reference => "node_modules/@y/websocket-server/src/server.js",
        Target::Hocuspocus => "hocuspocus.mjs",
    };
    let port = free_port();
    let child = Command::new("taskset")
        .args(["-c", "0", "node", script])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers"))
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("node");
    wait_port(port);
    (child, format!("ws://127.0.0.1:{port}"))
}

fn start_concord(db: &str, extra: &[&str]) -> (Child, String) {
    let port = free_port();
    let child = Command::new("taskset")
        .args(["-c", "0", env!("CARGO_BIN_EXE_concord"), "serve", "--bind"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--database-url",
            db,
            "--auto-migrate",
            "true",
            "--max-connections-per-ip",
            "100000",
        ])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("concord");
    wait_port(port);
    (child, format!("ws://127.0.0.1:{port}/ws"))
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client socket of one document.
struct Peer {
    ws: Socket,
    doc: Doc,
    framing: Framing,
}

/// Frames messages for one document on one socket. y-websocket sends them
/// bare, one document per socket named by the path; Hocuspocus multiplexes
/// documents over a socket, so each message starts with the document's name,
/// and a document opens with an auth message.
struct Framing {
    /// The document's name as Hocuspocus prefixes it; empty for y-websocket.
    prefix: Vec<u8>,
}

impl Framing {
    fn new(target: Target, doc: &str) -> Self {
        use yrs::encoding::write::Write;
        let mut prefix = Vec::new();
        if target == Target::Hocuspocus {
            prefix.write_string(doc);
        }
        Self { prefix }
    }

    /// What opens the document before its sync, if anything: Hocuspocus's
    /// auth (2), token subtype (0), an empty token (the server has no
    /// onAuthenticate hook).
    fn opening(&self) -> Option<Ws> {
        use yrs::encoding::write::Write;
        if self.prefix.is_empty() {
            return None;
        }
        let mut auth = self.prefix.clone();
        auth.write_var(2u32);
        auth.write_var(0u32);
        auth.write_string("");
        Some(Ws::Binary(auth.into()))
    }

    fn encode(&self, msg: Message) -> Ws {
        let mut frame = self.prefix.clone();
        frame.extend(msg.encode_v1());
        Ws::Binary(frame.into())
    }

    /// The y-protocols message a frame carries; `None` for what the bench
    /// ignores (Hocuspocus's auth answers and sync acknowledgements).
    fn decode(&self, data: &[u8]) -> Option<Message> {
        if self.prefix.is_empty() {
            return Message::decode_v1(data).ok();
        }
        let body = data.strip_prefix(self.prefix.as_slice())?;
        match body.first()? {
            0 | 1 | 3 => Message::decode_v1(body).ok(),
            // A sync reply: a sync message that asks for no step 2 back.
            4 => Message::decode_v1(&[&[0], &body[1..]].concat()).ok(),
            _ => None,
        }
    }
}

/// Connects to `doc` and completes the sync handshake.
async fn connect(base: &str, name: &str, target: Target) -> Peer {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{base}/{name}"))
        .await
        .expect("connect");
    let framing = Framing::new(target, name);
    if let Some(opening) = framing.opening() {
        ws.send(opening).await.unwrap();
    }
    let doc = Doc::new();
    let sv = doc.transact().state_vector();
    ws.send(framing.encode(Message::Sync(SyncMessage::SyncStep1(sv))))
        .await
        .unwrap();
    loop {
        let Some(Ok(Ws::Binary(data))) = ws.next().await else {
            panic!("closed during handshake")
        };
        match framing.decode(&data) {
            Some(Message::Sync(SyncMessage::SyncStep2(u))) => {
                doc.transact_mut()
                    .apply_update(Update::decode_v1(&u).unwrap())
                    .unwrap();
                return Peer { ws, doc, framing };
            }
            Some(Message::Sync(SyncMessage::SyncStep1(_))) => {
                let reply = Message::Sync(SyncMessage::SyncStep2(Update::EMPTY_V1.to_vec()));
                ws.send(framing.encode(reply)).await.unwrap();
            }
            _ => {}
        }
    }
}

struct FanoutResult {
    p50: f64,
    p99: f64,
    deliveries: usize,
    cpu: f64,
}

async fn fanout(writer_url: &str, reader_url: &str, target: Target, c: &Config) -> FanoutResult {
    let base = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for room in 0..c.rooms {
        let name = format!("bench-{}-{room}", std::process::id());
        for _ in 1..c.clients {
            let Peer {
                mut ws,
                doc,
                framing,
            } = connect(reader_url, &name, target).await;
            let (latencies, measuring, stop) = (latencies.clone(), measuring.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let map = doc.get_or_insert_map("m");
                let mut local = Vec::new();
                loop {
                    let msg = tokio::select! {
                        m = ws.next() => m,
                        _ = stop.cancelled() => break,
                    };
                    // Pings (every 30 s) and other control frames are not the
                    // end of the stream: counting stopped at the first one.
                    let data = match msg {
                        Some(Ok(Ws::Binary(data))) => data,
                        Some(Ok(_)) => continue,
                        _ => break,
                    };
                    if let Some(Message::Sync(SyncMessage::Update(u))) = framing.decode(&data) {
                        doc.transact_mut()
                            .apply_update(Update::decode_v1(&u).unwrap())
                            .unwrap();
                        let sent = match map.get(&doc.transact(), "t") {
                            Some(Out::Any(yrs::Any::Number(t))) => t.as_f64().unwrap_or_default(),
                            _ => continue,
                        };
                        if measuring.load(std::sync::atomic::Ordering::Relaxed) {
                            local.push(base.elapsed().as_secs_f64() * 1000.0 - sent);
                        }
                    }
                }
                latencies.lock().await.extend(local);
            }));
        }
        let Peer {
            mut ws,
            doc,
            framing,
        } = connect(writer_url, &name, target).await;
        let (stop, rate) = (stop.clone(), c.rate);
        tasks.push(tokio::spawn(async move {
            let map = doc.get_or_insert_map("m");
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
            // Spread writers over the interval.
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % (1000 / rate))).await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => break,
                }
                let before = doc.transact().state_vector();
                map.insert(
                    &mut doc.transact_mut(),
                    "t",
                    base.elapsed().as_secs_f64() * 1000.0,
                );
                let update = doc.transact().encode_diff_v1(&before);
                let frame = framing.encode(Message::Sync(SyncMessage::Update(update)));
                if ws.send(frame).await.is_err() {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_start = cpu_seconds();
    let wall = Instant::now();
    measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(c.seconds)).await;
    measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    let cpu = (cpu_seconds() - cpu_start) / wall.elapsed().as_secs_f64() * 100.0;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let mut l = std::mem::take(&mut *latencies.lock().await);
    l.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    FanoutResult {
        p50: pct(0.50),
        p99: pct(0.99),
        deliveries: l.len(),
        cpu,
    }
}

/// This process's user + system CPU seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

async fn idle(url: &str, pid: u32, n: usize, target: Target) -> (f64, f64) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = rss_kib(pid);
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("idle-{}-{}", std::process::id(), i / 10);
        sockets.push(connect(url, &name, target).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    drop(sockets);
    (base, (after - base) / n as f64)
}

/// The floor: accepts sockets, answers a client's sync step 1 with an empty
/// step 2, and forwards every other frame to the other sockets of the same
/// path. No document, no store: what is left of a fan-out latency is the
/// sockets, the scheduler and this generator.
// The handshake callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
async fn relay(port: u16) {
    use std::collections::HashMap;
    use tokio::sync::mpsc;
    type Peers = Arc<std::sync::Mutex<HashMap<String, Vec<(u64, mpsc::UnboundedSender<Ws>)>>>>;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let peers: Peers = Default::default();
    for id in 0u64.. {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tcp.set_nodelay(true);
        let peers = peers.clone();
        tokio::spawn(async move {
            let mut path = String::new();
            let callback = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                            resp| {
                path = req.uri().path().to_string();
                Ok(resp)
            };
            let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Ws>();
            peers
                .lock()
                .unwrap()
                .entry(path.clone())
                .or_default()
                .push((id, tx.clone()));
            tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(msg)) = stream.next().await {
                let Ws::Binary(data) = msg else { continue };
                if data.starts_with(&[0, 0]) {
                    let reply = Message::Sync(SyncMessage::SyncStep2(Update::EMPTY_V1.to_vec()));
                    let _ = tx.send(Ws::Binary(reply.encode_v1().into()));
                    continue;
                }
                for (other, peer) in peers.lock().unwrap().get(&path).into_iter().flatten() {
                    if *other != id {
                        let _ = peer.send(Ws::Binary(data.clone()));
                    }
                }
            }
            if let Some(list) = peers.lock().unwrap().get_mut(&path) {
                list.retain(|(other, _)| *other != id);
            }
        });
    }
}
