//! Integration tests of the runtime core and the `gust` CLI, against real
//! components built from `tests/programs` and a real Wasmtime engine.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod cache;
mod cli;
mod cluster;
mod console;
mod crash;
mod diskfull;
mod egress;
mod fixtures;
mod gpu;
mod hostile;
mod http_p3;
mod jobs;
mod js;
mod kv;
mod limits;
mod load_errors;
mod map;
mod models;
mod python;
mod python_build;
mod quotas;
mod ready;
mod records;
mod reuse;
mod routes;
mod schedules;
mod secrets;
mod server;
mod store;
mod stream;
mod traces;

use std::path::Path;
use std::time::Duration;

use gust_host::runtime::{
    CallLimits, Invocation, LoadedComponent, Request, Runtime, RuntimeConfig,
};
use tempfile::TempDir;

/// A runtime with its own cache directory (kept alive by the returned guard).
pub(crate) fn runtime() -> (Runtime, TempDir) {
    let dir = TempDir::new().expect("temp dir");
    let runtime = Runtime::new(RuntimeConfig::new(dir.path().join("cache"))).expect("runtime");
    (runtime, dir)
}

pub(crate) fn load(runtime: &Runtime, path: &str) -> LoadedComponent {
    let bytes = std::fs::read(Path::new(path)).expect("fixture was built");
    runtime.load(&bytes).expect("fixture loads")
}

pub(crate) fn request(body: &str) -> Request {
    Request {
        body: body.as_bytes().to_vec(),
        content_type: "text/plain".into(),
        headers: Vec::new(),
        invocation_id: "inv_test".into(),
    }
}

pub(crate) fn limits() -> CallLimits {
    CallLimits {
        timeout: Duration::from_secs(10),
        ..CallLimits::default()
    }
}

pub(crate) async fn invoke(
    runtime: &Runtime,
    component: &LoadedComponent,
    body: &str,
) -> Invocation {
    runtime.invoke(component, request(body), &limits()).await
}
