//! Answers with the request's body, content type and headers, plus
//! `x-invocation-id` so tests can match a response to its invocation.

use gust_sdk::{Error, Request, Response};

fn handle(req: Request) -> Result<Response, Error> {
    let mut resp = Response::new(200, req.content_type, req.body);
    resp.headers = req.headers;
    Ok(resp.with_header("x-invocation-id", req.invocation_id))
}

gust_sdk::export_handler!(handle);
