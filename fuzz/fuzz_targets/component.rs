//! A deploy's upload: any bytes are validated (and, when valid, compiled)
//! or refused with a `LoadError`; nothing panics.
#![no_main]

use std::sync::OnceLock;

use gust_host::runtime::{AllocationConfig, Runtime, RuntimeConfig};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<(Runtime, tempfile::TempDir)> = OnceLock::new();
    &RUNTIME
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let mut config = RuntimeConfig::new(dir.path().join("compiled"));
            // No pool to reserve: the fuzzer only loads.
            config.allocation = AllocationConfig::OnDemand;
            (Runtime::new(config).expect("a runtime"), dir)
        })
        .0
}

fuzz_target!(|bytes: &[u8]| {
    let _ = runtime().load(bytes);
});
