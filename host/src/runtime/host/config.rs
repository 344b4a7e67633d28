//! Host side of `wasi:config/store` (0.2.0-rc.1): the values a call was
//! given in [`CallLimits::config`](crate::runtime::CallLimits::config).
//!
//! Not `wasmtime-wasi-config`: it serves a `HashMap` it borrows for the
//! store's whole life, so every call (or every reuse of an instance) would
//! build one. Here the values are one sorted slice shared by all calls of
//! a function, set anew per call like the rest of its grants, and read by
//! binary search.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

use crate::runtime::bindings::wasi::config::store::{self, Error};

/// What of a call's state `wasi:config` reads.
pub(crate) struct ConfigCtxView<'a> {
    /// The call's values, sorted by key.
    pub(crate) values: &'a Arc<[(String, String)]>,
}

/// Store data that can lend a [`ConfigCtxView`].
pub(crate) trait ConfigView: Send {
    /// The part of the state `wasi:config` reads.
    fn config(&mut self) -> ConfigCtxView<'_>;
}

struct HasConfig;

impl HasData for HasConfig {
    type Data<'a> = ConfigCtxView<'a>;
}

/// Adds `wasi:config/store` to `linker`.
pub(crate) fn add_to_linker<T: ConfigView + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<T, HasConfig>(linker, T::config)
}

impl store::Host for ConfigCtxView<'_> {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<String>, Error>> {
        Ok(Ok(self
            .values
            .binary_search_by(|(k, _)| k.as_str().cmp(&key))
            .ok()
            .map(|i| self.values[i].1.clone())))
    }

    async fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, Error>> {
        Ok(Ok(self.values.to_vec()))
    }
}
