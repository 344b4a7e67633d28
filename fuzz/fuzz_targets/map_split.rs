//! The map input splitter (`POST …/map`): a JSON array or NDJSON body, in
//! chunks of any size, with any per-input cap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let ndjson = mode & 1 == 1;
    let chunk = usize::from(mode >> 1) + 1;
    let limit = usize::from(mode % 64) + 1;
    gust_host::api::fuzzing::split_map_inputs(body, ndjson, chunk, limit);
    gust_host::api::fuzzing::split_map_inputs(body, ndjson, body.len().max(1), 1 << 20);
});
