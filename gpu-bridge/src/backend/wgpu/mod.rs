//! The wgpu backend: WGSL compute shaders on whatever adapter wgpu opens
//! (Vulkan, Metal, DX12 or GL), including a software one such as lavapipe
//! when the caller allows it.
//!
//! Every tensor is one storage buffer. 2-byte dtypes (f16, bf16) are packed
//! two per 32-bit word, because WGSL storage arrays have no 16-bit type
//! without an optional feature; the kernels that write them give each
//! invocation a whole output word so that no two invocations ever write the
//! same word. Arithmetic kernels run in f32 only; data movement and casts
//! handle every dtype.
//!
//! All kernels share one bind group layout (binding 0: a small uniform of
//! parameters, 1: the output, 2–4: inputs, unused ones bound to a dummy
//! buffer), so one pipeline layout serves every pipeline. Pipelines are
//! compiled on first use and cached. Parameters go through a uniform buffer
//! rather than immediates, which need an optional feature.
//!
//! wgpu reports validation, out-of-memory and internal errors asynchronously
//! and panics on uncaught ones by default, so every call that creates or
//! submits work runs inside error scopes and turns what they catch into a
//! [`BridgeError`]; a handler records anything that escapes a scope, and
//! [`Backend::synchronize`] reports it.
//!
//! Layout: `device` (adapter discovery, device setup, error scopes, storage
//! buffers), `pipelines` (shader modules, the pipeline cache, recording and
//! submitting dispatches), `params` (checked parameter packing), then one
//! module per kernel family (`elementwise`, `rows`, `movement`); this
//! module dispatches a [`Kernel`] to its family. Device tests are in
//! `gpu-bridge/tests/all/kernels`.

mod device;
mod elementwise;
mod movement;
mod params;
mod pipelines;
mod rows;

pub use device::{WgpuBackend, WgpuBuffer, WgpuOptions};

use params::{Call, padded_size};

use crate::backend::{Backend, DeviceDescription};
use crate::error::{BridgeError, Result};
use crate::kernel::Kernel;

impl Backend for WgpuBackend {
    type Buffer = WgpuBuffer;

    fn describe(&self) -> DeviceDescription {
        self.description.clone()
    }

    fn alloc(&mut self, bytes: usize) -> Result<WgpuBuffer> {
        Ok(WgpuBuffer {
            buffer: self.create_storage(bytes, "alloc")?,
        })
    }

    fn upload(&mut self, data: &[u8]) -> Result<WgpuBuffer> {
        let buffer = self.create_storage(data.len(), "upload")?;
        if !data.is_empty() {
            self.scoped("upload", |this| {
                if data.len().is_multiple_of(4) {
                    this.queue.write_buffer(&buffer, 0, data);
                } else {
                    // Queue writes must be whole words.
                    let mut padded = Vec::with_capacity(data.len().next_multiple_of(4));
                    padded.extend_from_slice(data);
                    padded.resize(data.len().next_multiple_of(4), 0);
                    this.queue.write_buffer(&buffer, 0, &padded);
                }
                Ok(())
            })?;
        }
        Ok(WgpuBuffer { buffer })
    }

    fn download(&mut self, buffer: &WgpuBuffer, bytes: usize) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = padded_size(bytes)?;
        if size > buffer.size() {
            return Err(BridgeError::invalid(format!(
                "download of {bytes} bytes from a {}-byte buffer",
                buffer.size()
            )));
        }
        let staging = self.scoped("download", |this| {
            let staging = this.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("gust download"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder = this
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("download"),
                });
            encoder.copy_buffer_to_buffer(&buffer.buffer, 0, &staging, 0, size);
            this.queue.submit([encoder.finish()]);
            Ok(staging)
        })?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |result| {
                // The receiver outlives the wait below; a send can only fail if
                // the download already gave up, when nobody needs the result.
                let _ = tx.send(result);
            });
        self.wait()?;
        match rx.try_recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(
                    BridgeError::backend(format!("mapping a download buffer: {e}")).with_source(e),
                );
            }
            Err(_) => {
                return Err(BridgeError::backend(
                    "the wgpu device did not finish a download",
                ));
            }
        }
        let data = {
            let view = staging.slice(..).get_mapped_range().map_err(|e| {
                BridgeError::backend(format!("reading a download buffer: {e}")).with_source(e)
            })?;
            view.get(..bytes)
                .ok_or_else(|| BridgeError::backend("download buffer is shorter than requested"))?
                .to_vec()
        };
        staging.unmap();
        self.take_uncaptured()?;
        Ok(data)
    }

    fn run(
        &mut self,
        kernel: &Kernel,
        inputs: &[&WgpuBuffer],
        output: &mut WgpuBuffer,
    ) -> Result<()> {
        let call = Call {
            name: kernel.name(),
            inputs,
            out: &output.buffer,
        };
        let steps = match kernel {
            Kernel::Attention { .. } | Kernel::CausalAttention { .. } => {
                return Err(BridgeError::unsupported(format!(
                    "{} runs on the cpu backend only; compose it from matmul and softmax",
                    call.name
                )));
            }
            Kernel::Linear { .. }
            | Kernel::SwiGlu { .. }
            | Kernel::Dequantize { .. }
            | Kernel::GatherQuantized { .. } => {
                return Err(BridgeError::unsupported(format!(
                    "{} with quantized or [out, in] weights runs on the cpu backend only",
                    call.name
                )));
            }
            &Kernel::Unary { op, dtype, len } => elementwise::unary(&call, op, dtype, len)?,
            &Kernel::Affine {
                dtype,
                len,
                scale,
                offset,
            } => elementwise::affine(&call, (dtype, len), (scale, offset))?,
            Kernel::Binary {
                op,
                dtype,
                out_shape,
                lhs_strides,
                rhs_strides,
            } => elementwise::binary(&call, (*op, *dtype), (out_shape, lhs_strides, rhs_strides))?,
            Kernel::Matmul {
                dtype,
                m,
                k,
                n,
                lhs_offsets,
                rhs_offsets,
            } => return self.matmul(&call, (*dtype, *m, *k, *n), lhs_offsets, rhs_offsets),
            &Kernel::Reduce {
                op,
                dtype,
                outer,
                len,
                inner,
            } => rows::reduce(&call, (op, dtype), (outer, len, inner))?,
            &Kernel::Softmax {
                dtype,
                outer,
                len,
                inner,
            } => rows::softmax(&call, dtype, (outer, len, inner))?,
            &Kernel::LayerNorm {
                dtype,
                rows,
                cols,
                eps,
                weight,
                bias,
            } => rows::layer_norm(&call, (dtype, rows, cols, eps), (weight, bias))?,
            &Kernel::RmsNorm {
                dtype,
                rows,
                cols,
                eps,
                weight,
            } => rows::rms_norm(&call, (dtype, rows, cols, eps), weight)?,
            Kernel::Permute {
                elem_size,
                in_shape,
                perm,
            } => movement::permute(&call, *elem_size, in_shape, perm)?,
            &Kernel::Slice {
                elem_size,
                outer,
                in_len,
                start,
                len,
                inner,
            } => movement::slice(&call, elem_size, (outer, in_len, start, len, inner))?,
            &Kernel::Gather {
                elem_size,
                index_dtype,
                indices,
                rows,
                row_len,
            } => movement::gather(&call, (elem_size, index_dtype), (indices, rows, row_len))?,
            Kernel::Concat {
                elem_size,
                outer,
                lens,
                inner,
            } => movement::concat(&call, *elem_size, (*outer, lens, *inner))?,
            &Kernel::Cast { from, to, len } => return self.cast(&call, from, to, len),
        };
        self.submit(call.name, call.out, &steps)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.wait()?;
        self.take_uncaptured()
    }
}

#[cfg(test)]
mod tests {
    //! Host-side logic that needs an adapter (lavapipe will do): what the
    //! backend says about it, and the pipeline cache. Kernels are tested
    //! against references in `gpu-bridge/tests/all` (`kernels`).

    use std::sync::{Mutex, MutexGuard, OnceLock};

    use super::device::SOFTWARE_MEMORY_BYTES;
    use super::*;
    use crate::DType;
    use crate::error::ErrorCode;
    use crate::kernel::UnaryOp;

    /// One adapter for the module: opening lavapipe dominates otherwise.
    fn shared() -> Option<MutexGuard<'static, WgpuBackend>> {
        static BACKEND: OnceLock<Option<Mutex<WgpuBackend>>> = OnceLock::new();
        let slot = BACKEND.get_or_init(|| {
            match WgpuBackend::open(&WgpuOptions {
                allow_software: true,
            }) {
                Ok(backend) => Some(Mutex::new(backend)),
                Err(e) => {
                    eprintln!("skipping wgpu tests, no adapter: {e}");
                    None
                }
            }
        });
        slot.as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    #[test]
    fn describes_the_adapter_honestly() {
        let Some(backend) = shared() else {
            return;
        };
        let d = backend.describe();
        assert_eq!(d.kind, crate::BackendKind::Wgpu);
        assert!(!d.name.is_empty());
        assert!(d.memory_bytes > 0);
        eprintln!(
            "largest buffer {} bytes, largest storage binding {} bytes",
            backend.limits.max_buffer_size, backend.limits.max_storage_buffer_binding_size
        );
        if d.name.contains("llvmpipe") || d.name.contains("lavapipe") {
            assert!(!d.is_gpu, "a software rasteriser is not a GPU");
            assert_eq!(d.memory_bytes, SOFTWARE_MEMORY_BYTES);
        }
        if !d.is_gpu {
            let err = WgpuBackend::open(&WgpuOptions::default()).unwrap_err();
            assert_eq!(err.code, ErrorCode::Unsupported);
            assert!(err.message.contains("no GPU adapter"), "{err}");
        }
    }

    #[test]
    fn pipelines_are_compiled_once() {
        let Some(mut backend) = shared() else {
            return;
        };
        let x = [1.0f32, 2.0, 3.0];
        let kernel = Kernel::Unary {
            op: UnaryOp::Relu,
            dtype: DType::F32,
            len: 3,
        };
        let relu = |backend: &mut WgpuBackend| -> Vec<f32> {
            let input = backend.upload(bytemuck::cast_slice(&x)).unwrap();
            let mut out = backend.alloc(12).unwrap();
            backend.run(&kernel, &[&input], &mut out).unwrap();
            bytemuck::pod_collect_to_vec(&backend.download(&out, 12).unwrap())
        };
        relu(&mut backend);
        let compiled = backend.pipelines.len();
        for _ in 0..3 {
            assert_eq!(relu(&mut backend), x);
        }
        assert_eq!(backend.pipelines.len(), compiled);
    }

    #[test]
    fn every_shader_module_starts_with_the_generated_constants() {
        for shader in pipelines::Shader::ALL {
            let source = shader.source();
            assert!(
                source.starts_with(&crate::kernel::wgsl_prelude()),
                "{}",
                shader.label()
            );
        }
    }
}
