//! Stand-in for the wgpu backend in builds without the `wgpu` feature.

use crate::backend::DeviceDescription;
use crate::error::{BridgeError, Result};

/// Options for opening a wgpu adapter.
#[derive(Debug, Clone, Default)]
pub struct WgpuOptions {
    /// Accept a software adapter (such as lavapipe) when no GPU is found.
    pub allow_software: bool,
}

/// The wgpu backend is not compiled in; [`WgpuBackend::open`] says so.
#[derive(Debug)]
pub enum WgpuBackend {}

impl WgpuBackend {
    /// Always fails: this build has no wgpu backend.
    pub fn open(_options: &WgpuOptions) -> Result<Self> {
        Err(BridgeError::not_compiled("wgpu"))
    }
}

impl crate::backend::Backend for WgpuBackend {
    type Buffer = ();

    fn describe(&self) -> DeviceDescription {
        match *self {}
    }

    fn alloc(&mut self, _bytes: usize) -> Result<()> {
        match *self {}
    }

    fn upload(&mut self, _data: &[u8]) -> Result<()> {
        match *self {}
    }

    fn download(&mut self, _buffer: &(), _bytes: usize) -> Result<Vec<u8>> {
        match *self {}
    }

    fn run(
        &mut self,
        _kernel: &crate::kernel::Kernel,
        _inputs: &[&()],
        _output: &mut (),
    ) -> Result<()> {
        match *self {}
    }

    fn synchronize(&mut self) -> Result<()> {
        match *self {}
    }
}
