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

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::backend::{Backend, BackendKind, DeviceDescription};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::kernel::{BinaryOp, Kernel, MAX_RANK, ReduceOp, UnaryOp};

/// Device memory reported for a software adapter. Its "device memory" is
/// host RAM, and wgpu has no memory query, so this is a fixed budget.
const SOFTWARE_MEMORY_BYTES: u64 = 2 << 30;

/// Cap on the memory reported for a GPU. wgpu has no memory query; the
/// adapter's largest buffer is the best figure it offers, but some drivers
/// report an effectively unlimited size.
const GPU_MEMORY_CAP_BYTES: u64 = 16 << 30;

/// Invocations per workgroup of the one-invocation-per-element kernels; the
/// shaders hard-code the same value.
const ELEMENT_WORKGROUP: u64 = 256;

/// Rows at least this long get a whole workgroup (a tree reduction) instead
/// of one invocation each.
const WORKGROUP_ROW_MIN: usize = 64;

/// Output tile edge of the matmul shader.
const MATMUL_TILE: usize = 64;

/// Which WGSL module a pipeline comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shader {
    Elementwise,
    Matmul,
    Reduce,
    Movement,
    Cast,
}

impl Shader {
    fn source(self) -> &'static str {
        match self {
            Self::Elementwise => include_str!("wgpu/elementwise.wgsl"),
            Self::Matmul => include_str!("wgpu/matmul.wgsl"),
            Self::Reduce => include_str!("wgpu/reduce.wgsl"),
            Self::Movement => include_str!("wgpu/movement.wgsl"),
            Self::Cast => include_str!("wgpu/cast.wgsl"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Elementwise => "gust elementwise",
            Self::Matmul => "gust matmul",
            Self::Reduce => "gust reduce",
            Self::Movement => "gust movement",
            Self::Cast => "gust cast",
        }
    }
}

/// Options for opening a wgpu adapter.
#[derive(Debug, Clone, Default)]
pub struct WgpuOptions {
    /// Accept a software adapter (such as lavapipe) when no GPU is found.
    pub allow_software: bool,
}

/// A tensor's storage on a wgpu device: one storage buffer whose size is the
/// requested byte count rounded up to a multiple of 4 (at least 4).
#[derive(Debug)]
pub struct WgpuBuffer {
    buffer: wgpu::Buffer,
}

impl WgpuBuffer {
    /// The allocated size in bytes.
    pub fn size(&self) -> u64 {
        self.buffer.size()
    }
}

/// One dispatch of a kernel: which entry point, its uniform parameters, up to
/// three inputs, and how many workgroups.
struct Step<'a> {
    shader: Shader,
    entry: &'static str,
    params: Vec<u32>,
    /// `None` binds the dummy buffer (an absent optional operand).
    inputs: Vec<Option<&'a wgpu::Buffer>>,
    workgroups: u64,
}

/// One wgpu device with its queue, layouts and compiled pipelines.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    description: DeviceDescription,
    limits: wgpu::Limits,
    bind_group_layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    modules: HashMap<Shader, wgpu::ShaderModule>,
    pipelines: HashMap<(Shader, &'static str), wgpu::ComputePipeline>,
    /// Bound to input slots a kernel does not use.
    dummy: wgpu::Buffer,
    /// Errors that escaped every error scope (reported by `synchronize`).
    uncaptured: Arc<Mutex<Vec<String>>>,
}

impl fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("description", &self.description)
            .field("pipelines", &self.pipelines.len())
            .finish_non_exhaustive()
    }
}

impl WgpuBackend {
    /// Open the highest-performance adapter wgpu finds.
    ///
    /// A software adapter (lavapipe, WARP, SwiftShader) is accepted only when
    /// `options.allow_software` is set; otherwise finding only one is an
    /// `unsupported` error.
    pub fn open(options: &WgpuOptions) -> Result<Self> {
        if wgpu::Instance::enabled_backend_features().is_empty() {
            return Err(BridgeError::unsupported(
                "wgpu was built without any graphics backend for this platform",
            ));
        }
        let mut instance_desc = wgpu::InstanceDescriptor::new_without_display_handle();
        // Vulkan, Metal and DX12 only: the GL backend has no compute
        // shaders worth using here, and probing it on a headless machine
        // logs EGL driver errors at every start. WGPU_BACKEND and friends
        // still override the choice, as in any wgpu program.
        instance_desc.backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(instance_desc.with_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        }))
        .map_err(|e| BridgeError::unsupported(format!("no wgpu adapter found: {e}")))?;

        let info = adapter.get_info();
        let is_gpu = info.device_type != wgpu::DeviceType::Cpu;
        let name = describe_adapter(&info);
        if !is_gpu && !options.allow_software {
            return Err(BridgeError::unsupported(format!(
                "no GPU adapter found (only the software adapter {name}; allow software adapters to use it)"
            )));
        }
        let downlevel = adapter.get_downlevel_capabilities();
        if !downlevel
            .flags
            .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
        {
            return Err(BridgeError::unsupported(format!(
                "adapter {name} has no compute shaders"
            )));
        }
        let limits = adapter.limits();
        check_limits(&limits, &name)?;

        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("gust-gpu-bridge"),
            required_features: wgpu::Features::empty(),
            // Everything the adapter offers: tensors can be large, and the
            // buffer and binding size limits are what bounds them.
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| BridgeError::backend(format!("cannot open wgpu device on {name}: {e}")))?;

        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            tracing::error!(%error, "uncaptured wgpu error");
            if let Ok(mut errors) = sink.lock() {
                errors.push(error.to_string());
            }
        }));

        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let bind_group_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("gust kernel"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
                storage(1, false),
                storage(2, true),
                storage(3, true),
                storage(4, true),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("gust kernel"),
            bind_group_layouts: &[Some(&bind_group_layout)],
            immediate_size: 0,
        });
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gust unused input"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });

        let memory_bytes = if is_gpu {
            limits.max_buffer_size.min(GPU_MEMORY_CAP_BYTES)
        } else {
            SOFTWARE_MEMORY_BYTES
        };
        Ok(Self {
            device,
            queue,
            description: DeviceDescription {
                kind: BackendKind::Wgpu,
                name,
                is_gpu,
                memory_bytes,
                arithmetic_dtypes: vec![DType::F32],
                fused_attention: false,
            },
            limits,
            bind_group_layout,
            pipeline_layout,
            modules: HashMap::new(),
            pipelines: HashMap::new(),
            dummy,
            uncaptured,
        })
    }

    /// Run `f` inside error scopes and turn what they catch into an error.
    fn scoped<T>(&self, what: &str, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let result = f(self);
        let internal = pollster::block_on(internal.pop());
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        if let Some(error) = oom {
            return Err(BridgeError::new(
                ErrorCode::OutOfMemory,
                format!("{what}: the wgpu device is out of memory: {error}"),
            ));
        }
        if let Some(error) = validation.or(internal) {
            return Err(BridgeError::backend(format!("{what}: {error}")));
        }
        result
    }

    /// Errors recorded outside any scope since the last call.
    fn take_uncaptured(&self) -> Result<()> {
        let errors = match self.uncaptured.lock() {
            Ok(mut errors) => std::mem::take(&mut *errors),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        if errors.is_empty() {
            Ok(())
        } else {
            Err(BridgeError::backend(format!(
                "wgpu reported: {}",
                errors.join("; ")
            )))
        }
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| BridgeError::backend(format!("waiting for the wgpu device: {e}")))?;
        Ok(())
    }

    /// A storage buffer of `bytes` rounded up to 4, after checking it against
    /// the device's limits.
    fn create_storage(&self, bytes: usize, what: &str) -> Result<wgpu::Buffer> {
        let size = padded_size(bytes)?;
        let largest = self
            .limits
            .max_buffer_size
            .min(self.limits.max_storage_buffer_binding_size);
        if size > largest {
            return Err(BridgeError::new(
                ErrorCode::OutOfMemory,
                format!(
                    "{what}: {bytes} bytes exceeds this adapter's largest storage buffer ({largest} bytes)"
                ),
            ));
        }
        self.scoped(what, |this| {
            Ok(this.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }))
        })
    }

    fn pipeline(&mut self, shader: Shader, entry: &'static str) -> Result<wgpu::ComputePipeline> {
        if let Some(pipeline) = self.pipelines.get(&(shader, entry)) {
            return Ok(pipeline.clone());
        }
        let module = match self.modules.get(&shader) {
            Some(module) => module.clone(),
            None => {
                let module = self.scoped(shader.label(), |this| {
                    Ok(this
                        .device
                        .create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(shader.label()),
                            source: wgpu::ShaderSource::Wgsl(shader.source().into()),
                        }))
                })?;
                self.modules.insert(shader, module.clone());
                module
            }
        };
        let pipeline = self.scoped(entry, |this| {
            Ok(this
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&this.pipeline_layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions::default(),
                    cache: None,
                }))
        })?;
        self.pipelines.insert((shader, entry), pipeline.clone());
        Ok(pipeline)
    }

    /// A 2-D grid of `workgroups` workgroups: the shaders number workgroups
    /// as x + y * width, so counts beyond one dimension's limit still fit.
    fn grid(&self, workgroups: u64) -> Result<(u32, u32)> {
        let max = u64::from(self.limits.max_compute_workgroups_per_dimension.max(1));
        let x = workgroups.clamp(1, max);
        let y = workgroups.div_ceil(x).max(1);
        if y > max {
            return Err(BridgeError::unsupported(format!(
                "{workgroups} workgroups exceed this adapter's dispatch limit"
            )));
        }
        Ok((to_u32(x, "workgroups")?, to_u32(y, "workgroups")?))
    }

    /// Record `steps` in one compute pass writing `output`, and submit it.
    fn submit(&mut self, name: &str, output: &wgpu::Buffer, steps: &[Step<'_>]) -> Result<()> {
        let mut prepared = Vec::with_capacity(steps.len());
        for step in steps {
            if step.workgroups == 0 {
                continue;
            }
            let pipeline = self.pipeline(step.shader, step.entry)?;
            prepared.push((step, pipeline, self.grid(step.workgroups)?));
        }
        self.scoped(name, |this| {
            let mut bind_groups = Vec::with_capacity(prepared.len());
            for (step, _, _) in &prepared {
                bind_groups.push(this.bind_group(step, output)?);
            }
            let mut encoder = this
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(name) });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(name),
                    timestamp_writes: None,
                });
                for ((_, pipeline, (x, y)), bind_group) in prepared.iter().zip(&bind_groups) {
                    pass.set_pipeline(pipeline);
                    pass.set_bind_group(0, bind_group, &[]);
                    pass.dispatch_workgroups(*x, *y, 1);
                }
            }
            this.queue.submit([encoder.finish()]);
            Ok(())
        })
    }

    fn bind_group(&self, step: &Step<'_>, output: &wgpu::Buffer) -> Result<wgpu::BindGroup> {
        if step.inputs.len() > 3 {
            return Err(BridgeError::backend(format!(
                "{} binds too many inputs",
                step.entry
            )));
        }
        let mut words = step.params.clone();
        // Uniform structs are sized in 16-byte units.
        words.resize(words.len().div_ceil(4).max(1) * 4, 0);
        let uniform = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gust params"),
            size: (words.len() * 4) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue
            .write_buffer(&uniform, 0, bytemuck::cast_slice(&words));
        let input = |i: usize| step.inputs.get(i).copied().flatten().unwrap_or(&self.dummy);
        Ok(self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(step.entry),
            layout: &self.bind_group_layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: uniform.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: output.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: input(0).as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: input(1).as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: input(2).as_entire_binding(),
                },
            ],
        }))
    }

    /// A temporary storage buffer holding `words` (matmul batch offsets).
    fn table(&self, words: &[u32]) -> Result<wgpu::Buffer> {
        let buffer = self.create_storage(words.len() * 4, "matmul offsets")?;
        self.queue
            .write_buffer(&buffer, 0, bytemuck::cast_slice(words));
        Ok(buffer)
    }

    /// Copy `bytes` (rounded up to 4) from `src` to `dst`.
    fn copy(&self, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: usize) -> Result<()> {
        let size = padded_size(bytes)?.min(src.size()).min(dst.size());
        self.scoped("copy", |this| {
            let mut encoder = this
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            encoder.copy_buffer_to_buffer(src, 0, dst, 0, size);
            this.queue.submit([encoder.finish()]);
            Ok(())
        })
    }
}

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
                return Err(BridgeError::backend(format!(
                    "mapping a download buffer: {e}"
                )));
            }
            Err(_) => {
                return Err(BridgeError::backend(
                    "the wgpu device did not finish a download",
                ));
            }
        }
        let data = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| BridgeError::backend(format!("reading a download buffer: {e}")))?;
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
        let name = kernel.name();
        let input = |i: usize| -> Result<&wgpu::Buffer> {
            inputs
                .get(i)
                .map(|b| &b.buffer)
                .ok_or_else(|| BridgeError::invalid(format!("{name}: missing input {i}")))
        };
        let out = &output.buffer;
        let need_output = |bytes: usize| -> Result<()> {
            if padded_size(bytes)? > out.size() {
                return Err(BridgeError::invalid(format!(
                    "{name}: output buffer of {} bytes is too small for {bytes} bytes",
                    out.size()
                )));
            }
            Ok(())
        };

        let mut steps = Vec::new();
        // Buffers that must outlive the submission.
        let offsets_table: wgpu::Buffer;
        match kernel {
            Kernel::Attention { .. } => {
                return Err(BridgeError::unsupported(format!(
                    "{name} runs on the cpu backend only; compose it from matmul and softmax"
                )));
            }
            Kernel::Unary { op, dtype, len } => {
                require_f32(name, *dtype)?;
                need_output(checked_product(&[*len, 4])?)?;
                let op = match op {
                    UnaryOp::Relu => 0,
                    UnaryOp::Gelu => 1,
                    UnaryOp::Silu => 2,
                    UnaryOp::Tanh => 3,
                    UnaryOp::Exp => 4,
                };
                let mut params = vec![to_u32(*len, "length")?, op];
                params.resize(32, 0);
                steps.push(Step {
                    shader: Shader::Elementwise,
                    entry: "unary",
                    params,
                    inputs: vec![Some(input(0)?)],
                    workgroups: element_groups(*len),
                });
            }
            Kernel::Affine {
                dtype,
                len,
                scale,
                offset,
            } => {
                require_f32(name, *dtype)?;
                need_output(checked_product(&[*len, 4])?)?;
                let mut params = vec![
                    to_u32(*len, "length")?,
                    0,
                    scale.to_bits(),
                    offset.to_bits(),
                ];
                params.resize(32, 0);
                steps.push(Step {
                    shader: Shader::Elementwise,
                    entry: "affine",
                    params,
                    inputs: vec![Some(input(0)?)],
                    workgroups: element_groups(*len),
                });
            }
            Kernel::Binary {
                op,
                dtype,
                out_shape,
                lhs_strides,
                rhs_strides,
            } => {
                require_f32(name, *dtype)?;
                let rank = out_shape.len();
                if rank == 0
                    || rank > MAX_RANK
                    || lhs_strides.len() != rank
                    || rhs_strides.len() != rank
                {
                    return Err(BridgeError::invalid(format!(
                        "{name}: shape and strides must have one rank from 1 to {MAX_RANK}"
                    )));
                }
                let len = checked_product(out_shape)?;
                need_output(checked_product(&[len, 4])?)?;
                let contiguous = contiguous_strides(out_shape);
                let flat = *lhs_strides == contiguous && *rhs_strides == contiguous;
                let op = match op {
                    BinaryOp::Add => 0,
                    BinaryOp::Sub => 1,
                    BinaryOp::Mul => 2,
                    BinaryOp::Div => 3,
                };
                let mut params = vec![
                    to_u32(len, "length")?,
                    op,
                    0,
                    0,
                    rank as u32,
                    u32::from(flat),
                    0,
                    0,
                ];
                params.extend(padded_dims(out_shape, 1)?);
                params.extend(padded_dims(lhs_strides, 0)?);
                params.extend(padded_dims(rhs_strides, 0)?);
                steps.push(Step {
                    shader: Shader::Elementwise,
                    entry: "binary",
                    params,
                    inputs: vec![Some(input(0)?), Some(input(1)?)],
                    workgroups: element_groups(len),
                });
            }
            Kernel::Matmul {
                dtype,
                m,
                k,
                n,
                lhs_offsets,
                rhs_offsets,
            } => {
                require_f32(name, *dtype)?;
                let batch = lhs_offsets.len();
                if batch == 0 || rhs_offsets.len() != batch {
                    return Err(BridgeError::invalid(format!(
                        "{name}: need one lhs and one rhs offset per batch entry"
                    )));
                }
                need_output(checked_product(&[batch, *m, *n, 4])?)?;
                let tiles_m = m.div_ceil(MATMUL_TILE);
                let tiles_n = n.div_ceil(MATMUL_TILE);
                let mut params = vec![
                    to_u32(*m, "m")?,
                    to_u32(*k, "k")?,
                    to_u32(*n, "n")?,
                    to_u32(batch, "batch")?,
                    to_u32(tiles_m, "m")?,
                    to_u32(tiles_n, "n")?,
                ];
                let mut matmul_inputs = vec![Some(input(0)?), Some(input(1)?)];
                match Kernel::uniform_batch_strides(lhs_offsets, rhs_offsets) {
                    Some((lhs_stride, rhs_stride)) => {
                        params.extend([
                            1,
                            0,
                            to_u32(lhs_stride, "batch stride")?,
                            to_u32(rhs_stride, "batch stride")?,
                            to_u32(lhs_offsets.first().copied().unwrap_or(0), "offset")?,
                            to_u32(rhs_offsets.first().copied().unwrap_or(0), "offset")?,
                        ]);
                    }
                    None => {
                        params.extend([0; 6]);
                        let mut words = Vec::with_capacity(batch * 2);
                        for (l, r) in lhs_offsets.iter().zip(rhs_offsets) {
                            words.push(to_u32(*l, "offset")?);
                            words.push(to_u32(*r, "offset")?);
                        }
                        offsets_table = self.table(&words)?;
                        matmul_inputs.push(Some(&offsets_table));
                    }
                }
                steps.push(Step {
                    shader: Shader::Matmul,
                    entry: "matmul",
                    params,
                    inputs: matmul_inputs,
                    workgroups: checked_product(&[tiles_m, tiles_n, batch])? as u64,
                });
            }
            Kernel::Reduce {
                op,
                dtype,
                outer,
                len,
                inner,
            } => {
                require_f32(name, *dtype)?;
                let rows = checked_product(&[*outer, *inner])?;
                need_output(checked_product(&[rows, 4])?)?;
                let op = match op {
                    ReduceOp::Sum => 0,
                    ReduceOp::Mean => 1,
                    ReduceOp::Max => 2,
                    ReduceOp::ArgMax => 3,
                };
                let params = vec![
                    to_u32(rows, "rows")?,
                    to_u32(*len, "length")?,
                    to_u32(*inner, "inner")?,
                    op,
                ];
                steps.push(row_step(
                    "reduce",
                    rows,
                    *len,
                    params,
                    vec![Some(input(0)?)],
                ));
            }
            Kernel::Softmax {
                dtype,
                outer,
                len,
                inner,
            } => {
                require_f32(name, *dtype)?;
                let rows = checked_product(&[*outer, *inner])?;
                need_output(checked_product(&[rows, *len, 4])?)?;
                let params = vec![
                    to_u32(rows, "rows")?,
                    to_u32(*len, "length")?,
                    to_u32(*inner, "inner")?,
                    0,
                ];
                steps.push(row_step(
                    "softmax",
                    rows,
                    *len,
                    params,
                    vec![Some(input(0)?)],
                ));
            }
            Kernel::LayerNorm {
                dtype,
                rows,
                cols,
                eps,
                weight,
                bias,
            } => {
                require_f32(name, *dtype)?;
                need_output(checked_product(&[*rows, *cols, 4])?)?;
                let mut norm_inputs = vec![Some(input(0)?), None, None];
                let mut next = 1;
                let mut flags = 0;
                if *weight {
                    norm_inputs[1] = Some(input(next)?);
                    next += 1;
                    flags |= 1;
                }
                if *bias {
                    norm_inputs[2] = Some(input(next)?);
                    flags |= 2;
                }
                let params = vec![
                    to_u32(*rows, "rows")?,
                    to_u32(*cols, "cols")?,
                    1,
                    0,
                    flags,
                    eps.to_bits(),
                ];
                steps.push(row_step("layer_norm", *rows, *cols, params, norm_inputs));
            }
            Kernel::RmsNorm {
                dtype,
                rows,
                cols,
                eps,
                weight,
            } => {
                require_f32(name, *dtype)?;
                need_output(checked_product(&[*rows, *cols, 4])?)?;
                let mut norm_inputs = vec![Some(input(0)?)];
                let mut flags = 0;
                if *weight {
                    norm_inputs.push(Some(input(1)?));
                    flags |= 1;
                }
                let params = vec![
                    to_u32(*rows, "rows")?,
                    to_u32(*cols, "cols")?,
                    1,
                    0,
                    flags,
                    eps.to_bits(),
                ];
                steps.push(row_step("rms_norm", *rows, *cols, params, norm_inputs));
            }
            Kernel::Permute {
                elem_size,
                in_shape,
                perm,
            } => {
                let rank = in_shape.len();
                if rank == 0 || rank > MAX_RANK || perm.len() != rank {
                    return Err(BridgeError::invalid(format!(
                        "{name}: shape and permutation must have one rank from 1 to {MAX_RANK}"
                    )));
                }
                let in_strides = contiguous_strides(in_shape);
                let mut out_shape = Vec::with_capacity(rank);
                let mut src_strides = Vec::with_capacity(rank);
                for &axis in perm {
                    match (in_shape.get(axis), in_strides.get(axis)) {
                        (Some(&dim), Some(&stride)) => {
                            out_shape.push(dim);
                            src_strides.push(stride);
                        }
                        _ => {
                            return Err(BridgeError::invalid(format!(
                                "{name}: axis {axis} out of range"
                            )));
                        }
                    }
                }
                let len = checked_product(&out_shape)?;
                need_output(checked_product(&[len, *elem_size])?)?;
                let mut params = vec![to_u32(len, "length")?, rank as u32, 0, 0, 0, 0, 0, 0];
                params.extend(padded_dims(&out_shape, 1)?);
                params.extend(padded_dims(&src_strides, 0)?);
                steps.push(movement_step(
                    "permute",
                    *elem_size,
                    len,
                    params,
                    vec![Some(input(0)?)],
                )?);
            }
            Kernel::Slice {
                elem_size,
                outer,
                in_len,
                start,
                len,
                inner,
            } => {
                let total = checked_product(&[*outer, *len, *inner])?;
                need_output(checked_product(&[total, *elem_size])?)?;
                let params = vec![
                    to_u32(total, "length")?,
                    0,
                    to_u32(checked_product(&[*len, *inner])?, "row")?,
                    to_u32(checked_product(&[*in_len, *inner])?, "row")?,
                    to_u32(checked_product(&[*start, *inner])?, "start")?,
                ];
                steps.push(movement_step(
                    "slice",
                    *elem_size,
                    total,
                    params,
                    vec![Some(input(0)?)],
                )?);
            }
            Kernel::Gather {
                elem_size,
                index_dtype,
                indices,
                rows,
                row_len,
            } => {
                let signed = match index_dtype {
                    DType::I32 => 1,
                    DType::U32 => 0,
                    other => {
                        return Err(BridgeError::invalid(format!(
                            "{name}: indices must be i32 or u32, not {other}"
                        )));
                    }
                };
                let total = checked_product(&[*indices, *row_len])?;
                need_output(checked_product(&[total, *elem_size])?)?;
                let params = vec![
                    to_u32(total, "length")?,
                    0,
                    to_u32(*row_len, "row length")?,
                    to_u32(*rows, "rows")?,
                    signed,
                ];
                steps.push(movement_step(
                    "gather",
                    *elem_size,
                    total,
                    params,
                    vec![Some(input(0)?), Some(input(1)?)],
                )?);
            }
            Kernel::Concat {
                elem_size,
                outer,
                lens,
                inner,
            } => {
                if lens.len() != inputs.len() {
                    return Err(BridgeError::invalid(format!(
                        "{name}: {} lengths for {} inputs",
                        lens.len(),
                        inputs.len()
                    )));
                }
                let joined = lens
                    .iter()
                    .try_fold(0usize, |acc, &l| acc.checked_add(l))
                    .ok_or_else(too_large)?;
                let row = checked_product(&[joined, *inner])?;
                need_output(checked_product(&[*outer, row, *elem_size])?)?;
                let mut before = 0usize;
                for (i, &part) in lens.iter().enumerate() {
                    let segment_start = before * inner;
                    before += part;
                    if part == 0 {
                        continue;
                    }
                    let segment = checked_product(&[part, *inner])?;
                    let (entry, threads, per_row) = match *elem_size {
                        4 => ("concat4", checked_product(&[*outer, segment])?, 0),
                        2 => {
                            // Words a row's segment touches: at most half its
                            // elements plus one at each unaligned end.
                            let per_row = segment / 2 + 2;
                            ("concat2", checked_product(&[*outer, per_row])?, per_row)
                        }
                        other => return Err(elem_size_error(name, other)),
                    };
                    let mut params = vec![
                        to_u32(threads, "length")?,
                        0,
                        to_u32(row, "row")?,
                        to_u32(segment_start, "offset")?,
                        to_u32(segment, "segment")?,
                        to_u32(*outer, "outer")?,
                        to_u32(per_row, "segment")?,
                    ];
                    params.resize(24, 0);
                    steps.push(Step {
                        shader: Shader::Movement,
                        entry,
                        params,
                        inputs: vec![Some(input(i)?)],
                        workgroups: element_groups(threads),
                    });
                }
            }
            Kernel::Cast { from, to, len } => {
                need_output(checked_product(&[*len, to.size()])?)?;
                if from == to {
                    return self.copy(input(0)?, out, len * to.size());
                }
                let (entry, threads) = match to.size() {
                    2 => ("cast2", len.div_ceil(2)),
                    _ => ("cast4", *len),
                };
                let params = vec![
                    to_u32(*len, "length")?,
                    dtype_code(*from),
                    dtype_code(*to),
                    0,
                ];
                steps.push(Step {
                    shader: Shader::Cast,
                    entry,
                    params,
                    inputs: vec![Some(input(0)?)],
                    workgroups: element_groups(threads),
                });
            }
        }
        self.submit(name, out, &steps)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.wait()?;
        self.take_uncaptured()
    }
}

/// "name / backend (driver, driver info)" without empty parts.
fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    let mut name = format!("{} / {:?}", info.name, info.backend);
    let driver: Vec<&str> = [info.driver.as_str(), info.driver_info.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if !driver.is_empty() {
        name.push_str(&format!(" ({})", driver.join(", ")));
    }
    name
}

/// The shaders' fixed workgroup shapes and bindings need these.
fn check_limits(limits: &wgpu::Limits, name: &str) -> Result<()> {
    let ok = limits.max_compute_invocations_per_workgroup >= 256
        && limits.max_compute_workgroup_size_x >= 256
        && limits.max_compute_workgroup_size_y >= 16
        && limits.max_compute_workgroup_storage_size >= 8192
        && limits.max_storage_buffers_per_shader_stage >= 4
        && limits.max_bind_groups >= 1;
    if ok {
        Ok(())
    } else {
        Err(BridgeError::unsupported(format!(
            "adapter {name} lacks the compute limits the bridge's shaders need"
        )))
    }
}

fn require_f32(name: &str, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        Ok(())
    } else {
        Err(BridgeError::unsupported(format!(
            "{name} in {dtype} on wgpu: arithmetic kernels run in f32 only on this backend (cast first)"
        )))
    }
}

fn elem_size_error(name: &str, elem_size: usize) -> BridgeError {
    BridgeError::invalid(format!(
        "{name}: element size must be 2 or 4 bytes, not {elem_size}"
    ))
}

fn too_large() -> BridgeError {
    BridgeError::invalid("tensor too large for the wgpu backend's 32-bit indexing")
}

fn too_large_for(what: &str) -> BridgeError {
    BridgeError::invalid(format!(
        "{what} too large for the wgpu backend's 32-bit indexing"
    ))
}

/// Bytes rounded up to a whole number of 4-byte words, and at least one.
fn padded_size(bytes: usize) -> Result<u64> {
    let size = bytes
        .checked_next_multiple_of(4)
        .ok_or_else(too_large)?
        .max(4);
    u64::try_from(size).map_err(|_| too_large())
}

fn to_u32(value: impl TryInto<u32>, what: &str) -> Result<u32> {
    value.try_into().map_err(|_| too_large_for(what))
}

fn checked_product(values: &[usize]) -> Result<usize> {
    values
        .iter()
        .try_fold(1usize, |acc, &v| acc.checked_mul(v))
        .ok_or_else(too_large)
}

fn element_groups(threads: usize) -> u64 {
    (threads as u64).div_ceil(ELEMENT_WORKGROUP)
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// `values` as eight u32s (two uniform vec4s), padded with `fill`.
fn padded_dims(values: &[usize], fill: u32) -> Result<[u32; MAX_RANK]> {
    let mut out = [fill; MAX_RANK];
    for (slot, &v) in out.iter_mut().zip(values) {
        *slot = to_u32(v, "dimension")?;
    }
    Ok(out)
}

fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::I32 => 3,
        DType::U32 => 4,
    }
}

/// A row kernel in its per-invocation or per-workgroup form (see
/// `reduce.wgsl`), with the reduce module's 8-word parameter block.
fn row_step<'a>(
    kernel: &'static str,
    rows: usize,
    len: usize,
    mut params: Vec<u32>,
    inputs: Vec<Option<&'a wgpu::Buffer>>,
) -> Step<'a> {
    params.resize(8, 0);
    let wide = len >= WORKGROUP_ROW_MIN;
    let entry = match (kernel, wide) {
        ("reduce", false) => "reduce_rows",
        ("reduce", true) => "reduce_wg",
        ("softmax", false) => "softmax_rows",
        ("softmax", true) => "softmax_wg",
        ("layer_norm", false) => "layer_norm_rows",
        ("layer_norm", true) => "layer_norm_wg",
        (_, false) => "rms_norm_rows",
        (_, true) => "rms_norm_wg",
    };
    Step {
        shader: Shader::Reduce,
        entry,
        params,
        inputs,
        workgroups: if wide {
            rows as u64
        } else {
            element_groups(rows)
        },
    }
}

/// A permute / slice / gather dispatch for `len` output elements of
/// `elem_size` bytes, with the movement module's 24-word parameter block.
fn movement_step<'a>(
    kernel: &'static str,
    elem_size: usize,
    len: usize,
    mut params: Vec<u32>,
    inputs: Vec<Option<&'a wgpu::Buffer>>,
) -> Result<Step<'a>> {
    params.resize(24, 0);
    let (entry, threads) = match (kernel, elem_size) {
        ("permute", 4) => ("permute4", len),
        ("permute", 2) => ("permute2", len.div_ceil(2)),
        ("slice", 4) => ("slice4", len),
        ("slice", 2) => ("slice2", len.div_ceil(2)),
        ("gather", 4) => ("gather4", len),
        ("gather", 2) => ("gather2", len.div_ceil(2)),
        (_, other) => return Err(elem_size_error(kernel, other)),
    };
    Ok(Step {
        shader: Shader::Movement,
        entry,
        params,
        inputs,
        workgroups: element_groups(threads),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{MutexGuard, OnceLock};

    use half::{bf16, f16};

    use super::*;

    /// One device for the whole module: opening lavapipe and compiling its
    /// pipelines dominates the test time otherwise.
    fn shared() -> Option<MutexGuard<'static, WgpuBackend>> {
        static BACKEND: OnceLock<Option<Mutex<WgpuBackend>>> = OnceLock::new();
        let slot = BACKEND.get_or_init(|| {
            match WgpuBackend::open(&WgpuOptions {
                allow_software: true,
            }) {
                Ok(backend) => {
                    eprintln!("wgpu tests run on: {:?}", backend.describe());
                    Some(Mutex::new(backend))
                }
                Err(e) => {
                    eprintln!("skipping wgpu tests, no adapter: {e}");
                    None
                }
            }
        });
        slot.as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    macro_rules! backend {
        () => {
            match shared() {
                Some(backend) => backend,
                None => return,
            }
        };
    }

    type Reference1 = fn(f64) -> f64;
    type Reference2 = fn(f64, f64) -> f64;

    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            let unit = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * unit
        }

        fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..n).map(|_| self.uniform(lo, hi)).collect()
        }

        fn halves(&mut self, n: usize) -> Vec<u16> {
            (0..n).map(|_| self.next() as u16).collect()
        }

        fn words(&mut self, n: usize) -> Vec<u32> {
            (0..n).map(|_| self.next() as u32).collect()
        }
    }

    /// Runs `kernel` on byte inputs; the output starts as all-ones bytes
    /// (NaN for every float type) so that unwritten elements show.
    fn run_raw(
        backend: &mut WgpuBackend,
        kernel: &Kernel,
        inputs: &[Vec<u8>],
        out_bytes: usize,
    ) -> Vec<u8> {
        let buffers: Vec<WgpuBuffer> = inputs.iter().map(|d| backend.upload(d).unwrap()).collect();
        let refs: Vec<&WgpuBuffer> = buffers.iter().collect();
        let mut out = backend.upload(&vec![0xFF; out_bytes]).unwrap();
        backend.run(kernel, &refs, &mut out).unwrap();
        backend.download(&out, out_bytes).unwrap()
    }

    fn run_f32(
        backend: &mut WgpuBackend,
        kernel: &Kernel,
        inputs: &[&[f32]],
        out_len: usize,
    ) -> Vec<f32> {
        let inputs: Vec<Vec<u8>> = inputs
            .iter()
            .map(|v| bytemuck::cast_slice(v).to_vec())
            .collect();
        let out = run_raw(backend, kernel, &inputs, out_len * 4);
        bytemuck::pod_collect_to_vec(&out)
    }

    fn run_u16(
        backend: &mut WgpuBackend,
        kernel: &Kernel,
        inputs: &[Vec<u8>],
        out_len: usize,
    ) -> Vec<u16> {
        let out = run_raw(backend, kernel, inputs, out_len * 2);
        bytemuck::pod_collect_to_vec(&out)
    }

    fn run_u32(
        backend: &mut WgpuBackend,
        kernel: &Kernel,
        inputs: &[Vec<u8>],
        out_len: usize,
    ) -> Vec<u32> {
        let out = run_raw(backend, kernel, inputs, out_len * 4);
        bytemuck::pod_collect_to_vec(&out)
    }

    fn bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[track_caller]
    fn assert_close(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let mut err = 0.0;
        let mut norm = 0.0;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(g.is_finite(), "{what}: element {i} is {g}, want {w}");
            err += (f64::from(g) - w).powi(2);
            norm += w * w;
        }
        let rel = err.sqrt() / norm.sqrt().max(1e-30);
        assert!(rel <= 1e-5, "{what}: relative error {rel:e}");
    }

    fn erf(x: f64) -> f64 {
        // Maclaurin series: plenty of f64 precision for |x| < 4.
        let mut term = x;
        let mut sum = x;
        let mut n = 0.0;
        while term.abs() > 1e-20 * sum.abs().max(1e-300) && n < 400.0 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn strides_of(shape: &[usize]) -> Vec<usize> {
        contiguous_strides(shape)
    }

    /// Multi-index of flat `i` in `shape`, dotted with `strides`.
    fn strided(i: usize, shape: &[usize], strides: &[usize]) -> usize {
        let mut rem = i;
        let mut at = 0;
        for d in (0..shape.len()).rev() {
            at += (rem % shape[d]) * strides[d];
            rem /= shape[d];
        }
        at
    }

    #[test]
    fn describes_the_adapter_honestly() {
        let backend = backend!();
        let d = backend.describe();
        assert_eq!(d.kind, BackendKind::Wgpu);
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
    fn upload_download_round_trip() {
        let mut backend = backend!();
        let mut rng = Rng::new(1);
        for n in [0usize, 1, 3, 4, 7, 1027] {
            let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let buffer = backend.upload(&data).unwrap();
            assert!(buffer.size() >= 4 && buffer.size() % 4 == 0);
            assert_eq!(backend.download(&buffer, n).unwrap(), data);
        }
        let buffer = backend.alloc(10).unwrap();
        assert_eq!(buffer.size(), 12);
        assert_eq!(backend.download(&buffer, 10).unwrap().len(), 10);
        let err = backend.download(&buffer, 13).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        // Buffers may be dropped on any thread.
        std::thread::spawn(move || drop(buffer)).join().unwrap();
        backend.synchronize().unwrap();
    }

    #[test]
    fn unary_and_affine() {
        let mut backend = backend!();
        let mut rng = Rng::new(2);
        let wide = rng.vec(1031, -5.0, 5.0);
        let narrow = rng.vec(257, -0.01, 0.01);
        let ops: [(UnaryOp, Reference1); 5] = [
            (UnaryOp::Relu, |x| x.max(0.0)),
            (UnaryOp::Gelu, |x| {
                0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
            }),
            (UnaryOp::Silu, |x| x / (1.0 + (-x).exp())),
            (UnaryOp::Tanh, f64::tanh),
            (UnaryOp::Exp, f64::exp),
        ];
        for (op, reference) in ops {
            for x in [&wide, &narrow] {
                let kernel = Kernel::Unary {
                    op,
                    dtype: DType::F32,
                    len: x.len(),
                };
                let got = run_f32(&mut backend, &kernel, &[x], x.len());
                let want: Vec<f64> = x.iter().map(|&v| reference(f64::from(v))).collect();
                assert_close(&format!("{op:?} on {} values", x.len()), &got, &want);
            }
        }
        // Large arguments must saturate, not turn into NaN.
        let big = [-100.0f32, -30.0, 30.0, 100.0];
        let kernel = Kernel::Unary {
            op: UnaryOp::Tanh,
            dtype: DType::F32,
            len: 4,
        };
        assert_eq!(
            run_f32(&mut backend, &kernel, &[&big], 4),
            [-1.0, -1.0, 1.0, 1.0]
        );
        let kernel = Kernel::Unary {
            op: UnaryOp::Gelu,
            dtype: DType::F32,
            len: 4,
        };
        assert_eq!(
            run_f32(&mut backend, &kernel, &[&big], 4),
            [-0.0, -0.0, 30.0, 100.0]
        );

        let kernel = Kernel::Affine {
            dtype: DType::F32,
            len: wide.len(),
            scale: -1.5,
            offset: 0.25,
        };
        let got = run_f32(&mut backend, &kernel, &[&wide], wide.len());
        let want: Vec<f64> = wide.iter().map(|&v| f64::from(v) * -1.5 + 0.25).collect();
        assert_close("affine", &got, &want);
    }

    #[test]
    fn binary_with_broadcasting() {
        let mut backend = backend!();
        let mut rng = Rng::new(3);
        // (out shape, lhs shape-as-strides, rhs strides, lhs len, rhs len)
        let cases: Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> = vec![
            (vec![7, 13], strides_of(&[7, 13]), strides_of(&[7, 13])),
            (vec![3, 4, 5], strides_of(&[3, 4, 5]), vec![0, 1, 0]),
            (vec![2, 3], vec![0, 0], strides_of(&[2, 3])),
            // lhs is a transposed [3, 2] view.
            (vec![2, 3], vec![1, 2], vec![3, 1]),
            (vec![1], vec![0], vec![0]),
            (
                vec![2, 1, 3, 1, 2, 2, 1, 3],
                strides_of(&[2, 1, 3, 1, 2, 2, 1, 3]),
                vec![0, 0, 2, 0, 1, 0, 0, 0],
            ),
        ];
        let ops: [(BinaryOp, Reference2); 4] = [
            (BinaryOp::Add, |a, b| a + b),
            (BinaryOp::Sub, |a, b| a - b),
            (BinaryOp::Mul, |a, b| a * b),
            (BinaryOp::Div, |a, b| a / b),
        ];
        for (out_shape, lhs_strides, rhs_strides) in cases {
            let len: usize = out_shape.iter().product();
            let extent = |strides: &[usize]| {
                1 + out_shape
                    .iter()
                    .zip(strides)
                    .map(|(n, s)| (n - 1) * s)
                    .sum::<usize>()
            };
            let lhs = rng.vec(extent(&lhs_strides), -3.0, 3.0);
            let rhs: Vec<f32> = rng
                .vec(extent(&rhs_strides), 0.5, 2.0)
                .into_iter()
                .map(|v| if rng.next().is_multiple_of(2) { v } else { -v })
                .collect();
            for (op, reference) in ops {
                let kernel = Kernel::Binary {
                    op,
                    dtype: DType::F32,
                    out_shape: out_shape.clone(),
                    lhs_strides: lhs_strides.clone(),
                    rhs_strides: rhs_strides.clone(),
                };
                let got = run_f32(&mut backend, &kernel, &[&lhs, &rhs], len);
                let want: Vec<f64> = (0..len)
                    .map(|i| {
                        let a = lhs[strided(i, &out_shape, &lhs_strides)];
                        let b = rhs[strided(i, &out_shape, &rhs_strides)];
                        reference(f64::from(a), f64::from(b))
                    })
                    .collect();
                assert_close(&format!("{op:?} {out_shape:?}"), &got, &want);
            }
        }
    }

    #[test]
    fn matmul_batched_and_odd_sizes() {
        let mut backend = backend!();
        let mut rng = Rng::new(4);
        let (m, k, n) = (33, 17, 65);
        let (mk, kn) = (m * k, k * n);
        // (m, k, n, lhs offsets, rhs offsets, lhs len, rhs len)
        let cases = vec![
            (m, k, n, vec![0, mk, 2 * mk], vec![0, 0, 0], 3 * mk, kn),
            (
                m,
                k,
                n,
                vec![2 * mk, 0, mk],
                vec![kn, 0, kn],
                3 * mk,
                2 * kn,
            ),
            (m, k, n, vec![mk, 2 * mk], vec![0, kn], 3 * mk, 2 * kn),
            (1, 1, 1, vec![0], vec![0], 1, 1),
            (64, 64, 64, vec![0], vec![0], 64 * 64, 64 * 64),
            (130, 3, 1, vec![0], vec![0], 390, 3),
            (2, 0, 3, vec![0], vec![0], 0, 0),
        ];
        for (m, k, n, lhs_offsets, rhs_offsets, lhs_len, rhs_len) in cases {
            let lhs = rng.vec(lhs_len, -1.0, 1.0);
            let rhs = rng.vec(rhs_len, -1.0, 1.0);
            let batch = lhs_offsets.len();
            let kernel = Kernel::Matmul {
                dtype: DType::F32,
                m,
                k,
                n,
                lhs_offsets: lhs_offsets.clone(),
                rhs_offsets: rhs_offsets.clone(),
            };
            let got = run_f32(&mut backend, &kernel, &[&lhs, &rhs], batch * m * n);
            let mut want = vec![0.0f64; batch * m * n];
            for b in 0..batch {
                for i in 0..m {
                    for j in 0..n {
                        want[b * m * n + i * n + j] = (0..k)
                            .map(|p| {
                                f64::from(lhs[lhs_offsets[b] + i * k + p])
                                    * f64::from(rhs[rhs_offsets[b] + p * n + j])
                            })
                            .sum();
                    }
                }
            }
            if k == 0 {
                assert!(got.iter().all(|&v| v == 0.0), "k = 0 gives zeros");
            } else {
                assert_close(
                    &format!("matmul {m}x{k}x{n} offsets {lhs_offsets:?} {rhs_offsets:?}"),
                    &got,
                    &want,
                );
            }
        }
    }

    #[test]
    fn reductions() {
        let mut backend = backend!();
        let mut rng = Rng::new(5);
        for (outer, len, inner) in [(3, 5, 7), (2, 300, 3), (1, 1, 1), (4, 64, 1), (1, 63, 2)] {
            // Quarter steps make ties likely, to check "first maximum".
            let x: Vec<f32> = rng
                .vec(outer * len * inner, -2.0, 2.0)
                .into_iter()
                .map(|v| (v * 4.0).round() / 4.0)
                .collect();
            let rows = outer * inner;
            let row = |r: usize| -> Vec<f32> {
                let (o, i) = (r / inner, r % inner);
                (0..len).map(|j| x[(o * len + j) * inner + i]).collect()
            };
            for op in [
                ReduceOp::Sum,
                ReduceOp::Mean,
                ReduceOp::Max,
                ReduceOp::ArgMax,
            ] {
                let kernel = Kernel::Reduce {
                    op,
                    dtype: DType::F32,
                    outer,
                    len,
                    inner,
                };
                let what = format!("{op:?} [{outer}, {len}, {inner}]");
                match op {
                    ReduceOp::ArgMax => {
                        let got = run_u32(&mut backend, &kernel, &[bytes(&x)], rows);
                        let want: Vec<u32> = (0..rows)
                            .map(|r| {
                                let v = row(r);
                                let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                                v.iter().position(|&e| e == max).unwrap() as u32
                            })
                            .collect();
                        assert_eq!(got, want, "{what}");
                    }
                    ReduceOp::Max => {
                        let got = run_f32(&mut backend, &kernel, &[&x], rows);
                        let want: Vec<f32> = (0..rows)
                            .map(|r| row(r).into_iter().fold(f32::NEG_INFINITY, f32::max))
                            .collect();
                        assert_eq!(got, want, "{what}");
                    }
                    _ => {
                        let got = run_f32(&mut backend, &kernel, &[&x], rows);
                        let want: Vec<f64> = (0..rows)
                            .map(|r| {
                                let s: f64 = row(r).iter().map(|&v| f64::from(v)).sum();
                                if op == ReduceOp::Mean {
                                    s / len as f64
                                } else {
                                    s
                                }
                            })
                            .collect();
                        assert_close(&what, &got, &want);
                    }
                }
            }
        }
    }

    #[test]
    fn max_and_argmax_see_nan() {
        let mut backend = backend!();
        for len in [5usize, 100] {
            let mut x = vec![1.0f32; len];
            x[len / 2] = 7.0;
            x[3] = f32::NAN;
            let kernel = |op| Kernel::Reduce {
                op,
                dtype: DType::F32,
                outer: 1,
                len,
                inner: 1,
            };
            assert!(run_f32(&mut backend, &kernel(ReduceOp::Max), &[&x], 1)[0].is_nan());
            assert_eq!(
                run_u32(&mut backend, &kernel(ReduceOp::ArgMax), &[bytes(&x)], 1),
                [3]
            );
        }
    }

    #[test]
    fn softmax_rows() {
        let mut backend = backend!();
        let mut rng = Rng::new(6);
        for (outer, len, inner) in [(3, 5, 7), (2, 300, 3), (5, 1, 1), (1, 64, 1)] {
            let x = rng.vec(outer * len * inner, -8.0, 8.0);
            let kernel = Kernel::Softmax {
                dtype: DType::F32,
                outer,
                len,
                inner,
            };
            let got = run_f32(&mut backend, &kernel, &[&x], x.len());
            let mut want = vec![0.0; x.len()];
            for o in 0..outer {
                for i in 0..inner {
                    let at = |j: usize| (o * len + j) * inner + i;
                    let max = (0..len)
                        .map(|j| f64::from(x[at(j)]))
                        .fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = (0..len).map(|j| (f64::from(x[at(j)]) - max).exp()).sum();
                    for j in 0..len {
                        want[at(j)] = (f64::from(x[at(j)]) - max).exp() / sum;
                    }
                }
            }
            assert_close(&format!("softmax [{outer}, {len}, {inner}]"), &got, &want);
        }
    }

    #[test]
    fn layer_and_rms_norm() {
        let mut backend = backend!();
        let mut rng = Rng::new(7);
        for (rows, cols) in [(5, 7), (3, 500), (2, 1), (4, 64)] {
            let x: Vec<f32> = rng
                .vec(rows * cols, -2.0, 2.0)
                .into_iter()
                .map(|v| v + 3.0)
                .collect();
            let w = rng.vec(cols, 0.5, 1.5);
            let b = rng.vec(cols, -1.0, 1.0);
            let eps = 1e-5f32;
            for (has_w, has_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let kernel = Kernel::LayerNorm {
                    dtype: DType::F32,
                    rows,
                    cols,
                    eps,
                    weight: has_w,
                    bias: has_b,
                };
                let mut inputs: Vec<&[f32]> = vec![&x];
                if has_w {
                    inputs.push(&w);
                }
                if has_b {
                    inputs.push(&b);
                }
                let got = run_f32(&mut backend, &kernel, &inputs, x.len());
                let mut want = vec![0.0; x.len()];
                for r in 0..rows {
                    let v: Vec<f64> = x[r * cols..(r + 1) * cols]
                        .iter()
                        .map(|&e| f64::from(e))
                        .collect();
                    let mean = v.iter().sum::<f64>() / cols as f64;
                    let var = v.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / cols as f64;
                    for c in 0..cols {
                        let mut y = (v[c] - mean) / (var + f64::from(eps)).sqrt();
                        if has_w {
                            y *= f64::from(w[c]);
                        }
                        if has_b {
                            y += f64::from(b[c]);
                        }
                        want[r * cols + c] = y;
                    }
                }
                assert_close(
                    &format!("layer norm {rows}x{cols} w={has_w} b={has_b}"),
                    &got,
                    &want,
                );
            }
            for has_w in [false, true] {
                let kernel = Kernel::RmsNorm {
                    dtype: DType::F32,
                    rows,
                    cols,
                    eps,
                    weight: has_w,
                };
                let inputs: Vec<&[f32]> = if has_w { vec![&x, &w] } else { vec![&x] };
                let got = run_f32(&mut backend, &kernel, &inputs, x.len());
                let mut want = vec![0.0; x.len()];
                for r in 0..rows {
                    let v: Vec<f64> = x[r * cols..(r + 1) * cols]
                        .iter()
                        .map(|&e| f64::from(e))
                        .collect();
                    let ms = v.iter().map(|e| e * e).sum::<f64>() / cols as f64;
                    for c in 0..cols {
                        let scale = if has_w { f64::from(w[c]) } else { 1.0 };
                        want[r * cols + c] = v[c] / (ms + f64::from(eps)).sqrt() * scale;
                    }
                }
                assert_close(&format!("rms norm {rows}x{cols} w={has_w}"), &got, &want);
            }
        }
    }

    /// Runs a movement kernel on 4-byte and on 2-byte random data and checks
    /// it against `reference`, which maps an output index to a source index
    /// (`None`: zero).
    fn check_movement(
        backend: &mut WgpuBackend,
        what: &str,
        kernel: impl Fn(usize) -> Kernel,
        src_len: usize,
        out_len: usize,
        extra: &[Vec<u8>],
        reference: impl Fn(usize) -> Option<usize>,
    ) {
        let mut rng = Rng::new(src_len as u64 + 11);
        let words = rng.words(src_len);
        let mut inputs = vec![bytes(&words)];
        inputs.extend_from_slice(extra);
        let got = run_u32(backend, &kernel(4), &inputs, out_len);
        let want: Vec<u32> = (0..out_len)
            .map(|e| reference(e).map_or(0, |s| words[s]))
            .collect();
        assert_eq!(got, want, "{what}, 4-byte");

        let halves = rng.halves(src_len);
        let mut inputs = vec![bytes(&halves)];
        inputs.extend_from_slice(extra);
        let got = run_u16(backend, &kernel(2), &inputs, out_len);
        let want: Vec<u16> = (0..out_len)
            .map(|e| reference(e).map_or(0, |s| halves[s]))
            .collect();
        assert_eq!(got, want, "{what}, 2-byte");
    }

    #[test]
    fn permute() {
        let mut backend = backend!();
        let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![3, 5, 7], vec![2, 0, 1]),
            (vec![2, 3, 1, 5], vec![3, 1, 0, 2]),
            (vec![2, 1, 3, 1, 2, 1, 1, 3], vec![7, 6, 5, 4, 3, 2, 1, 0]),
            (vec![1, 1], vec![1, 0]),
            (vec![5, 3], vec![0, 1]),
        ];
        for (in_shape, perm) in cases {
            let len: usize = in_shape.iter().product();
            let out_shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
            let in_strides = strides_of(&in_shape);
            let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
            check_movement(
                &mut backend,
                &format!("permute {in_shape:?} by {perm:?}"),
                |elem_size| Kernel::Permute {
                    elem_size,
                    in_shape: in_shape.clone(),
                    perm: perm.clone(),
                },
                len,
                len,
                &[],
                |e| Some(strided(e, &out_shape, &src_strides)),
            );
        }
    }

    #[test]
    fn slice() {
        let mut backend = backend!();
        for (outer, in_len, start, len, inner) in [
            (3, 7, 2, 3, 5),
            (1, 9, 0, 9, 1),
            (5, 4, 3, 1, 1),
            (3, 3, 1, 1, 1),
        ] {
            check_movement(
                &mut backend,
                &format!("slice [{outer}, {in_len}, {inner}] from {start} take {len}"),
                |elem_size| Kernel::Slice {
                    elem_size,
                    outer,
                    in_len,
                    start,
                    len,
                    inner,
                },
                outer * in_len * inner,
                outer * len * inner,
                &[],
                |e| {
                    let (o, rem) = (e / (len * inner), e % (len * inner));
                    Some(o * in_len * inner + start * inner + rem)
                },
            );
        }
    }

    #[test]
    fn gather() {
        let mut backend = backend!();
        let rows = 4;
        let row_len = 3;
        let signed = [2i32, -1, 0, 5, 1, 2, i32::MIN];
        let unsigned = [3u32, 0, u32::MAX, 4, 1];
        let cases: Vec<(DType, Vec<u8>, Vec<Option<usize>>)> = vec![
            (
                DType::I32,
                bytes(&signed),
                signed
                    .iter()
                    .map(|&i| usize::try_from(i).ok().filter(|&i| i < rows))
                    .collect(),
            ),
            (
                DType::U32,
                bytes(&unsigned),
                unsigned
                    .iter()
                    .map(|&i| Some(i as usize).filter(|&i| i < rows))
                    .collect(),
            ),
        ];
        for (index_dtype, index_bytes, picked) in cases {
            let indices = picked.len();
            check_movement(
                &mut backend,
                &format!("gather by {index_dtype}"),
                |elem_size| Kernel::Gather {
                    elem_size,
                    index_dtype,
                    indices,
                    rows,
                    row_len,
                },
                rows * row_len,
                indices * row_len,
                std::slice::from_ref(&index_bytes),
                |e| picked[e / row_len].map(|r| r * row_len + e % row_len),
            );
        }
    }

    #[test]
    fn concat() {
        let mut backend = backend!();
        let mut rng = Rng::new(8);
        let cases: Vec<(usize, Vec<usize>, usize)> = vec![
            (3, vec![3, 0, 2, 5], 1),
            (2, vec![1, 1, 1], 3),
            (3, vec![0, 5, 0], 1),
            (4, vec![1, 2], 1),
            (1, vec![1], 1),
            (5, vec![1, 1], 1),
            (3, vec![2, 3, 1], 3),
        ];
        for (outer, lens, inner) in cases {
            let total: usize = lens.iter().sum();
            let out_len = outer * total * inner;
            let kernel = |elem_size| Kernel::Concat {
                elem_size,
                outer,
                lens: lens.clone(),
                inner,
            };
            // Output element -> (input, index in it).
            let source = |e: usize| {
                let (o, rem) = (e / (total * inner), e % (total * inner));
                let (j, i) = (rem / inner, rem % inner);
                let mut before = 0;
                for (p, &l) in lens.iter().enumerate() {
                    if j < before + l {
                        return (p, (o * l + j - before) * inner + i);
                    }
                    before += l;
                }
                unreachable!()
            };
            let words: Vec<Vec<u32>> = lens.iter().map(|&l| rng.words(outer * l * inner)).collect();
            let got = run_u32(
                &mut backend,
                &kernel(4),
                &words.iter().map(|w| bytes(w)).collect::<Vec<_>>(),
                out_len,
            );
            let want: Vec<u32> = (0..out_len)
                .map(|e| {
                    let (p, s) = source(e);
                    words[p][s]
                })
                .collect();
            assert_eq!(
                got, want,
                "concat {lens:?} outer {outer} inner {inner}, 4-byte"
            );

            let halves: Vec<Vec<u16>> = lens
                .iter()
                .map(|&l| rng.halves(outer * l * inner))
                .collect();
            let got = run_u16(
                &mut backend,
                &kernel(2),
                &halves.iter().map(|h| bytes(h)).collect::<Vec<_>>(),
                out_len,
            );
            let want: Vec<u16> = (0..out_len)
                .map(|e| {
                    let (p, s) = source(e);
                    halves[p][s]
                })
                .collect();
            assert_eq!(
                got, want,
                "concat {lens:?} outer {outer} inner {inner}, 2-byte"
            );
        }
    }

    fn encode(dtype: DType, values: &[f64], ints: &[i64]) -> Vec<u8> {
        match dtype {
            DType::F32 => bytes(&values.iter().map(|&v| v as f32).collect::<Vec<_>>()),
            DType::F16 => bytes(
                &values
                    .iter()
                    .map(|&v| f16::from_f64_const(v).to_bits())
                    .collect::<Vec<_>>(),
            ),
            DType::BF16 => bytes(
                &values
                    .iter()
                    .map(|&v| bf16::from_f64_const(v).to_bits())
                    .collect::<Vec<_>>(),
            ),
            DType::I32 => bytes(&ints.iter().map(|&v| v as i32).collect::<Vec<_>>()),
            DType::U32 => bytes(&ints.iter().map(|&v| v as u32).collect::<Vec<_>>()),
        }
    }

    /// Element `i` of `data` as the value a cast starts from: float types
    /// widened to f64 exactly, integers exactly.
    fn decode(dtype: DType, data: &[u8]) -> Vec<f64> {
        crate::dtype::bytes_to_f64(dtype, data).unwrap()
    }

    /// The f16 / bf16 nearest to the integer `v`, ties to even, chosen by
    /// comparing exact distances: `half`'s f64 conversions drop low mantissa
    /// bits before rounding, and going through f32 rounds twice, so neither
    /// is a correct reference for large integers.
    fn nearest_half(v: f64, to: DType) -> u32 {
        let decode = |bits: u16| match to {
            DType::F16 => f16::from_bits(bits).to_f64(),
            _ => bf16::from_bits(bits).to_f64(),
        };
        if to == DType::F16 && v.abs() >= 65520.0 {
            return u32::from(f16::from_f64(v.signum() * f64::INFINITY).to_bits());
        }
        let start = match to {
            DType::F16 => f16::from_f64_const(v).to_bits(),
            _ => bf16::from_f64_const(v).to_bits(),
        };
        let mut best = start;
        for candidate in [start.wrapping_sub(1), start.wrapping_add(1)] {
            let c = decode(candidate);
            if c.is_nan() || c.is_infinite() || (v != 0.0 && c.signum() != v.signum()) {
                continue;
            }
            let (dc, db) = ((c - v).abs(), (decode(best) - v).abs());
            if dc < db || (dc == db && candidate % 2 == 0) {
                best = candidate;
            }
        }
        u32::from(best)
    }

    /// The bit pattern Rust's `as` / the `half` crate give for the exact
    /// value `v` cast to `to`, as u32 (integers to f16 / bf16: correctly
    /// rounded).
    fn expected_bits(v: f64, from: DType, to: DType) -> u32 {
        let from_int = !from.is_float();
        match to {
            DType::F32 => (v as f32).to_bits(),
            DType::F16 => {
                if from_int {
                    nearest_half(v, to)
                } else {
                    u32::from(f16::from_f32(v as f32).to_bits())
                }
            }
            DType::BF16 => {
                if from_int {
                    nearest_half(v, to)
                } else {
                    u32::from(bf16::from_f32(v as f32).to_bits())
                }
            }
            // Saturating from the exact value, integers included (-1 → 0u).
            DType::I32 => (v as i32).cast_unsigned(),
            DType::U32 => v as u32,
        }
    }

    #[test]
    fn casts_between_every_dtype() {
        let mut backend = backend!();
        let floats = [
            0.0,
            -0.0,
            1.0,
            -1.5,
            2.5,
            -2.5,
            0.49999997,
            1e-3,
            3.3e-5,
            6.0e-8,
            1e-40,
            -7.9,
            65504.0,
            65519.0,
            65520.0,
            1e6,
            -3.0e9,
            2147483520.0,
            2147483648.0,
            -2147483648.0,
            4294967040.0,
            4294967296.0,
            1.0e30,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            123.456,
            -0.3,
            1.00048828125,
            1.0009765625,
        ];
        let ints: [i64; 30] = [
            0,
            1,
            -1,
            7,
            -8,
            255,
            256,
            257,
            65504,
            65519,
            65520,
            65536,
            16_777_217,
            -16_777_217,
            (1 << 25) + (1 << 17) + 1,
            (1 << 25) + (1 << 17),
            (1 << 24) + 3,
            i32::MAX as i64,
            i32::MIN as i64,
            0x7fff_ff80,
            0x8000_0000,
            0xffff_ffff,
            0xffff_ff7f,
            0xc000_0001,
            123_456_789,
            -123_456_789,
            1 << 30,
            3,
            -3,
            100,
        ];
        for from in DType::ALL {
            // Odd counts exercise the half-filled last word of 2-byte data.
            let count = if from.size() == 2 { 29 } else { 30 };
            let input = encode(from, &floats[..count], &ints[..count]);
            let values = decode(from, &input);
            for to in DType::ALL {
                if to == from {
                    continue;
                }
                let kernel = Kernel::Cast {
                    from,
                    to,
                    len: count,
                };
                let out = run_raw(
                    &mut backend,
                    &kernel,
                    std::slice::from_ref(&input),
                    count * to.size(),
                );
                let got: Vec<u32> = if to.size() == 2 {
                    out.chunks_exact(2)
                        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                        .collect()
                } else {
                    bytemuck::pod_collect_to_vec(&out)
                };
                for (i, &v) in values.iter().enumerate() {
                    let want = expected_bits(v, from, to);
                    let is_nan = |bits: u32| match to {
                        DType::F32 => f32::from_bits(bits).is_nan(),
                        DType::F16 => f16::from_bits(bits as u16).is_nan(),
                        DType::BF16 => bf16::from_bits(bits as u16).is_nan(),
                        _ => false,
                    };
                    if is_nan(want) {
                        assert!(
                            is_nan(got[i]),
                            "{from} -> {to}: {v} gave {:#x}, want NaN",
                            got[i]
                        );
                    } else {
                        assert_eq!(
                            got[i], want,
                            "{from} -> {to}: element {i} ({v}) gave {:#x}, want {want:#x}",
                            got[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn more_than_65535_workgroups() {
        let mut backend = backend!();
        // 65537 workgroups of 256: needs the second grid dimension.
        let len = 256 * 65536 + 5;
        let x: Vec<f32> = (0..len).map(|i| (i % 1000) as f32).collect();
        let kernel = Kernel::Affine {
            dtype: DType::F32,
            len,
            scale: 2.0,
            offset: 1.0,
        };
        let got = run_f32(&mut backend, &kernel, &[&x], len);
        let bad = got
            .iter()
            .enumerate()
            .find(|&(i, &v)| v != (i % 1000) as f32 * 2.0 + 1.0);
        assert_eq!(bad, None);

        // 70000 rows of one workgroup each.
        let (rows, len) = (70_000, 64);
        let x: Vec<f32> = (0..rows * len).map(|i| (i % 7) as f32).collect();
        let kernel = Kernel::Reduce {
            op: ReduceOp::Sum,
            dtype: DType::F32,
            outer: rows,
            len,
            inner: 1,
        };
        let got = run_f32(&mut backend, &kernel, &[&x], rows);
        let bad = got.iter().enumerate().find(|&(r, &v)| {
            let want: usize = (r * len..(r + 1) * len).map(|i| i % 7).sum();
            v != want as f32
        });
        assert_eq!(bad, None);
    }

    #[test]
    fn half_precision_arithmetic_is_unsupported() {
        let mut backend = backend!();
        let x = backend.upload(&[0; 8]).unwrap();
        let mut out = backend.alloc(8).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let kernel = Kernel::Unary {
                op: UnaryOp::Exp,
                dtype,
                len: 4,
            };
            let err = backend.run(&kernel, &[&x], &mut out).unwrap_err();
            assert_eq!(err.code, ErrorCode::Unsupported);
            assert!(err.message.contains("on wgpu"), "{err}");
        }
    }

    #[test]
    fn bad_calls_are_errors_not_panics() {
        let mut backend = backend!();
        let x = backend.upload(&[0; 16]).unwrap();
        let mut out = backend.alloc(16).unwrap();
        let kernel = Kernel::Binary {
            op: BinaryOp::Add,
            dtype: DType::F32,
            out_shape: vec![4],
            lhs_strides: vec![1],
            rhs_strides: vec![1],
        };
        assert_eq!(
            backend.run(&kernel, &[&x], &mut out).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        let kernel = Kernel::Affine {
            dtype: DType::F32,
            len: 100,
            scale: 1.0,
            offset: 0.0,
        };
        assert_eq!(
            backend.run(&kernel, &[&x], &mut out).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        let err = backend.alloc(usize::MAX / 2).unwrap_err();
        assert!(
            matches!(
                err.code,
                ErrorCode::OutOfMemory | ErrorCode::InvalidArgument
            ),
            "{err}"
        );
        backend.synchronize().unwrap();
    }

    #[test]
    fn pipelines_are_compiled_once() {
        let mut backend = backend!();
        let x = [1.0f32, 2.0, 3.0];
        let kernel = Kernel::Unary {
            op: UnaryOp::Relu,
            dtype: DType::F32,
            len: 3,
        };
        run_f32(&mut backend, &kernel, &[&x], 3);
        let compiled = backend.pipelines.len();
        for _ in 0..3 {
            assert_eq!(run_f32(&mut backend, &kernel, &[&x], 3), x);
        }
        assert_eq!(backend.pipelines.len(), compiled);
    }
}
