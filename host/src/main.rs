//! `gust`: the Gust host's command-line interface.

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// jemalloc, not glibc's malloc: per-request allocations were an eighth of
/// the HTTP path's CPU under load with glibc (see `benches/README.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start: a background thread returns
/// freed pages to the system after 1 s (the default keeps them 10 s, so
/// bursts showed as RSS held for long after them), and no "muzzy" stage.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // Guests yield to the executor at every epoch tick (10 ms), so a busy
    // worker polls many long tasks in a row; checking for I/O every 8 polls
    // (instead of tokio's 61) keeps accepting and answering other requests
    // within tens of milliseconds while runaway guests burn their budgets.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(8)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_HOST);
        }
    };
    let telemetry = match cli::init_tracing(&args, runtime.handle().clone()) {
        Ok(telemetry) => telemetry,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(cli::EXIT_BAD_INPUT);
        }
    };
    let code = runtime.block_on(cli::dispatch(args));
    // The last spans go out while the runtime their connections use runs.
    if let Some(telemetry) = telemetry {
        runtime.block_on(async {
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        });
    }
    // Tasks still spawned (a response body being streamed, a WebSocket
    // session) hold parts of the host: dropping them here, before `main`
    // returns, lets the devices' worker threads and the store close while
    // the process is whole, not race the exit's teardown of the libraries
    // they use (a wgpu device on lavapipe crashed the host that way).
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}
