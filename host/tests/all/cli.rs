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
