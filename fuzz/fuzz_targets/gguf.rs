//! GGUF model files (weights of quantised models).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    gust_gpu_bridge::models::fuzzing::gguf(bytes);
});
