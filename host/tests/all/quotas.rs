//! Deploy quotas and disk hygiene: `max_functions` and `max_storage_bytes`
//! refuse with 507 before compiling; replaced and deleted versions take
//! their blobs and compiled artifacts with them; a restart removes what a
//! crash left behind.

use std::path::Path;

use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use super::server::{TestServer, deploy, request, tenant};

fn size(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Files in `dir` whose name ends with `suffix`.
fn count(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(suffix))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_beyond_the_quotas_are_refused_before_compiling() {
    let dir = TempDir::new().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("two.toml"), "max_functions = 2\n").unwrap();
    let room = size(artifacts::HELLO_COMPONENT) + size(artifacts::ECHO_COMPONENT) + 16;
    std::fs::write(
        policies.join("small.toml"),
        format!("max_storage_bytes = {room}\n"),
    )
    .unwrap();
    let server = TestServer::start(dir.path()).await;

    let two = tenant(&server, "two").await;
    for (name, path) in [
        ("a", artifacts::HELLO_COMPONENT),
        ("b", artifacts::ECHO_COMPONENT),
    ] {
        assert_eq!(deploy(&server, &two, name, path).await.status, 201);
    }
    let compiles = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("gust_compile_total "))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    let metrics = || async {
        request(
            "GET",
            &server.url("/metrics"),
            Some(super::server::ADMIN_KEY),
            "",
        )
        .await
        .text()
    };
    let before = compiles(&metrics().await);
    let third = deploy(&server, &two, "c", artifacts::COUNTER_COMPONENT).await;
    let problem = third.problem(507, "function-quota");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("max_functions")
    );
    assert_eq!(
        compiles(&metrics().await),
        before,
        "refused before compiling"
    );
    // Replacing one is not a new function.
    assert_eq!(
        deploy(&server, &two, "a", artifacts::COUNTER_COMPONENT)
            .await
            .status,
        201
    );
    // After a delete there is room again.
    let deleted = request("DELETE", &server.url("/v1/functions/b"), Some(&two), "").await;
    assert_eq!(deleted.status, 204);
    assert_eq!(
        deploy(&server, &two, "c", artifacts::ECHO_COMPONENT)
            .await
            .status,
        201
    );

    let small = tenant(&server, "small").await;
    assert_eq!(
        deploy(&server, &small, "a", artifacts::HELLO_COMPONENT)
            .await
            .status,
        201
    );
    assert_eq!(
        deploy(&server, &small, "b", artifacts::ECHO_COMPONENT)
            .await
            .status,
        201
    );
    let over = deploy(&server, &small, "c", artifacts::HELLO_COMPONENT).await;
    let problem = over.problem(507, "storage-quota");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("max_storage_bytes")
    );
    // Nothing of the refused deploy stays: its function does not exist.
    request("GET", &server.url("/v1/functions/c"), Some(&small), "")
        .await
        .problem(404, "not-found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_and_deleted_versions_leave_nothing_behind() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    let blobs = server.data_dir.join("blobs");
    let compiled = server.data_dir.join("compiled");
    assert_eq!(
        deploy(&server, &key, "f", artifacts::HELLO_COMPONENT)
            .await
            .status,
        201
    );
    assert_eq!((count(&blobs, ".wasm"), count(&compiled, ".cwasm")), (1, 1));
    // A new version of f: the old bytes and code go.
    assert_eq!(
        deploy(&server, &key, "f", artifacts::ECHO_COMPONENT)
            .await
            .status,
        201
    );
    assert_eq!((count(&blobs, ".wasm"), count(&compiled, ".cwasm")), (1, 1));
    assert_eq!(count(&compiled, ".cwasm.mac"), 1);
    // Bytes another function still uses stay.
    assert_eq!(
        deploy(&server, &key, "g", artifacts::ECHO_COMPONENT)
            .await
            .status,
        201
    );
    let deleted = request("DELETE", &server.url("/v1/functions/f"), Some(&key), "").await;
    assert_eq!(deleted.status, 204);
    assert_eq!((count(&blobs, ".wasm"), count(&compiled, ".cwasm")), (1, 1));
    let call = request(
        "POST",
        &server.url("/v1/functions/g/invoke"),
        Some(&key),
        "hi",
    )
    .await;
    assert_eq!(call.status, 200);
    server.stop().await;

    // What a crash can leave: a blob no function points at, and compiled
    // code of another engine. The next start removes both.
    let orphan = std::fs::read(artifacts::HELLO_COMPONENT).unwrap();
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&orphan))
    };
    std::fs::write(blobs.join(format!("{digest}.wasm")), &orphan).unwrap();
    std::fs::write(compiled.join("00ff.cwasm"), b"stale").unwrap();
    std::fs::write(compiled.join("00ff.cwasm.mac"), b"stale").unwrap();
    let server = TestServer::start(dir.path()).await;
    assert_eq!(count(&blobs, ".wasm"), 1);
    assert_eq!(count(&compiled, ".cwasm"), 1);
    assert_eq!(count(&compiled, ".cwasm.mac"), 1);
    let call = request(
        "POST",
        &server.url("/v1/functions/g/invoke"),
        Some(&key),
        "hi",
    )
    .await;
    assert_eq!(call.status, 200);
    server.stop().await;
}
