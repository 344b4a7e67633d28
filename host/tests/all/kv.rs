//! `wasi:keyvalue` and `wasi:config` end to end: a component written the
//! way Spin and wasmCloud components are (`tests/programs/kv-config`),
//! the `/v1/kv` API and `gust kv`, on the embedded store and on two hosts
//! sharing PostgreSQL.

use std::collections::BTreeSet;
use std::time::Duration;

use gust_host::service::StoreLocation;
use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use crate::server::{Reply, TestServer, request, tenant, tenant_on};

/// The policies of the tenants these tests make.
fn write_policies(dir: &std::path::Path) {
    let policies = crate::server::policies(dir);
    std::fs::write(
        policies.join("kvone.toml"),
        "max_concurrency = 32\ntimeout_ms = 20000\nkv_max_buckets = 2\nkv_max_keys = 50\n\
         kv_max_bytes = 4096\n\n[config]\ngreeting = \"hello\"\nregion = \"eu\"\n",
    )
    .unwrap();
    std::fs::write(policies.join("kvtwo.toml"), "timeout_ms = 5000\n").unwrap();
    std::fs::write(
        policies.join("kvoff.toml"),
        "timeout_ms = 5000\nkv_max_buckets = 0\n",
    )
    .unwrap();
}

async fn deploy(server: &TestServer, key: &str, query: &str) -> Reply {
    let bytes = std::fs::read(artifacts::KV_CONFIG_COMPONENT).unwrap();
    request(
        "PUT",
        &server.url(&format!("/v1/functions/kv{query}")),
        Some(key),
        bytes,
    )
    .await
}

async fn call(server: &TestServer, key: &str, command: &str) -> Reply {
    request(
        "POST",
        &server.url("/v1/functions/kv/invoke"),
        Some(key),
        command.to_owned(),
    )
    .await
}

/// The answer of a call that must succeed.
async fn ok(server: &TestServer, key: &str, command: &str) -> String {
    let reply = call(server, key, command).await;
    assert_eq!(reply.status, 200, "{command}: {}", reply.text());
    reply.text()
}

/// Increments counter `counters/hits` 32 times at once, the calls spread
/// over `hosts`, and checks that each call saw a value of its own, 1 to 32:
/// no update was lost.
async fn increment_32_times(hosts: &[&TestServer], key: &str) {
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let url = hosts[i % hosts.len()].url("/v1/functions/kv/invoke");
            let key = key.to_owned();
            tokio::spawn(
                async move { request("POST", &url, Some(&key), "incr counters hits 1").await },
            )
        })
        .collect();
    let mut seen = BTreeSet::new();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        seen.insert(reply.text().parse::<u64>().unwrap());
    }
    assert_eq!(seen, (1..=32).collect::<BTreeSet<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_layers_policy_function_and_secret_values_and_misses_are_none() {
    let dir = TempDir::new().unwrap();
    write_policies(dir.path());
    let server = TestServer::start(dir.path()).await;
    let one = tenant(&server, "kvone").await;
    let secret = request(
        "PUT",
        &server.url("/v1/secrets/TOKEN"),
        Some(&one),
        "s3cr3t",
    )
    .await;
    assert_eq!(secret.status, 201, "{}", secret.text());

    // Bad values are refused before anything is stored.
    deploy(&server, &one, "?config=bad%20key=1")
        .await
        .problem(400, "invalid-config");
    deploy(&server, &one, "?config=novalue")
        .await
        .problem(400, "invalid-config");
    let long = format!("?config=k={}", "v".repeat(16 * 1024 + 1));
    deploy(&server, &one, &long)
        .await
        .problem(400, "invalid-config");
    let listed = request("GET", &server.url("/v1/functions"), Some(&one), "").await;
    assert_eq!(listed.json()["functions"], serde_json::json!([]));

    let deployed = deploy(
        &server,
        &one,
        "?config=region=us&config=mode=a%3Db%20c&secrets=TOKEN",
    )
    .await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    assert_eq!(deployed.json()["config"]["mode"], "a=b c");
    let shown = request("GET", &server.url("/v1/functions/kv"), Some(&one), "").await;
    assert_eq!(shown.json()["config"]["region"], "us");

    assert_eq!(ok(&server, &one, "config greeting").await, "hello");
    assert_eq!(ok(&server, &one, "config region").await, "us");
    assert_eq!(ok(&server, &one, "config TOKEN").await, "s3cr3t");
    assert_eq!(ok(&server, &one, "config missing").await, "<none>");
    assert_eq!(
        ok(&server, &one, "config-all").await,
        "TOKEN=s3cr3t\ngreeting=hello\nmode=a=b c\nregion=us\n"
    );

    // Redeployed without its own values: the policy's again.
    assert_eq!(deploy(&server, &one, "").await.status, 201);
    assert_eq!(ok(&server, &one, "config region").await, "eu");
    assert_eq!(ok(&server, &one, "config TOKEN").await, "<none>");

    // Another tenant sees none of it.
    let two = tenant(&server, "kvtwo").await;
    assert_eq!(deploy(&server, &two, "").await.status, 201);
    assert_eq!(ok(&server, &two, "config-all").await, "");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_are_per_tenant_atomic_within_quotas_and_outlive_a_restart() {
    let dir = TempDir::new().unwrap();
    write_policies(dir.path());
    let server = TestServer::start(dir.path()).await;
    let one = tenant(&server, "kvone").await;
    let two = tenant(&server, "kvtwo").await;
    let off = tenant(&server, "kvoff").await;
    for key in [&one, &two, &off] {
        assert_eq!(deploy(&server, key, "").await.status, 201);
    }

    // store: set, get, exists, list, delete.
    assert_eq!(ok(&server, &one, "set cache a 1").await, "ok");
    assert_eq!(ok(&server, &one, "set cache b/c two words").await, "ok");
    assert_eq!(ok(&server, &one, "get cache a").await, "1");
    assert_eq!(ok(&server, &one, "get cache b/c").await, "two words");
    assert_eq!(ok(&server, &one, "get cache zz").await, "<none>");
    assert_eq!(ok(&server, &one, "exists cache a").await, "true");
    assert_eq!(ok(&server, &one, "list cache").await, "a\nb/c\n");
    assert_eq!(ok(&server, &one, "del cache a").await, "ok");
    assert_eq!(ok(&server, &one, "del cache a").await, "ok");
    assert_eq!(ok(&server, &one, "exists cache a").await, "false");
    assert_eq!(ok(&server, &one, "del cache b/c").await, "ok");

    // batch: set-many, get-many (an absent key is none), delete-many.
    assert_eq!(
        ok(&server, &one, "batch b 5").await,
        "k0=v0\nk1=v1\nk2=v2\nk3=v3\nk4=v4\n<none>\n"
    );
    assert_eq!(ok(&server, &one, "list b").await, "k1\nk3\n");

    // atomics: 32 concurrent increments, no update lost.
    increment_32_times(&[&server], &one).await;
    assert_eq!(ok(&server, &one, "get counters hits").await, "32");
    let not_a_number = call(&server, &one, "incr b k1 1").await;
    assert_eq!(not_a_number.status, 500);
    assert!(
        not_a_number.text().contains("decimal u64"),
        "{}",
        not_a_number.text()
    );

    // Tenants never see each other's buckets.
    assert_eq!(ok(&server, &two, "get counters hits").await, "<none>");
    assert_eq!(ok(&server, &two, "list b").await, "");
    assert_eq!(ok(&server, &two, "set counters hits 5").await, "ok");
    assert_eq!(ok(&server, &one, "get counters hits").await, "32");
    // A tenant allowed no bucket is denied, and the host goes on.
    let denied = call(&server, &off, "get cache a").await;
    assert!(denied.text().contains("access-denied"), "{}", denied.text());
    let bad_name = call(&server, &one, "get a/b k").await;
    assert!(
        bad_name.text().contains("access-denied"),
        "{}",
        bad_name.text()
    );

    // Quotas (2 buckets, 50 keys a bucket, 4096 bytes): refused whole.
    let third = call(&server, &one, "set third k v").await;
    assert!(third.text().contains("kv_max_buckets"), "{}", third.text());
    let many = call(&server, &one, "batch b 60").await;
    assert!(many.text().contains("kv_max_keys"), "{}", many.text());
    assert_eq!(ok(&server, &one, "list b").await, "k1\nk3\n");
    let big = format!("set b big {}", "x".repeat(5000));
    let big = call(&server, &one, &big).await;
    assert!(big.text().contains("kv_max_bytes"), "{}", big.text());

    // The API and the CLI read and seed the same buckets.
    let buckets = request("GET", &server.url("/v1/kv"), Some(&one), "").await;
    assert_eq!(buckets.status, 200);
    let names: Vec<String> = buckets.json()["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["b", "counters"]);
    let hits = request("GET", &server.url("/v1/kv/counters/hits"), Some(&one), "").await;
    assert_eq!((hits.status, hits.text().as_str()), (200, "32"));
    let put = request(
        "PUT",
        &server.url("/v1/kv/b/dir%2Fseed"),
        Some(&one),
        "seeded",
    )
    .await;
    assert_eq!(put.status, 204, "{}", put.text());
    assert_eq!(ok(&server, &one, "get b dir/seed").await, "seeded");
    let page = request("GET", &server.url("/v1/kv/b?limit=2"), Some(&one), "").await;
    assert_eq!(page.json()["keys"], serde_json::json!(["dir/seed", "k1"]));
    assert_eq!(page.json()["next_cursor"], 2);
    let rest = request(
        "GET",
        &server.url("/v1/kv/b?limit=2&cursor=2"),
        Some(&one),
        "",
    )
    .await;
    assert_eq!(rest.json()["keys"], serde_json::json!(["k3"]));
    assert!(rest.json().get("next_cursor").is_none());
    request("PUT", &server.url("/v1/kv/third/k"), Some(&one), "v")
        .await
        .problem(507, "quota-exceeded");
    request("PUT", &server.url("/v1/kv/a%20b/k"), Some(&one), "v")
        .await
        .problem(400, "invalid-kv");
    request("GET", &server.url("/v1/kv/b/nope"), Some(&one), "")
        .await
        .problem(404, "not-found");
    request("GET", &server.url("/v1/kv/b?limit=0"), Some(&one), "")
        .await
        .problem(400, "invalid-kv");
    request("GET", &server.url("/v1/kv"), None, "")
        .await
        .problem(401, "unauthorized");
    let gone = request("DELETE", &server.url("/v1/kv/b/dir%2Fseed"), Some(&one), "").await;
    assert_eq!(gone.status, 204);
    assert_eq!(ok(&server, &one, "get b dir/seed").await, "<none>");

    let url = server.url("");
    let cli = |args: Vec<&'static str>, stdin: &'static [u8]| {
        let (url, key) = (url.clone(), one.clone());
        tokio::task::spawn_blocking(move || crate::secrets::gust(&url, &key, &args, stdin))
    };
    let (code, out, err) = cli(vec!["kv", "set", "b", "from cli", "v1"], b"")
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "set b/from cli\n");
    let (_, out, _) = cli(vec!["kv", "set", "b", "piped"], b"bytes\n")
        .await
        .unwrap();
    assert_eq!(out, "set b/piped\n");
    assert_eq!(ok(&server, &one, "get b piped").await, "bytes\n");
    let (_, out, _) = cli(vec!["kv", "get", "b", "from cli"], b"").await.unwrap();
    assert_eq!(out, "v1");
    let (_, out, _) = cli(vec!["kv", "ls", "b"], b"").await.unwrap();
    assert_eq!(out, "from cli\nk1\nk3\npiped\n");
    let (_, out, _) = cli(vec!["kv", "ls"], b"").await.unwrap();
    assert!(out.starts_with("BUCKET"), "{out}");
    assert!(out.contains("counters"), "{out}");
    let (code, _, _) = cli(vec!["kv", "rm", "b", "piped"], b"").await.unwrap();
    assert_eq!(code, Some(0));
    let (code, _, err) = cli(vec!["kv", "get", "b", "piped"], b"").await.unwrap();
    assert_ne!(code, Some(0));
    assert!(err.contains("not-found"), "{err}");

    // After a restart, everything is there.
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    assert_eq!(ok(&server, &one, "get counters hits").await, "32");
    assert_eq!(ok(&server, &one, "incr counters hits 10").await, "42");
    assert_eq!(ok(&server, &two, "get counters hits").await, "5");
    assert_eq!(ok(&server, &one, "list b").await, "from cli\nk1\nk3\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_postgres_share_buckets_and_lose_no_increment() {
    let Some(db) = crate::store::test_database() else {
        return;
    };
    let (a_dir, b_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    for dir in [&a_dir, &b_dir] {
        write_policies(dir.path());
    }
    let on = |dir: &std::path::Path| {
        let url = db.url.clone();
        let dir = dir.to_owned();
        async move {
            TestServer::start_configured(&dir, move |config| {
                config.store = StoreLocation::Postgres(url);
            })
            .await
        }
    };
    let a = on(a_dir.path()).await;
    let b = on(b_dir.path()).await;
    let one = tenant_on(&a.url(""), "kvone").await;
    assert_eq!(deploy(&a, &one, "?config=region=us").await.status, 201);
    // B learns of the deploy from the database.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while call(&b, &one, "config region").await.text() != "us" {
        assert!(
            std::time::Instant::now() < deadline,
            "B never served the deploy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    increment_32_times(&[&a, &b], &one).await;
    assert_eq!(ok(&b, &one, "get counters hits").await, "32");

    // A quota holds across hosts: the second bucket on A, the third on B.
    assert_eq!(ok(&a, &one, "set cache k v").await, "ok");
    let third = call(&b, &one, "set third k v").await;
    assert!(third.text().contains("kv_max_buckets"), "{}", third.text());
    let put = request("PUT", &b.url("/v1/kv/cache/seed"), Some(&one), "from b").await;
    assert_eq!(put.status, 204);
    assert_eq!(ok(&a, &one, "get cache seed").await, "from b");
    a.stop().await;
    b.stop().await;
}
