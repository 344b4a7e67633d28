//! NVRTC: the programs the backend compiles, the target it compiles them
//! for, and the compilation itself. Host-side only; nothing here needs a
//! device.

use std::ffi::{CString, c_char, c_int};

use cudarc::nvrtc;

use crate::kernel::cuda_prelude;

/// One NVRTC program: the shared prelude plus one `.cu` file, and the
/// `extern "C"` kernels it defines (the `ptx_compiles` test checks this
/// list against the compiled code).
pub(super) struct Program {
    pub(super) name: &'static str,
    /// The shared prelude and the `.cu` file; [`Program::source`] puts the
    /// generated constants in front.
    body: &'static str,
    pub(super) functions: &'static [&'static str],
}

impl Program {
    /// The complete NVRTC program: the constants generated from
    /// `kernel.rs` (op and dtype codes), common.cuh, then the `.cu` file.
    pub(super) fn source(&self) -> String {
        let mut source = cuda_prelude();
        source.push_str(self.body);
        source
    }
}

/// Every program the backend compiles at open.
pub(super) const PROGRAMS: &[Program] = &[
    Program {
        name: "elementwise.cu",
        body: concat!(include_str!("common.cuh"), include_str!("elementwise.cu")),
        functions: &[
            "unary_f32",
            "unary_f16",
            "unary_bf16",
            "affine_f32",
            "affine_f16",
            "affine_bf16",
            "binary_f32",
            "binary_f16",
            "binary_bf16",
        ],
    },
    Program {
        name: "reduce.cu",
        body: concat!(include_str!("common.cuh"), include_str!("reduce.cu")),
        functions: &[
            "reduce_rows_f32",
            "reduce_rows_f16",
            "reduce_rows_bf16",
            "reduce_cols_f32",
            "reduce_cols_f16",
            "reduce_cols_bf16",
            "argmax_rows_f32",
            "argmax_rows_f16",
            "argmax_rows_bf16",
            "argmax_cols_f32",
            "argmax_cols_f16",
            "argmax_cols_bf16",
            "softmax_rows_f32",
            "softmax_rows_f16",
            "softmax_rows_bf16",
            "softmax_cols_f32",
            "softmax_cols_f16",
            "softmax_cols_bf16",
        ],
    },
    Program {
        name: "norm.cu",
        body: concat!(include_str!("common.cuh"), include_str!("norm.cu")),
        functions: &[
            "layer_norm_f32",
            "layer_norm_f16",
            "layer_norm_bf16",
            "rms_norm_f32",
            "rms_norm_f16",
            "rms_norm_bf16",
        ],
    },
    Program {
        name: "movement.cu",
        body: concat!(include_str!("common.cuh"), include_str!("movement.cu")),
        functions: &[
            "permute_u16",
            "permute_u32",
            "copy_rows_u16",
            "copy_rows_u32",
            "gather_u16",
            "gather_u32",
        ],
    },
    Program {
        name: "cast.cu",
        body: concat!(include_str!("common.cuh"), include_str!("cast.cu")),
        functions: &[
            "cast_f32_f16",
            "cast_f32_bf16",
            "cast_f32_i32",
            "cast_f32_u32",
            "cast_f16_f32",
            "cast_f16_bf16",
            "cast_f16_i32",
            "cast_f16_u32",
            "cast_bf16_f32",
            "cast_bf16_f16",
            "cast_bf16_i32",
            "cast_bf16_u32",
            "cast_i32_f32",
            "cast_i32_f16",
            "cast_i32_bf16",
            "cast_i32_u32",
            "cast_u32_f32",
            "cast_u32_f16",
            "cast_u32_bf16",
            "cast_u32_i32",
        ],
    },
];

/// Every CUDA kernel source, by name: each is one complete NVRTC program
/// (the generated constants, the shared prelude, then one `.cu` file).
pub fn kernel_sources() -> Vec<(&'static str, String)> {
    PROGRAMS.iter().map(|p| (p.name, p.source())).collect()
}

/// What NVRTC should produce for a device with compute capability `X.Y`
/// (written `XY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// Machine code for exactly this architecture (`sm_XY`).
    Cubin(u32),
    /// PTX for this architecture (`compute_XY`), JIT-compiled by the driver.
    Ptx(u32),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cubin(arch) => write!(f, "sm_{arch}"),
            Self::Ptx(arch) => write!(f, "compute_{arch}"),
        }
    }
}

/// The NVRTC options every program is compiled with. No fast math: IEEE
/// division and square root, denormals kept.
pub(super) fn compile_options(target: Target) -> Vec<String> {
    vec![
        format!("--gpu-architecture={target}"),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
}

/// A device of compute capability `device` (as `XY`) gets a CUBIN when NVRTC
/// supports it; otherwise PTX for the newest older architecture NVRTC
/// knows, which the driver can JIT for the device.
pub(super) fn choose_target(device: u32, supported: &[u32]) -> Option<Target> {
    if supported.contains(&device) {
        return Some(Target::Cubin(device));
    }
    supported
        .iter()
        .copied()
        .filter(|&arch| arch <= device)
        .max()
        .map(Target::Ptx)
}

/// NVRTC's version, e.g. `(12, 9)`.
pub(super) fn nvrtc_version() -> std::result::Result<(i32, i32), String> {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: both pointers are valid for writes.
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion: {e}"))?;
    Ok((major, minor))
}

/// The architectures (as `XY`) this NVRTC can compile for.
pub(super) fn nvrtc_supported_archs() -> std::result::Result<Vec<u32>, String> {
    let mut count: c_int = 0;
    // SAFETY: the pointer is valid for writes.
    unsafe { nvrtc::sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(|e| format!("nvrtcGetNumSupportedArchs: {e}"))?;
    let mut archs: Vec<c_int> = vec![0; usize::try_from(count).unwrap_or(0)];
    if !archs.is_empty() {
        // SAFETY: `archs` has room for the `count` entries NVRTC writes.
        unsafe { nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| format!("nvrtcGetSupportedArchs: {e}"))?;
    }
    Ok(archs
        .into_iter()
        .filter_map(|a| u32::try_from(a).ok())
        .collect())
}

/// Destroys an NVRTC program however compilation ends.
struct NvrtcProgram(nvrtc::sys::nvrtcProgram);

impl Drop for NvrtcProgram {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        if let Err(err) = unsafe { nvrtc::result::destroy_program(self.0) } {
            tracing::warn!(error = %err, "nvrtcDestroyProgram failed");
        }
    }
}

fn c_chars_to_bytes(chars: &[c_char]) -> Vec<u8> {
    chars.iter().map(|&c| c as u8).collect()
}

/// Compile one program for `target`: a CUBIN, or NUL-terminated PTX text
/// (both are what cuModuleLoadData takes). The error carries NVRTC's log.
pub(super) fn nvrtc_compile(
    name: &str,
    source: &str,
    target: Target,
) -> std::result::Result<Vec<u8>, String> {
    let c_source =
        CString::new(source).map_err(|_| format!("{name}: source contains a NUL byte"))?;
    let c_name = CString::new(name).map_err(|_| format!("{name}: name contains a NUL byte"))?;
    let program = NvrtcProgram(
        nvrtc::result::create_program(&c_source, Some(&c_name))
            .map_err(|e| format!("{name}: nvrtcCreateProgram: {e}"))?,
    );
    let options = compile_options(target);
    // SAFETY: `program` is a live program; the options are plain strings.
    let compiled = unsafe { nvrtc::result::compile_program(program.0, &options) };
    if let Err(err) = compiled {
        // SAFETY: as above.
        let log = unsafe { nvrtc::result::get_program_log(program.0) }
            .map(|raw| {
                String::from_utf8_lossy(&c_chars_to_bytes(&raw))
                    .trim_end_matches('\0')
                    .to_owned()
            })
            .unwrap_or_else(|e| format!("(no log: {e})"));
        return Err(format!("{name}: {err} with options {options:?}:\n{log}"));
    }
    match target {
        Target::Ptx(_) => {
            // SAFETY: compiled successfully above.
            let ptx = unsafe { nvrtc::result::get_ptx(program.0) }
                .map_err(|e| format!("{name}: nvrtcGetPTX: {e}"))?;
            let mut bytes = c_chars_to_bytes(&ptx);
            if bytes.last() != Some(&0) {
                bytes.push(0);
            }
            Ok(bytes)
        }
        Target::Cubin(_) => {
            let mut size = 0usize;
            // SAFETY: compiled successfully; the pointer is valid for writes.
            unsafe { nvrtc::sys::nvrtcGetCUBINSize(program.0, &mut size) }
                .result()
                .map_err(|e| format!("{name}: nvrtcGetCUBINSize: {e}"))?;
            let mut cubin: Vec<c_char> = vec![0; size];
            // SAFETY: `cubin` has the `size` bytes NVRTC writes.
            unsafe { nvrtc::sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr()) }
                .result()
                .map_err(|e| format!("{name}: nvrtcGetCUBIN: {e}"))?;
            Ok(c_chars_to_bytes(&cubin))
        }
    }
}

/// Compile every program in parallel (NVRTC programs are independent and
/// NVRTC is thread-safe), in `PROGRAMS` order.
pub(super) fn compile_all(target: Target) -> std::result::Result<Vec<Vec<u8>>, String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = PROGRAMS
            .iter()
            .map(|p| scope.spawn(move || nvrtc_compile(p.name, &p.source(), target)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|panic| {
                    Err(format!("NVRTC panicked: {}", panic_message(panic.as_ref())))
                })
            })
            .collect()
    })
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

#[cfg(test)]
mod tests {
    //! Host-only: NVRTC compiles every kernel (skips when libnvrtc is not
    //! found) and the target choice. Device tests live in
    //! `gpu-bridge/tests/all`.

    use super::*;

    #[test]
    fn ptx_compiles() {
        // SAFETY: only tries to dlopen libnvrtc.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            eprintln!(
                "ptx_compiles: SKIPPED: libnvrtc not found; to check that the CUDA kernels compile, put the \
                 directory holding libnvrtc.so.* on LD_LIBRARY_PATH (e.g. `pip install nvidia-cuda-nvrtc-cu12`, \
                 then its site-packages/nvidia/cuda_nvrtc/lib)"
            );
            return;
        }
        let (major, minor) = nvrtc_version().unwrap();
        let supported = nvrtc_supported_archs().unwrap();
        eprintln!("ptx_compiles: NVRTC {major}.{minor}, architectures {supported:?}");
        // The fixed PTX target stands in for a device; the CUBINs are the
        // form `open` uses on an A100 (sm_80) and an H100/H200 (sm_90).
        let mut targets = vec![Target::Ptx(80)];
        targets.extend(
            [80, 90]
                .into_iter()
                .filter(|a| supported.contains(a))
                .map(Target::Cubin),
        );
        for target in targets {
            for program in PROGRAMS {
                let image =
                    nvrtc_compile(program.name, &program.source(), target).unwrap_or_else(|log| {
                        panic!("{} does not compile for {target}:\n{log}", program.name)
                    });
                if matches!(target, Target::Ptx(_)) {
                    let ptx = String::from_utf8_lossy(&image);
                    let mut found: Vec<&str> = ptx
                        .lines()
                        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
                        .map(|l| l.split('(').next().unwrap_or_default().trim())
                        .collect();
                    found.sort_unstable();
                    let mut listed = program.functions.to_vec();
                    listed.sort_unstable();
                    assert_eq!(
                        found, listed,
                        "{}: kernels compiled vs PROGRAMS",
                        program.name
                    );
                    // Layout structs must stay in parameter space (see the
                    // unrolled loops); local memory here means a slow path.
                    assert!(
                        !ptx.contains(".local"),
                        "{}: uses local memory",
                        program.name
                    );
                } else {
                    assert!(
                        image.len() > 1000,
                        "{}: CUBIN of {} bytes",
                        program.name,
                        image.len()
                    );
                }
                eprintln!(
                    "ptx_compiles: {} -> {target}: {} bytes",
                    program.name,
                    image.len()
                );
            }
        }
    }

    #[test]
    fn kernel_sources_lists_every_program() {
        let sources = kernel_sources();
        assert_eq!(sources.len(), PROGRAMS.len());
        for (name, source) in sources {
            assert!(name.ends_with(".cu"));
            assert!(
                source.contains("gust_f32_to_f16"),
                "{name} lacks the prelude"
            );
            assert!(
                !source.contains("#include"),
                "{name} must not need CUDA headers"
            );
            assert!(
                source.starts_with(&cuda_prelude()),
                "{name} lacks the op codes generated from kernel.rs"
            );
        }
    }

    #[test]
    fn target_prefers_an_exact_cubin() {
        assert_eq!(
            choose_target(90, &[75, 80, 86, 89, 90, 100]),
            Some(Target::Cubin(90))
        );
        assert_eq!(
            choose_target(121, &[80, 90, 100, 120]),
            Some(Target::Ptx(120))
        );
        assert_eq!(choose_target(86, &[75, 80, 90]), Some(Target::Ptx(80)));
        assert_eq!(choose_target(50, &[75, 80]), None);
        assert_eq!(
            compile_options(Target::Ptx(80))[0],
            "--gpu-architecture=compute_80"
        );
        assert_eq!(
            compile_options(Target::Cubin(90))[0],
            "--gpu-architecture=sm_90"
        );
    }
}
