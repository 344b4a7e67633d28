//! The guest test programs and examples, built for `wasm32-wasip2`.
//!
//! The build script compiles every crate under `tests/programs` and
//! `examples` (release profile) into components and exposes their absolute
//! paths: one `<NAME>_COMPONENT` constant per crate ([`HELLO_COMPONENT`],
//! [`RETURNS_ERROR_COMPONENT`], …, [`EXAMPLE_HELLO_COMPONENT`]), plus the
//! [`FIXTURES`] and [`EXAMPLES`] lists.
//!
//! A new directory with a `Cargo.toml` under `tests/programs` becomes a
//! fixture on the next build. [`foreach_fixture!`] calls a macro once per
//! fixture name:
//!
//! ```
//! let mut names = Vec::new();
//! macro_rules! collect {
//!     ($name:ident) => {
//!         names.push(stringify!($name));
//!     };
//! }
//! gust_test_artifacts::foreach_fixture!(collect);
//! assert!(names.contains(&"hello") && names.contains(&"infinite_loop"));
//! ```
//!
//! so a test suite can insist that each fixture has a test of its name (the
//! host's `tests/all/fixtures.rs` does), failing to compile otherwise:
//!
//! ```text
//! macro_rules! assert_test_exists {
//!     ($name:ident) => {
//!         #[allow(unused_imports)]
//!         use self::$name as _;
//!     };
//! }
//! gust_test_artifacts::foreach_fixture!(assert_test_exists);
//! ```

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    /// Magic, version 0x0d, layer 1: a component rather than a core module.
    const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    #[test]
    fn every_artifact_is_a_component() {
        for (name, path) in FIXTURES.iter().chain(EXAMPLES) {
            let bytes = std::fs::read(path).unwrap_or_default();
            assert!(
                bytes.starts_with(&COMPONENT_HEADER),
                "{name} ({path}) is missing or not a component"
            );
        }
    }

    #[test]
    fn lists_match_the_named_constants() {
        assert!(FIXTURES.contains(&("hello", HELLO_COMPONENT)));
        assert!(FIXTURES.contains(&("returns_error", RETURNS_ERROR_COMPONENT)));
        assert!(EXAMPLES.contains(&("hello", EXAMPLE_HELLO_COMPONENT)));
        let mut count = 0;
        macro_rules! count {
            ($name:ident) => {
                count += 1;
                assert!(FIXTURES.iter().any(|(n, _)| *n == stringify!($name)));
            };
        }
        foreach_fixture!(count);
        assert_eq!(count, FIXTURES.len());
    }
}
