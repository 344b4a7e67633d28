//! Text generation with a model the host keeps resident.
//!
//! POST `{"prompt": "..."}` with optional `max_tokens` (default 64),
//! `temperature` (0 = greedy, the default), `top_k`, `top_p`, `seed`,
//! `stop` (a list of strings), `chat` (wrap the prompt in the model's chat
//! template; default true) and `model` (default `smollm2-135m-instruct`);
//! the answer is `{"model", "text"}`. With `"stream": true` the text is
//! emitted piece by piece as the model produces it instead: invoke with
//! `Accept: text/event-stream` (or `gust invoke --stream`) to see tokens as
//! they come; a plain caller gets the text as the body.

use gust_sdk::{Error, GenerateParams, Model, Request, Response};

#[derive(serde::Deserialize)]
struct Input {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    chat: Option<bool>,
    #[serde(default)]
    stream: bool,
}

#[derive(serde::Serialize)]
struct Output {
    model: String,
    text: String,
}

fn handle(req: Request) -> Result<Response, Error> {
    let input: Input = req.json()?;
    let model = Model::load(input.model.as_deref().unwrap_or("smollm2-135m-instruct"))?;
    // SmolLM2-Instruct and most small chat models use the ChatML template.
    let prompt = if input.chat.unwrap_or(true) {
        format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            input.prompt
        )
    } else {
        input.prompt
    };
    let mut stop = input.stop;
    stop.push("<|im_end|>".to_owned());
    let params = GenerateParams {
        max_tokens: input.max_tokens.unwrap_or(64),
        temperature: input.temperature.unwrap_or(0.0),
        top_k: input.top_k,
        top_p: input.top_p,
        seed: input.seed,
        stop,
    };
    if input.stream {
        // Everything already went out through the output stream.
        model.generate_stream(&prompt, &params)?;
        return Ok(Response::text(""));
    }
    let text = model.generate(&prompt, &params)?;
    Response::json(&Output {
        model: model.name(),
        text,
    })
}

gust_sdk::export_handler!(handle);
