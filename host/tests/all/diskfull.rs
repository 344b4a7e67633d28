//! A full disk: the data directory on a small tmpfs, filled up. Deploys
//! and spawns fail with a clear 507 (or 503), nothing acknowledged before
//! is lost, and deployed functions keep being served.
//!
//! Needs to mount a tmpfs (root, or CAP_SYS_ADMIN); skips with a message
//! otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use super::server::{TestServer, deploy, request};

/// A tmpfs of `mib` MiB at `at`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_work_and_keeps_serving() {
    let dir = TempDir::new().unwrap();
    let Some(_tmpfs) = Tmpfs::mount(&dir.path().join("data"), 48) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)");
        return;
    };
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    assert_eq!(
        deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT)
            .await
            .status,
        201
    );
    let invoke = |body: &'static str| {
        let url = server.url("/v1/functions/hello/invoke");
        let key = key.clone();
        async move { request("POST", &url, Some(&key), body).await }
    };
    assert_eq!(invoke("before").await.status, 200);

    fill(&server.data_dir.join("filler"));

    // New work cannot be stored: a clear refusal, not a generic error.
    let refused = deploy(&server, &key, "echo", artifacts::ECHO_COMPONENT).await;
    assert!(
        matches!(refused.status, 503 | 507),
        "{} {}",
        refused.status,
        refused.text()
    );
    let code = refused.json()["code"].as_str().unwrap_or("").to_owned();
    assert!(
        ["disk-full", "overloaded"].contains(&code.as_str()),
        "{}",
        refused.text()
    );
    // A job is small: the store's log may still have room for it (then it
    // is acknowledged, and durable), or it is refused.
    let spawn = request(
        "POST",
        &server.url("/v1/functions/hello/spawn"),
        Some(&key),
        "job",
    )
    .await;
    assert!(
        matches!(spawn.status, 202 | 503 | 507),
        "{} {}",
        spawn.status,
        spawn.text()
    );
    let job = (spawn.status == 202).then(|| spawn.json()["job_id"].as_str().unwrap().to_owned());
    // What is deployed is still served.
    for _ in 0..5 {
        let reply = invoke("during").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), "Hello, during!");
    }
    let listed = request("GET", &server.url("/v1/functions"), Some(&key), "").await;
    assert_eq!(listed.status, 200);
    assert!(listed.text().contains("\"hello\""), "{}", listed.text());
    request("GET", &server.url("/v1/functions/echo"), Some(&key), "")
        .await
        .problem(404, "not-found");

    // Stopping cannot flush what was refused; it says so. With room again,
    // and after a restart, nothing acknowledged is lost.
    let stopped = server.stop_result().await;
    std::fs::remove_file(dir.path().join("data/filler")).unwrap();
    if let Err(e) = &stopped {
        assert!(e.to_string().contains("space"), "{e}");
    }
    let server = TestServer::start(dir.path()).await;
    if let Some(id) = job {
        let job = request(
            "GET",
            &server.url(&format!("/v1/jobs/{id}")),
            Some(&key),
            "",
        )
        .await;
        assert_eq!(job.status, 200, "an acknowledged job: {}", job.text());
    }
    let reply = request(
        "POST",
        &server.url("/v1/functions/hello/invoke"),
        Some(&key),
        "after",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        deploy(&server, &key, "echo", artifacts::ECHO_COMPONENT)
            .await
            .status,
        201
    );
    server.stop().await;
}
