//! Ready instances (policy `ready_instances`, on by default): a fresh
//! instance made before the call that takes it, which must be exactly what
//! the call's own instantiation would have given it.

use std::sync::Arc;
use std::time::Duration;

use gust_host::runtime::{
    CallControl, CallLimits, Invocation, LoadedComponent, Outcome, Ready, Reuse, Runtime,
    RuntimeConfig,
};
use gust_test_artifacts::{COUNTER_COMPONENT, ENV_VAR_COMPONENT, STREAMER_COMPONENT};
use tempfile::TempDir;

use super::server::{TestServer, deploy, invocation_record, invocation_status, request, tenant};
use super::{limits, load, request as call_request};

/// A runtime that makes instances ahead for every component, however
/// quickly it instantiates.
fn runtime() -> (Runtime, TempDir) {
    let dir = TempDir::new().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.ready_min_instantiate = Duration::ZERO;
    (Runtime::new(config).unwrap(), dir)
}

/// A server that makes instances ahead for every component.
async fn server(dir: &TempDir) -> TestServer {
    TestServer::start_configured(dir.path(), |config| {
        config.runtime.ready_min_instantiate = Duration::ZERO;
    })
    .await
}

fn ready(scope: &str) -> CallLimits {
    CallLimits {
        ready: Some(Ready {
            scope: Arc::from(scope),
            count: 1,
        }),
        ..limits()
    }
}

fn body(invocation: &Invocation) -> String {
    match &invocation.outcome {
        Outcome::Ok(response) => String::from_utf8(response.body.clone()).unwrap(),
        other => panic!("the call failed: {other:?}"),
    }
}

/// Waits until `scope` has a ready instance (made in a task of its own).
async fn until_ready(runtime: &Runtime, scope: &str) {
    // Twenty seconds: CI runs this beside a hundred other tests on two
    // cores.
    for _ in 0..2000 {
        if runtime.ready_instances(scope) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no instance was made ready for {scope}");
}

async fn probe(
    runtime: &Runtime,
    counter: &LoadedComponent,
    limits: &CallLimits,
) -> (String, Invocation) {
    let invocation = runtime.invoke(counter, call_request("probe"), limits).await;
    (body(&invocation), invocation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_instance_shows_nothing_of_earlier_calls() {
    let (runtime, _dir) = runtime();
    let counter = load(&runtime, COUNTER_COMPONENT);
    let mine = ready("acme/counter");
    let theirs = ready("globex/counter");
    // The first call finds nothing ready and instantiates its own: what it
    // sees is what a fresh instance shows.
    let (fresh, first) = probe(&runtime, &counter, &mine).await;
    assert!(!first.timings.ready && !first.timings.reused);
    assert!(fresh.starts_with("calls=1 marked=false heap=0x"), "{fresh}");
    // Each call waits for the instance made after the one before: one made
    // while a call runs is not made at all (the host is busy then), and on
    // a loaded machine the maker can be that late.
    until_ready(&runtime, "acme/counter").await;
    // Another tenant's first call of the same component: the same.
    let (theirs_fresh, _) = probe(&runtime, &counter, &theirs).await;
    assert_eq!(theirs_fresh, fresh);
    until_ready(&runtime, "globex/counter").await;

    for scope in [&mine, &theirs, &mine, &theirs, &mine] {
        let name = &*scope.ready.as_ref().unwrap().scope;
        assert_eq!(runtime.ready_instances(name), 1);
        let (seen, invocation) = probe(&runtime, &counter, scope).await;
        assert!(
            invocation.timings.ready,
            "{name} did not take its ready instance"
        );
        // Globals, static memory and the heap's layout are those of a fresh
        // instance, whichever tenant called before.
        assert_eq!(seen, fresh);
        // Its output is its own.
        assert_eq!(invocation.stdout.text(), "call 1\n");
        assert_eq!(invocation.outcome.code(), "ok");
        until_ready(&runtime, name).await;
    }
    assert_eq!(runtime.stats().ready_hits, 5);

    // The probe does see what an earlier call leaves in its instance (so
    // the checks above could fail): with reuse, the second call differs.
    let reusing = CallLimits {
        reuse: Some(Reuse {
            scope: Arc::from("acme/counter"),
            max_uses: 2,
        }),
        ..mine.clone()
    };
    let (_, first) = probe(&runtime, &counter, &reusing).await;
    assert!(!first.timings.ready, "reuse takes no ready instance");
    let (again, second) = probe(&runtime, &counter, &reusing).await;
    assert!(second.timings.reused);
    assert!(again.starts_with("calls=2 marked=true heap=0x"), "{again}");
    assert_ne!(
        again[again.find("heap=").unwrap()..],
        fresh[fresh.find("heap=").unwrap()..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_instance_runs_with_the_grants_of_the_call_that_takes_it() {
    let (runtime, _dir) = runtime();
    let env_var = load(&runtime, ENV_VAR_COMPONENT);
    let with = |value: &str| CallLimits {
        env: Arc::from(vec![("GUST_TEST_VAR".to_owned(), value.to_owned())]),
        ..ready("acme/env")
    };
    let first = runtime
        .invoke(&env_var, call_request(""), &with("one"))
        .await;
    assert_eq!(body(&first), "one");
    until_ready(&runtime, "acme/env").await;
    // Made while the policy said "one"; taken by a call whose says "two".
    let second = runtime
        .invoke(&env_var, call_request(""), &with("two"))
        .await;
    assert!(second.timings.ready);
    assert_eq!(body(&second), "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_lets_go_of_its_caller_when_it_ends_though_its_instance_is_torn_down_later() {
    // The store of a call whose next instance is being prepared is dropped
    // later, on the preparing thread; what it held for its caller must not
    // wait for that. A streaming caller's end of the stream shows it: the
    // stream ends when the host drops its sender.
    let (runtime, _dir) = runtime();
    let streamer = load(&runtime, STREAMER_COMPONENT);
    let limits = ready("acme/stream");
    let first = runtime
        .invoke(&streamer, call_request("one"), &limits)
        .await;
    assert_eq!(body(&first), "one\ndone\n");
    for _ in 0..3 {
        until_ready(&runtime, "acme/stream").await;
        let (sender, mut chunks) = tokio::sync::mpsc::channel(16);
        let control = CallControl {
            stream: Some(sender),
            ..CallControl::default()
        };
        let streamed = runtime
            .invoke_with(&streamer, call_request("a b"), &limits, control)
            .await;
        assert!(streamed.timings.ready);
        assert_eq!(body(&streamed), "done\n");
        assert_eq!(chunks.try_recv().unwrap(), "a\n");
        assert_eq!(chunks.try_recv().unwrap(), "b\n");
        // At once, not once the instance is torn down.
        assert_eq!(
            chunks.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_instance_is_not_taken_beyond_the_calls_memory_limit() {
    let (runtime, _dir) = runtime();
    let counter = load(&runtime, COUNTER_COMPONENT);
    let first = runtime
        .invoke(&counter, call_request(""), &ready("acme/counter"))
        .await;
    assert_eq!(body(&first), "1");
    until_ready(&runtime, "acme/counter").await;
    // Less than the instance already holds: its own instantiation would
    // have failed, so taking the ready one would give it more than that.
    let small = CallLimits {
        memory_bytes: first.peak_memory_bytes - 1,
        ..ready("acme/counter")
    };
    let refused = runtime.invoke(&counter, call_request(""), &small).await;
    assert!(!refused.timings.ready);
    assert_eq!(
        refused.outcome.code(),
        "out-of-memory",
        "{:?}",
        refused.outcome
    );
    assert_eq!(runtime.ready_instances("acme/counter"), 1);
    // Deleting (or replacing) the function drops its ready instances.
    runtime.drop_idle_instances("acme/counter");
    assert_eq!(runtime.ready_instances("acme/counter"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_takes_the_slot_of_a_kept_instance_when_the_pool_is_full() {
    let dir = TempDir::new().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.ready_min_instantiate = Duration::ZERO;
    config.allocation =
        gust_host::runtime::AllocationConfig::Pooling(gust_host::runtime::PoolingConfig {
            max_instances: 1,
            ..gust_host::runtime::PoolingConfig::default()
        });
    let runtime = Runtime::new(config).unwrap();
    let counter = load(&runtime, COUNTER_COMPONENT);
    // One slot: a's instance, kept for reuse, holds it once a's call is
    // done…
    let reusing = CallLimits {
        reuse: Some(Reuse {
            scope: Arc::from("a/counter"),
            max_uses: 10,
        }),
        ..limits()
    };
    let a = runtime.invoke(&counter, call_request(""), &reusing).await;
    assert_eq!(body(&a), "1");
    assert_eq!(runtime.idle_instances(), 1);
    // …and b's call gets it all the same.
    let b = runtime
        .invoke(&counter, call_request(""), &ready("b/counter"))
        .await;
    assert_eq!(body(&b), "1");
    assert!(!b.timings.ready);
    // a's instance was dropped for b: a starts afresh. (b's store is left
    // to the thread preparing b's next instance to tear down, a moment
    // later; a's call, coming before that, drops it to get the slot.)
    let a = runtime.invoke(&counter, call_request(""), &reusing).await;
    assert_eq!(body(&a), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_get_ready_instances_by_default() {
    let dir = TempDir::new().unwrap();
    let server = server(&dir).await;
    let key = tenant(&server, "acme").await;
    let deployed = deploy(&server, &key, "counter", COUNTER_COMPONENT).await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    let url = server.url("/v1/functions/counter/invoke");
    let mut records = Vec::new();
    for _ in 0..4 {
        let reply = request("POST", &url, Some(&key), "").await;
        // Every call sees a fresh instance.
        assert_eq!(reply.text(), "1");
        let id = reply.headers["gust-invocation-id"].to_str().unwrap();
        records.push(invocation_record(&server, &key, id).await);
        // Give the host the moment it needs to make the next one.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(records[0]["timings"]["ready_instance"], false);
    for record in &records[1..] {
        assert_eq!(record["timings"]["ready_instance"], true, "{record}");
        assert_eq!(record["timings"]["reused_instance"], false, "{record}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_is_made_ahead_for_a_component_that_instantiates_quickly() {
    let dir = TempDir::new().unwrap();
    let mut config = RuntimeConfig::new(dir.path().join("cache"));
    config.ready_min_instantiate = Duration::from_secs(3600);
    let runtime = Runtime::new(config).unwrap();
    let counter = load(&runtime, COUNTER_COMPONENT);
    for _ in 0..3 {
        let invocation = runtime
            .invoke(&counter, call_request(""), &ready("a/counter"))
            .await;
        assert_eq!(body(&invocation), "1");
        assert!(!invocation.timings.ready);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runtime.ready_instances("a/counter"), 0);
    assert_eq!(runtime.stats().instantiations, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_http_functions_get_ready_instances_too() {
    let dir = TempDir::new().unwrap();
    let server = server(&dir).await;
    let key = tenant(&server, "acme").await;
    let bytes = std::fs::read(gust_test_artifacts::HTTP_HELLO_COMPONENT).unwrap();
    let deployed = request("PUT", &server.url("/v1/functions/web"), Some(&key), bytes).await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    let url = server.url("/http/acme/web/echo?n=1");
    let mut ready = Vec::new();
    for i in 0..4 {
        let body = format!("request {i}");
        let reply = request("POST", &url, Some(&key), body.clone()).await;
        // The request reached the instance whole, ready or not.
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), body);
        assert_eq!(reply.headers["x-path"], "/echo?n=1");
        let id = reply.headers["gust-invocation-id"].to_str().unwrap();
        // The record is written once the guest is done.
        let mut found = invocation_status(&server, &key, id).await;
        for _ in 0..250 {
            if found.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            found = invocation_status(&server, &key, id).await;
        }
        let record = found.1;
        ready.push(record["timings"]["ready_instance"].as_bool().unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ready, [false, true, true, true]);
    server.stop().await;
}
