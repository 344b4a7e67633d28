//! Map throughput against plain invokes, and map's memory as inputs grow.
//!
//! `cargo bench -p gust-host --bench map`. Starts a real `gust serve` on a
//! loopback port (embedded defaults, max_concurrency 16), deploys the hello
//! fixture and measures, in one run:
//!
//! - `map`: one `POST …/map` with 10,000 inputs (a JSON array);
//! - `invoke x1`: 10,000 sequential `POST …/invoke` from one keep-alive client;
//! - `invoke x2`: the same 10,000 split over 2 concurrent clients;
//!
//! as invocations/s and ratios, then the process's peak RSS after maps of
//! 10,000 and 100,000 inputs (bounded memory means the second adds little).
//!
//! With `GUST_BENCH_POSTGRES` (the URL of a role that may create
//! databases), the same throughput runs again in the same process against
//! a host on a fresh PostgreSQL database (`--store postgres://…`), and the
//! Postgres/sled ratios are printed (target ≥ 0.8×).

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout
)]

use std::time::Instant;

use bytes::Bytes;
use gust_host::api::{ServeConfig, Server};
use gust_host::service::StoreLocation;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn post(client: &HttpClient, url: &str, key: &str, body: impl Into<Bytes>) -> Bytes {
    let request = hyper::Request::post(url)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(body.into()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.into_body().collect().await.unwrap().to_bytes()
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn names(n: usize) -> String {
    let items: Vec<String> = (0..n).map(|i| format!("\"n{i}\"")).collect();
    format!("[{}]", items.join(","))
}

/// Invocations per second of one `map` of 10,000 inputs, of 10,000
/// sequential invokes, and of 10,000 invokes from 2 clients.
struct Rates {
    map: f64,
    one: f64,
    two: f64,
}

/// A host on `store` with the hello fixture deployed: its base URL and key.
async fn host(dir: &std::path::Path, store: StoreLocation) -> (HttpClient, String, String) {
    let mut config = ServeConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.join("data"),
        dir.join("no-policies"),
    );
    config.gpu.wgpu = false;
    config.gpu.cuda = false;
    config.retention_per_function = 100;
    config.store = store;
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let key = server.first_start().unwrap().demo_key.clone();
    tokio::spawn(async move { server.run(std::future::pending()).await });
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let base = format!("http://{addr}/v1/functions/hello");

    let wasm = std::fs::read(gust_test_artifacts::HELLO_COMPONENT).unwrap();
    let request = hyper::Request::put(&base)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(wasm)))
        .unwrap();
    assert!(client.request(request).await.unwrap().status().is_success());
    (client, base, key)
}

async fn throughput(client: &HttpClient, base: &str, key: &str, label: &str) -> Rates {
    let n = 10_000;
    let inputs = names(n);
    // Warm up connections, instance pool and caches.
    post(client, &format!("{base}/map"), key, names(500)).await;

    let started = Instant::now();
    let body = post(client, &format!("{base}/map"), key, inputs.clone()).await;
    let map_secs = started.elapsed().as_secs_f64();
    assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), n);

    let invoke = format!("{base}/invoke");
    let started = Instant::now();
    for i in 0..n {
        post(client, &invoke, key, format!("n{i}")).await;
    }
    let seq_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let halves: Vec<_> = (0..2)
        .map(|half| {
            let (client, invoke, key) = (client.clone(), invoke.clone(), key.to_owned());
            tokio::spawn(async move {
                for i in 0..n / 2 {
                    post(&client, &invoke, &key, format!("n{half}-{i}")).await;
                }
            })
        })
        .collect();
    for half in halves {
        half.await.unwrap();
    }
    let two_secs = started.elapsed().as_secs_f64();

    let rate = |secs: f64| n as f64 / secs;
    println!("[{label}]");
    println!(
        "map {n} inputs:            {:>8.0} invocations/s",
        rate(map_secs)
    );
    println!(
        "invoke, 1 client:          {:>8.0} invocations/s  (map is {:.2}x)",
        rate(seq_secs),
        seq_secs / map_secs
    );
    println!(
        "invoke, 2 clients:         {:>8.0} invocations/s  (map is {:.2}x)",
        rate(two_secs),
        two_secs / map_secs
    );
    Rates {
        map: rate(map_secs),
        one: rate(seq_secs),
        two: rate(two_secs),
    }
}

/// Runs `sql` on the database at `url`.
async fn admin_sql(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap();
    drop(client);
    let _ = driver.await;
}

fn main() {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    tokio.block_on(async {
        let dir = tempfile::TempDir::new().unwrap();
        let (client, base, key) = host(dir.path(), StoreLocation::Embedded).await;
        let sled = throughput(&client, &base, &key, "sled").await;

        // Peak RSS as maps grow 10× and then repeat: bounded memory means
        // a bigger or repeated map raises the peak by little. The client's
        // own buffers (the ~1 MB request, the ~11 MB collected answer) are
        // in this process too.
        let mut peaks = vec![("10,000", peak_rss_kib())];
        for round in ["100,000", "100,000 again", "100,000 a third time"] {
            let started = Instant::now();
            let body = post(&client, &format!("{base}/map"), &key, names(100_000)).await;
            assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), 100_000);
            drop(body);
            println!("{round}: {:.1?}", started.elapsed());
            peaks.push((round, peak_rss_kib()));
        }
        for (round, kib) in peaks {
            println!("peak RSS after the {round}-input map: {kib} KiB");
        }

        if let Ok(admin) = std::env::var("GUST_BENCH_POSTGRES") {
            let name = format!("gust_bench_{}", std::process::id());
            admin_sql(&admin, &format!("CREATE DATABASE {name}")).await;
            let (root, query) = admin.split_once('?').unwrap_or((&admin, ""));
            let url = format!(
                "{}/{name}{}{query}",
                &root[..root.rfind('/').unwrap()],
                if query.is_empty() { "" } else { "?" }
            );
            let pg_dir = tempfile::TempDir::new().unwrap();
            let (client, base, key) = host(pg_dir.path(), StoreLocation::Postgres(url)).await;
            let pg = throughput(&client, &base, &key, "postgres").await;
            println!(
                "postgres/sled: map {:.2}x, invoke 1 client {:.2}x, invoke 2 clients {:.2}x (target >= 0.8x)",
                pg.map / sled.map,
                pg.one / sled.one,
                pg.two / sled.two
            );
            drop(client);
            admin_sql(&admin, &format!("DROP DATABASE {name} WITH (FORCE)")).await;
        } else {
            println!("(set GUST_BENCH_POSTGRES to compare with a host on PostgreSQL)");
        }
    });
}
