//! Command line and environment: every knob the binary reads, in one typed tree.
//!
//! The flag and env names the README's configuration table lists are relied
//! on from outside (deployments, scripts): keep them exactly. The limit flags'
//! names are ours, but their defaults are part of that promise.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "concord",
    version,
    about = "Collaborative document editing backend"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// `serve` is the default subcommand, so its flags are accepted at the top level too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations.
    Migrate(MigrateArgs),
    /// Print a development token signed with CONCORD_JWT_SECRET.
    Token(TokenArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `postgres://…` or `sqlite://…`; a SQLite file is created if missing.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://concord.db")]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Listen address.
    #[arg(long, env = "CONCORD_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    #[command(flatten)]
    pub db: DatabaseArgs,

    /// `redis://…` enables cross-replica fan-out; unset means a single node.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Entries each document's Redis stream keeps (at least; the database is the
    /// record). A replica that falls further behind on a document resyncs it from the database.
    #[arg(long, env = "CONCORD_STREAM_MAX_LEN", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub stream_max_len: u64,

    #[command(flatten)]
    pub auth: AuthArgs,

    /// Name of this replica in logs, metrics and Redis entries (random when unset).
    #[arg(long, env = "CONCORD_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Run pending migrations at start (default: true for SQLite, false for Postgres).
    #[arg(long, env = "CONCORD_AUTO_MIGRATE")]
    pub auto_migrate: Option<bool>,

    #[arg(long, env = "CONCORD_LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,

    /// Comma-separated browser origins allowed to open a WebSocket (unset: any).
    #[arg(long, env = "CONCORD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    /// Open sockets per client address; past it the upgrade is answered with 429.
    #[arg(long, env = "CONCORD_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: usize,

    /// Comma-separated CIDRs whose X-Forwarded-For is believed for the client address.
    #[arg(long, env = "CONCORD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<ipnet::IpNet>>,

    #[command(flatten)]
    pub limits: Limits,

    #[command(flatten)]
    pub webhooks: WebhookArgs,

    #[command(flatten)]
    pub history: HistoryArgs,
}

#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// How long versions are kept (named ones are kept for good); `0` turns
    /// automatic versions off.
    #[arg(long, env = "CONCORD_HISTORY_RETENTION", value_parser = humantime::parse_duration, default_value = "30d")]
    pub history_retention: Duration,

    /// A version is recorded when a changed document has been quiet this long.
    #[arg(long, env = "CONCORD_VERSION_IDLE", value_parser = humantime::parse_duration, default_value = "30s")]
    pub version_idle: Duration,
}

#[derive(Clone, Args)]
pub struct WebhookArgs {
    /// URLs that receive document events (comma-separated; several allowed).
    #[arg(
        long = "webhook-url",
        env = "CONCORD_WEBHOOK_URL",
        value_delimiter = ','
    )]
    pub webhook_urls: Vec<String>,

    /// Key of the HMAC-SHA256 signature every webhook carries; required with a URL.
    #[arg(long, env = "CONCORD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// How long a receiver has to answer before the attempt counts as failed.
    #[arg(long, env = "CONCORD_WEBHOOK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub webhook_timeout: Duration,
}

/// The secret signs bodies: it never reaches a log, even through `{:?}`.
impl std::fmt::Debug for WebhookArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookArgs")
            .field("webhook_urls", &self.webhook_urls.len())
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("webhook_timeout", &self.webhook_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// HS256 secret; unset (and no public key) means auth is off.
    #[arg(long, env = "CONCORD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Path to a PEM public key for RS256/ES256 tokens from an identity provider.
    #[arg(long, env = "CONCORD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// Required `aud` claim, when set.
    #[arg(long, env = "CONCORD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim, when set.
    #[arg(long, env = "CONCORD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
}

/// Resource limits. The defaults are the contract; tests shorten the timers.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Largest WebSocket message accepted (close 1009 past it).
    #[arg(long, env = "CONCORD_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Sustained messages per second per connection (close 1008 past it).
    #[arg(long, env = "CONCORD_RATE_LIMIT_PER_SECOND", default_value_t = 200)]
    pub rate_limit_per_second: u32,

    /// Token bucket size of the per-connection rate limit.
    #[arg(long, env = "CONCORD_RATE_LIMIT_BURST", default_value_t = 1000)]
    pub rate_limit_burst: u32,

    /// How often the server pings each socket.
    #[arg(long, env = "CONCORD_PING_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub ping_interval: Duration,

    /// A socket from which nothing (not even a pong) arrived for this long is dropped.
    #[arg(long, env = "CONCORD_PONG_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub pong_timeout: Duration,

    /// A Hocuspocus socket on which no document authenticated this long after
    /// it opened is closed (4408).
    #[arg(long, env = "CONCORD_AUTH_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub auth_timeout: Duration,

    /// A document with no clients is flushed and unloaded this long after the last one leaves.
    #[arg(long, env = "CONCORD_UNLOAD_AFTER", value_parser = humantime::parse_duration, default_value = "30s")]
    pub unload_after: Duration,

    /// Messages queued for one socket before it counts as a slow consumer (close 1013).
    #[arg(long, env = "CONCORD_OUTBOX_CAPACITY", default_value_t = 1024)]
    pub outbox_capacity: usize,

    /// Bytes queued for one socket before it counts as a slow consumer (close 1013).
    #[arg(long, env = "CONCORD_OUTBOX_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub outbox_bytes: usize,

    /// Bytes of accepted-but-unstored updates held in memory while the database is away;
    /// past it new writes are refused (close 1013) instead of growing without bound.
    #[arg(long, env = "CONCORD_PERSIST_BUDGET_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub persist_budget_bytes: usize,

    /// Least time between the starts of two group commits (default: 10ms on
    /// SQLite, whose every commit flushes the local disk; 0 on PostgreSQL,
    /// where each commit is a round trip that cross-replica delivery waits for).
    /// Local clients get an update at once whatever it is; only what waits for
    /// durability (a Hocuspocus ack, an HTTP write's answer) waits up to this.
    #[arg(long, env = "CONCORD_COMMIT_INTERVAL", value_parser = humantime::parse_duration)]
    pub commit_interval: Option<Duration>,

    /// Fold a document's update log into its snapshot past this many entries…
    #[arg(long, env = "CONCORD_COMPACT_AFTER_UPDATES", default_value_t = 1000)]
    pub compact_after_updates: u64,

    /// …or past this many bytes.
    #[arg(long, env = "CONCORD_COMPACT_AFTER_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub compact_after_bytes: u64,

    /// Largest body accepted by `POST /api/docs/{doc}/updates` (413 past it).
    #[arg(long, env = "CONCORD_MAX_HTTP_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_http_body_bytes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,

    /// Apply nothing; exit 1 when migrations are pending.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// `PATTERN[=read|write]`; repeatable. A pattern without a mode grants write.
    #[arg(long = "doc", required = true)]
    pub docs: Vec<String>,

    /// The `sub` claim.
    #[arg(long)]
    pub sub: Option<String>,

    /// Lifetime: `90s`, `15m`, `1h`, `7d`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub ttl: Duration,

    #[arg(
        long,
        env = "CONCORD_JWT_SECRET",
        hide_env_values = true,
        required = true
    )]
    pub jwt_secret: String,
}

impl ServeArgs {
    pub fn is_postgres(&self) -> bool {
        self.db.is_postgres()
    }

    pub fn auto_migrate(&self) -> bool {
        self.auto_migrate.unwrap_or(!self.is_postgres())
    }

    pub fn commit_interval(&self) -> Duration {
        let default = match self.is_postgres() {
            true => Duration::ZERO,
            false => Duration::from_millis(10),
        };
        self.limits.commit_interval.unwrap_or(default)
    }
}

impl DatabaseArgs {
    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres:") || self.database_url.starts_with("postgresql:")
    }
}
