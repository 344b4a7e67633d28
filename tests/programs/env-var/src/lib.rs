//! Reads the environment variable named by the body (`GUST_TEST_VAR` when the
//! body is empty) so tests can check what environment a function sees.

use gust_sdk::{Error, Request, Response};

const DEFAULT_VAR: &str = "GUST_TEST_VAR";

fn handle(req: Request) -> Result<Response, Error> {
    let name = req.text()?.trim();
    let name = if name.is_empty() { DEFAULT_VAR } else { name };
    match std::env::var(name) {
        Ok(value) => Ok(Response::new(200, "text/plain", value)),
        Err(_) => Err(
            Error::new("not-set", format!("environment variable {name} is not set"))
                .with_status(404),
        ),
    }
}

gust_sdk::export_handler!(handle);
