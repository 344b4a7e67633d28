//! The Gust host: runs user functions as WebAssembly components in Wasmtime.

pub mod api;
pub mod digest;
mod fsutil;
pub mod runtime;
pub mod service;
pub mod store;
pub mod tenancy;
mod tls_roots;
pub mod trace;
pub mod wire;
