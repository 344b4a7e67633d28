//! Host side of `gust:gpu`: the one module that links the WIT imports to
//! `gust-gpu-bridge`.
//!
//! The bridge's devices and ops land with the GPU-bridge work; until then the
//! contract is complete and every operation answers the `unsupported` error
//! code, so guests built against `gust:gpu` link, run, and can degrade
//! gracefully instead of failing to instantiate.

use wasmtime::component::Resource;

use crate::runtime::bindings::gust::function::types as fn_types;
use crate::runtime::bindings::gust::gpu::models::{self, GenerateParams};
use crate::runtime::bindings::gust::gpu::tensors::{self, DeviceInfo};
use crate::runtime::bindings::gust::gpu::types::{self, Dtype, Error, ErrorCode};
use crate::runtime::state::CallState;

/// A tensor handle owned by one invocation. No tensor can be created until
/// the bridge lands, so no value of this type exists yet.
#[derive(Debug)]
pub struct GpuTensor {
    _private: (),
}

/// A handle to a resident model, owned by one invocation.
#[derive(Debug)]
pub struct GpuModel {
    _private: (),
}

type Outcome<T> = wasmtime::Result<Result<T, Error>>;

fn unsupported<T>(what: &str) -> Outcome<T> {
    Ok(Err(Error {
        code: ErrorCode::Unsupported,
        message: format!("{what}: this host has no GPU bridge yet"),
    }))
}

/// Methods on a handle that cannot exist: the guest forged or reused a
/// handle, which the component model turns into a trap.
fn no_such<T>(kind: &str) -> wasmtime::Result<T> {
    Err(wasmtime::format_err!("unknown {kind} handle"))
}

impl fn_types::Host for CallState {}
impl types::Host for CallState {}

impl tensors::HostTensor for CallState {
    async fn from_bytes(
        &mut self,
        _dtype: Dtype,
        _shape: Vec<u32>,
        _data: Vec<u8>,
    ) -> Outcome<Resource<GpuTensor>> {
        unsupported("tensor.from-bytes")
    }

    async fn from_f32(
        &mut self,
        _shape: Vec<u32>,
        _values: Vec<f32>,
    ) -> Outcome<Resource<GpuTensor>> {
        unsupported("tensor.from-f32")
    }

    async fn from_i32(
        &mut self,
        _shape: Vec<u32>,
        _values: Vec<i32>,
    ) -> Outcome<Resource<GpuTensor>> {
        unsupported("tensor.from-i32")
    }

    async fn zeros(&mut self, _dtype: Dtype, _shape: Vec<u32>) -> Outcome<Resource<GpuTensor>> {
        unsupported("tensor.zeros")
    }

    async fn shape(&mut self, _tensor: Resource<GpuTensor>) -> wasmtime::Result<Vec<u32>> {
        no_such("tensor")
    }

    async fn dtype(&mut self, _tensor: Resource<GpuTensor>) -> wasmtime::Result<Dtype> {
        no_such("tensor")
    }

    async fn read(&mut self, _tensor: Resource<GpuTensor>) -> Outcome<Vec<u8>> {
        no_such("tensor")
    }

    async fn read_f32(&mut self, _tensor: Resource<GpuTensor>) -> Outcome<Vec<f32>> {
        no_such("tensor")
    }

    async fn drop(&mut self, tensor: Resource<GpuTensor>) -> wasmtime::Result<()> {
        self.table.delete(tensor)?;
        Ok(())
    }
}

type T = Resource<GpuTensor>;

impl tensors::Host for CallState {
    async fn devices(&mut self) -> wasmtime::Result<Vec<DeviceInfo>> {
        Ok(Vec::new())
    }
    async fn matmul(&mut self, _a: T, _b: T) -> Outcome<T> {
        unsupported("matmul")
    }
    async fn add(&mut self, _a: T, _b: T) -> Outcome<T> {
        unsupported("add")
    }
    async fn sub(&mut self, _a: T, _b: T) -> Outcome<T> {
        unsupported("sub")
    }
    async fn mul(&mut self, _a: T, _b: T) -> Outcome<T> {
        unsupported("mul")
    }
    async fn div(&mut self, _a: T, _b: T) -> Outcome<T> {
        unsupported("div")
    }
    async fn affine(&mut self, _x: T, _scale: f32, _offset: f32) -> Outcome<T> {
        unsupported("affine")
    }
    async fn relu(&mut self, _x: T) -> Outcome<T> {
        unsupported("relu")
    }
    async fn gelu(&mut self, _x: T) -> Outcome<T> {
        unsupported("gelu")
    }
    async fn silu(&mut self, _x: T) -> Outcome<T> {
        unsupported("silu")
    }
    async fn tanh(&mut self, _x: T) -> Outcome<T> {
        unsupported("tanh")
    }
    async fn exp(&mut self, _x: T) -> Outcome<T> {
        unsupported("exp")
    }
    async fn softmax(&mut self, _x: T, _dim: i32) -> Outcome<T> {
        unsupported("softmax")
    }
    async fn layer_norm(&mut self, _x: T, _w: Option<T>, _b: Option<T>, _eps: f32) -> Outcome<T> {
        unsupported("layer-norm")
    }
    async fn rms_norm(&mut self, _x: T, _w: Option<T>, _eps: f32) -> Outcome<T> {
        unsupported("rms-norm")
    }
    async fn sum(&mut self, _x: T, _dim: i32, _keep_dim: bool) -> Outcome<T> {
        unsupported("sum")
    }
    async fn mean(&mut self, _x: T, _dim: i32, _keep_dim: bool) -> Outcome<T> {
        unsupported("mean")
    }
    async fn max(&mut self, _x: T, _dim: i32, _keep_dim: bool) -> Outcome<T> {
        unsupported("max")
    }
    async fn argmax(&mut self, _x: T, _dim: i32, _keep_dim: bool) -> Outcome<T> {
        unsupported("argmax")
    }
    async fn transpose(&mut self, _x: T, _dim0: i32, _dim1: i32) -> Outcome<T> {
        unsupported("transpose")
    }
    async fn permute(&mut self, _x: T, _dims: Vec<u32>) -> Outcome<T> {
        unsupported("permute")
    }
    async fn reshape(&mut self, _x: T, _shape: Vec<i64>) -> Outcome<T> {
        unsupported("reshape")
    }
    async fn slice(&mut self, _x: T, _dim: i32, _start: u32, _len: u32) -> Outcome<T> {
        unsupported("slice")
    }
    async fn concat(&mut self, _xs: Vec<T>, _dim: i32) -> Outcome<T> {
        unsupported("concat")
    }
    async fn gather(&mut self, _table: T, _indices: T) -> Outcome<T> {
        unsupported("gather")
    }
    async fn cast(&mut self, _x: T, _to: Dtype) -> Outcome<T> {
        unsupported("cast")
    }
}

impl models::HostModel for CallState {
    async fn load(&mut self, name: String) -> Outcome<Resource<GpuModel>> {
        unsupported(&format!("model.load({name:?})"))
    }
    async fn name(&mut self, _model: Resource<GpuModel>) -> wasmtime::Result<String> {
        no_such("model")
    }
    async fn family(&mut self, _model: Resource<GpuModel>) -> wasmtime::Result<String> {
        no_such("model")
    }
    async fn embed(
        &mut self,
        _model: Resource<GpuModel>,
        _texts: Vec<String>,
    ) -> Outcome<Vec<Vec<f32>>> {
        no_such("model")
    }
    async fn generate(
        &mut self,
        _model: Resource<GpuModel>,
        _prompt: String,
        _params: GenerateParams,
    ) -> Outcome<String> {
        no_such("model")
    }
    async fn run(
        &mut self,
        _model: Resource<GpuModel>,
        _inputs: Vec<(String, T)>,
    ) -> Outcome<Vec<(String, T)>> {
        no_such("model")
    }
    async fn drop(&mut self, model: Resource<GpuModel>) -> wasmtime::Result<()> {
        self.table.delete(model)?;
        Ok(())
    }
}

impl models::Host for CallState {}
