//! Spins forever without calling the host, so only epoch/fuel interruption
//! can stop it.

use std::hint::black_box;

use gust_sdk::{Error, Request, Response};

fn handle(_req: Request) -> Result<Response, Error> {
    let mut n: u64 = 0;
    loop {
        // black_box keeps the optimiser from proving the loop has no effect.
        n = black_box(n.wrapping_add(1));
    }
}

gust_sdk::export_handler!(handle);
