//! A Gust function that greets whoever the request body names.
//!
//! * body `Ada` → `200 text/plain`, `Hello, Ada!`
//! * empty body → `200 text/plain`, `Hello from Gust!`
//! * body that is not UTF-8 → error `invalid-input`, status 400

use gust_sdk::{Error, Request, Response};

/// Handles one invocation.
///
/// The host creates a fresh instance for every call, so there is no state to
/// set up or clean up: everything the function needs is in `req`.
fn handle(req: Request) -> Result<Response, Error> {
    // `text()` fails with a ready-made 400 error when the body is not UTF-8;
    // `?` hands that straight back to the caller.
    let name = req.text()?.trim();

    let greeting = if name.is_empty() {
        "Hello from Gust!".to_owned()
    } else {
        format!("Hello, {name}!")
    };

    // Headers are optional; this one just shows how to add one.
    Ok(Response::text(greeting).with_header("x-greeter", "gust-example-hello"))
}

// Generates the component export `gust:function/handler@0.1.0` that calls
// `handle`. Exactly one per component.
gust_sdk::export_handler!(handle);
