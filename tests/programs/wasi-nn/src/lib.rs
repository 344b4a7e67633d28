//! A guest written against the standard `wasi:nn` interface (graph,
//! inference, tensor, errors; 0.2.0-rc-2024-10-28), nothing Gust-specific
//! but the handler export. The first line of the body is a command:
//!
//! - `text <model>` then one text per line: `compute` on a `u8` tensor
//!   named `text`; answers the `embedding` output, one row per line.
//! - `ids <model> <id>,<id>,...`: `compute` on an `i64` `input_ids` tensor
//!   of one row; answers each output as `name dims: values`.
//! - `prompt <model> <max-tokens>` then the prompt: `compute` on a `u8`
//!   `prompt` and an `i32` `max_tokens`; answers the `text` output.
//!
//! A wasi-nn error is answered as `error <code>: <data>` with status 200,
//! so tests see exactly what the guest saw.

use gust_sdk::bindings::wasi::nn::errors::Error as NnError;
use gust_sdk::bindings::wasi::nn::graph;
use gust_sdk::bindings::wasi::nn::tensor::{Tensor, TensorType};
use gust_sdk::{Error, Request, Response};

fn floats(data: &[u8]) -> String {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn compute(model: &str, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError> {
    let graph = graph::load_by_name(model)?;
    let context = graph.init_execution_context()?;
    context.compute(inputs)
}

fn handle(req: Request) -> Result<Response, Error> {
    let body = req.text()?;
    let (command, input) = body.split_once('\n').unwrap_or((body, ""));
    let words: Vec<&str> = command.split_whitespace().collect();
    let result = match words.as_slice() {
        ["text", model] => {
            let bytes = input.as_bytes().to_vec();
            let len = u32::try_from(bytes.len())
                .map_err(|_| Error::new("too-large", "input too large"))?;
            let text = Tensor::new(&[len], TensorType::U8, &bytes);
            compute(model, vec![("text".to_owned(), text)]).map(|outputs| {
                outputs
                    .iter()
                    .filter(|(name, _)| name == "embedding")
                    .flat_map(|(_, t)| {
                        let dims = t.dimensions();
                        let width = dims.get(1).copied().unwrap_or(1).max(1) as usize * 4;
                        t.data().chunks(width).map(floats).collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        ["ids", model, ids] => {
            let ids: Vec<i64> = ids
                .split(',')
                .map(|id| id.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| Error::new("bad-request", "ids must be integers").with_status(400))?;
            let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
            let count = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            let tensor = Tensor::new(&[1, count], TensorType::I64, &bytes);
            compute(model, vec![("input_ids".to_owned(), tensor)]).map(|outputs| {
                outputs
                    .iter()
                    .map(|(name, t)| format!("{name} {:?}: {}", t.dimensions(), floats(&t.data())))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        ["prompt", model, max_tokens] => {
            let max: i32 = max_tokens
                .parse()
                .map_err(|_| Error::new("bad-request", "max-tokens: a number").with_status(400))?;
            let bytes = input.as_bytes().to_vec();
            let len = u32::try_from(bytes.len())
                .map_err(|_| Error::new("too-large", "input too large"))?;
            let prompt = Tensor::new(&[len], TensorType::U8, &bytes);
            let max = Tensor::new(&[1], TensorType::I32, &max.to_le_bytes());
            compute(
                model,
                vec![
                    ("prompt".to_owned(), prompt),
                    ("max_tokens".to_owned(), max),
                ],
            )
            .map(|outputs| {
                outputs
                    .iter()
                    .filter(|(name, _)| name == "text")
                    .map(|(_, t)| String::from_utf8_lossy(&t.data()).into_owned())
                    .collect()
            })
        }
        _ => {
            return Err(Error::new(
                "bad-request",
                "expected `text <model>`, `ids <model> <ids>` or `prompt <model> <max-tokens>`",
            )
            .with_status(400));
        }
    };
    Ok(Response::text(match result {
        Ok(text) => text,
        Err(e) => format!("error {:?}: {}", e.code(), e.data()),
    }))
}

gust_sdk::export_handler!(handle);
