//! Counts the calls its instance has served and answers with the count, so
//! tests can tell a reused instance from a fresh one. The body `trap` makes
//! it panic and `fail` return its own error, after counting; every call
//! prints `call N` to stdout.

use std::sync::atomic::{AtomicU64, Ordering};

use gust_sdk::{Error, Request, Response};

static CALLS: AtomicU64 = AtomicU64::new(0);

fn handle(req: Request) -> Result<Response, Error> {
    let count = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    println!("call {count}");
    match req.text()? {
        "trap" => panic!("trapping on call {count}"),
        "fail" => Err(Error::new("refused", format!("failing on call {count}"))),
        _ => Ok(Response::text(count.to_string())),
    }
}

gust_sdk::export_handler!(handle);
