//! Test harness: real `concord` processes on ephemeral ports, a `yrs` client
//! over a real WebSocket, fresh Postgres databases and private Redis servers.
//! Every wait is bounded; a missing service fails the test, never skips it.
#![allow(dead_code)]

pub mod hocuspocus;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

pub const WAIT: Duration = Duration::from_secs(15);
pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A `concord serve` process.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub database_url: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

pub struct ServerBuilder {
    database_url: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    closed_stderr: bool,
}

impl ServerBuilder {
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Self {
        self.args.extend(args.into_iter().map(String::from));
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Give the server a stderr pipe whose reading end is already closed, as
    /// `concord | head` does once `head` has seen enough.
    pub fn closed_stderr(mut self) -> Self {
        self.closed_stderr = true;
        self
    }

    pub fn start(self) -> Server {
        let stderr = if self.closed_stderr {
            Stdio::piped()
        } else {
            Stdio::inherit()
        };
        Server::spawn(self.database_url, self.args, self.env, stderr)
    }
}

impl Server {
    pub fn builder(database_url: impl Into<String>) -> ServerBuilder {
        ServerBuilder {
            database_url: database_url.into(),
            args: Vec::new(),
            env: Vec::new(),
            closed_stderr: false,
        }
    }

    /// One replica of a multi-replica set: shared PostgreSQL `db` (migrated at
    /// start) and Redis fan-out, named `id`.
    pub fn replica(db: &str, redis: &str, id: &str) -> ServerBuilder {
        Self::builder(db).args([
            "--auto-migrate",
            "true",
            "--redis-url",
            redis,
            "--replica-id",
            id,
        ])
    }

    /// A server on a fresh SQLite file in `dir`.
    pub fn sqlite(dir: &tempfile::TempDir) -> ServerBuilder {
        Self::builder(sqlite_url(dir))
    }

    fn spawn(
        database_url: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        stderr: Stdio,
    ) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_concord"));
        cmd.arg("serve")
            .arg("--bind")
            .arg("127.0.0.1:0")
            .arg("--database-url")
            .arg(&database_url)
            .args(&args)
            .env_remove("CONCORD_JWT_SECRET")
            .env_remove("REDIS_URL")
            .env(
                "RUST_LOG",
                std::env::var("CONCORD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn concord");
        drop(child.stderr.take());
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("concord listening on ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("addr"));
                    break;
                }
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("concord did not start listening (exit: {status:?})");
            }
        };
        Server {
            child,
            addr,
            database_url,
            args,
            env,
        }
    }

    /// Starts the same server again (same database and flags, new port).
    pub fn restart(mut self) -> Server {
        self.terminate();
        self.start_again()
    }

    /// A new process with the same configuration (after a kill).
    pub fn start_again(&self) -> Server {
        Server::spawn(
            self.database_url.clone(),
            self.args.clone(),
            self.env.clone(),
            Stdio::inherit(),
        )
    }

    pub fn ws_url(&self, doc: &str) -> String {
        format!("ws://{}/ws/{}", self.addr, doc)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGTERM and wait for exit; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        signal(&self.child, "TERM");
        let status =
            wait_exit(&mut self.child, Duration::from_secs(20)).expect("exit after SIGTERM");
        (status, started.elapsed())
    }

    /// The server's resident memory now and at its peak, in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("server status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("memory field")
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics_text().await, name)
    }

    /// Polls a metric until `pred` holds (bounded).
    pub async fn wait_metric(&self, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(name).await;
            if pred(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "metric {name} stuck at {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of every series of a metric (labels ignored unless part of `name`).
pub fn metric_value(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
                || (name.contains('{') && l.starts_with(&name[..name.len() - 1]))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().ok()? {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("concord.db").display())
}

/// A fresh, empty Postgres database for one suite. Fails (never skips) when
/// Postgres is not there.
pub async fn fresh_postgres() -> String {
    use sqlx::Connection;
    let name = unique("concord_test").replace('-', "_");
    let mut admin = sqlx::PgConnection::connect(PG_ADMIN)
        .await
        .expect("PostgreSQL must be running on 127.0.0.1:5432 for this suite");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

/// Runs `concord` with arguments, returning (status code, stdout, stderr).
pub fn concord(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_concord"));
    cmd.args(args)
        .env_remove("CONCORD_JWT_SECRET")
        .env_remove("DATABASE_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run concord");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits (at most [`WAIT`]) until a process started by the test accepts
/// connections on `port`: polling is the only signal such a process gives.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private `redis-server` on a free port, for outage tests.
pub struct PrivateRedis {
    pub child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for this suite");
        wait_for_port(port, "private redis");
        Self { child, port, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn shared_redis_url() -> String {
    let url = "redis://127.0.0.1:6379".to_string();
    std::net::TcpStream::connect("127.0.0.1:6379")
        .expect("Redis must be running on 127.0.0.1:6379 for this suite");
    url
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A Yjs client over a real WebSocket, driven explicitly by the test.
pub struct Client {
    pub ws: Ws,
    pub doc: Doc,
    /// Step 2 payloads received, in order (to check resync sends only the diff).
    pub step2s: Vec<Vec<u8>>,
    /// Awareness entries seen, by client id (`None` once removed).
    pub awareness: std::collections::HashMap<u64, Option<String>>,
    pub awareness_frames: usize,
    pub closed: Option<(u16, String)>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::connect_with(url, Doc::new()).await
    }

    /// Connects with an existing document (a reconnect): the handshake is
    /// completed, both ways.
    pub async fn connect_with(url: &str, doc: Doc) -> Client {
        let mut client = Self::open(url, doc).await.expect("websocket connect");
        client.sync().await;
        client
    }

    /// Opens the socket without the sync handshake.
    pub async fn open(
        url: &str,
        doc: Doc,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(
            url,
            Some(
                tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .max_message_size(Some(64 << 20))
                    .max_frame_size(Some(64 << 20)),
            ),
            false,
        )
        .await?;
        Ok(Client {
            ws,
            doc,
            step2s: Vec::new(),
            awareness: Default::default(),
            awareness_frames: 0,
            closed: None,
        })
    }

    /// Sends our step 1 and waits for the server's step 2.
    pub async fn sync(&mut self) {
        let sv = self.doc.transact().state_vector();
        self.send(Message::Sync(SyncMessage::SyncStep1(sv))).await;
        let before = self.step2s.len();
        self.pump_until(|c| c.step2s.len() > before).await;
    }

    pub async fn send(&mut self, msg: Message) {
        self.send_raw(msg.encode_v1()).await;
    }

    /// Sends a frame; an error once the server has dropped the socket.
    pub async fn try_send_raw(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .expect("send");
    }

    /// Edits the local document and sends the change as an update.
    pub async fn insert(&mut self, name: &str, index: u32, chunk: &str) {
        let update = self.local_insert(name, index, chunk);
        self.send(Message::Sync(SyncMessage::Update(update))).await;
    }

    /// Edits the local document without sending anything (offline).
    pub fn local_insert(&mut self, name: &str, index: u32, chunk: &str) -> Vec<u8> {
        let before = self.doc.transact().state_vector();
        let text = self.doc.get_or_insert_text(name);
        text.insert(&mut self.doc.transact_mut(), index, chunk);
        self.doc.transact().encode_diff_v1(&before)
    }

    pub fn text(&self, name: &str) -> String {
        let text = self.doc.get_or_insert_text(name);
        text.get_string(&self.doc.transact())
    }

    pub async fn set_awareness(&mut self, clock: u32, json: &str) {
        let mut clients = std::collections::HashMap::new();
        clients.insert(
            self.doc.client_id(),
            AwarenessUpdateEntry {
                clock,
                json: json.into(),
            },
        );
        self.send(Message::Awareness(AwarenessUpdate { clients }))
            .await;
    }

    pub fn client_id(&self) -> u64 {
        self.doc.client_id().get()
    }

    /// Reads and applies one message; false once the socket is closed.
    pub async fn pump_one(&mut self) -> bool {
        let msg = match self.ws.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(_)) | None => {
                self.closed.get_or_insert((1006, "abnormal".into()));
                return false;
            }
        };
        match msg {
            WsMessage::Binary(data) => self.handle(&data).await,
            WsMessage::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                self.closed = Some((code, reason));
                return false;
            }
            _ => {}
        }
        true
    }

    async fn handle(&mut self, data: &[u8]) {
        match Message::decode_v1(data).expect("server sent undecodable message") {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let diff = self.doc.transact().encode_diff_v1(&sv);
                self.send(Message::Sync(SyncMessage::SyncStep2(diff))).await;
            }
            Message::Sync(SyncMessage::SyncStep2(update)) => {
                self.apply(&update);
                self.step2s.push(update);
            }
            Message::Sync(SyncMessage::Update(update)) => self.apply(&update),
            Message::Awareness(update) => {
                self.awareness_frames += 1;
                for (id, entry) in update.clients {
                    let state = (&*entry.json != "null").then(|| entry.json.to_string());
                    self.awareness.insert(id.get(), state);
                }
            }
            _ => {}
        }
    }

    fn apply(&mut self, update: &[u8]) {
        let update = Update::decode_v1(update).expect("server sent undecodable update");
        self.doc.transact_mut().apply_update(update).expect("apply");
    }

    /// Pumps messages until `pred` holds; panics after [`WAIT`].
    pub async fn pump_until(&mut self, pred: impl Fn(&Client) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !pred(self) {
            match tokio::time::timeout_at(deadline, self.pump_one()).await {
                Ok(true) => {}
                Ok(false) => panic!("socket closed while waiting: {:?}", self.closed),
                Err(_) => panic!("timed out waiting"),
            }
        }
    }

    pub async fn wait_text(&mut self, name: &str, expected: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.text(name) != expected {
            match tokio::time::timeout_at(deadline, self.pump_one()).await {
                Ok(true) => {}
                Ok(false) => panic!(
                    "socket closed; text is {:?}, want {expected:?}",
                    self.text(name)
                ),
                Err(_) => panic!(
                    "timed out: text is {:?}, want {expected:?}",
                    self.text(name)
                ),
            }
        }
    }

    /// Reads until the server closes the socket; returns the close code and reason.
    pub async fn wait_close(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.closed.is_none() {
            match tokio::time::timeout_at(deadline, self.pump_one()).await {
                Ok(_) => {}
                Err(_) => panic!("timed out waiting for close"),
            }
        }
        self.closed.clone().unwrap()
    }

    /// Whether the socket stays open for `period` (used to check that a
    /// refused message does not close it).
    pub async fn stays_open(&mut self, period: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + period;
        loop {
            match tokio::time::timeout_at(deadline, self.pump_one()).await {
                Ok(true) => {}
                Ok(false) => return false,
                Err(_) => return true,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// The whole state of a document held by the server, read over HTTP.
pub async fn fetch_doc(server: &Server, doc: &str) -> Option<Doc> {
    let name = percent_encode(doc);
    let resp = reqwest::get(server.http(&format!("/api/docs/{name}")))
        .await
        .unwrap();
    if resp.status() == 404 {
        return None;
    }
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    let ydoc = Doc::new();
    ydoc.transact_mut()
        .apply_update(Update::decode_v1(&bytes).unwrap())
        .unwrap();
    Some(ydoc)
}

pub fn text_of(doc: &Doc, name: &str) -> String {
    let text = doc.get_or_insert_text(name);
    text.get_string(&doc.transact())
}

pub fn percent_encode(doc: &str) -> String {
    percent_encoding::utf8_percent_encode(doc, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn close_code(code: CloseCode) -> u16 {
    u16::from(code)
}

pub fn state_vector(doc: &Doc) -> StateVector {
    doc.transact().state_vector()
}

/// An awareness frame announcing `(client id, clock, JSON state)` entries.
pub fn awareness_frame(states: impl IntoIterator<Item = (u64, u32, String)>) -> Vec<u8> {
    let clients = states
        .into_iter()
        .map(|(id, clock, json)| {
            let entry = AwarenessUpdateEntry {
                clock,
                json: json.into(),
            };
            (ClientID::new(id), entry)
        })
        .collect();
    Message::Awareness(AwarenessUpdate { clients }).encode_v1()
}

pub fn client_id(id: u64) -> ClientID {
    ClientID::new(id)
}

pub fn tmp_path() -> PathBuf {
    std::env::temp_dir()
}

/// A document with content and a second client, for bad-input tests: what
/// an attacker sends must leave both, and what is stored, intact.
pub struct Witness {
    pub doc: String,
    writer: Client,
    bystander: Client,
}

impl Witness {
    pub async fn new(server: &Server) -> Witness {
        let doc = unique("hostile");
        let mut writer = Client::connect(&server.ws_url(&doc)).await;
        writer.insert("t", 0, "intact").await;
        let mut bystander = Client::connect(&server.ws_url(&doc)).await;
        bystander.wait_text("t", "intact").await;
        Witness {
            doc,
            writer,
            bystander,
        }
    }

    /// The room goes on: the bystander still gets edits, and nothing of the
    /// attack was applied or stored.
    pub async fn check_intact(mut self, server: &Server) {
        self.writer.insert("t", 6, "!").await;
        self.bystander.wait_text("t", "intact!").await;
        let fresh = Client::connect(&server.ws_url(&self.doc)).await;
        assert_eq!(fresh.text("t"), "intact!");
        let stored = fetch_doc(server, &self.doc).await.unwrap();
        assert_eq!(text_of(&stored, "t"), "intact!");
    }
}
