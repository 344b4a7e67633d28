//! Always returns an application error, the non-trap failure path.

use gust_sdk::{Error, Request, Response};

fn handle(_req: Request) -> Result<Response, Error> {
    Err(Error::new("invalid-input", "the returns-error fixture always fails").with_status(422))
}

gust_sdk::export_handler!(handle);
