//! Allocates 1 MiB chunks until linear memory runs out; the allocation
//! failure aborts, which traps.

use std::hint::black_box;

use gust_sdk::{Error, Request, Response};

const CHUNK: usize = 1 << 20;

fn handle(_req: Request) -> Result<Response, Error> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Filling with a non-zero byte writes every page, so the memory is
        // really committed rather than left as fresh zero pages.
        hoard.push(black_box(vec![1u8; CHUNK]));
        black_box(&hoard);
    }
}

gust_sdk::export_handler!(handle);
