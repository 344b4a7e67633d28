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
