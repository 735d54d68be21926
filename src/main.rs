//! The `concord` binary: `serve` (default), `migrate`, `token`.

use std::process::ExitCode;

use clap::Parser;
use concord::config::{Cli, Command, LogFormat, MigrateArgs};
use concord::server::redact_url;

#[global_allocator]
static ALLOCATOR: concord::alloc::CappedAllocator = concord::alloc::CappedAllocator;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut json = false;
    let result = match cli.command {
        None => {
            json = cli.serve.log_format == LogFormat::Json;
            serve(cli.serve).await
        }
        Some(Command::Serve(args)) => {
            json = args.log_format == LogFormat::Json;
            serve(*args).await
        }
        Some(Command::Migrate(args)) => return migrate(args).await,
        Some(Command::Token(args)) => {
            concord::auth::mint(&args.jwt_secret, args.sub, &args.docs, args.ttl)
                .map(|token| println!("{token}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // In JSON mode every line the process writes is JSON, errors included.
        Err(error) if json => {
            tracing::error!(error = format!("{error:#}"), "concord stopped");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: concord::config::ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    concord::server::serve(args).await
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn,tower_http=info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Reporting a failed log write goes through `eprintln!`, which panics
        // when stderr is a closed pipe: a task that logs would die mid-way.
        .log_internal_errors(false);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).init();
            // A panic's default report is plain text on stderr.
            std::panic::set_hook(Box::new(|info| {
                let location = info.location().map(ToString::to_string);
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = payload, location, "panicked");
            }));
        }
    }
}

/// Exit codes: 0 done (or nothing pending), 1 pending with `--check`, 2 error.
async fn migrate(args: MigrateArgs) -> ExitCode {
    let database = redact_url(&args.db.database_url);
    let store = match concord::store::open(&args.db.database_url).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("error: cannot reach the database at {database}: {error}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return match store.pending_migrations().await {
            Ok(pending) if pending.is_empty() => {
                println!("no pending migrations");
                ExitCode::SUCCESS
            }
            Ok(pending) => {
                for version in pending {
                    println!("pending {version}");
                }
                ExitCode::from(1)
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(2)
            }
        };
    }
    match store.migrate().await {
        Ok(applied) if applied.is_empty() => {
            println!("no pending migrations");
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            for (version, description) in applied {
                println!("applied {version} {description}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: migration failed: {error}");
            ExitCode::from(2)
        }
    }
}
