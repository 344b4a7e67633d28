//! Spins without calling the host, so only epoch/fuel interruption can stop
//! it: forever, or, when the body is `for <n>`, for n milliseconds of wall
//! time (then answers `spun`), for tests that need a call that is long but
//! ends.

use std::hint::black_box;
use std::time::{Duration, Instant};

use gust_sdk::{Error, Request, Response};

fn handle(req: Request) -> Result<Response, Error> {
    let until = req
        .text()
        .ok()
        .and_then(|text| text.trim().strip_prefix("for ")?.parse::<u64>().ok())
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut n: u64 = 0;
    loop {
        // black_box keeps the optimiser from proving the loop has no effect.
        n = black_box(n.wrapping_add(1));
        // The clock is read now and then only: between reads the loop
        // stays host-call free.
        if n % (1 << 16) == 0 && until.is_some_and(|until| Instant::now() >= until) {
            return Ok(Response::new(200, "text/plain", "spun"));
        }
    }
}

gust_sdk::export_handler!(handle);
