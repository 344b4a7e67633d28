//! The host side of the WIT imports Gust itself defines (`gust:function`'s
//! output, `gust:gpu`, `wasi:nn`), beside the runtime that links them.
//!
//! Like `wasmtime-wasi-http` with `WasiHttpView`, each package's host traits
//! are implemented on a narrow view of the call's state ([`gpu::GpuCtxView`],
//! [`nn::NnCtxView`], the output sink) rather than on the whole `CallState`,
//! and each package has an `add_to_linker` that projects the store's data to
//! its view. The glue thus depends on the parts it uses, not on the runtime's
//! call machinery, and the runtime's linker setup is a list of packages.

pub(super) mod config;
pub(super) mod gpu;
pub(super) mod kv;
pub(super) mod nn;

use wasmtime::component::{HasSelf, Linker};

pub use self::gpu::{GpuGrant, ModelGrant, ModelUsage};
pub use self::kv::{KeyValue, KvFailure};
use super::bindings::gust::function::{output, types as fn_types};
use super::control::OutputSink;

// `gust:function/types` has no functions: linking it only names the
// instance for components whose handler types are imported from it.
impl fn_types::Host for OutputSink {}

/// Adds `gust:function`'s imports (`types`, `output`) to `linker`: an
/// `emit` goes to the sink `output` projects the store's data to.
pub(super) fn add_function_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    output: fn(&mut T) -> &mut OutputSink,
) -> wasmtime::Result<()> {
    fn_types::add_to_linker::<T, HasSelf<OutputSink>>(linker, output)?;
    output::add_to_linker::<T, HasSelf<OutputSink>>(linker, output)?;
    Ok(())
}
