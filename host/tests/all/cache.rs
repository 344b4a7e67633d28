//! The compiled-component cache: compile once, verify before loading.

use std::path::{Path, PathBuf};

use gust_host::runtime::{LoadSource, Runtime, RuntimeConfig};
use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use super::invoke;

fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    entries.sort();
    entries
}

fn fresh_runtime(cache: &Path) -> Runtime {
    Runtime::new(RuntimeConfig::new(cache)).unwrap()
}

#[tokio::test]
async fn a_second_load_compiles_nothing() {
    let dir = TempDir::new().unwrap();
    let bytes = std::fs::read(artifacts::HELLO_COMPONENT).unwrap();

    let first = fresh_runtime(dir.path());
    let loaded = first.load(&bytes).unwrap();
    assert_eq!(loaded.source(), LoadSource::Compiled);
    assert_eq!(first.stats().compiles, 1);
    assert_eq!(cache_entries(dir.path()).len(), 1);
    // Same runtime, same bytes: served from the cache.
    assert_eq!(first.load(&bytes).unwrap().source(), LoadSource::Cache);
    assert_eq!(first.stats().compiles, 1);
    drop(first);

    // A "restart": a new engine over the same cache directory.
    let second = fresh_runtime(dir.path());
    let loaded = second.load(&bytes).unwrap();
    assert_eq!(loaded.source(), LoadSource::Cache);
    let stats = second.stats();
    assert_eq!(
        (stats.compiles, stats.cache_hits, stats.cache_rejections),
        (0, 1, 0)
    );
    assert!(invoke(&second, &loaded, "").await.outcome.is_ok());
}

#[tokio::test]
async fn a_corrupt_cache_file_is_recompiled() {
    let dir = TempDir::new().unwrap();
    let bytes = std::fs::read(artifacts::HELLO_COMPONENT).unwrap();
    fresh_runtime(dir.path()).load(&bytes).unwrap();
    let entry = cache_entries(dir.path()).pop().unwrap();
    let mut artifact = std::fs::read(&entry).unwrap();
    let middle = artifact.len() / 2;
    artifact[middle] ^= 0xff;
    std::fs::write(&entry, &artifact).unwrap();

    let rt = fresh_runtime(dir.path());
    let loaded = rt.load(&bytes).unwrap();
    assert_eq!(loaded.source(), LoadSource::Compiled);
    let stats = rt.stats();
    assert_eq!((stats.compiles, stats.cache_rejections), (1, 1));
    assert!(invoke(&rt, &loaded, "").await.outcome.is_ok());
    // The rewritten entry is trusted again.
    let again = fresh_runtime(dir.path());
    assert_eq!(again.load(&bytes).unwrap().source(), LoadSource::Cache);
}

#[tokio::test]
async fn a_foreign_or_truncated_file_is_never_loaded() {
    let dir = TempDir::new().unwrap();
    let hello = std::fs::read(artifacts::HELLO_COMPONENT).unwrap();
    let echo = std::fs::read(artifacts::ECHO_COMPONENT).unwrap();
    let rt = fresh_runtime(dir.path());
    rt.load(&hello).unwrap();
    rt.load(&echo).unwrap();
    drop(rt);
    let entries = cache_entries(dir.path());
    assert_eq!(entries.len(), 2);
    // Swap the two artifacts (each a valid compiled component, with its own
    // MAC file left in place), then truncate a copy: all must be rejected.
    let (a, b) = (
        std::fs::read(&entries[0]).unwrap(),
        std::fs::read(&entries[1]).unwrap(),
    );
    std::fs::write(&entries[0], &b).unwrap();
    std::fs::write(&entries[1], &a[..a.len() / 3]).unwrap();

    let rt = fresh_runtime(dir.path());
    assert_eq!(rt.load(&hello).unwrap().source(), LoadSource::Compiled);
    assert_eq!(rt.load(&echo).unwrap().source(), LoadSource::Compiled);
    assert_eq!(rt.stats().cache_rejections, 2);

    // Files written by another host (another secret key) are foreign too.
    std::fs::write(dir.path().join("cache.key"), [7u8; 32]).unwrap();
    let rt = fresh_runtime(dir.path());
    assert_eq!(rt.load(&hello).unwrap().source(), LoadSource::Compiled);
    assert_eq!(rt.stats().cache_rejections, 1);
}

#[test]
fn the_cache_key_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    drop(fresh_runtime(dir.path()));
    let mode = std::fs::metadata(dir.path().join("cache.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "cache key mode {mode:o}");
}

#[tokio::test]
async fn a_restart_loads_from_the_artifact_alone() {
    let dir = TempDir::new().unwrap();
    let bytes = std::fs::read(artifacts::HELLO_COMPONENT).unwrap();
    let digest = gust_host::digest::Digest::of(&bytes);
    let first = fresh_runtime(dir.path());
    // Nothing compiled yet: the caller must fetch the bytes.
    assert!(first.load_compiled(&digest).is_none());
    first.load(&bytes).unwrap();
    drop(first);

    let second = fresh_runtime(dir.path());
    let loaded = second.load_compiled(&digest).unwrap().unwrap();
    assert_eq!(
        (loaded.source(), loaded.digest()),
        (LoadSource::Cache, digest)
    );
    let stats = second.stats();
    assert_eq!((stats.compiles, stats.cache_hits), (0, 1));
    assert!(invoke(&second, &loaded, "").await.outcome.is_ok());
}

#[tokio::test]
async fn a_rejected_artifact_is_removed_and_the_bytes_compiled_once() {
    let dir = TempDir::new().unwrap();
    let bytes = std::fs::read(artifacts::HELLO_COMPONENT).unwrap();
    let digest = gust_host::digest::Digest::of(&bytes);
    fresh_runtime(dir.path()).load(&bytes).unwrap();
    let entry = cache_entries(dir.path()).pop().unwrap();
    // One flipped byte anywhere fails the MAC: the last one here.
    let mut artifact = std::fs::read(&entry).unwrap();
    let last = artifact.len() - 1;
    artifact[last] ^= 1;
    std::fs::write(&entry, &artifact).unwrap();

    let rt = fresh_runtime(dir.path());
    assert!(rt.load_compiled(&digest).is_none());
    assert_eq!(rt.stats().cache_rejections, 1);
    assert!(cache_entries(dir.path()).is_empty());
    // The load that follows compiles without meeting the bad entry again.
    assert_eq!(rt.load(&bytes).unwrap().source(), LoadSource::Compiled);
    let stats = rt.stats();
    assert_eq!((stats.compiles, stats.cache_rejections), (1, 1));
    assert_eq!(
        fresh_runtime(dir.path())
            .load_compiled(&digest)
            .unwrap()
            .unwrap()
            .source(),
        LoadSource::Cache
    );
}

/// WASI 0.3 components run on an engine of their own (component-model
/// async on), with a cache of its own beside the other engine's: found again
/// after a restart, and cleaned up with it.
#[tokio::test]
async fn a_wasi_0_3_component_is_cached_apart_and_found_after_a_restart() {
    use std::sync::Arc;

    let dir = TempDir::new().unwrap();
    let p3 = std::fs::read(artifacts::HTTP_P3_COMPONENT).unwrap();
    let p2 = std::fs::read(artifacts::HELLO_COMPONENT).unwrap();
    let (p3_digest, p2_digest) = (
        gust_host::digest::Digest::of(&p3),
        gust_host::digest::Digest::of(&p2),
    );
    let first = fresh_runtime(dir.path());
    assert_eq!(first.load(&p3).unwrap().world().as_str(), "http-p3");
    first.load(&p2).unwrap();
    let wasi3 = dir.path().join("wasi3");
    assert_eq!(cache_entries(dir.path()).len(), 1, "the WASI 0.2 entry");
    assert_eq!(cache_entries(&wasi3).len(), 1, "the WASI 0.3 entry");
    drop(first);

    let second = Arc::new(fresh_runtime(dir.path()));
    let loaded = second.load_compiled(&p3_digest).unwrap().unwrap();
    assert_eq!(
        (loaded.source(), loaded.world().as_str()),
        (LoadSource::Cache, "http-p3")
    );
    let hello = second.load_compiled(&p2_digest).unwrap().unwrap();
    assert_eq!(hello.world().as_str(), "handler");
    assert_eq!(second.stats().compiles, 0);
    // Both still run, each on its own engine.
    let request = hyper::Request::builder()
        .uri("http://localhost/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let call = second
        .serve_http(
            &loaded,
            request,
            &super::limits(),
            gust_host::runtime::CallControl::default(),
        )
        .ok()
        .unwrap();
    assert_eq!(call.response.await.unwrap().unwrap().status(), 200);
    assert!(call.completion.await.unwrap().outcome.is_ok());
    assert!(invoke(&second, &hello, "").await.outcome.is_ok());

    // Keeping only the WASI 0.3 component removes the other's artifact,
    // and forgetting it empties its own cache.
    assert_eq!(second.retain_compiled(&[p3_digest]).unwrap(), 2);
    assert!(cache_entries(dir.path()).is_empty());
    assert_eq!(cache_entries(&wasi3).len(), 1);
    second.forget_compiled(&p3_digest).unwrap();
    assert!(cache_entries(&wasi3).is_empty());
}
