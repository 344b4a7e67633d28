//! Reads the environment variable named by the body (`GUST_TEST_VAR` when the
//! body is empty) so tests can check what environment a function sees. With
//! `print:NAME`, it also writes the value to stdout and stderr (as a careless
//! function logging its configuration would), and answers `printed`.

use gust_sdk::{Error, Request, Response};

const DEFAULT_VAR: &str = "GUST_TEST_VAR";

fn handle(req: Request) -> Result<Response, Error> {
    let name = req.text()?.trim();
    let (print, name) = match name.strip_prefix("print:") {
        Some(name) => (true, name),
        None => (false, name),
    };
    let name = if name.is_empty() { DEFAULT_VAR } else { name };
    match std::env::var(name) {
        Ok(value) if print => {
            println!("config: {name}={value}");
            eprintln!("using token {value} for the call");
            Ok(Response::new(200, "text/plain", "printed"))
        }
        Ok(value) => Ok(Response::new(200, "text/plain", value)),
        Err(_) => Err(
            Error::new("not-set", format!("environment variable {name} is not set"))
                .with_status(404),
        ),
    }
}

gust_sdk::export_handler!(handle);
