//! Integration tests of the bridge: every op on every compiled backend
//! against a float64 reference, every kernel on every backend below the op
//! layer, shape and dtype errors, quotas.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity,
    reason = "test code: a failed expectation is a failed test"
)]

mod bert;
mod errors;
mod harness;
mod kernels;
mod llama;
mod memory;
mod models;
mod ops;
mod props;
mod reference;
mod sharing;
