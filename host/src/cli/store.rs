//! `gust store migrate`: moves a single host's state to PostgreSQL.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use gust_host::store::migrate::{self, Copied};
use gust_host::store::postgres::{PgBlobStore, PgStore};
use gust_host::store::sled::SledStore;
use gust_host::store::{FsBlobStore, StoreError};

use super::{EXIT_BAD_INPUT, EXIT_HOST};

#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy a host's embedded store to a PostgreSQL database that several
    /// hosts can share.
    ///
    /// Copies tenants, API key hashes, functions (with their versions and
    /// components), schedules and unfinished jobs; invocation records and
    /// finished jobs stay behind. Stop the host first: its store is opened
    /// directly. Nothing in the database is overwritten, and running it
    /// again finishes a copy that stopped half-way. Then start the hosts
    /// with `gust serve --store <URL>` (on the same data directory, a host
    /// reuses its compiled code).
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// The data directory of the (stopped) host whose store to copy.
    #[arg(long, value_name = "DATA_DIR")]
    from: PathBuf,

    /// The database: a `postgres://` URL (also `GUST_STORE`). Its schema is
    /// created or brought up to date first.
    #[arg(long, value_name = "URL", env = "GUST_STORE", hide_env_values = true)]
    to: String,
}

pub(crate) async fn store(args: StoreArgs) -> ExitCode {
    let StoreCommand::Migrate(args) = args.command;
    let meta = args.from.join("meta");
    if !meta.is_dir() {
        eprintln!(
            "error: {} has no embedded store (no `meta` directory): is it a Gust data directory?",
            args.from.display()
        );
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    if !(args.to.starts_with("postgres://") || args.to.starts_with("postgresql://")) {
        eprintln!("error: --to must be a postgres:// URL");
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    // Opening sled and talking to PostgreSQL block: off the async threads.
    let copied = tokio::task::spawn_blocking(move || run(&args)).await;
    match copied {
        Ok(Ok(copied)) => {
            let mut out = std::io::stdout();
            if writeln!(out, "{}", summary(&copied)).is_err() {
                // The copy is done; only its summary could not be shown.
                return ExitCode::from(EXIT_HOST);
            }
            ExitCode::SUCCESS
        }
        Ok(Err(Failed::Source(error))) => {
            eprintln!(
                "error: opening the embedded store: {error} (is a host still running on it? stop it first)"
            );
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Ok(Err(Failed::Copy(error))) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_HOST)
        }
        Err(error) => {
            eprintln!("error: the copy stopped: {error}");
            ExitCode::from(EXIT_HOST)
        }
    }
}

enum Failed {
    Source(StoreError),
    Copy(StoreError),
}

fn run(args: &MigrateArgs) -> Result<Copied, Failed> {
    let from = SledStore::open(&args.from.join("meta"), usize::MAX).map_err(Failed::Source)?;
    let from_blobs = FsBlobStore::open(&args.from.join("blobs")).map_err(Failed::Source)?;
    let to = PgStore::connect(&args.to, 1).map_err(Failed::Copy)?;
    // The blob cache a host on this data directory would use.
    let to_blobs =
        PgBlobStore::new(to.clone(), &args.from.join("blob-cache")).map_err(Failed::Copy)?;
    migrate::copy(&from, &from_blobs, &to, &to_blobs).map_err(Failed::Copy)
}

fn summary(copied: &Copied) -> String {
    let line = |what: &str, (new, there): (u64, u64)| {
        format!("  {what:<10} {new:>6} copied, {there:>6} already there")
    };
    [
        "copied to PostgreSQL:".to_owned(),
        line("tenants", copied.tenants),
        line("keys", copied.keys),
        line("secrets", copied.secrets),
        line("kv", copied.kv),
        line("functions", copied.functions),
        line("blobs", copied.blobs),
        line("schedules", copied.schedules),
        line("jobs", copied.jobs),
    ]
    .join("\n")
}
