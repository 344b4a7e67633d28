//! `gust`: the Gust host's command-line interface.

use std::process::ExitCode;

use clap::Parser;

mod cli;

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
