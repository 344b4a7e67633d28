//! A two-layer perceptron scored on the host's device through the GPU bridge.
//!
//! POST a JSON body `{"inputs": [[f32; 4], ...]}`; the answer is
//! `{"device": ..., "probabilities": [[f32; 3], ...], "classes": [u32, ...]}`.
//! The weights are uploaded once per call, the whole forward pass runs as
//! one chain of ops on the device, and only the results are read back.

use gust_sdk::tensor::{Dtype, Tensor};
use gust_sdk::{Error, Request, Response};

#[derive(serde::Deserialize)]
struct Input {
    inputs: Vec<[f32; 4]>,
}

#[derive(serde::Serialize)]
struct Output {
    device: String,
    probabilities: Vec<Vec<f32>>,
    classes: Vec<u32>,
}

// A fixed 4 → 8 → 3 network, so the example needs no weight files.
fn layer(rows: u32, cols: u32, seed: u32) -> Result<Tensor, Error> {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| (((i * 37 + seed * 11) % 17) as f32 - 8.0) / 8.0)
        .collect();
    Ok(Tensor::from_f32(&[rows, cols], &values)?)
}

fn handle(req: Request) -> Result<Response, Error> {
    let input: Input = req.json()?;
    if input.inputs.is_empty() {
        return Err(Error::new("invalid-input", "`inputs` is empty").with_status(400));
    }
    let rows = u32::try_from(input.inputs.len())
        .map_err(|_| Error::new("invalid-input", "too many inputs").with_status(400))?;
    let flat: Vec<f32> = input.inputs.iter().flatten().copied().collect();
    let x = Tensor::from_f32(&[rows, 4], &flat)?;
    let (w1, w2) = (layer(4, 8, 1)?, layer(8, 3, 2)?);
    let b1 = Tensor::from_f32(&[8], &[0.1; 8])?;

    let hidden = x
        .matmul(&w1)?
        .add(&b1)?
        .gelu()?
        .layer_norm(None, None, 1e-5)?;
    let probabilities = hidden.matmul(&w2)?.softmax(-1)?;
    let classes = probabilities.argmax(-1, false)?.cast(Dtype::F32)?;

    let flat = probabilities.to_vec_f32()?;
    let output = Output {
        device: gust_sdk::tensor::devices()
            .first()
            .map(|d| format!("{} ({})", d.backend, d.name))
            .unwrap_or_default(),
        probabilities: flat.chunks(3).map(<[f32]>::to_vec).collect(),
        classes: classes.to_vec_f32()?.iter().map(|&c| c as u32).collect(),
    };
    Response::json(&output)
}

gust_sdk::export_handler!(handle);
