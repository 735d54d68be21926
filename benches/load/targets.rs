//! The servers measured side by side: Concord (both protocols) and its peers,
//! each started pinned to core 0 on a free port.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server measured by the load scenarios.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// Concord's y-websocket path, every update stored in SQLite.
    Concord,
    /// Concord's Hocuspocus path (`/hocuspocus`), every update stored in SQLite.
    ConcordHocuspocus,
    /// `@y/websocket-server`, documents in memory only.
    Reference,
    /// `@y/websocket-server` with `YPERSISTENCE`: every update stored in LevelDB.
    ReferenceLevelDb,
    /// `@hocuspocus/server` 4.x without extensions: documents in memory only.
    Hocuspocus,
    /// A relay that forwards frames and does nothing else: the machine's floor.
    Relay,
}

/// How a client talks to a target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Protocol {
    YWebsocket,
    Hocuspocus,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Concord => "concord (y-websocket)",
            Target::ConcordHocuspocus => "concord (hocuspocus)",
            Target::Reference => "y-websocket server (memory)",
            Target::ReferenceLevelDb => "y-websocket server + LevelDB",
            Target::Hocuspocus => "hocuspocus 4 (memory)",
            Target::Relay => "no-op relay (floor)",
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            Target::ConcordHocuspocus | Target::Hocuspocus => Protocol::Hocuspocus,
            _ => Protocol::YWebsocket,
        }
    }

    /// Whether the target holds documents at all (the relay does not).
    pub fn has_documents(self) -> bool {
        self != Target::Relay
    }
}

/// A started server.
pub struct Running {
    pub target: Target,
    child: Child,
    pub pid: u32,
    /// `ws://HOST:PORT` with the path that precedes a document name, if any.
    base: String,
    pub http: String,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    /// The URL a client of `doc` opens.
    pub fn socket_url(&self, doc: &str) -> String {
        match self.target.protocol() {
            Protocol::YWebsocket => format!("{}/{doc}", self.base),
            Protocol::Hocuspocus => self.base.clone(),
        }
    }

    /// The same Concord process, measured through its Hocuspocus path.
    pub fn through_hocuspocus(mut self) -> Self {
        self.target = Target::ConcordHocuspocus;
        self.base = self.base.replace("/ws", "/hocuspocus");
        self
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        let _ = self.child.wait();
    }
}

const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers");

/// Concord's flags in every bench: every generated client comes from
/// 127.0.0.1, and the generator sends faster than one person types, so the
/// per-address cap and the per-connection rate limit are lifted (the Node
/// peers have neither).
pub const CONCORD_BENCH_FLAGS: &[&str] = &[
    "--max-connections-per-ip",
    "1000000",
    "--rate-limit-per-second",
    "1000000",
    "--rate-limit-burst",
    "1000000",
];

pub fn start(target: Target) -> Running {
    match target {
        Target::Concord | Target::ConcordHocuspocus => {
            let dir = tempfile::tempdir().unwrap();
            let db = format!("sqlite://{}", dir.path().join("bench.db").display());
            let mut running = start_concord(&db, &[]);
            running._dir = Some(dir);
            if target == Target::ConcordHocuspocus {
                running = running.through_hocuspocus();
            }
            running
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
            Running {
                target,
                pid: child.id(),
                child,
                base: format!("ws://127.0.0.1:{port}"),
                http: String::new(),
                _dir: None,
            }
        }
        Target::Reference | Target::ReferenceLevelDb | Target::Hocuspocus => {
            let script = match target {
                Target::Hocuspocus => "hocuspocus.mjs",
                _ => "node_modules/@y/websocket-server/src/server.js",
            };
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", "0", "node_modules/.bin/node", script])
                .current_dir(PEERS)
                .env("HOST", "127.0.0.1")
                .env("PORT", port.to_string())
                .stdout(Stdio::null());
            if target == Target::ReferenceLevelDb {
                cmd.env("YPERSISTENCE", dir.path().join("leveldb"));
            }
            let child = cmd.spawn().expect("node (benches/run installs the peers)");
            wait_port(port);
            Running {
                target,
                pid: child.id(),
                child,
                base: format!("ws://127.0.0.1:{port}"),
                http: String::new(),
                _dir: Some(dir),
            }
        }
    }
}

/// A `concord serve` on `db` with the bench flags and `extra`.
pub fn start_concord(db: &str, extra: &[&str]) -> Running {
    let port = free_port();
    let child = Command::new("taskset")
        .args(["-c", "0", env!("CARGO_BIN_EXE_concord"), "serve", "--bind"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--database-url", db, "--auto-migrate", "true"])
        .args(CONCORD_BENCH_FLAGS)
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("concord");
    wait_port(port);
    Running {
        target: Target::Concord,
        pid: child.id(),
        child,
        base: format!("ws://127.0.0.1:{port}/ws"),
        http: format!("http://127.0.0.1:{port}"),
        _dir: None,
    }
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

/// CPU seconds (user + system, every thread) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of a process, KiB: (now, peak).
pub fn rss_kib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU nanoseconds every live thread of a process has used (schedstat):
/// finer than [`cpu_seconds`]'s 10 ms ticks, for short measurements.
pub fn cpu_nanos(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// POSTs a Yjs update to a Concord document.
pub async fn post_update(http: &str, doc: &str, update: Vec<u8>) {
    let url = format!("{http}/api/docs/{}/updates", doc.replace('/', "%2F"));
    let status = reqwest::Client::new()
        .post(url)
        .body(update)
        .send()
        .await
        .expect("post update")
        .status();
    assert!(status.is_success(), "posting the document: {status}");
}

/// A counter or gauge from Concord's `/metrics` (all series summed).
pub async fn metric(http: &str, name: &str) -> f64 {
    let body = reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
