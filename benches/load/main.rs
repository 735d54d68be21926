//! Load generator speaking the y-websocket protocol and Hocuspocus's framing
//! of it, measuring Concord side by side with its peers in one run: the
//! y-websocket server (`@y/websocket-server`, in memory and with its LevelDB
//! store), Hocuspocus (`@hocuspocus/server` 4, on Node 22) and a no-op relay
//! that shows the machine's floor. Servers are pinned to core 0, this
//! generator to core 1 (`taskset`).
//!
//! Run with `benches/run SCENARIO… [--quick] [--targets a,b]` (it installs
//! the peers and raises the fd limit); each scenario appends a section to
//! BENCHMARKS.md:
//! - `local`: S1 (100 rooms × 10 clients, one writer per room at 10/s) and
//!   S3 (5,000 idle sockets: memory per socket);
//! - `s2`: one room × 500 clients, one writer at 20/s;
//! - `s4`: 20 rooms × 5 clients, all writing, a sweep of offered rates until
//!   one is not sustained, then one at twice the highest sustained
//!   (`--steps 80000,160000` runs those rates instead);
//! - `storm`: 150 clients open a cold 4 MB document at once;
//! - `growth`: server CPU per append as the document grows to 1 M characters;
//! - `cross`: writers on one replica, readers on another (PostgreSQL + Redis),
//!   next to one replica; `--rounds N` repeats the pair.
//!
//! With `BENCH_DUMP=<prefix>`, each fan-out phase also writes every
//! delivery's send time and latency to a file, to line its tail up with
//! `perf sched` or the servers' metrics.

#[path = "../common/mod.rs"]
mod common;

mod client;
mod fanout;
mod growth;
mod idle;
mod relay;
mod storm;
mod targets;

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use fanout::{Outcome, Shape};
use targets::Target;

const ALL: &[Target] = &[
    Target::Concord,
    Target::ConcordHocuspocus,
    Target::Reference,
    Target::ReferenceLevelDb,
    Target::Hocuspocus,
    Target::Relay,
];

struct Args {
    quick: bool,
    /// S4's offered rates, when given (`--steps 80000,160000`).
    steps: Option<Vec<f64>>,
    rounds: usize,
    targets: Vec<Target>,
    command: String,
}

fn main() {
    if let Some(port) = std::env::args().skip_while(|a| a != "--relay").nth(1) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(relay::relay(port.parse().expect("--relay PORT")));
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
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let value = |flag: &str| argv.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let targets = match value("--targets") {
        Some(list) => list
            .split(',')
            .map(|name| {
                *ALL.iter()
                    .find(|t| format!("{t:?}").eq_ignore_ascii_case(name))
                    .unwrap_or_else(|| panic!("unknown target {name}: one of {ALL:?}"))
            })
            .collect(),
        None => ALL.to_vec(),
    };
    let args = Args {
        quick: argv.iter().any(|a| a == "--quick"),
        steps: value("--steps").map(|list| {
            list.split(',')
                .map(|n| n.parse().expect("--steps N,N"))
                .collect()
        }),
        rounds: value("--rounds").map_or(1, |n| n.parse().expect("--rounds N")),
        targets,
        command: format!("benches/run {}", argv.join(" ")).trim().to_string(),
    };
    let scenarios: Vec<&str> = argv
        .iter()
        .map(String::as_str)
        .filter(|a| ["local", "s2", "s4", "storm", "growth", "cross", "all"].contains(a))
        .collect();
    let scenarios = if scenarios.is_empty() {
        vec!["local"]
    } else {
        scenarios
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let all = scenarios.contains(&"all");
        for scenario in ["local", "s2", "s4", "storm", "growth", "cross"] {
            if all || scenarios.contains(&scenario) {
                let report = match scenario {
                    "local" => local(&args).await,
                    "s2" => s2(&args).await,
                    "s4" => s4(&args).await,
                    "storm" => storm(&args).await,
                    "growth" => growth(&args).await,
                    _ => cross(&args).await,
                };
                common::append_report(&report);
            }
        }
    });
}

fn heading(title: &str, args: &Args, what: &str) -> String {
    format!(
        "\n## {title} ({})\n\nCommand: `{}`. Servers pinned to core 0, generator to core 1. {what}\n\n",
        common::today(),
        args.command,
    )
}

const MACHINE: &str = "Concord stores every update in SQLite and runs with the per-address cap \
    and the per-connection rate limit lifted (every generated client comes from 127.0.0.1, and \
    writers send faster than a person types); the y-websocket server keeps documents in memory, \
    or stores every update in LevelDB (`YPERSISTENCE`); Hocuspocus (no extensions, Node 22) keeps \
    them in memory; the relay only forwards frames. Latency is from a writer's send to a reader's \
    receipt; server CPU is the server process's user + system time over the measured window, \
    divided by the deliveries in it.";

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn fanout_row(label: &str, o: &Outcome) -> String {
    format!(
        "| {label} | {} | {} | {} | {} / {} | {} | {:.1} µs | {:.0}% | {:.0} MiB |\n",
        ms(o.p50),
        ms(o.p99),
        ms(o.max),
        o.received,
        o.expected,
        o.missing.map_or("–".into(), |m| m.to_string()),
        o.server_cpu_us,
        o.gen_cpu,
        o.server_rss_peak_mib,
    )
}

const FANOUT_HEADER: &str = "| server | p50 | p99 | max | deliveries received / expected | missing after drain | server CPU per delivery | generator CPU | server peak RSS |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";

/// S1 and S3.
async fn local(args: &Args) -> String {
    let (shape, idle_n) = if args.quick {
        (shape(10, 5, 1, 10.0, 3), 300)
    } else {
        (shape(100, 10, 1, 10.0, 20), 5000)
    };
    let mut report = heading(
        "S1 fan-out and S3 idle memory",
        args,
        &format!(
            "S1: {} rooms × {} clients, one writer per room appending at {}/s, {} s measured. \
             S3: {idle_n} sockets in rooms of ten, synced, then idle. {MACHINE}",
            shape.rooms, shape.clients, shape.rate, shape.seconds
        ),
    );
    report.push_str(FANOUT_HEADER);
    let mut idle_rows = String::new();
    for &target in &args.targets {
        let server = targets::start(target);
        let o = fanout::run(&server, &shape).await;
        server.stop();
        report.push_str(&fanout_row(target.label(), &o));
        if target.has_documents() {
            let server = targets::start(target);
            let (base, per) = idle::run(&server, idle_n).await;
            server.stop();
            let _ = writeln!(
                idle_rows,
                "| {} | {:.1} MiB | {per:.2} KiB |",
                target.label(),
                base / 1024.0
            );
        }
    }
    report.push_str(
        "\n| server | RSS before the idle sockets | RSS per idle socket |\n| --- | --- | --- |\n",
    );
    report.push_str(&idle_rows);
    report
}

fn shape(rooms: usize, clients: usize, writers: usize, rate: f64, seconds: u64) -> Shape {
    Shape {
        rooms,
        clients,
        writers,
        rate,
        warmup: Duration::from_secs(2),
        seconds,
        verify: true,
    }
}

/// S2: one big room.
async fn s2(args: &Args) -> String {
    let shape = if args.quick {
        shape(1, 100, 1, 20.0, 3)
    } else {
        shape(1, 500, 1, 20.0, 20)
    };
    let mut report = heading(
        "S2: one room of 500",
        args,
        &format!(
            "{} room × {} clients, one writer appending at {}/s, {} s measured. {MACHINE}",
            shape.rooms, shape.clients, shape.rate, shape.seconds
        ),
    );
    report.push_str(FANOUT_HEADER);
    for &target in &args.targets {
        let server = targets::start(target);
        let o = fanout::run(&server, &shape).await;
        server.stop();
        report.push_str(&fanout_row(target.label(), &o));
    }
    report
}

/// S4: every client writes; a sweep of offered rates.
async fn s4(args: &Args) -> String {
    let (seconds, steps): (u64, &[f64]) = if args.quick {
        (3, &[20_000.0, 40_000.0])
    } else {
        (
            20,
            &[
                20_000.0, 40_000.0, 80_000.0, 120_000.0, 160_000.0, 240_000.0, 320_000.0,
            ],
        )
    };
    let steps = args.steps.as_deref().unwrap_or(steps);
    let mut report = heading(
        "S4: every client writes, a sweep",
        args,
        &format!(
            "20 rooms × 5 clients, all five appending; offered deliveries/s = 20 × 5 × rate × 4. \
             Each step on a fresh server: 2 s warm-up, {seconds} s measured, then up to 10 s of \
             drain, then a fresh client per room counts the tokens missing from its document. \
             A step is sustained when p99 ≤ 50 ms, everything is delivered, nothing is missing \
             and at least 95 % of the offered rate is delivered. The sweep stops at the first step \
             not sustained, then runs one at twice the highest sustained rate. {MACHINE}"
        ),
    );
    report.push_str("| server | offered deliveries/s | delivered/s | p50 | p99 | max | received / expected | missing | server CPU per delivery | generator CPU | server peak RSS | sustained |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for &target in &args.targets {
        let mut best = None;
        let mut ran = Vec::new();
        for &offered in steps {
            let (o, ok) = s4_step(target, offered, seconds).await;
            report.push_str(&s4_row(target, offered, &o, ok));
            ran.push(offered);
            if !ok {
                break;
            }
            best = Some(offered);
        }
        if let Some(best) = best {
            let past = best * 2.0;
            if !ran.contains(&past) {
                let (o, ok) = s4_step(target, past, seconds).await;
                report.push_str(&s4_row(target, past, &o, ok));
            }
        }
    }
    report
}

/// One step of the sweep, and whether it was sustained.
async fn s4_step(target: Target, offered: f64, seconds: u64) -> (Outcome, bool) {
    let shape = shape(20, 5, 5, offered / (20.0 * 5.0 * 4.0), seconds);
    let server = targets::start(target);
    let o = fanout::run(&server, &shape).await;
    server.stop();
    let ok = o.sustained(shape.offered());
    (o, ok)
}

fn s4_row(target: Target, offered: f64, o: &Outcome, ok: bool) -> String {
    format!(
        "| {} | {offered:.0} | {:.0} | {} | {} | {} | {} / {} | {} | {:.1} µs | {:.0}% | {:.0} MiB | {} |\n",
        target.label(),
        o.delivered,
        ms(o.p50),
        ms(o.p99),
        ms(o.max),
        o.received,
        o.expected,
        o.missing.map_or("–".into(), |m| m.to_string()),
        o.server_cpu_us,
        o.gen_cpu,
        o.server_rss_peak_mib,
        if ok { "yes" } else { "**no**" },
    )
}

async fn storm(args: &Args) -> String {
    let (clients, bytes) = if args.quick {
        (30, 400_000)
    } else {
        (150, 4_000_000)
    };
    let mut report = heading(
        "Join storm",
        args,
        &format!(
            "A document of about {} MB of text typed by ten writers in turns is stored, the server \
             restarted (cold), then {clients} clients open it at once: time from the common start \
             to each client's step 2, store loads counted by `concord_store_loads_total`.",
            bytes / 1_000_000
        ),
    );
    report.push_str("| path | document (Yjs update) | p50 to synced | p99 | max | store loads | server CPU | server peak RSS |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for &target in args
        .targets
        .iter()
        .filter(|t| matches!(t, Target::Concord | Target::ConcordHocuspocus))
    {
        let o = storm::run(target, clients, bytes).await;
        let _ = writeln!(
            report,
            "| {} | {:.1} MB | {} | {} | {} | {} | {:.0} ms | {:.0} MiB |",
            target.label(),
            o.doc_bytes as f64 / 1e6,
            ms(o.p50),
            ms(o.p99),
            ms(o.max),
            o.loads,
            o.server_cpu_ms,
            o.server_rss_peak_mib
        );
    }
    report
}

async fn growth(args: &Args) -> String {
    let (sizes, appends): (&[usize], usize) = if args.quick {
        (&[0, 1_000, 100_000], 300)
    } else {
        (&[0, 1_000, 10_000, 100_000, 1_000_000], 2_000)
    };
    let mut report = heading(
        "Cost of an update as the document grows",
        args,
        &format!(
            "Concord, y-websocket path. A text of N characters is posted, a writer and a reader \
             connect, and the writer sends {appends} one-character appends at the end, 1,000 a \
             second; server CPU (every thread's schedstat) from the first send until the reader \
             has them all, per append. Then the server restarts and the same is measured on the \
             document as loaded from the store (cold), with the time from connecting to synced."
        ),
    );
    report.push_str("| document | characters | CPU per append | ratio to empty | after a cold load | ratio to empty | cold load, connect to synced |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for shape in [growth::Shape::Typed, growth::Shape::Blocks] {
        let mut empty = None;
        for &size in sizes {
            let row = growth::run(shape, size, appends).await;
            let (warm0, cold0) = *empty.get_or_insert((row.warm_us, row.cold_us));
            let _ = writeln!(
                report,
                "| {} | {} | {:.1} µs | {:.2}× | {:.1} µs | {:.2}× | {} |",
                row.shape.label(),
                row.size,
                row.warm_us,
                row.warm_us / warm0,
                row.cold_us,
                row.cold_us / cold0,
                ms(row.cold_sync_ms),
            );
        }
    }
    report
}

/// Cross-replica through Redis, next to one replica on the same stores.
async fn cross(args: &Args) -> String {
    let shape = if args.quick {
        shape(10, 5, 1, 10.0, 3)
    } else {
        shape(100, 10, 1, 10.0, 20)
    };
    let mut report = heading(
        "Cross-replica",
        args,
        &format!(
            "S1's shape ({} rooms × {} clients, one writer per room at {}/s, {} s measured) on \
             PostgreSQL + Redis Streams; both replicas on core 0, PostgreSQL and Redis unpinned; \
             each round measures one replica, then the writers on replica 1 and the readers on \
             replica 2, on a fresh database with a PostgreSQL `CHECKPOINT` before each.",
            shape.rooms, shape.clients, shape.rate, shape.seconds
        ),
    );
    report.push_str("| round | one replica p50 | one replica p99 | cross p50 | cross p99 | p99 gap | deliveries (one / cross) | generator CPU (one / cross) |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let mut met = 0;
    let (mut worst, mut widest) = (0f64, 0f64);
    for round in 1..=args.rounds {
        let (solo, cross) = cross_round(&shape).await;
        let gap = cross.p99 - solo.p99;
        if cross.p99 < 5.0 && gap <= 2.0 {
            met += 1;
        }
        worst = worst.max(cross.p99);
        widest = widest.max(gap);
        let _ = writeln!(
            report,
            "| {round} | {} | {} | {} | {} | {gap:.2} ms | {} / {} | {:.0}% / {:.0}% |",
            ms(solo.p50),
            ms(solo.p99),
            ms(cross.p50),
            ms(cross.p99),
            solo.received,
            cross.received,
            solo.gen_cpu,
            cross.gen_cpu
        );
    }
    let _ = writeln!(
        report,
        "\nTarget (cross p99 under 5 ms and within 2 ms of one replica's) met in {met} of {} rounds; \
         worst cross p99 {worst:.2} ms, widest gap {widest:.2} ms.",
        args.rounds
    );
    report
}

async fn cross_round(shape: &Shape) -> (Outcome, Outcome) {
    let (db, db_name) = common::fresh_postgres("concord_bench").await;
    let replica = |id: &'static str| {
        targets::start_concord(
            &db,
            &["--redis-url", "redis://127.0.0.1:6379", "--replica-id", id],
        )
    };
    common::checkpoint().await;
    let single = replica("solo");
    let solo = fanout::run(&single, shape).await;
    single.stop();
    common::checkpoint().await;
    let r1 = replica("b1");
    let r2 = replica("b2");
    let cross = fanout::run_split(&r1, &r2, shape).await;
    r1.stop();
    r2.stop();
    common::drop_postgres(&db_name).await;
    (solo, cross)
}
