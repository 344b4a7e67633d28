//! Resident models over HTTP: a real server, the `models` fixture, tiny
//! bert models written into the server's models directory.

use std::time::Duration;

use gust_gpu_bridge::models::ModelRegistry;
use gust_gpu_bridge::models::testing::{TINY_BERT_HIDDEN, write_tiny_bert};
use gust_gpu_bridge::{Account, Device, DeviceOptions};
use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use crate::server::{TestServer, deploy, request, tenant};

fn parse_rows(text: &str) -> Vec<Vec<f32>> {
    text.lines()
        .map(|line| line.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|v| v * v).sum::<f32>().sqrt();
    let nb = b.iter().map(|v| v * v).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Limits granting `tiny-bert` (but not `other-bert`, also in the
/// directory) on a cpu device of their own; the directory must outlive them.
fn fixture_limits() -> (gust_host::runtime::CallLimits, TempDir) {
    use gust_host::runtime::{GpuGrant, ModelGrant};

    let dir = TempDir::new().unwrap();
    write_tiny_bert(dir.path(), "tiny-bert", "", 3).unwrap();
    write_tiny_bert(dir.path(), "other-bert", "", 5).unwrap();
    let registry = std::sync::Arc::new(ModelRegistry::open(dir.path()).unwrap());
    let device = Device::start_inline(
        gust_gpu_bridge::backend::cpu::CpuBackend::new(1 << 28),
        DeviceOptions::default(),
    )
    .unwrap();
    let limits = gust_host::runtime::CallLimits {
        timeout: Duration::from_secs(20),
        gpu: Some(GpuGrant {
            devices: std::sync::Arc::from(vec![device]),
            account: Account::new("fixture", None, None),
            models: Some(ModelGrant {
                registry,
                allowed: std::sync::Arc::from(vec!["tiny-bert".to_owned()]),
                usage: Default::default(),
            }),
        }),
        ..gust_host::runtime::CallLimits::default()
    };
    (limits, dir)
}

fn ok_text(outcome: gust_host::runtime::Outcome) -> String {
    match outcome {
        gust_host::runtime::Outcome::Ok(reply) => String::from_utf8(reply.body).unwrap(),
        other => panic!("expected ok, got {other:?}"),
    }
}

/// The `models` fixture run directly by the runtime.
pub(crate) async fn fixture_embeds_and_is_refused_models_not_granted() {
    use gust_host::runtime::Outcome;

    let (limits, _models) = fixture_limits();
    let (rt, _cache) = crate::runtime();
    let component = crate::load(&rt, artifacts::MODELS_COMPONENT);
    let call = |body: &str| rt.invoke(&component, crate::request(body), &limits);
    let rows = parse_rows(&ok_text(
        call("embed tiny-bert\nthe cat\na dog").await.outcome,
    ));
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.len() == TINY_BERT_HIDDEN));
    match call("describe other-bert").await.outcome {
        Outcome::GuestError(e) => {
            assert_eq!(e.code, "gpu-forbidden", "{e:?}");
            assert_eq!(e.http_status(), 403);
        }
        other => panic!("expected gpu-forbidden, got {other:?}"),
    }
    match call("nonsense").await.outcome {
        Outcome::GuestError(e) => assert_eq!(e.http_status(), 400, "{e:?}"),
        other => panic!("expected a 400, got {other:?}"),
    }
    // More text than a model call takes is refused before it is tokenised.
    let long = format!("embed tiny-bert\n{}", "word ".repeat(220_000));
    match call(&long).await.outcome {
        Outcome::GuestError(e) => {
            assert_eq!(e.code, "gpu-invalid-argument", "{e:?}");
            assert!(e.message.contains("at most 1048576 bytes"), "{e:?}");
        }
        other => panic!("expected invalid-argument, got {other:?}"),
    }
}

/// The `wasi-nn` fixture: a guest written against the standard interface
/// gets the same embeddings through `load-by-name` and `compute`.
pub(crate) async fn wasi_nn_guest_runs_on_resident_models() {
    let (limits, _models) = fixture_limits();
    let (rt, _cache) = crate::runtime();
    let component = crate::load(&rt, artifacts::WASI_NN_COMPONENT);
    let sdk = crate::load(&rt, artifacts::MODELS_COMPONENT);
    let nn = |body: &str| rt.invoke(&component, crate::request(body), &limits);
    let expected = parse_rows(&ok_text(
        rt.invoke(
            &sdk,
            crate::request("embed tiny-bert\nthe cat sat\na dog"),
            &limits,
        )
        .await
        .outcome,
    ));

    let rows = parse_rows(&ok_text(
        nn("text tiny-bert\nthe cat sat\na dog").await.outcome,
    ));
    assert_eq!(rows.len(), 2);
    for (got, want) in rows.iter().zip(&expected) {
        assert!(cosine(got, want) > 0.99999, "{got:?} vs {want:?}");
    }

    // Token ids as i64, the way most frameworks hand them over.
    let ran = ok_text(nn("ids tiny-bert 2,5,7,9,3").await.outcome);
    let mut lines = ran.lines();
    let hidden = lines.next().unwrap();
    assert!(
        hidden.starts_with(&format!("last_hidden_state [1, 5, {TINY_BERT_HIDDEN}]: ")),
        "{ran}"
    );
    let pooled = lines.next().unwrap();
    let (head, values) = pooled.split_once(": ").unwrap();
    assert_eq!(head, format!("sentence_embedding [1, {TINY_BERT_HIDDEN}]"));
    let values: Vec<f32> = values.split(',').map(|v| v.parse().unwrap()).collect();
    assert!(cosine(&values, &expected[0]) > 0.99999);

    // wasi-nn errors arrive as its own codes.
    let refused = ok_text(nn("text other-bert\nhello").await.outcome);
    assert!(
        refused.starts_with("error ErrorCode::Security: "),
        "{refused}"
    );
    assert!(refused.contains("other-bert"), "{refused}");
    let unknown = ok_text(nn("ids tiny-bert 2,99,3").await.outcome);
    assert!(
        unknown.starts_with("error ErrorCode::InvalidArgument: "),
        "{unknown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_stay_resident_and_follow_the_tenant_policy() {
    let dir = TempDir::new().unwrap();
    let models = dir.path().join("data").join("models");
    write_tiny_bert(&models, "tiny-bert", "", 7).unwrap();
    write_tiny_bert(
        &models,
        "queue-bert",
        "\n[batching]\nmax_batch = 64\nmax_delay_ms = 1500\nmax_queue = 1\n",
        11,
    )
    .unwrap();
    let server = TestServer::start(dir.path()).await;
    let demo = server.demo_key.clone().unwrap();
    let key = tenant(&server, "models").await;
    for k in [&demo, &key] {
        let reply = deploy(&server, k, "models", artifacts::MODELS_COMPONENT).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let url = server.url("/v1/functions/models/invoke");
    let invoke = |key: &str, body: &str| {
        let (url, key, body) = (url.clone(), key.to_owned(), body.to_owned());
        async move { request("POST", &url, Some(&key), body).await }
    };

    // The same embeddings the bridge computes directly.
    let texts = "the cat sat on the mat\na dog ran in the park\nquantum physics";
    let first = invoke(&key, &format!("embed tiny-bert\n{texts}")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let rows = parse_rows(&first.text());
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.len() == TINY_BERT_HIDDEN));
    let registry = ModelRegistry::open(&models).unwrap();
    let device = Device::start_inline(
        gust_gpu_bridge::backend::cpu::CpuBackend::new(1 << 28),
        DeviceOptions::default(),
    )
    .unwrap();
    let direct = registry.load("tiny-bert", &device).await.unwrap();
    let expected = direct
        .embed(
            texts.lines().map(str::to_owned).collect(),
            &Account::new("test", None, None),
            None,
        )
        .await
        .unwrap();
    for (got, want) in rows.iter().zip(&expected) {
        assert!(cosine(got, want) > 0.99999, "{got:?} vs {want:?}");
    }

    // The second call finds the model resident: no second load.
    let listed = request("GET", &server.url("/v1/models"), Some(&key), "").await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.json()["stats"]["loads"], 1, "{}", listed.text());
    let second = invoke(&key, "describe tiny-bert").await;
    assert_eq!(second.text(), "tiny-bert bert");
    let again = invoke(&key, "embed tiny-bert\nthe cat sat on the mat").await;
    assert!(cosine(&parse_rows(&again.text())[0], &rows[0]) > 0.99999);
    let listed = request("GET", &server.url("/v1/models"), Some(&key), "")
        .await
        .json();
    assert_eq!(listed["stats"]["loads"], 1, "{listed}");
    assert!(listed["stats"]["hits"].as_u64().unwrap() >= 2, "{listed}");
    let tiny = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tiny-bert")
        .unwrap();
    assert_eq!(tiny["allowed"], true);
    assert_eq!(tiny["family"], "bert");
    assert_eq!(tiny["resident_on"][0], "cpu");

    // `run` on token ids: "[CLS] the cat sat [SEP]".
    let ran = invoke(&key, "run tiny-bert 2,5,7,9,3").await;
    assert_eq!(ran.status, 200, "{}", ran.text());
    let ran = parse_rows(&ran.text());
    let alone = invoke(&key, "embed tiny-bert\nthe cat sat").await;
    assert!(cosine(&ran[0], &parse_rows(&alone.text())[0]) > 0.99999);

    // The demo tenant's policy does not list the model.
    let forbidden = invoke(&demo, "embed tiny-bert\nhello").await;
    let problem = forbidden.problem(403, "gpu-forbidden");
    assert!(
        problem["detail"].as_str().unwrap().contains("tiny-bert"),
        "{problem}"
    );
    invoke(&key, "embed missing-bert\nhello")
        .await
        .problem(500, "gpu-not-found");
    let not_bert = invoke(&key, "generate tiny-bert 4\nhello").await;
    not_bert.problem(500, "gpu-unsupported");

    // A full batch queue: the first call waits for its batch (1.5 s), the
    // second finds the one queue slot taken and is refused at once.
    let waiting = tokio::spawn(invoke(&key, "embed queue-bert\nthe cat"));
    let mut refused = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reply = invoke(&key, "embed queue-bert\na dog").await;
        if reply.status == 503 {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("a second call while the queue is full gets 503");
    assert_eq!(
        refused
            .headers
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let problem = refused.problem(503, "gpu-quota-exceeded");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("queue is full"),
        "{problem}"
    );
    let waited = waiting.await.unwrap();
    assert_eq!(waited.status, 200, "{}", waited.text());
    server.stop().await;
}

/// The models directory `scripts/fetch-models.sh` fills, if it holds
/// `model`; otherwise prints why the calling test is skipped.
pub(crate) fn fetched_models_with(model: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("GUST_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../gust-data/models")
        });
    if dir.join(model).join("gust-model.toml").is_file() {
        return Some(dir);
    }
    eprintln!(
        "skipping: no {model} in {} (run scripts/fetch-models.sh or set GUST_MODELS_DIR)",
        dir.display()
    );
    None
}

/// The README's promise: `examples/embed` deployed, called over HTTP,
/// answers real MiniLM embeddings, and the model stays resident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embed_example_serves_minilm() {
    let Some(models) = fetched_models_with("all-minilm-l6-v2") else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let server = TestServer::start_configured(dir.path(), |config| {
        config.models_dir = Some(models);
    })
    .await;
    let key = tenant(&server, "models").await;
    let reply = deploy(&server, &key, "embed", artifacts::EXAMPLE_EMBED_COMPONENT).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let body = r#"{"sentences": ["A man is eating food.", "The new movie is awesome.",
        "A man is eating a piece of bread."], "query": "someone having a meal"}"#;
    let url = server.url("/v1/functions/embed/invoke");
    for _ in 0..2 {
        let reply = request("POST", &url, Some(&key), body).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let answer = reply.json();
        assert_eq!(answer["model"], "all-minilm-l6-v2");
        assert_eq!(answer["dimensions"], 384);
        let embeddings = answer["embeddings"].as_array().unwrap();
        assert_eq!(embeddings.len(), 3);
        let ranking = answer["ranking"].as_array().unwrap();
        let last = ranking[2]["sentence"].as_str().unwrap();
        assert_eq!(last, "The new movie is awesome.", "{answer}");
    }
    let listed = request("GET", &server.url("/v1/models"), Some(&key), "")
        .await
        .json();
    assert_eq!(listed["stats"]["loads"], 1, "{listed}");
    server.stop().await;
}

/// `examples/generate` with the real SmolLM2: a plain call answers JSON, a
/// streamed one sends the text as Server-Sent Events, piece by piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generate_example_continues_and_streams() {
    let Some(models) = fetched_models_with("smollm2-135m-instruct") else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let server = TestServer::start_configured(dir.path(), |config| {
        config.models_dir = Some(models);
    })
    .await;
    let key = tenant(&server, "llm").await;
    let reply = deploy(
        &server,
        &key,
        "generate",
        artifacts::EXAMPLE_GENERATE_COMPONENT,
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let url = server.url("/v1/functions/generate/invoke");
    let plain = request(
        "POST",
        &url,
        Some(&key),
        r#"{"prompt": "The capital of France is", "chat": false, "max_tokens": 6}"#,
    )
    .await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    let text = plain.json()["text"].as_str().unwrap().to_owned();
    assert!(text.contains("Paris"), "{text:?}");

    let streamed = crate::server::request_with(
        "POST",
        &url,
        Some(&key),
        r#"{"prompt": "The capital of France is", "chat": false, "max_tokens": 6, "stream": true}"#,
        &[("accept", "text/event-stream")],
    )
    .await;
    assert_eq!(streamed.status, 200, "{}", streamed.text());
    let events = streamed.text();
    let pieces: Vec<&str> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert!(pieces.len() >= 3, "one event per piece: {events}");
    assert!(pieces.concat().contains("Paris"), "{events}");
    assert!(events.contains("event: done"), "{events}");
    server.stop().await;
}

/// A wasi-nn guest generating with the real SmolLM2 through `compute`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_nn_generates_with_a_resident_llama() {
    use gust_host::runtime::{GpuGrant, ModelGrant};

    let Some(models) = fetched_models_with("smollm2-135m-instruct") else {
        return;
    };
    let registry = std::sync::Arc::new(ModelRegistry::open(&models).unwrap());
    let device = Device::start_inline(
        gust_gpu_bridge::backend::cpu::CpuBackend::new(1 << 31),
        DeviceOptions::default(),
    )
    .unwrap();
    let limits = gust_host::runtime::CallLimits {
        timeout: Duration::from_secs(300),
        gpu: Some(GpuGrant {
            devices: std::sync::Arc::from(vec![device]),
            account: Account::new("fixture", None, None),
            models: Some(ModelGrant {
                registry,
                allowed: std::sync::Arc::from(vec!["smollm2-135m-instruct".to_owned()]),
                usage: Default::default(),
            }),
        }),
        ..gust_host::runtime::CallLimits::default()
    };
    let (rt, _cache) = crate::runtime();
    let component = crate::load(&rt, artifacts::WASI_NN_COMPONENT);
    let text = ok_text(
        rt.invoke(
            &component,
            crate::request("prompt smollm2-135m-instruct 6\nThe capital of France is"),
            &limits,
        )
        .await
        .outcome,
    );
    assert!(text.contains("Paris"), "{text:?}");
}
