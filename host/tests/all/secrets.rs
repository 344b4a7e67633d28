//! Tenant secrets end to end on the embedded store: the API, the CLI, a
//! function that reads (and carelessly prints) one, rotation, deletion,
//! other tenants, and what the disk and the records hold.

use std::process::{Command, Stdio};

use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use crate::server::{TestServer, request, request_with, tenant};

const TOKEN: &str = "sk-live-4f9a1c2e7b";
const ROTATED: &str = "sk-live-rotated-88d1";

/// Every file under `dir`, read whole.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                found.push((path, bytes));
            }
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_only_the_functions_deployed_with_them() {
    let dir = TempDir::new().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/capped.toml"), "max_secrets = 2\n").unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    let put = |name: &str, value: &'static [u8], key: &str| {
        let url = server.url(&format!("/v1/secrets/{name}"));
        let key = key.to_owned();
        async move { request("PUT", &url, Some(&key), value).await }
    };

    // Set, list (names and times, no values), replace.
    let created = put("API_TOKEN", TOKEN.as_bytes(), &key).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.json()["name"], "API_TOKEN");
    let list = request("GET", &server.url("/v1/secrets"), Some(&key), "").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["secrets"][0]["name"], "API_TOKEN");
    assert!(list.json()["secrets"][0]["updated_at"].is_string());
    assert!(!list.text().contains(TOKEN), "{}", list.text());

    // Bad input: clear codes, nothing stored.
    put("lower", b"x", &key)
        .await
        .problem(400, "invalid-secret-name");
    put("1ABC", b"x", &key)
        .await
        .problem(400, "invalid-secret-name");
    put("EMPTY", b"", &key).await.problem(400, "invalid-secret");
    let big = vec![b'a'; 64 * 1024 + 1];
    let reply = request("PUT", &server.url("/v1/secrets/BIG"), Some(&key), big).await;
    reply.problem(400, "invalid-secret");
    put("BINARY", b"\xff\xfe", &key)
        .await
        .problem(400, "invalid-secret");
    let list = request("GET", &server.url("/v1/secrets"), Some(&key), "").await;
    assert_eq!(list.json()["secrets"].as_array().unwrap().len(), 1);

    // A deploy names existing secrets only.
    let bytes = std::fs::read(artifacts::ENV_VAR_COMPONENT).unwrap();
    let missing = request(
        "PUT",
        &server.url("/v1/functions/env?secrets=API_TOKEN,NOPE"),
        Some(&key),
        bytes.clone(),
    )
    .await;
    let problem = missing.problem(400, "invalid-secret");
    assert!(
        problem["detail"].as_str().unwrap().contains("NOPE"),
        "{problem}"
    );
    let deployed = request(
        "PUT",
        &server.url("/v1/functions/env?secrets=API_TOKEN"),
        Some(&key),
        bytes.clone(),
    )
    .await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    assert_eq!(deployed.json()["secrets"][0], "API_TOKEN");
    // Another function of the same tenant, deployed without it, sees
    // nothing.
    let plain = request(
        "PUT",
        &server.url("/v1/functions/plain"),
        Some(&key),
        bytes.clone(),
    )
    .await;
    assert_eq!(plain.status, 201);

    let invoke = |function: &str, body: &'static str| {
        let url = server.url(&format!("/v1/functions/{function}/invoke"));
        let key = key.clone();
        async move { request("POST", &url, Some(&key), body).await }
    };
    let read = invoke("env", "API_TOKEN").await;
    assert_eq!((read.status, read.text().as_str()), (200, TOKEN));
    assert_eq!(invoke("plain", "API_TOKEN").await.status, 404);

    // Printed, it is redacted from the captured output.
    let printed = invoke("env", "print:API_TOKEN").await;
    assert_eq!(printed.text(), "printed");
    let id = printed.headers["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let record = crate::server::invocation_record(&server, &key, &id).await;
    let stdout = record["stdout"].as_str().unwrap();
    let stderr = record["stderr"].as_str().unwrap();
    assert_eq!(stdout, "config: API_TOKEN=[secret API_TOKEN]\n");
    assert_eq!(stderr, "using token [secret API_TOKEN] for the call\n");
    let logs = request("GET", &server.url("/v1/functions/env/logs"), Some(&key), "").await;
    assert!(!logs.text().contains(TOKEN), "{}", logs.text());

    // Rotated: the next call sees the new value.
    let replaced = put("API_TOKEN", ROTATED.as_bytes(), &key).await;
    assert_eq!(replaced.status, 200, "{}", replaced.text());
    assert_eq!(invoke("env", "API_TOKEN").await.text(), ROTATED);

    // Another tenant sees none of it and cannot use it.
    let other = tenant(&server, "other").await;
    let list = request("GET", &server.url("/v1/secrets"), Some(&other), "").await;
    assert_eq!(list.json()["secrets"].as_array().unwrap().len(), 0);
    let theirs = request(
        "PUT",
        &server.url("/v1/functions/env?secrets=API_TOKEN"),
        Some(&other),
        bytes.clone(),
    )
    .await;
    theirs.problem(400, "invalid-secret");
    let delete = request(
        "DELETE",
        &server.url("/v1/secrets/API_TOKEN"),
        Some(&other),
        "",
    )
    .await;
    delete.problem(404, "not-found");

    // The per-tenant cap.
    let capped = tenant(&server, "capped").await;
    assert_eq!(put("A", b"one1", &capped).await.status, 201);
    assert_eq!(put("B", b"two2", &capped).await.status, 201);
    put("C", b"three", &capped)
        .await
        .problem(400, "too-many-secrets");
    assert_eq!(
        put("A", b"one-again", &capped).await.status,
        200,
        "replacing is not adding"
    );

    // Neither value is on disk in the clear.
    let data_dir = server.data_dir.clone();
    server.stop().await;
    for (path, bytes) in files(&data_dir) {
        for value in [TOKEN, ROTATED] {
            assert!(
                !contains(&bytes, value.as_bytes()),
                "{} holds the secret in the clear",
                path.display()
            );
        }
    }
    assert!(data_dir.join("secrets.key").exists());
}

/// Runs `gust ARGS` against the host at `url` with `key`, `stdin` piped
/// in: the exit code, stdout and stderr.
pub(crate) fn gust(
    url: &str,
    key: &str,
    args: &[&str],
    stdin: &[u8],
) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gust"))
        .args(args)
        .env("GUST_URL", url)
        .env("GUST_KEY", key)
        .env_remove("GUST_ADMIN_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_secret_fails_the_calls_that_need_it_and_the_cli_manages_them() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    let url = server.url("");
    let blocking = |args: Vec<&'static str>, stdin: &'static [u8]| {
        let (url, key) = (url.clone(), key.clone());
        tokio::task::spawn_blocking(move || gust(&url, &key, &args, stdin))
    };
    let (code, out, err) = blocking(vec!["secrets", "set", "DB_PASSWORD"], b"hunter2-long\n")
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "set DB_PASSWORD\n");
    let (code, out, _) = blocking(vec!["secrets", "ls"], b"").await.unwrap();
    assert_eq!(code, Some(0));
    assert!(
        out.contains("DB_PASSWORD") && !out.contains("hunter2"),
        "{out}"
    );
    let (code, out, err) = blocking(
        vec![
            "deploy",
            artifacts::ENV_VAR_COMPONENT,
            "--name",
            "env",
            "--secret",
            "DB_PASSWORD",
        ],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deployed env"), "{out}");
    let invoke = || {
        let url = server.url("/v1/functions/env/invoke");
        let key = key.clone();
        async move {
            request_with(
                "POST",
                &url,
                Some(&key),
                "DB_PASSWORD",
                &[("content-type", "text/plain")],
            )
            .await
        }
    };
    // The trailing newline of stdin is not part of the value.
    assert_eq!(invoke().await.text(), "hunter2-long");
    let (code, out, _) = blocking(vec!["secrets", "rm", "DB_PASSWORD"], b"")
        .await
        .unwrap();
    assert_eq!((code, out.as_str()), (Some(0), "deleted DB_PASSWORD\n"));
    let problem = invoke().await.problem(409, "secret-missing");
    assert!(
        problem["detail"].as_str().unwrap().contains("DB_PASSWORD"),
        "{problem}"
    );
    // Set again, the function works again.
    let (code, _, err) = blocking(vec!["secrets", "set", "DB_PASSWORD"], b"hunter3-long")
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(invoke().await.text(), "hunter3-long");
    // A bad name is refused by the host with its code; no value is an
    // error before anything is sent.
    let (code, _, err) = blocking(vec!["secrets", "set", "bad-name"], b"x")
        .await
        .unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid-secret-name"), "{err}");
    let (code, _, err) = blocking(vec!["secrets", "set", "EMPTY"], b"")
        .await
        .unwrap();
    assert_eq!(code, Some(2));
    assert!(err.contains("--from-file"), "{err}");
    server.stop().await;
}
