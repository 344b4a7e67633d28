//! Recurses without bound until the wasm call stack is exhausted.

use std::hint::black_box;

use gust_sdk::{Error, Request, Response};

// The frame deliberately holds nothing whose address is taken (no
// black_box here): such locals live on the shadow stack in linear memory,
// and overflowing that is an out-of-bounds memory access, not the stack
// overflow this fixture exists to produce. The work after the call keeps it
// from being a tail call, and rotate-then-xor is not an accumulator LLVM can
// turn into a loop.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    // Never true for a start of 0, but the optimiser cannot know that, so the
    // function is not "unconditionally recursive".
    if depth == u64::MAX {
        return depth;
    }
    recurse(depth + 1).rotate_left((depth % 63) as u32) ^ depth
}

fn handle(_req: Request) -> Result<Response, Error> {
    let n = recurse(black_box(0));
    Ok(Response::text(n.to_string()))
}

gust_sdk::export_handler!(handle);
