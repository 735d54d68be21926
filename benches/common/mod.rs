//! What the benchmark binaries share: where results go and how they are dated.

/// Appends a report section to BENCHMARKS.md (created with its title if missing).
pub fn append_report(report: &str) {
    println!("{report}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let mut existing = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    existing.push_str(report);
    std::fs::write(path, existing).unwrap();
}

/// Today's date, for section headings.
pub fn today() -> String {
    let out = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

async fn admin(sql: &str) {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(PG_ADMIN)
        .await
        .expect("PostgreSQL must be running on 127.0.0.1:5432");
    sqlx::query(sql).execute(&mut admin).await.expect(sql);
}

/// A fresh PostgreSQL database named after this process; drop it with
/// [`drop_postgres`] so benchmark runs leave nothing behind.
pub async fn fresh_postgres(prefix: &str) -> (String, String) {
    let name = format!("{prefix}_{}", std::process::id());
    admin(&format!("DROP DATABASE IF EXISTS {name}")).await;
    admin(&format!("CREATE DATABASE {name}")).await;
    (format!("postgres://postgres@127.0.0.1:5432/{name}"), name)
}

pub async fn drop_postgres(name: &str) {
    admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
}

/// Writes out PostgreSQL's dirty pages now. A timed checkpoint ends by
/// fsyncing every file it wrote, which stalls commits for a few hundred
/// milliseconds; phases that are compared start right after one, so none of
/// them has that burst and the others not.
pub async fn checkpoint() {
    admin("CHECKPOINT").await;
}
