//! A tenant's policy file (`policies/<tenant>.toml`): any text either loads
//! or is refused with an error naming the key; it never panics.
#![no_main]

use gust_host::tenancy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = Policy::default().with_overrides(std::path::Path::new("fuzz.toml"), text);
});
