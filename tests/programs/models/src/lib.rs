//! Exercises resident models through `gust_sdk::Model`. The first line of
//! the request body is a command, the rest its input:
//!
//! - `embed <model>` then one text per line: one embedding per line, its
//!   values comma-separated.
//! - `describe <model>`: `<name> <family>`.
//! - `run <model> <id>,<id>,...`: the `sentence_embedding` output of
//!   `run` on one row of token ids, comma-separated.
//! - `generate <model> <max-tokens>` then the prompt: the continuation
//!   (greedy).
//!
//! Model errors are returned with `?`, so they reach the caller with the
//! SDK's status mapping (503 for a full batch queue, 403 when forbidden).

use gust_sdk::{Error, GenerateParams, Model, Request, Response, Tensor};

fn bad(message: &str) -> Error {
    Error::new("bad-request", message).with_status(400)
}

fn join(values: &[f32]) -> String {
    values
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn handle(req: Request) -> Result<Response, Error> {
    let text = req.text()?;
    let (command, input) = text.split_once('\n').unwrap_or((text, ""));
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["embed", name] => {
            let model = Model::load(name)?;
            let texts: Vec<&str> = input.lines().collect();
            let embeddings = model.embed(&texts)?;
            let lines: Vec<String> = embeddings.iter().map(|e| join(e)).collect();
            Ok(Response::text(lines.join("\n")))
        }
        ["describe", name] => {
            let model = Model::load(name)?;
            Ok(Response::text(format!(
                "{} {}",
                model.name(),
                model.family()
            )))
        }
        ["run", name, ids] => {
            let model = Model::load(name)?;
            let ids: Vec<i32> = ids
                .split(',')
                .map(|id| id.parse().map_err(|_| bad("ids must be integers")))
                .collect::<Result<_, _>>()?;
            let count = u32::try_from(ids.len()).map_err(|_| bad("too many ids"))?;
            let input_ids = Tensor::from_i32(&[1, count], &ids)?;
            let outputs = model.run(&[("input_ids", &input_ids)])?;
            let (_, embedding) = outputs
                .iter()
                .find(|(name, _)| name == "sentence_embedding")
                .ok_or_else(|| Error::new("no-output", "no sentence_embedding output"))?;
            Ok(Response::text(join(&embedding.to_vec_f32()?)))
        }
        ["generate", name, max_tokens] => {
            let model = Model::load(name)?;
            let params = GenerateParams {
                max_tokens: max_tokens
                    .parse()
                    .map_err(|_| bad("max-tokens: a number"))?,
                ..GenerateParams::default()
            };
            Ok(Response::text(model.generate(input, &params)?))
        }
        _ => Err(bad(
            "expected `embed <model>`, `describe <model>`, `run <model> <ids>` or \
             `generate <model> <max-tokens>`",
        )),
    }
}

gust_sdk::export_handler!(handle);
