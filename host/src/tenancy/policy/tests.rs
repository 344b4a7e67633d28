use super::*;
use crate::runtime::Destination;

const FILE: &str = "policies/acme.toml";

fn parse(text: &str) -> Result<Policy, InvalidPolicy> {
    Policy::default().with_overrides(Path::new(FILE), text)
}

/// Parses `text`, expects an error, and checks that its message names the
/// file, `line` and `key`.
#[track_caller]
fn expect_error(text: &str, line: usize, key: &str) -> InvalidPolicy {
    let err = parse(text).expect_err("expected an error");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{FILE}:{line}:")),
        "expected {FILE}:{line}: in {shown:?}"
    );
    assert!(
        shown.contains(&format!("key `{key}`")),
        "expected key `{key}` in {shown:?}"
    );
    assert_eq!(err.key.as_deref(), Some(key));
    assert_eq!(err.location.map(|l| l.line), Some(line));
    err
}

#[test]
fn builtin_defaults() {
    let p = Policy::default();
    assert_eq!(p.timeout_ms, 10_000);
    assert_eq!(p.memory_mb, 128);
    assert_eq!(p.max_concurrency, 16);
    assert_eq!(p.max_body_bytes, 10 << 20);
    assert_eq!(p.max_component_bytes, 64 << 20);
    assert_eq!(p.log_bytes, 64 << 10);
    assert!(p.env.is_empty());
    assert!(p.volumes.is_empty());
    assert!(p.outbound_http.is_empty());
    assert_eq!(p.gpu.backends, [GpuBackend::Cpu]);
    assert_eq!(p.gpu.memory_mb, 1024);
    assert_eq!(p.gpu.time_ms_per_minute, 15_000);
    assert!(p.gpu.models.is_empty());
    assert!(!p.allows_outbound(true, "example.com", 443));
}

#[test]
fn builtin_call_limits_match_runtime_defaults() {
    let limits = Policy::default().call_limits("acme", "resize");
    let runtime = CallLimits::default();
    assert_eq!(limits.timeout, runtime.timeout);
    assert_eq!(limits.memory_bytes, runtime.memory_bytes);
    assert_eq!(limits.stdout_limit, runtime.stdout_limit);
    assert_eq!(limits.stderr_limit, runtime.stderr_limit);
    assert!(limits.env.is_empty());
    assert!(
        limits
            .outbound
            .admits(true, &Destination::Name("example.com".to_owned()), 443)
            .is_err()
    );
    // Every call gets a fresh instance unless the policy says otherwise.
    assert_eq!(limits.reuse, runtime.reuse);
    assert_eq!(limits.reuse, None);
}

#[test]
fn instance_reuse_is_scoped_to_the_function() {
    let p = parse(
        "reuse_instances = 100
",
    )
    .unwrap();
    let reuse = p.call_limits("acme", "resize").reuse.unwrap();
    assert_eq!(&*reuse.scope, "acme/resize");
    assert_eq!(reuse.max_uses, 100);
    let other = p.call_limits("acme", "thumbnail").reuse.unwrap();
    assert_ne!(reuse.scope, other.scope);
    // One use per instance is no reuse at all.
    assert_eq!(
        parse(
            "reuse_instances = 1
"
        )
        .unwrap()
        .call_limits("a", "f")
        .reuse,
        None
    );
    expect_error(
        "reuse_instances = 1000001
",
        1,
        "reuse_instances",
    );
}

#[test]
fn ready_instances_are_on_by_default_scoped_to_the_function_and_bounded() {
    let ready = Policy::default()
        .call_limits("acme", "resize")
        .ready
        .unwrap();
    assert_eq!(&*ready.scope, "acme/resize");
    assert_eq!(ready.count, 1);
    let p = parse("ready_instances = 4\n").unwrap();
    assert_eq!(p.call_limits("acme", "resize").ready.unwrap().count, 4);
    assert_eq!(
        parse("ready_instances = 0\n")
            .unwrap()
            .call_limits("a", "f")
            .ready,
        None
    );
    expect_error("ready_instances = 17\n", 1, "ready_instances");
}

#[test]
fn call_limits_map_the_policy() {
    let p = parse(
        "timeout_ms = 1500\nmemory_mb = 64\nlog_bytes = \"1 KiB\"\n[env]\nB = \"2\"\nA = \"1\"\n",
    )
    .unwrap();
    let limits = p.call_limits("acme", "resize");
    assert_eq!(limits.timeout, Duration::from_millis(1500));
    assert_eq!(limits.memory_bytes, 64 << 20);
    assert_eq!(limits.stdout_limit, 1024);
    assert_eq!(limits.stderr_limit, 1024);
    let env: Vec<_> = limits.env.iter().cloned().collect();
    assert_eq!(
        env,
        [
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "2".to_owned())
        ]
    );
    // Shared, not copied.
    assert!(Arc::ptr_eq(&limits.env, &p.env));
    assert!(
        limits
            .outbound
            .admits(true, &Destination::Name("example.com".to_owned()), 443)
            .is_err()
    );

    let p = parse("outbound_http = [\"*.example.com:443\"]\n").unwrap();
    let outbound = p.call_limits("acme", "resize").outbound;
    assert!(
        outbound
            .admits(true, &Destination::Name("api.example.com".to_owned()), 443)
            .is_ok()
    );
    assert!(
        outbound
            .admits(true, &Destination::Name("api.example.com".to_owned()), 80)
            .is_err()
    );
    assert!(
        outbound
            .admits(true, &Destination::Name("example.com".to_owned()), 443)
            .is_err()
    );
}

#[test]
fn shipped_default_toml_equals_builtin_defaults() {
    let text = include_str!("../../../../policies/default.toml");
    let parsed = Policy::default()
        .with_overrides(Path::new("policies/default.toml"), text)
        .unwrap();
    assert_eq!(parsed, Policy::default());
    // Every key is spelled out, so the parse above is not vacuous: applied on
    // top of a very different policy it must bring back the defaults.
    let other = parse(include_str!("../../../../policies/examples/gpu-team.toml")).unwrap();
    assert_ne!(other, Policy::default());
    let back = other
        .with_overrides(Path::new("policies/default.toml"), text)
        .unwrap();
    assert_eq!(back, Policy::default());
}

#[test]
fn gpu_team_example_parses() {
    let p = parse(include_str!("../../../../policies/examples/gpu-team.toml")).unwrap();
    assert_eq!(p.timeout_ms, 60_000);
    assert_eq!(p.memory_mb, 1024);
    assert_eq!(p.max_body_bytes, 32 << 20);
    assert_eq!(p.max_component_bytes, 256 << 20);
    assert_eq!(p.max_concurrency, 16, "not overridden");
    assert!(p.allows_outbound(true, "huggingface.co", 443));
    assert!(p.allows_outbound(true, "cdn-lfs.hf.co", 443));
    assert!(!p.allows_outbound(true, "huggingface.co", 80));
    assert_eq!(&*p.env, [("HF_HOME".to_owned(), "/models".to_owned())]);
    assert_eq!(p.volumes.len(), 2);
    assert!(p.volumes[0].read_only);
    assert!(!p.volumes[1].read_only);
    assert_eq!(p.gpu.backends, [GpuBackend::Cuda, GpuBackend::Cpu]);
    assert_eq!(p.gpu.memory_mb, 16384);
    assert_eq!(p.gpu.time_ms_per_minute, 15_000, "not overridden");
    assert!(p.gpu.allows_model("bge-small-en-v1.5"));
    assert!(!p.gpu.allows_model("gpt-5"));
}

#[test]
fn override_of_one_key_keeps_the_rest() {
    let base = parse("memory_mb = 256\ntimeout_ms = 2000\n[env]\nA = \"1\"\n").unwrap();
    let tenant = base
        .with_overrides(Path::new(FILE), "# only this\nmemory_mb = 512\n")
        .unwrap();
    let mut expected = base.clone();
    expected.memory_mb = 512;
    assert_eq!(tenant, expected);
    assert_eq!(tenant.timeout_ms, 2000);
    assert_eq!(tenant.env.len(), 1);
}

#[test]
fn empty_file_changes_nothing() {
    assert_eq!(parse("").unwrap(), Policy::default());
    assert_eq!(parse("# just a comment\n\n").unwrap(), Policy::default());
}

#[test]
fn lists_and_env_replace_but_gpu_keys_merge() {
    let base = parse(
        "outbound_http = [\"a.example.com\"]\n[env]\nA = \"1\"\nB = \"2\"\n[gpu]\nbackends = [\"cpu\", \"cuda\"]\nmodels = [\"m1\"]\n",
    )
    .unwrap();
    let tenant = base
        .with_overrides(
            Path::new(FILE),
            "outbound_http = [\"b.example.com\"]\n[env]\nC = \"3\"\n[gpu]\nmemory_mb = 2048\n",
        )
        .unwrap();
    assert!(!tenant.allows_outbound(true, "a.example.com", 443));
    assert!(tenant.allows_outbound(true, "b.example.com", 443));
    assert_eq!(&*tenant.env, [("C".to_owned(), "3".to_owned())]);
    assert_eq!(tenant.gpu.memory_mb, 2048);
    assert_eq!(tenant.gpu.backends, [GpuBackend::Cpu, GpuBackend::Cuda]);
    assert_eq!(tenant.gpu.models, ["m1"]);
    // An explicitly empty list or table clears the default's.
    let cleared = base
        .with_overrides(Path::new(FILE), "outbound_http = []\nenv = {}\n")
        .unwrap();
    assert!(cleared.outbound_http.is_empty());
    assert!(cleared.env.is_empty());
}

#[test]
fn byte_counts_accept_integers_and_units() {
    let p = parse("max_body_bytes = 1000\nmax_component_bytes = \"2 MiB\"\nlog_bytes = \"1KB\"\n")
        .unwrap();
    assert_eq!(p.max_body_bytes, 1000);
    assert_eq!(p.max_component_bytes, 2 << 20);
    assert_eq!(p.log_bytes, 1000);
    assert_eq!(parse("log_bytes = 0\n").unwrap().log_bytes, 0);
}

// --- Errors: file, line and key -------------------------------------------

#[test]
fn error_unknown_key() {
    let err = expect_error("timeout_ms = 5\nmemory_mb = 64\nbogus = 1\n", 3, "bogus");
    assert!(err.message.contains("unknown field `bogus`"), "{err}");
    assert_eq!(err.location.map(|l| l.column), Some(1));
    // Nested tables name the full path.
    expect_error("[gpu]\nmemory_mb = 1\nmemroy_mb = 2\n", 3, "gpu.memroy_mb");
    expect_error(
        "[[volumes]]\nname = \"a\"\npath = \"a\"\nmount = \"/a\"\nreadonly = true\n",
        5,
        "volumes[0].readonly",
    );
}

#[test]
fn error_wrong_type() {
    let err = expect_error("\n\nmemory_mb = \"lots\"\n", 3, "memory_mb");
    assert!(err.message.contains("invalid type"), "{err}");
    assert_eq!(err.location.map(|l| l.column), Some(13));
    expect_error("[gpu]\nbackends = \"cpu\"\n", 2, "gpu.backends");
    expect_error("outbound_http = [\"a.com\", 7]\n", 1, "outbound_http[1]");
    expect_error("env = { A = \"1\", B = 2 }\n", 1, "env.B");
    expect_error("log_bytes = true\n", 1, "log_bytes");
    expect_error("max_body_bytes = \"ten megs\"\n", 1, "max_body_bytes");
    expect_error("log_bytes = -1\n", 1, "log_bytes");
    expect_error("timeout_ms = -1\n", 1, "timeout_ms");
    let err = expect_error(
        "[gpu]\nbackends = [\"cpu\", \"rocm\"]\n",
        2,
        "gpu.backends[1]",
    );
    assert!(err.message.contains("rocm"), "{err}");
}

#[test]
fn error_out_of_range() {
    let err = expect_error("timeout_ms = 100\nmemory_mb = 0\n", 2, "memory_mb");
    assert_eq!(
        err.to_string(),
        "policies/acme.toml:2:13: key `memory_mb`: must be between 1 and 4096, got 0"
    );
    expect_error("memory_mb = 4097\n", 1, "memory_mb");
    expect_error("timeout_ms = 0\n", 1, "timeout_ms");
    expect_error("timeout_ms = 3600001\n", 1, "timeout_ms");
    let err = expect_error("max_concurrency = 0\n", 1, "max_concurrency");
    assert!(err.message.contains("at least 1"), "{err}");
    expect_error("max_concurrency = 4294967296\n", 1, "max_concurrency");
    expect_error("max_queued_jobs = 1000001\n", 1, "max_queued_jobs");
    assert_eq!(parse("max_queued_jobs = 0\n").unwrap().max_queued_jobs, 0);
    let err = expect_error("max_body_bytes = \"2 GiB\"\n", 1, "max_body_bytes");
    assert!(err.message.contains("1 GiB, got 2 GiB"), "{err}");
    expect_error("max_component_bytes = 0\n", 1, "max_component_bytes");
    expect_error("log_bytes = \"17 MiB\"\n", 1, "log_bytes");
    expect_error("[gpu]\nmemory_mb = 2000000\n", 2, "gpu.memory_mb");
    expect_error(
        "\n[gpu]\ntime_ms_per_minute = 600001\n",
        3,
        "gpu.time_ms_per_minute",
    );
    // Boundaries are inclusive.
    let p =
        parse("timeout_ms = 3600000\nmemory_mb = 4096\nmax_concurrency = 4294967295\n").unwrap();
    assert_eq!(p.max_concurrency, u32::MAX);
}

#[test]
fn error_escaping_volume_path() {
    let volume = |path: &str| {
        format!("# volumes\n[[volumes]]\nname = \"data\"\npath = {path:?}\nmount = \"/data\"\n")
    };
    for path in ["../other", "a/../../b", "a/..", ".."] {
        let err = expect_error(&volume(path), 4, "volumes[0].path");
        assert!(err.message.contains("`..`"), "{err}");
    }
    for path in ["/etc", "/"] {
        let err = expect_error(&volume(path), 4, "volumes[0].path");
        assert!(err.message.contains("absolute"), "{err}");
    }
    expect_error(&volume(""), 4, "volumes[0].path");
    // The second volume is reported with its own index and line.
    let text = format!(
        "{}[[volumes]]\nname = \"b\"\npath = \"../x\"\nmount = \"/b\"\n",
        volume("ok")
    );
    expect_error(&text, 8, "volumes[1].path");
}

#[test]
fn volume_paths_are_normalised() {
    let p = parse("[[volumes]]\nname = \"root\"\npath = \".\"\nmount = \"/\"\n").unwrap();
    assert_eq!(p.volumes[0].path, PathBuf::new());
    assert!(p.volumes[0].read_only, "read_only defaults to true");
    let p = parse(
        "[[volumes]]\nname = \"b\"\npath = \"./a/./b/\"\nmount = \"/b\"\nread_only = false\n",
    )
    .unwrap();
    assert_eq!(p.volumes[0].path, PathBuf::from("a/b"));
    assert!(!p.volumes[0].read_only);
}

#[test]
fn error_bad_volume_name_or_mount() {
    let vol = |name: &str, mount: &str| {
        format!("[[volumes]]\nname = {name:?}\npath = \"p\"\nmount = {mount:?}\n")
    };
    expect_error(&vol("Data", "/d"), 2, "volumes[0].name");
    for mount in ["data", "", "/a//b", "/a/./b", "/a/../b", "/a/"] {
        expect_error(&vol("d", mount), 4, "volumes[0].mount");
    }
    let two = format!("{}{}", vol("a", "/x"), vol("a", "/y"));
    expect_error(&two, 6, "volumes[1].name");
    let two = format!("{}{}", vol("a", "/x"), vol("b", "/x"));
    expect_error(&two, 8, "volumes[1].mount");
    expect_error("[[volumes]]\nname = \"a\"\npath = \"a\"\n", 1, "volumes[0]");
}

#[test]
fn error_bad_env_name() {
    let err = expect_error("[env]\nOK = \"1\"\n\"A=B\" = \"x\"\n", 3, "env.\"A=B\"");
    assert!(err.message.contains('='), "{err}");
    expect_error("[env]\n\"\" = \"x\"\n", 2, "env.\"\"");
    expect_error("[env]\n\"A\\u0000\" = \"x\"\n", 2, "env.\"A\\0\"");
    expect_error("[env]\nA = \"x\\u0000y\"\n", 2, "env.A");
    // Anything else is a legal name.
    let p = parse("[env]\n\"lower.case-name\" = \"\"\nPATH = \"/bin\"\n").unwrap();
    assert_eq!(p.env.len(), 2);
}

#[test]
fn error_bad_outbound_pattern() {
    for (pattern, needle) in [
        ("ftp://api.example.com", "schemes"),
        ("api.example.com:80/x", "no path"),
        ("api.example.com/path", "host name"),
        ("*", "first label"),
        ("*.com", "two labels"),
        ("a.*.example.com", "first label"),
        ("*example.com", "first label"),
        ("**.example.com", "first label"),
        ("api.example.com:0", "port"),
        ("api.example.com:65536", "port"),
        ("api.example.com:", "port"),
        ("api.example.com:http", "port"),
        ("[::1]:http", "port"),
        ("", "host name"),
        ("user@api.example.com", "host name"),
        ("api.example.com.", "host name"),
        ("-bad.example.com", "host name"),
        ("a b.com", "host name"),
    ] {
        let text =
            format!("# outbound\noutbound_http = [\n  \"ok.example.com\",\n  {pattern:?},\n]\n");
        let err = expect_error(&text, 4, "outbound_http[1]");
        assert!(
            err.message.contains(needle),
            "{pattern:?}: expected {needle:?} in {err}"
        );
    }
}

#[test]
fn error_gpu_duplicates_and_bad_models() {
    expect_error(
        "[gpu]\nbackends = [\"cpu\", \"cpu\"]\n",
        2,
        "gpu.backends[1]",
    );
    expect_error("[gpu]\nmodels = [\"a\", \"a\"]\n", 2, "gpu.models[1]");
    expect_error("[gpu]\nmodels = [\"\"]\n", 2, "gpu.models[0]");
    expect_error("[gpu]\nmodels = [\"a b\"]\n", 2, "gpu.models[0]");
    let p = parse("[gpu]\nbackends = []\nmodels = [\"org/model-7b.Q4\"]\n").unwrap();
    assert!(!p.gpu.allows_backend(GpuBackend::Cpu));
    assert!(p.gpu.allows_model("org/model-7b.Q4"));
}

#[test]
fn error_syntax_names_line_and_key() {
    let err = expect_error("timeout_ms = 5\nmemory_mb = \n", 2, "memory_mb");
    assert!(!err.message.is_empty());
    expect_error("memory_mb = 1\nmemory_mb = 2\n", 2, "memory_mb");
    expect_error("[gpu]\nmemory_mb = 1\nmemory_mb = 2\n", 3, "gpu.memory_mb");
    // Not every syntax error is about a key, but it still has a place.
    let err = parse("timeout_ms = 5\n[gpu\n").unwrap_err();
    assert!(
        err.to_string().starts_with("policies/acme.toml:2:"),
        "{err}"
    );
}

#[test]
fn error_columns_count_characters() {
    // Two-byte characters before the error must not shift the column.
    let err = expect_error("[env]\n\"é=\" = \"é\"\n", 2, "env.\"é=\"");
    assert_eq!(err.location.map(|l| l.column), Some(1));
    let err = expect_error("env = { \"ééé\" = \"x\", B = 1 }\n", 1, "env.B");
    // `1` is the 26th character (the 29th byte).
    assert_eq!(err.location.map(|l| l.column), Some(26));
}

#[test]
fn location_is_robust() {
    let text = "ab\ncdé\n";
    assert_eq!(location(text, 0), Location { line: 1, column: 1 });
    assert_eq!(location(text, 3), Location { line: 2, column: 1 });
    assert_eq!(location(text, 5), Location { line: 2, column: 3 });
    // Inside a multi-byte character, and past the end: no panic.
    assert_eq!(location(text, 6), Location { line: 2, column: 3 });
    assert_eq!(location(text, 100), Location { line: 3, column: 1 });
}

// --- Outbound matching ----------------------------------------------------

fn rules(patterns: &[&str]) -> Policy {
    let list = patterns
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    parse(&format!("outbound_http = [{list}]\n")).unwrap()
}

#[test]
fn outbound_exact_host() {
    let p = rules(&["api.example.com"]);
    assert!(p.allows_outbound(true, "api.example.com", 443));
    assert!(
        p.allows_outbound(true, "api.example.com", 8080),
        "no port: any port"
    );
    assert!(
        p.allows_outbound(true, "API.Example.COM", 443),
        "case-insensitive"
    );
    assert!(
        p.allows_outbound(true, "api.example.com.", 443),
        "trailing dot"
    );
    assert!(!p.allows_outbound(true, "example.com", 443));
    assert!(!p.allows_outbound(true, "x.api.example.com", 443));
    assert!(!p.allows_outbound(true, "api.example.com.evil.com", 443));
    assert!(!p.allows_outbound(true, "evilapi.example.com", 443));
    assert!(!p.allows_outbound(true, "api.example.co", 443));
}

#[test]
fn outbound_wildcard() {
    let p = rules(&["*.example.org"]);
    assert!(p.allows_outbound(true, "a.example.org", 443));
    assert!(p.allows_outbound(true, "a.b.example.org", 443), "any depth");
    assert!(p.allows_outbound(true, "A.EXAMPLE.ORG.", 80));
    assert!(!p.allows_outbound(true, "example.org", 443), "not the apex");
    assert!(!p.allows_outbound(true, ".example.org", 443));
    assert!(!p.allows_outbound(true, "a.example.org.evil.com", 443));
    assert!(!p.allows_outbound(true, "aexample.org", 443));
    assert!(!p.allows_outbound(true, "a-example.org", 443));
    assert!(!p.allows_outbound(true, "example.org.a", 443));
}

#[test]
fn outbound_ports() {
    let p = rules(&["api.example.com:443", "*.example.org:8443"]);
    assert!(p.allows_outbound(true, "api.example.com", 443));
    assert!(!p.allows_outbound(true, "api.example.com", 80));
    assert!(p.allows_outbound(true, "x.example.org", 8443));
    assert!(!p.allows_outbound(true, "x.example.org", 443));
}

#[test]
fn outbound_rejects_malformed_hosts() {
    let p = rules(&["*.example.org", "api.example.com"]);
    for host in [
        "",
        ".",
        "evil.com#.example.org",
        "evil.com/.example.org",
        "user@a.example.org",
        "a.example.org:443",
        "a..example.org",
        " a.example.org",
        "a.example.org..",
        "api.example.com\0",
    ] {
        assert!(!p.allows_outbound(true, host, 443), "{host:?}");
    }
}

#[test]
fn outbound_private_opens_private_addresses_behind_listed_names() {
    let closed = rules(&["db.internal", "https://api.example.com"]);
    assert!(!closed.outbound_private);
    let loopback: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let policy = closed.outbound_policy();
    assert!(
        policy
            .admits_address(false, "db.internal", loopback, 80)
            .is_err()
    );
    let open = parse("outbound_http = [\"db.internal\"]\noutbound_private = true\n").unwrap();
    assert!(open.outbound_private);
    let policy = open.outbound_policy();
    assert!(
        policy
            .admits_address(false, "db.internal", loopback, 80)
            .is_ok()
    );
    // The scheme rule: HTTPS only to that host.
    assert!(closed.allows_outbound(true, "api.example.com", 443));
    assert!(!closed.allows_outbound(false, "api.example.com", 80));
    expect_error("outbound_private = \"yes\"\n", 1, "outbound_private");
}

#[test]
fn outbound_rules_display_and_parse() {
    for pattern in ["api.example.com", "*.example.org:443", "10.0.0.1:8080"] {
        let rule: OutboundRule = pattern.parse().unwrap();
        assert_eq!(rule.to_string(), pattern);
    }
    let rule: OutboundRule = "API.Example.com".parse().unwrap();
    assert_eq!(rule.to_string(), "api.example.com");
    assert!(rule.matches(true, "api.example.com", 1));
}

// --- Volumes --------------------------------------------------------------

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

fn volume_policy(paths: &[&str]) -> Policy {
    let text: String = paths
        .iter()
        .enumerate()
        .map(|(i, p)| format!("[[volumes]]\nname = \"v{i}\"\npath = {p:?}\nmount = \"/v{i}\"\n"))
        .collect();
    parse(&text).unwrap()
}

#[test]
fn volume_root_is_per_tenant() {
    let root = volume_root(Path::new("/srv/gust"), "acme").unwrap();
    assert_eq!(root, Path::new("/srv/gust/volumes/acme"));
    assert_eq!(volume_root(Path::new("/srv/gust"), ".."), None);
    assert_eq!(volume_root(Path::new("/srv/gust"), "a/b"), None);
}

#[test]
fn volumes_resolve_inside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("volumes").join("acme");
    fs::create_dir_all(root.join("data/sub")).unwrap();
    fs::create_dir_all(root.join("other")).unwrap();
    fs::write(root.join("data/sub/marker"), "sub").unwrap();
    let p = volume_policy(&["other", "data/sub"]);
    let resolved = p.resolve_volumes(&root).unwrap();
    let canonical = fs::canonicalize(&root).unwrap();
    assert_eq!(resolved[0].host_path, canonical.join("other"));
    assert_eq!(resolved[1].host_path, canonical.join("data/sub"));
    assert_eq!(resolved[1].mount, "/v1");
    assert!(resolved[1].read_only);
    assert_eq!(resolved[1].name, "v1");
    // The open handle is the directory the path named.
    assert_eq!(resolved[1].dir.read_to_string("marker").unwrap(), "sub");
    let whole = volume_policy(&["."]).resolve_volumes(&root).unwrap();
    assert_eq!(whole[0].host_path, canonical);
    assert!(whole[0].dir.is_dir("data"));
}

#[test]
fn nested_volumes_are_refused() {
    // With one volume inside a writable other, a function could swap the
    // inner directory for a symlink between admission and open.
    for (outer, inner) in [("data", "data/sub"), (".", "data"), ("a/b/c", "a/b")] {
        let text = format!(
            "[[volumes]]\nname = \"outer\"\npath = {outer:?}\nmount = \"/o\"\n\
             [[volumes]]\nname = \"inner\"\npath = {inner:?}\nmount = \"/i\"\n"
        );
        let err = expect_error(&text, 7, "volumes[1].path");
        assert!(err.to_string().contains("nested"), "{err}");
    }
    // Siblings, and names that only share a prefix, are fine.
    volume_policy(&["data/a", "data/b", "data-2"]);
}

#[cfg(unix)]
#[test]
fn volumes_may_follow_symlinks_that_stay_inside() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("acme");
    fs::create_dir_all(root.join("real")).unwrap();
    symlink(Path::new("real"), &root.join("alias"));
    let resolved = volume_policy(&["alias"]).resolve_volumes(&root).unwrap();
    assert_eq!(
        resolved[0].host_path,
        fs::canonicalize(root.join("real")).unwrap()
    );
}

#[cfg(unix)]
#[test]
fn volumes_reject_symlinks_pointing_outside() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("acme");
    let sibling = dir.path().join("acme-evil");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&sibling).unwrap();
    symlink(&sibling, &root.join("escape"));
    symlink(Path::new("../acme-evil"), &root.join("relative"));
    symlink(Path::new("/"), &root.join("slash"));
    for path in ["escape", "relative", "slash"] {
        let err = volume_policy(&[path]).resolve_volumes(&root).unwrap_err();
        assert!(matches!(err, VolumeError::Escapes { .. }), "{path}: {err}");
        assert!(err.to_string().contains("outside"), "{err}");
    }
}

#[test]
fn volumes_must_exist_and_be_directories() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("acme");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("file"), "x").unwrap();
    let err = volume_policy(&["missing"])
        .resolve_volumes(&root)
        .unwrap_err();
    assert!(matches!(err, VolumeError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("v0"), "{err}");
    let err = volume_policy(&["file"]).resolve_volumes(&root).unwrap_err();
    assert!(matches!(err, VolumeError::NotADirectory { .. }), "{err}");
    let err = volume_policy(&["x"])
        .resolve_volumes(&dir.path().join("nobody"))
        .unwrap_err();
    assert!(matches!(err, VolumeError::Root { .. }), "{err}");
    // No volumes: nothing to resolve, but the root must still exist.
    assert!(Policy::default().resolve_volumes(&root).unwrap().is_empty());
}

// --- Loading a directory --------------------------------------------------

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

#[test]
fn load_missing_directory_uses_builtin_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let set = PolicySet::load(&dir.path().join("nope")).unwrap();
    assert_eq!(set, PolicySet::builtin());
    assert_eq!(*set.for_tenant("anyone"), Policy::default());
}

#[test]
fn load_without_default_toml_uses_builtin_default() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acme.toml", "memory_mb = 256\n");
    let set = PolicySet::load(dir.path()).unwrap();
    assert_eq!(*set.default_policy(), Policy::default());
    assert_eq!(set.for_tenant("acme").memory_mb, 256);
    assert_eq!(set.for_tenant("acme").timeout_ms, 10_000);
}

#[test]
fn load_layers_builtin_default_and_tenant() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "default.toml",
        "timeout_ms = 5000\n[gpu]\nmemory_mb = 10\n",
    );
    write(
        dir.path(),
        "acme.toml",
        "memory_mb = 512\n[gpu]\nmodels = [\"m\"]\n",
    );
    write(dir.path(), "not-yet-created.toml", "max_concurrency = 1\n");
    // Not policy files: ignored.
    write(dir.path(), "README.md", "# notes");
    write(dir.path(), ".acme.toml.swp", "garbage");
    write(dir.path(), ".hidden.toml", "garbage = true");
    write(dir.path(), "acme.toml~", "garbage");
    fs::create_dir(dir.path().join("examples")).unwrap();
    write(&dir.path().join("examples"), "Bad Name.toml", "garbage");

    let set = PolicySet::load(dir.path()).unwrap();
    let default = set.default_policy();
    assert_eq!(default.timeout_ms, 5000);
    assert_eq!(default.memory_mb, 128);
    assert_eq!(default.gpu.memory_mb, 10);

    let acme = set.for_tenant("acme");
    assert_eq!(acme.timeout_ms, 5000, "from default.toml");
    assert_eq!(acme.memory_mb, 512, "from acme.toml");
    assert_eq!(acme.gpu.memory_mb, 10, "gpu key from default.toml");
    assert_eq!(acme.gpu.models, ["m"]);
    assert_eq!(acme.max_concurrency, 16, "built-in");

    assert_eq!(set.for_tenant("other"), default);
    assert_eq!(set.for_tenant("not-yet-created").max_concurrency, 1);
    assert_eq!(
        set.overridden_tenants().collect::<Vec<_>>(),
        ["acme", "not-yet-created"]
    );
}

#[test]
fn load_rejects_badly_named_tenant_files() {
    for name in [
        "Acme.toml",
        "my_tenant.toml",
        "-x.toml",
        "a.b.toml",
        ".toml2.toml",
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), name, "");
        match PolicySet::load(dir.path()) {
            // Dotfiles are skipped, not rejected.
            Ok(_) if name.starts_with('.') => {}
            Err(err @ PolicyError::BadFileName { .. }) => {
                assert!(err.to_string().contains(name), "{err}");
            }
            other => panic!("{name}: unexpected {other:?}"),
        }
    }
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "default.toml", "memory_mb = 64\n");
    write(
        dir.path(),
        "acme.toml",
        "# acme\n\n[gpu]\nbackends = [\"tpu\"]\n",
    );
    let err = PolicySet::load(dir.path()).unwrap_err();
    let shown = err.to_string();
    let file = dir.path().join("acme.toml");
    assert!(
        shown.starts_with(&format!("{}:4:", file.display())),
        "{shown}"
    );
    assert!(shown.contains("key `gpu.backends[0]`"), "{shown}");
    assert!(shown.contains("tpu"), "{shown}");

    // A bad default.toml is reported as such.
    write(dir.path(), "default.toml", "memory_mb = 0\n");
    let err = PolicySet::load(dir.path()).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "{}:1:13:",
            dir.path().join("default.toml").display()
        )),
        "{err}"
    );
}

#[test]
fn load_a_file_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policies", "");
    let err = PolicySet::load(&dir.path().join("policies")).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }), "{err}");
}

#[test]
fn debug_hides_env_values() {
    let p = parse("[env]\nTOKEN = \"s3cret\"\n").unwrap();
    let shown = format!("{p:?}");
    assert!(shown.contains("TOKEN"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}
