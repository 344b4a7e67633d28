//! Command-line parsing and the subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod run;

/// Exit status when the function ran and failed (error, trap, timeout, ...).
pub(crate) const EXIT_FUNCTION_FAILED: u8 = 1;
/// Exit status when the component could not be loaded or the input read.
pub(crate) const EXIT_BAD_INPUT: u8 = 2;
/// Exit status when the host itself failed.
pub(crate) const EXIT_HOST: u8 = 3;

/// Gust: a sandboxed function host. User functions are WebAssembly
/// components run in Wasmtime, each call in a fresh, limited instance.
#[derive(Debug, Parser)]
#[command(name = "gust", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace). `RUST_LOG`
    /// overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one invocation of a component locally and print the response body.
    ///
    /// The response body goes to stdout; what the function wrote to its own
    /// stdout and stderr goes to stderr. Exit status: 0 when the function
    /// returned a response, 1 when it failed (returned an error, trapped,
    /// timed out, ran out of memory), 2 when the component or input could not
    /// be read or loaded, 3 when the host failed.
    Run(run::RunArgs),
}

/// Where compiled components are cached when `--cache-dir` is not given.
pub(crate) fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("gust").join("compiled");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home)
            .join(".cache")
            .join("gust")
            .join("compiled");
    }
    PathBuf::from(".gust-cache")
}

pub(crate) fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub(crate) async fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => run::run(args).await,
    }
}
