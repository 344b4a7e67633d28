//! The set of devices a host opens at start.

use tracing::{info, warn};

use crate::backend::BackendKind;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::wgpu::{WgpuBackend, WgpuOptions};
use crate::device::{Device, DeviceOptions};
use crate::error::Result;

/// Which devices to open and how.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Bytes of host memory the cpu backend may hold in tensors.
    pub cpu_memory_bytes: u64,
    /// Threads of the cpu backend's pool; `None`:
    /// [`default_threads`](crate::backend::cpu::default_threads), which
    /// leaves a core to the rest of the host.
    pub cpu_threads: Option<usize>,
    /// Try to open a wgpu adapter.
    pub wgpu: bool,
    /// Accept a software wgpu adapter (lavapipe) when there is no GPU.
    pub wgpu_allow_software: bool,
    /// Try to open CUDA device 0.
    pub cuda: bool,
    /// How each device's worker is set up.
    pub device: DeviceOptions,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            cpu_memory_bytes: 4 << 30,
            cpu_threads: None,
            wgpu: true,
            wgpu_allow_software: true,
            cuda: true,
            device: DeviceOptions::default(),
        }
    }
}

/// The devices this host offers, the cpu device always among them.
#[derive(Debug, Clone)]
pub struct Bridge {
    devices: Vec<Device>,
    unavailable: Vec<(BackendKind, String)>,
}

impl Bridge {
    /// Open every device `config` asks for. A backend that is not compiled
    /// in or finds no device is logged and left out; only the cpu device is
    /// required.
    pub fn open(config: &BridgeConfig) -> Result<Self> {
        let mut devices = Vec::new();
        let mut unavailable = Vec::new();
        if config.cuda {
            match CudaBackend::open(0).and_then(|b| Device::start(b, config.device)) {
                Ok(device) => devices.push(device),
                Err(e) => unavailable.push((BackendKind::Cuda, e.message)),
            }
        }
        if config.wgpu {
            let options = WgpuOptions {
                allow_software: config.wgpu_allow_software,
            };
            match WgpuBackend::open(&options).and_then(|b| Device::start(b, config.device)) {
                Ok(device) => devices.push(device),
                Err(e) => unavailable.push((BackendKind::Wgpu, e.message)),
            }
        }
        let cpu = match config.cpu_threads {
            Some(threads) => CpuBackend::with_threads(config.cpu_memory_bytes, threads),
            None => CpuBackend::new(config.cpu_memory_bytes),
        };
        devices.push(Device::start(cpu, config.device)?);
        for device in &devices {
            let d = device.description();
            info!(backend = %d.kind, name = %d.name, is_gpu = d.is_gpu, memory_bytes = d.memory_bytes, "gpu bridge device ready");
        }
        for (kind, why) in &unavailable {
            let compiled = match kind {
                BackendKind::Cuda => cfg!(feature = "cuda"),
                BackendKind::Wgpu => cfg!(feature = "wgpu"),
                BackendKind::Cpu => true,
            };
            // A backend left out of the build is a choice, not a problem.
            if compiled {
                warn!(backend = %kind, reason = %why, "gpu bridge backend unavailable");
            } else {
                info!(backend = %kind, reason = %why, "gpu bridge backend not compiled in");
            }
        }
        Ok(Self {
            devices,
            unavailable,
        })
    }

    /// Open devices, the preferred (fastest) first.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The device of backend `kind`, if it opened.
    pub fn device(&self, kind: BackendKind) -> Option<&Device> {
        self.devices.iter().find(|d| d.kind() == kind)
    }

    /// Backends that were asked for but did not open, with the reason.
    pub fn unavailable(&self) -> &[(BackendKind, String)] {
        &self.unavailable
    }
}
