//! Counts the calls its instance has served and answers with the count, so
//! tests can tell a reused instance from a fresh one. The body `trap` makes
//! it panic and `fail` return its own error, after counting; every call
//! prints `call N` to stdout. The body `probe` answers with what an earlier
//! call of the same instance would have left: the count, whether static
//! memory still holds the mark a call writes, and where the heap puts a new
//! allocation (each call leaks one, so the next lands elsewhere).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use gust_sdk::{Error, Request, Response};

static CALLS: AtomicU64 = AtomicU64::new(0);
static SCRATCH: Mutex<[u8; 8]> = Mutex::new([0; 8]);

fn probe(count: u64) -> String {
    let mut scratch = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    let marked = *scratch == *b"written!";
    *scratch = *b"written!";
    let leaked: &'static mut [u8; 256] = Box::leak(Box::new([1; 256]));
    format!("calls={count} marked={marked} heap={:p}", leaked.as_ptr())
}

fn handle(req: Request) -> Result<Response, Error> {
    let count = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    println!("call {count}");
    match req.text()? {
        "trap" => panic!("trapping on call {count}"),
        "fail" => Err(Error::new("refused", format!("failing on call {count}"))),
        "probe" => Ok(Response::text(probe(count))),
        _ => Ok(Response::text(count.to_string())),
    }
}

gust_sdk::export_handler!(handle);
