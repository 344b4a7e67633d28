//! Instance reuse (policy `reuse_instances`): an instance serves several
//! calls of one function of one tenant, never another's, and a call that
//! did not return normally never leaves its instance behind.

use std::sync::Arc;

use gust_host::runtime::{CallLimits, Invocation, LoadedComponent, Outcome, Reuse, Runtime};
use gust_test_artifacts::COUNTER_COMPONENT;
use tempfile::TempDir;

use super::server::{ADMIN_KEY, TestServer, deploy, invocation_record, request, tenant};
use super::{limits, load, request as call_request, runtime};

fn reusing(scope: &str, max_uses: u32) -> CallLimits {
    CallLimits {
        reuse: Some(Reuse {
            scope: Arc::from(scope),
            max_uses,
        }),
        ..limits()
    }
}

async fn call(
    runtime: &Runtime,
    counter: &LoadedComponent,
    limits: &CallLimits,
    body: &str,
) -> Invocation {
    runtime.invoke(counter, call_request(body), limits).await
}

/// The body of a successful call.
fn body(invocation: &Invocation) -> String {
    match &invocation.outcome {
        Outcome::Ok(response) => String::from_utf8(response.body.clone()).unwrap(),
        other => panic!("the counter failed: {other:?}"),
    }
}

/// The count the counter answered with (how many calls its instance served).
async fn count(runtime: &Runtime, counter: &LoadedComponent, limits: &CallLimits) -> String {
    body(&call(runtime, counter, limits, "").await)
}

/// Run as the `counter` fixture's test (see `fixtures.rs`).
pub(crate) async fn an_instance_serves_at_most_max_uses_calls() {
    let (runtime, _dir) = runtime();
    let counter = load(&runtime, COUNTER_COMPONENT);
    let limits = reusing("acme/counter", 3);
    let mut counts = Vec::new();
    let mut reused = Vec::new();
    for _ in 0..7 {
        let invocation = call(&runtime, &counter, &limits, "").await;
        counts.push(body(&invocation));
        reused.push(invocation.timings.reused);
        // Each call's output is its own, not the instance's history.
        let stdout = invocation.stdout.text();
        assert_eq!(stdout, format!("call {}\n", counts.last().unwrap()));
    }
    assert_eq!(counts, ["1", "2", "3", "1", "2", "3", "1"]);
    assert_eq!(reused, [false, true, true, false, true, true, false]);
    let stats = runtime.stats();
    assert_eq!((stats.instantiations, stats.reuses), (3, 4));
    // The last instance has two uses left and waits for the next call.
    assert_eq!(runtime.idle_instances(), 1);
}

#[tokio::test]
async fn without_reuse_every_call_gets_a_fresh_instance() {
    let (runtime, _dir) = runtime();
    let counter = load(&runtime, COUNTER_COMPONENT);
    for _ in 0..3 {
        assert_eq!(count(&runtime, &counter, &limits()).await, "1");
    }
    // One use per instance is no reuse either.
    for _ in 0..3 {
        assert_eq!(
            count(&runtime, &counter, &reusing("acme/counter", 1)).await,
            "1"
        );
    }
    assert_eq!(runtime.stats().reuses, 0);
    assert_eq!(runtime.idle_instances(), 0);
}

#[tokio::test]
async fn scopes_never_share_instances() {
    let (runtime, _dir) = runtime();
    let counter = load(&runtime, COUNTER_COMPONENT);
    let mine = reusing("acme/counter", 10);
    let theirs = reusing("globex/counter", 10);
    assert_eq!(count(&runtime, &counter, &mine).await, "1");
    assert_eq!(count(&runtime, &counter, &theirs).await, "1");
    assert_eq!(count(&runtime, &counter, &mine).await, "2");
    assert_eq!(count(&runtime, &counter, &theirs).await, "2");
    // Nor do calls whose WASI context would differ (here: the environment).
    let other_env = CallLimits {
        env: Arc::from(vec![("A".to_owned(), "1".to_owned())]),
        ..mine.clone()
    };
    assert_eq!(count(&runtime, &counter, &other_env).await, "1");
    assert_eq!(count(&runtime, &counter, &mine).await, "3");
}

#[tokio::test]
async fn a_trap_drops_the_instance_and_a_guest_error_keeps_it() {
    let (runtime, _dir) = runtime();
    let counter = load(&runtime, COUNTER_COMPONENT);
    let limits = reusing("acme/counter", 100);
    assert_eq!(count(&runtime, &counter, &limits).await, "1");
    let failed = call(&runtime, &counter, &limits, "fail").await;
    assert!(
        matches!(&failed.outcome, Outcome::GuestError(e) if e.code == "refused"),
        "{:?}",
        failed.outcome
    );
    assert_eq!(count(&runtime, &counter, &limits).await, "3");
    let trapped = call(&runtime, &counter, &limits, "trap").await;
    assert_eq!(trapped.outcome.code(), "trap", "{:?}", trapped.outcome);
    assert!(trapped.timings.reused);
    // The trapped instance is gone: the next call starts from scratch.
    let fresh = call(&runtime, &counter, &limits, "").await;
    assert!(!fresh.timings.reused);
    assert_eq!(body(&fresh), "1");
}

#[tokio::test]
async fn idle_instances_are_bounded_and_expire() {
    let dir = TempDir::new().unwrap();
    let mut config = gust_host::runtime::RuntimeConfig::new(dir.path().join("cache"));
    config.max_idle_instances = 2;
    config.idle_instance_timeout = std::time::Duration::from_millis(200);
    let runtime = Runtime::new(config).unwrap();
    let counter = load(&runtime, COUNTER_COMPONENT);
    for scope in ["a/counter", "b/counter", "c/counter"] {
        assert_eq!(count(&runtime, &counter, &reusing(scope, 10)).await, "1");
    }
    // The third found the pool full and was dropped.
    assert_eq!(runtime.idle_instances(), 2);
    assert_eq!(
        count(&runtime, &counter, &reusing("c/counter", 10)).await,
        "1"
    );
    assert_eq!(
        count(&runtime, &counter, &reusing("a/counter", 10)).await,
        "2"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    runtime.sweep_idle_instances();
    assert_eq!(runtime.idle_instances(), 0);
    assert_eq!(
        count(&runtime, &counter, &reusing("a/counter", 10)).await,
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_turns_reuse_on_per_function() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let reusing = tenant(&server, "reuse").await;
    let fresh = tenant(&server, "fresh").await;
    for key in [&reusing, &fresh] {
        for name in ["one", "two"] {
            let deployed = deploy(&server, key, name, COUNTER_COMPONENT).await;
            assert_eq!(deployed.status, 201, "{}", deployed.text());
        }
    }
    let invoke = |key: &str, name: &str| {
        let url = server.url(&format!("/v1/functions/{name}/invoke"));
        let key = key.to_owned();
        async move { request("POST", &url, Some(&key), "").await }
    };
    let mut answers = Vec::new();
    for name in ["one", "one", "two", "one", "one", "two"] {
        answers.push(invoke(&reusing, name).await.text());
    }
    // `reuse_instances = 3`: one's instance serves three calls, two has its own.
    assert_eq!(answers, ["1", "2", "1", "3", "1", "2"]);
    let last = invoke(&fresh, "one").await;
    assert_eq!(invoke(&fresh, "one").await.text(), "1");
    assert_eq!(last.text(), "1");

    // The invocation record says which calls ran in a reused instance.
    let reply = invoke(&reusing, "two").await;
    assert_eq!(reply.text(), "3");
    let id = reply.headers["gust-invocation-id"].to_str().unwrap();
    let record = invocation_record(&server, &reusing, id).await;
    assert_eq!(record["timings"]["reused_instance"], true, "{record}");
    let metrics = request("GET", &server.url("/metrics"), Some(ADMIN_KEY), "")
        .await
        .text();
    // Instances: one's two, two's one, and the other tenant's two calls.
    assert!(metrics.contains("gust_instantiations_total 5"), "{metrics}");
    assert!(
        metrics.contains("gust_instance_reuses_total 4"),
        "{metrics}"
    );

    // Deleting a function drops its idle instances: the same bytes deployed
    // again under the same name start from scratch.
    assert_eq!(invoke(&reusing, "one").await.text(), "2");
    let url = server.url("/v1/functions/one");
    assert_eq!(
        request("DELETE", &url, Some(&reusing), "").await.status,
        204
    );
    let deployed = deploy(&server, &reusing, "one", COUNTER_COMPONENT).await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    assert_eq!(invoke(&reusing, "one").await.text(), "1");
    server.stop().await;
}
