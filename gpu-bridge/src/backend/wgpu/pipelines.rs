//! Shader modules and compute pipelines (compiled on first use, cached by
//! module and entry point), and recording and submitting dispatches.

use super::device::WgpuBackend;
use super::params::{padded_size, to_u32};
use crate::error::{BridgeError, Result};
use crate::kernel::wgsl_prelude;

/// Which WGSL module a pipeline comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Shader {
    /// Unary, affine and binary (elementwise.wgsl).
    Elementwise,
    /// Tiled matmul (matmul.wgsl).
    Matmul,
    /// Reductions, softmax and norms (reduce.wgsl).
    Reduce,
    /// Permute, slice, gather, concat (movement.wgsl).
    Movement,
    /// Casts (cast.wgsl).
    Cast,
}

impl Shader {
    /// Every module, for tests.
    #[cfg(test)]
    pub(super) const ALL: [Self; 5] = [
        Self::Elementwise,
        Self::Matmul,
        Self::Reduce,
        Self::Movement,
        Self::Cast,
    ];

    /// The complete WGSL module: the constants generated from `kernel.rs`
    /// (op and dtype codes), then the `.wgsl` file.
    pub(super) fn source(self) -> String {
        let mut source = wgsl_prelude();
        source.push_str(self.file());
        source
    }

    /// The `.wgsl` file as written.
    fn file(self) -> &'static str {
        match self {
            Self::Elementwise => include_str!("elementwise.wgsl"),
            Self::Matmul => include_str!("matmul.wgsl"),
            Self::Reduce => include_str!("reduce.wgsl"),
            Self::Movement => include_str!("movement.wgsl"),
            Self::Cast => include_str!("cast.wgsl"),
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Elementwise => "gust elementwise",
            Self::Matmul => "gust matmul",
            Self::Reduce => "gust reduce",
            Self::Movement => "gust movement",
            Self::Cast => "gust cast",
        }
    }
}

/// One dispatch of a kernel: which entry point, its uniform parameters, up to
/// three inputs, and how many workgroups.
pub(super) struct Step<'a> {
    pub(super) shader: Shader,
    pub(super) entry: &'static str,
    pub(super) params: Vec<u32>,
    /// `None` binds the dummy buffer (an absent optional operand).
    pub(super) inputs: Vec<Option<&'a wgpu::Buffer>>,
    pub(super) workgroups: u64,
}

impl WgpuBackend {
    /// The pipeline of `entry` in `shader`, compiling the module and the
    /// pipeline on first use.
    pub(super) fn pipeline(
        &mut self,
        shader: Shader,
        entry: &'static str,
    ) -> Result<wgpu::ComputePipeline> {
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
    pub(super) fn grid(&self, workgroups: u64) -> Result<(u32, u32)> {
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
    pub(super) fn submit(
        &mut self,
        name: &str,
        output: &wgpu::Buffer,
        steps: &[Step<'_>],
    ) -> Result<()> {
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

    pub(super) fn bind_group(
        &self,
        step: &Step<'_>,
        output: &wgpu::Buffer,
    ) -> Result<wgpu::BindGroup> {
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
    pub(super) fn table(&self, words: &[u32]) -> Result<wgpu::Buffer> {
        let buffer = self.create_storage(words.len() * 4, "matmul offsets")?;
        self.queue
            .write_buffer(&buffer, 0, bytemuck::cast_slice(words));
        Ok(buffer)
    }

    /// Copy `bytes` (rounded up to 4) from `src` to `dst`.
    pub(super) fn copy(&self, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: usize) -> Result<()> {
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
