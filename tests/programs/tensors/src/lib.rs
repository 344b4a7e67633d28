//! Exercises the GPU bridge. The request body picks what to do:
//!
//! - `chain`: `softmax(relu(x·w + b))`, then its row sums, as one chain of
//!   ops with no read-back until the end; answers the values, one per line.
//! - `devices`: one line per device, `backend name is_gpu`.
//! - `hold <MiB>`: allocate that many MiB in 1 MiB tensors and answer how
//!   many succeeded before the first error (and the error).
//! - `trap <MiB>`: allocate that many MiB, then trap with them alive.
//! - `mismatch`: a matmul of incompatible shapes, returned with `?`.
//! - `relu <N>`: `N` relus of a 16-element tensor, each result dropped (the
//!   bridge round-trip benchmark); answers `N`.
//! - `layers`: two Q8_0 weight matrices uploaded as blocks
//!   ([`layers_weights`]), `linear` of [`layers_input`] with both side by
//!   side, then `swiglu`; answers the block format, the linear values, the
//!   swiglu values (a line each), and the error code of adding two block
//!   tensors. `host/tests/all/gpu.rs` computes the same in f64.

use gust_sdk::{Error, Request, Response, Tensor};

fn chain() -> Result<Response, Error> {
    let x: Vec<f32> = (0..12).map(|i| (i as f32 - 6.0) / 4.0).collect();
    let w: Vec<f32> = (0..20).map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0).collect();
    let b: Vec<f32> = (0..5).map(|i| i as f32 / 10.0).collect();
    let x = Tensor::from_f32(&[3, 4], &x)?;
    let w = Tensor::from_f32(&[4, 5], &w)?;
    let b = Tensor::from_f32(&[5], &b)?;
    let probabilities = x.matmul(&w)?.add(&b)?.relu()?.softmax(-1)?;
    let weighted = probabilities.mul(&b)?.sum(-1, false)?;
    let values = weighted.to_vec_f32()?;
    let lines: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    Ok(Response::text(lines.join("\n")))
}

/// `[2, 64]` activations, multiples of 1/128 with 127/128 in each block of
/// 32: their 8-bit blocks are exact, so the products are too.
fn layers_input() -> Vec<f32> {
    (0..128)
        .map(|i| {
            if i % 32 == 0 {
                127.0 / 128.0
            } else {
                ((i % 17) as f32 - 8.0) / 128.0
            }
        })
        .collect()
}

/// A `[3, 64]` Q8_0 matrix: scale 1/16 and small integers
/// `(7r + step·c) mod 21 − 10` for row `r`, column `c`.
fn layers_weights(step: usize) -> Vec<u8> {
    let mut blocks = Vec::new();
    for r in 0..3 {
        for b in 0..2 {
            // 1/16 as an f16.
            blocks.extend_from_slice(&0x2C00u16.to_le_bytes());
            for j in 0..32 {
                let q = ((r * 7 + (b * 32 + j) * step) % 21) as i8 - 10;
                blocks.push(q as u8);
            }
        }
    }
    blocks
}

fn layers() -> Result<Response, Error> {
    use gust_sdk::tensor::BlockFormat;
    let x = Tensor::from_f32(&[2, 64], &layers_input())?;
    let w = Tensor::from_blocks(BlockFormat::Q80, &[3, 64], &layers_weights(3))?;
    let v = Tensor::from_blocks(BlockFormat::Q80, &[3, 64], &layers_weights(5))?;
    let y = x.linear(&[&w, &v])?;
    let gated = y.swiglu()?;
    let refused = match w.add(&w) {
        Ok(_) => "accepted".to_owned(),
        Err(e) => e.code_name().to_owned(),
    };
    let line = |t: &Tensor| -> Result<String, Error> {
        let values: Vec<String> = t.to_vec_f32()?.iter().map(|v| v.to_string()).collect();
        Ok(values.join(" "))
    };
    Ok(Response::text(format!(
        "{:?}\n{}\n{}\n{refused}",
        w.block_format(),
        line(&y)?,
        line(&gated)?
    )))
}

fn allocate(mib: u32) -> (Vec<Tensor>, Option<String>) {
    let mut held = Vec::new();
    for _ in 0..mib {
        match Tensor::zeros(gust_sdk::tensor::Dtype::F32, &[256, 1024]) {
            Ok(t) => held.push(t),
            Err(e) => return (held, Some(e.to_string())),
        }
    }
    (held, None)
}

fn handle(req: Request) -> Result<Response, Error> {
    let command = req.text()?.trim().to_owned();
    let (verb, arg) = command.split_once(' ').unwrap_or((command.as_str(), ""));
    let mib = || {
        arg.parse::<u32>()
            .map_err(|_| Error::new("bad-request", "expected a number of MiB").with_status(400))
    };
    match verb {
        "chain" => chain(),
        "layers" => layers(),
        "devices" => {
            let lines: Vec<String> = gust_sdk::tensor::devices()
                .iter()
                .map(|d| format!("{} {} {}", d.backend, d.name, d.is_gpu))
                .collect();
            Ok(Response::text(lines.join("\n")))
        }
        "hold" => {
            let (held, error) = allocate(mib()?);
            Ok(Response::text(format!(
                "{} {}",
                held.len(),
                error.unwrap_or_default()
            )))
        }
        "trap" => {
            let (held, error) = allocate(mib()?);
            if let Some(e) = error {
                return Err(Error::new("setup", e));
            }
            // Trap with every tensor still alive: the host must free them.
            std::hint::black_box(&held);
            std::process::abort()
        }
        "relu" => {
            let n = arg
                .parse::<u32>()
                .map_err(|_| Error::new("bad-request", "expected a count").with_status(400))?;
            let x = Tensor::from_f32(&[16], &[0.5; 16])?;
            for _ in 0..n {
                drop(x.relu()?);
            }
            Ok(Response::text(n.to_string()))
        }
        "mismatch" => {
            let a = Tensor::from_f32(&[2, 3], &[0.0; 6])?;
            let product = a.matmul(&a)?;
            Ok(Response::text(format!("{:?}", product.shape())))
        }
        other => {
            Err(Error::new("bad-request", format!("unknown command {other:?}")).with_status(400))
        }
    }
}

gust_sdk::export_handler!(handle);
