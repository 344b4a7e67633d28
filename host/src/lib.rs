//! The Gust host: runs user functions as WebAssembly components in Wasmtime.

pub mod api;
mod fsutil;
pub mod gpu;
pub mod nn;
pub mod runtime;
pub mod service;
pub mod store;
pub mod tenancy;
pub mod wire;
