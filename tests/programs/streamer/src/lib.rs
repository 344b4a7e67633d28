//! Streams its input, one whitespace-separated word per emitted chunk, then
//! answers `done`. The word `spin` spins forever instead (until the host
//! interrupts it), so a test can see chunks arrive while the function is
//! still running.

use std::hint::black_box;

use gust_sdk::{Error, Request, Response};

fn handle(req: Request) -> Result<Response, Error> {
    for word in req.text()?.split_whitespace() {
        if word == "spin" {
            let mut n: u64 = 0;
            loop {
                // black_box keeps the optimiser from proving the loop has no effect.
                n = black_box(n.wrapping_add(1));
            }
        }
        gust_sdk::emit(format!("{word}\n"));
    }
    Ok(Response::text("done\n"))
}

gust_sdk::export_handler!(handle);
