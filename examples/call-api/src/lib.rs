//! Calls an HTTPS API with a token kept as a tenant secret: the request
//! body is POSTed to `$API_URL` with `Authorization: Bearer $API_TOKEN`,
//! and the API's answer comes back.
//!
//! ```sh
//! printf %s "$TOKEN" | gust secrets set API_TOKEN
//! gust deploy examples/call-api --secret API_TOKEN
//! ```
//!
//! The tenant's policy names the API (`outbound_http = ["https://api.example.com"]`)
//! and, in `[env]`, `API_URL`.

use std::time::Duration;

use gust_sdk::{Error, Fetch, Request, Response};

fn handle(req: Request) -> Result<Response, Error> {
    let setting = |name: &str| {
        std::env::var(name).map_err(|_| {
            Error::new("not-configured", format!("{name} is not set")).with_status(500)
        })
    };
    let (url, token) = (setting("API_URL")?, setting("API_TOKEN")?);
    let reply = Fetch::post(&url, req.body.clone())
        .header("authorization", &format!("Bearer {token}"))
        .header("content-type", &req.content_type)
        .timeout(Duration::from_secs(5))
        .send()?;
    let content_type = reply
        .header("content-type")
        .unwrap_or("text/plain")
        .to_owned();
    Ok(Response::new(reply.status, content_type, reply.body))
}

gust_sdk::export_handler!(handle);
