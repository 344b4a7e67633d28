//! Adapter discovery and device setup, error scopes, and storage buffers.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use super::params::padded_size;
use super::pipelines::Shader;
use crate::backend::{BackendKind, DeviceDescription};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};

/// Device memory reported for a software adapter. Its "device memory" is
/// host RAM, and wgpu has no memory query, so this is a fixed budget.
pub(super) const SOFTWARE_MEMORY_BYTES: u64 = 2 << 30;

/// Cap on the memory reported for a GPU. wgpu has no memory query; the
/// adapter's largest buffer is the best figure it offers, but some drivers
/// report an effectively unlimited size.
pub(super) const GPU_MEMORY_CAP_BYTES: u64 = 16 << 30;

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
    pub(super) buffer: wgpu::Buffer,
}

impl WgpuBuffer {
    /// The allocated size in bytes.
    pub fn size(&self) -> u64 {
        self.buffer.size()
    }
}

/// One wgpu device with its queue, layouts and compiled pipelines.
pub struct WgpuBackend {
    pub(super) device: wgpu::Device,
    pub(super) queue: wgpu::Queue,
    pub(super) description: DeviceDescription,
    pub(super) limits: wgpu::Limits,
    pub(super) bind_group_layout: wgpu::BindGroupLayout,
    pub(super) pipeline_layout: wgpu::PipelineLayout,
    pub(super) modules: HashMap<Shader, wgpu::ShaderModule>,
    pub(super) pipelines: HashMap<(Shader, &'static str), wgpu::ComputePipeline>,
    /// Bound to input slots a kernel does not use.
    pub(super) dummy: wgpu::Buffer,
    /// Errors that escaped every error scope (reported by `synchronize`).
    pub(super) uncaptured: Arc<Mutex<Vec<String>>>,
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
        let (adapter, name, is_gpu) = adapter(options)?;
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
        .map_err(|e| {
            BridgeError::backend(format!("cannot open wgpu device on {name}: {e}")).with_source(e)
        })?;

        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            tracing::error!(%error, "uncaptured wgpu error");
            if let Ok(mut errors) = sink.lock() {
                errors.push(error.to_string());
            }
        }));
        let (bind_group_layout, pipeline_layout) = layouts(&device);
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
                linear: false,
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
    pub(super) fn scoped<T>(&self, what: &str, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
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
            )
            .with_source(error));
        }
        if let Some(error) = validation.or(internal) {
            return Err(BridgeError::backend(format!("{what}: {error}")).with_source(error));
        }
        result
    }

    /// Errors recorded outside any scope since the last call.
    pub(super) fn take_uncaptured(&self) -> Result<()> {
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

    pub(super) fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| {
                BridgeError::backend(format!("waiting for the wgpu device: {e}")).with_source(e)
            })?;
        Ok(())
    }

    /// A storage buffer of `bytes` rounded up to 4, after checking it against
    /// the device's limits.
    pub(super) fn create_storage(&self, bytes: usize, what: &str) -> Result<wgpu::Buffer> {
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
}

/// The highest-performance adapter, its name, and whether it is a GPU;
/// `unsupported` when there is none this build and `options` accept.
fn adapter(options: &WgpuOptions) -> Result<(wgpu::Adapter, String, bool)> {
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
    .map_err(|e| BridgeError::unsupported(format!("no wgpu adapter found: {e}")).with_source(e))?;

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
    Ok((adapter, name, is_gpu))
}

/// The one bind group layout every kernel shares (0: uniform parameters,
/// 1: the output, 2-4: inputs) and the pipeline layout over it.
fn layouts(device: &wgpu::Device) -> (wgpu::BindGroupLayout, wgpu::PipelineLayout) {
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
    (bind_group_layout, pipeline_layout)
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
