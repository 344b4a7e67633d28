//! Greets the body: `Hello, {body}!`, or `Hello, world!` for an empty body.

use gust_sdk::{Error, Request, Response};

fn handle(req: Request) -> Result<Response, Error> {
    let name = req.text()?;
    let name = if name.is_empty() { "world" } else { name };
    Ok(Response::new(200, "text/plain", format!("Hello, {name}!")))
}

gust_sdk::export_handler!(handle);
