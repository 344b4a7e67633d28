//! Stand-in for the CUDA backend in builds without the `cuda` feature.

use crate::backend::DeviceDescription;
use crate::error::{BridgeError, Result};

/// The CUDA backend is not compiled in; [`CudaBackend::open`] says so.
#[derive(Debug)]
pub enum CudaBackend {}

impl CudaBackend {
    /// Always fails: this build has no CUDA backend.
    pub fn open(_ordinal: usize) -> Result<Self> {
        Err(BridgeError::not_compiled("cuda"))
    }
}

/// Every CUDA kernel source, by name; empty without the `cuda` feature.
pub fn kernel_sources() -> Vec<(&'static str, String)> {
    Vec::new()
}

impl crate::backend::Backend for CudaBackend {
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
