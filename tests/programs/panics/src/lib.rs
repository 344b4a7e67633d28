//! Panics, which traps the instance (wasm32 panics abort).

use gust_sdk::{Error, Request, Response};

fn handle(_req: Request) -> Result<Response, Error> {
    panic!("the panics fixture panicked on purpose")
}

gust_sdk::export_handler!(handle);
