//! The fan-out scenarios (S1, S2, S4): rooms of clients, some of them
//! writers, each writer appending a token at a fixed rate; latency from a
//! writer's send to each reader's receipt, server CPU per delivery, and,
//! after a drain, what a fresh client of each room finds missing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Writer};
use crate::targets::{self, Running};

#[derive(Clone, Copy)]
pub struct Shape {
    pub rooms: usize,
    pub clients: usize,
    /// Writers per room (the first clients of each room).
    pub writers: usize,
    /// Updates per second per writer.
    pub rate: f64,
    pub warmup: Duration,
    pub seconds: u64,
    /// After the drain, sync a fresh client per room and count missing tokens.
    pub verify: bool,
}

impl Shape {
    /// Deliveries per second offered: every update goes to every other client.
    pub fn offered(&self) -> f64 {
        self.rooms as f64 * self.writers as f64 * self.rate * (self.clients - 1) as f64
    }
}

pub struct Outcome {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// Deliveries expected in all (every update sent × readers of its room) and received.
    pub expected: u64,
    pub received: u64,
    /// Tokens absent from the documents after the drain (`None`: not verified).
    pub missing: Option<u64>,
    /// Deliveries received per second during the measured window.
    pub delivered: f64,
    /// Server CPU per delivery in the window, µs.
    pub server_cpu_us: f64,
    /// Generator CPU, % of its core, during the window.
    pub gen_cpu: f64,
    pub server_rss_peak_mib: f64,
}

impl Outcome {
    /// p99 within 50 ms, everything delivered, nothing missing, and at least
    /// 95 % of the offered rate achieved.
    pub fn sustained(&self, offered: f64) -> bool {
        self.p99 <= 50.0
            && self.received >= self.expected
            && self.missing.unwrap_or(0) == 0
            && self.delivered >= 0.95 * offered
    }
}

struct Shared {
    base: Instant,
    /// The measured window, µs since `base`; tokens stamped inside it count.
    window: (AtomicU64, AtomicU64),
    received: AtomicU64,
    /// Each delivery in the window: when its update was sent (µs since
    /// `base`) and how long it took to arrive (µs).
    latencies: Mutex<Vec<(u64, u32)>>,
    /// Last sequence number sent, per writer.
    sent: Vec<AtomicU32>,
}

impl Shared {
    fn micros(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    fn in_window(&self, micros: u64) -> bool {
        micros >= self.window.0.load(Ordering::Relaxed)
            && micros < self.window.1.load(Ordering::Relaxed)
    }
}

pub async fn run(server: &Running, shape: &Shape) -> Outcome {
    run_split(server, server, shape).await
}

/// Writers on `writers_on`, everyone else on `readers_on` (cross-replica);
/// the server CPU is both processes'.
pub async fn run_split(writers_on: &Running, readers_on: &Running, shape: &Shape) -> Outcome {
    let server = readers_on;
    let protocol = server.target.protocol();
    let server_cpu = || {
        let mut cpu = targets::cpu_seconds(readers_on.pid);
        if writers_on.pid != readers_on.pid {
            cpu += targets::cpu_seconds(writers_on.pid);
        }
        cpu
    };
    let shared = Arc::new(Shared {
        base: Instant::now(),
        window: (AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)),
        received: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
        sent: (0..shape.rooms * shape.writers)
            .map(|_| AtomicU32::new(0))
            .collect(),
    });
    let stop_readers = CancellationToken::new();
    let stop_writers = CancellationToken::new();
    let go = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(AtomicBool::new(false));
    let run_id = format!(
        "{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xffffff
    );
    let names: Vec<String> = (0..shape.rooms)
        .map(|r| format!("load-{run_id}-{r}"))
        .collect();
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (room, name) in names.iter().enumerate() {
        for c in 0..shape.clients {
            let on = if c < shape.writers {
                writers_on
            } else {
                readers_on
            };
            let peer = client::connect(&on.socket_url(name), name, protocol).await;
            let (mut sink, mut stream) = peer.ws.split();
            let framing = peer.framing;
            let (shared_r, stop) = (shared.clone(), stop_readers.clone());
            let reader_framing = framing.clone();
            // Hocuspocus echoes an update to its sender too; that is not a delivery.
            let own = (c < shape.writers).then_some((room * shape.writers + c) as u32);
            readers.push(tokio::spawn(async move {
                let mut local = Vec::new();
                loop {
                    let msg = tokio::select! {
                        m = stream.next() => m,
                        _ = stop.cancelled() => break,
                    };
                    let data = match msg {
                        Some(Ok(Ws::Binary(data))) => data,
                        Some(Ok(_)) => continue,
                        _ => break,
                    };
                    let Some(body) = reader_framing.body(&data) else {
                        continue;
                    };
                    if !body.starts_with(&[0, 2]) {
                        continue;
                    }
                    let now = shared_r.micros();
                    client::tokens(body, |token| {
                        if Some(token.writer) == own {
                            return;
                        }
                        shared_r.received.fetch_add(1, Ordering::Relaxed);
                        if shared_r.in_window(token.micros) {
                            local.push((token.micros, now.saturating_sub(token.micros) as u32));
                        }
                    });
                }
                shared_r.latencies.lock().unwrap().extend(local);
                stream
            }));
            if c >= shape.writers {
                writers.push(tokio::spawn(async move { sink }));
                continue;
            }
            let id = (room * shape.writers + c) as u32;
            let (shared_w, stop, go, started, rate) = (
                shared.clone(),
                stop_writers.clone(),
                go.clone(),
                started.clone(),
                shape.rate,
            );
            writers.push(tokio::spawn(async move {
                let mut writer = Writer::new(id);
                if !started.load(Ordering::Acquire) {
                    go.notified().await;
                }
                let period = Duration::from_secs_f64(1.0 / rate);
                // Spread the writers over one period.
                tokio::time::sleep(period.mul_f64(rand::random::<f64>())).await;
                let mut tick = tokio::time::interval(period);
                // A writer held back by the server's backpressure sends later,
                // not in a burst: the offered rate is then not achieved, which
                // the report shows.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => break,
                    }
                    let update = writer.next(shared_w.micros());
                    if sink.send(framing.update(&update)).await.is_err() {
                        break;
                    }
                    shared_w.sent[id as usize].store(writer.seq, Ordering::Relaxed);
                }
                sink
            }));
        }
    }
    started.store(true, Ordering::Release);
    go.notify_waiters();
    tokio::time::sleep(shape.warmup).await;

    let (cpu0, gen0, received0) = (
        server_cpu(),
        targets::cpu_seconds(std::process::id()),
        shared.received.load(Ordering::Relaxed),
    );
    let wall = Instant::now();
    let now = shared.micros();
    shared.window.0.store(now, Ordering::Relaxed);
    shared
        .window
        .1
        .store(now + shape.seconds * 1_000_000, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(shape.seconds)).await;
    let elapsed = wall.elapsed().as_secs_f64();
    let (cpu1, gen1, received1) = (
        server_cpu(),
        targets::cpu_seconds(std::process::id()),
        shared.received.load(Ordering::Relaxed),
    );
    stop_writers.cancel();
    let mut sinks = Vec::new();
    for w in writers {
        sinks.push(w.await.unwrap());
    }
    let sent: u64 = shared
        .sent
        .iter()
        .map(|s| s.load(Ordering::Relaxed) as u64)
        .sum();
    let expected = sent * (shape.clients as u64 - 1);
    // The drain: what was sent is still on its way.
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = shared.received.load(Ordering::Relaxed);
    // Verified while the clients are still connected: servers that keep
    // documents in memory only drop them when the last client leaves.
    let missing = if shape.verify && server.target.has_documents() {
        Some(missing(server, &names, shape, &shared).await)
    } else {
        None
    };
    stop_readers.cancel();
    for r in readers {
        let _ = r.await;
    }
    drop(sinks);

    let samples = std::mem::take(&mut *shared.latencies.lock().unwrap());
    if let Ok(prefix) = std::env::var("BENCH_DUMP") {
        dump(&prefix, shared.base, &samples);
    }
    let mut l: Vec<u32> = samples.into_iter().map(|(_, us)| us).collect();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .map_or(f64::NAN, |&us| us as f64 / 1000.0)
    };
    let in_window = received1 - received0;
    Outcome {
        p50: pct(0.50),
        p99: pct(0.99),
        max: l.last().map_or(f64::NAN, |&us| us as f64 / 1000.0),
        expected,
        received,
        missing,
        delivered: in_window as f64 / elapsed,
        server_cpu_us: (cpu1 - cpu0) * 1e6 / in_window.max(1) as f64,
        gen_cpu: (gen1 - gen0) / elapsed * 100.0,
        server_rss_peak_mib: targets::rss_kib(server.pid).1 / 1024.0,
    }
}

/// Writes one line per delivery, `<sent, µs since the Unix epoch> <latency,
/// µs>`, to a new file `<prefix>.<unix ms>`: to line the tail up in time
/// with what else the machine did (`perf sched`, the replicas' metrics).
fn dump(prefix: &str, base: Instant, samples: &[(u64, u32)]) {
    use std::io::Write;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let base_us = now.as_micros() as u64 - base.elapsed().as_micros() as u64;
    let path = format!("{prefix}.{}", now.as_millis());
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for (sent, latency) in samples {
        writeln!(out, "{} {latency}", base_us + sent).unwrap();
    }
    out.flush().unwrap();
    eprintln!("deliveries written to {path}");
}

/// Tokens sent but absent from the document a fresh client syncs, per room.
async fn missing(server: &Running, names: &[String], shape: &Shape, shared: &Shared) -> u64 {
    let mut missing = 0;
    for (room, name) in names.iter().enumerate() {
        let peer = client::connect(&server.socket_url(name), name, server.target.protocol()).await;
        let mut present = HashSet::new();
        client::tokens(client::text_of(&peer.doc).as_bytes(), |t| {
            present.insert((t.writer, t.seq));
        });
        for w in 0..shape.writers {
            let id = (room * shape.writers + w) as u32;
            let last = shared.sent[id as usize].load(Ordering::Relaxed);
            missing += (1..=last).filter(|s| !present.contains(&(id, *s))).count() as u64;
        }
    }
    missing
}
