//! A hostile guest: it takes host memory through one host API, in a loop,
//! until something stops it. The body's first word picks the API, the
//! second the size of each piece in bytes:
//!
//! - `nn-tensors <bytes>`: keeps `wasi:nn` tensors (host memory).
//! - `gpu-tensors <bytes>`: keeps `gust:gpu` tensors (bridge memory).
//! - `emit <bytes>`: emits chunks of output to a caller that buffers them.
//! - `stdout <bytes>`: writes to stdout.
//! - `handles`: keeps empty `wasi:nn` tensors, each a host resource.
//!
//! A host API that refuses with an error value ends the call with that
//! error (`refused` with its message), so tests see what stopped it; one
//! that traps ends the call with the host's own outcome.

use std::hint::black_box;
use std::io::Write;

use gust_sdk::bindings::wasi::nn::tensor::{Tensor as NnTensor, TensorType};
use gust_sdk::tensor::{Dtype, Tensor};
use gust_sdk::{Error, Request, Response};

fn refused(what: impl std::fmt::Display) -> Error {
    Error::new("refused", what.to_string()).with_status(507)
}

fn handle(req: Request) -> Result<Response, Error> {
    let body = req.text()?;
    let mut words = body.split_whitespace();
    let command = words.next().unwrap_or("");
    let size: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(1 << 20);
    let piece = vec![7u8; size];
    let len = u32::try_from(size).map_err(|_| refused("size does not fit 32 bits"))?;
    match command {
        "nn-tensors" => {
            let mut kept = Vec::new();
            loop {
                kept.push(NnTensor::new(&[len], TensorType::U8, &piece));
                black_box(&kept);
            }
        }
        "handles" => {
            let mut kept = Vec::new();
            loop {
                kept.push(NnTensor::new(&[0], TensorType::U8, &[]));
                black_box(&kept);
            }
        }
        "gpu-tensors" => {
            let mut kept = Vec::new();
            // f32 elements: the bridge has no byte dtype.
            let elements = len / 4;
            let bytes = &piece[..size / 4 * 4];
            loop {
                let tensor = Tensor::from_bytes(Dtype::F32, &[elements], bytes).map_err(refused)?;
                kept.push(tensor);
                black_box(&kept);
            }
        }
        "emit" => loop {
            gust_sdk::emit(&piece);
        },
        "stdout" => {
            let mut out = std::io::stdout();
            loop {
                out.write_all(&piece).map_err(refused)?;
            }
        }
        other => {
            Err(Error::new("bad-request", format!("unknown command `{other}`")).with_status(400))
        }
    }
}

gust_sdk::export_handler!(handle);
