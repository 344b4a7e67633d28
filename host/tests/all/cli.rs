//! The `gust` binary, as a user runs it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use gust_test_artifacts as artifacts;
use tempfile::TempDir;

fn gust(cache: &TempDir, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gust"))
        .args(args)
        .env("GUST_CACHE_DIR", cache.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_prints_the_greeting() {
    let cache = TempDir::new().unwrap();
    let out = gust(&cache, &["run", artifacts::HELLO_COMPONENT], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello, world!");

    let out = gust(
        &cache,
        &["run", artifacts::HELLO_COMPONENT, "--input", "-"],
        Some(b"CLI"),
    );
    assert_eq!(text(&out.stdout), "Hello, CLI!");

    let example = gust(&cache, &["run", artifacts::EXAMPLE_HELLO_COMPONENT], None);
    assert!(example.status.success(), "{}", text(&example.stderr));
    assert!(!example.stdout.is_empty());
}

#[test]
fn run_passes_input_files_env_and_captured_output() {
    let cache = TempDir::new().unwrap();
    let input = cache.path().join("name.txt");
    std::fs::write(&input, "GUST_TEST_VAR").unwrap();
    let input = input.to_str().unwrap();
    let out = gust(
        &cache,
        &[
            "run",
            artifacts::ENV_VAR_COMPONENT,
            "--input",
            input,
            "--env",
            "GUST_TEST_VAR=from the cli",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from the cli");

    let out = gust(&cache, &["run", artifacts::STDIO_COMPONENT], None);
    assert_eq!(text(&out.stdout), "ok");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("hello stdout") && stderr.contains("hello stderr"),
        "{stderr}"
    );
}

/// Each failure is a non-zero exit and a one-line reason.
#[test]
fn failures_exit_non_zero_with_one_line() {
    let cache = TempDir::new().unwrap();
    let empty = cache.path().join("empty.wasm");
    std::fs::write(&empty, b"").unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["run", artifacts::RETURNS_ERROR_COMPONENT],
            1,
            "error: the function returned error `invalid-input` (422)",
        ),
        (
            &["run", artifacts::PANICS_COMPONENT],
            1,
            "error: panicked: the panics fixture panicked on purpose",
        ),
        (
            &[
                "run",
                artifacts::INFINITE_LOOP_COMPONENT,
                "--timeout",
                "200ms",
            ],
            1,
            "error: timed out after 200ms",
        ),
        (
            &["run", artifacts::MEMORY_BOMB_COMPONENT, "--memory", "32MiB"],
            1,
            "error: out of memory",
        ),
        (
            &["run", artifacts::DEEP_RECURSION_COMPONENT],
            1,
            "error: stack overflow",
        ),
        (&["run", empty.to_str().unwrap()], 2, "the file is empty"),
        (&["run", "/nonexistent/x.wasm"], 2, "/nonexistent/x.wasm"),
    ];
    for (args, code, expected) in cases {
        let out = gust(&cache, args, None);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let stderr = text(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{args:?}: {stderr}");
        assert!(
            last.contains(expected),
            "{args:?}: `{last}` lacks `{expected}`"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// `--store` takes `sled` or a `postgres://` URL: anything else is a usage
/// error naming what it takes; a database that cannot be reached stops the
/// start with an error that says so (within the store's 5 s timeout), and
/// never prints the URL's password.
#[test]
fn serve_refuses_a_bad_or_unreachable_store() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    let serve = |store: &str| {
        gust(
            &dir,
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
                "--gpu",
                "cpu",
                "--store",
                store,
            ],
            None,
        )
    };
    let out = serve("mysql://db/gust");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("expected `sled` or a `postgres://` URL"),
        "{}",
        text(&out.stderr)
    );
    // Port 1 on localhost: refused at once.
    let started = std::time::Instant::now();
    let out = serve("postgres://gust:hunter2@127.0.0.1:1/gust");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("postgres"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password was printed: {stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn help_is_complete() {
    let cache = TempDir::new().unwrap();
    let out = gust(&cache, &["--help"], None);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("run"));
    let out = gust(&cache, &["run", "--help"], None);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "--input",
        "--timeout",
        "--memory",
        "--env",
        "--content-type",
        "--header",
        "--cache-dir",
        "--output-limit",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}");
    }
    let out = gust(
        &cache,
        &["run", artifacts::HELLO_COMPONENT, "--memory", "lots"],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad flag value is a usage error"
    );
}

/// The client commands against a real server, the way the README tour uses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_against_a_real_server() {
    use super::server::{ADMIN_KEY, TestServer};

    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let url = server.url("");
    let key = server.demo_key.clone().unwrap();
    let cache = TempDir::new().unwrap();
    let client = move |args: Vec<String>, key: String| {
        let url = url.clone();
        let cache_path = cache.path().to_owned();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_gust"))
                .args(&args)
                .env("GUST_URL", &url)
                .env("GUST_KEY", &key)
                .env("GUST_CACHE_DIR", &cache_path)
                .env_remove("GUST_ADMIN_KEY")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();

    let out = client(
        s(&[
            "deploy",
            artifacts::EXAMPLE_HELLO_COMPONENT,
            "--name",
            "hello",
        ]),
        key.clone(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deployed hello version 1"),
        "{}",
        text(&out.stdout)
    );
    let out = client(
        s(&[
            "deploy",
            artifacts::EXAMPLE_HELLO_COMPONENT,
            "--name",
            "hello",
        ]),
        key.clone(),
    )
    .await
    .unwrap();
    assert!(
        text(&out.stdout).contains("unchanged"),
        "{}",
        text(&out.stdout)
    );

    let out = client(s(&["invoke", "hello", "--data", "Ada"]), key.clone())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello, Ada!");

    let out = client(s(&["ls"]), key.clone()).await.unwrap();
    assert!(text(&out.stdout).contains("hello"), "{}", text(&out.stdout));
    let out = client(s(&["logs", "hello"]), key.clone()).await.unwrap();
    assert!(text(&out.stdout).contains("ok"), "{}", text(&out.stdout));

    // An API error is one line and exit 1.
    let out = client(s(&["invoke", "nope"]), key.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not-found"),
        "{}",
        text(&out.stderr)
    );

    // Admin: a new tenant's key works and sees none of demo's functions.
    let out = client(s(&["tenants", "create", "acme"]), ADMIN_KEY.to_owned())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let acme_key = text(&out.stdout).trim().to_owned();
    let out = client(s(&["ls", "--json"]), acme_key).await.unwrap();
    assert!(
        !text(&out.stdout).contains("hello"),
        "{}",
        text(&out.stdout)
    );

    let out = client(s(&["rm", "hello"]), key.clone()).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = client(s(&["invoke", "hello"]), key).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    server.stop().await;
}

/// `spawn`, `job`, `schedule`, `unschedule` and `invoke --stream` against a
/// real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_schedules_and_streams_from_the_cli() {
    use super::server::{TestServer, deploy};

    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let url = server.url("");
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    deploy(&server, &key, "stream", artifacts::STREAMER_COMPONENT).await;
    deploy(&server, &key, "errors", artifacts::RETURNS_ERROR_COMPONENT).await;
    deploy(&server, &key, "echo", artifacts::ECHO_COMPONENT).await;
    let cache = TempDir::new().unwrap();

    // `gust ws`: one invocation per line of stdin, each answer on a line.
    let (ws_url, ws_key) = (url.clone(), key.clone());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gust"))
            .args(["ws", "echo"])
            .env("GUST_URL", &ws_url)
            .env("GUST_KEY", &ws_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(b"hello\nworld\n").unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\nworld\n");

    let client = move |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let (url, key) = (url.clone(), key.clone());
        let cache_path = cache.path().to_owned();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_gust"))
                .args(&args)
                .env("GUST_URL", &url)
                .env("GUST_KEY", &key)
                .env("GUST_CACHE_DIR", &cache_path)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };

    let out = client(&["spawn", "hello", "--data", "Ada", "--wait"])
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello, Ada!");
    let id = text(&out.stderr).trim().to_owned();
    assert!(id.starts_with("job_"), "{id}");
    let out = client(&["job", &id]).await.unwrap();
    assert_eq!(text(&out.stdout), "Hello, Ada!");
    let out = client(&["job", &id, "--cancel"]).await.unwrap();
    assert_eq!(text(&out.stdout), format!("deleted {id}\n"));
    let out = client(&["job", &id]).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));

    let out = client(&["spawn", "errors"]).await.unwrap();
    let failing = text(&out.stdout).trim().to_owned();
    let out = client(&["job", &failing, "--wait"]).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("failed"),
        "{}",
        text(&out.stderr)
    );

    let out = client(&["invoke", "stream", "--stream", "--data", "one two"])
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "one\ntwo\ndone\n");

    let out = client(&[
        "schedule",
        "hello",
        "--cron",
        "0 0 1 1 *",
        "--input",
        "cron",
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("scheduled hello"));
    let out = client(&["ls"]).await.unwrap();
    assert!(
        text(&out.stdout).contains("0 0 1 1 *"),
        "{}",
        text(&out.stdout)
    );
    let out = client(&["unschedule", "hello"]).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = client(&["schedule", "hello", "--cron", "nonsense"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid-cron"),
        "{}",
        text(&out.stderr)
    );
    server.stop().await;
}
