//! Sentence embeddings from a model the host keeps resident.
//!
//! POST `{"sentences": ["...", ...]}` (and optionally `"model"`, default
//! `all-minilm-l6-v2`); the answer is
//! `{"model", "dimensions", "embeddings": [[f32, ...], ...]}`, one
//! L2-normalised vector per sentence, so the dot product of two is their
//! cosine similarity. With `"query": "..."` the sentences also come back
//! ranked by similarity to the query.
//!
//! The first call on a host loads the model; every later call, from any
//! invocation, finds it resident, and concurrent calls are batched.

use gust_sdk::{Error, Model, Request, Response};

#[derive(serde::Deserialize)]
struct Input {
    sentences: Vec<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(serde::Serialize)]
struct Ranked {
    sentence: String,
    score: f32,
}

#[derive(serde::Serialize)]
struct Output {
    model: String,
    dimensions: usize,
    embeddings: Vec<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ranking: Option<Vec<Ranked>>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn handle(req: Request) -> Result<Response, Error> {
    let input: Input = req.json()?;
    if input.sentences.is_empty() {
        return Err(Error::new("invalid-input", "`sentences` is empty").with_status(400));
    }
    let name = input.model.as_deref().unwrap_or("all-minilm-l6-v2");
    let model = Model::load(name)?;
    let embeddings = model.embed(&input.sentences)?;
    let ranking = match &input.query {
        Some(query) => {
            let q = model.embed(&[query])?.remove(0);
            let mut ranked: Vec<Ranked> = input
                .sentences
                .iter()
                .zip(&embeddings)
                .map(|(sentence, e)| Ranked {
                    sentence: sentence.clone(),
                    score: dot(&q, e),
                })
                .collect();
            ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
            Some(ranked)
        }
        None => None,
    };
    Response::json(&Output {
        model: model.name(),
        dimensions: embeddings.first().map_or(0, Vec::len),
        embeddings,
        ranking,
    })
}

gust_sdk::export_handler!(handle);
