//! Several hosts on one PostgreSQL: the shared job queue and its leases,
//! schedule fires claimed once, at the store and with real hosts (in this
//! process, and `gust serve` processes killed with SIGKILL).
//!
//! Like the PostgreSQL half of the store suite, these skip with a message
//! without `GUST_TEST_POSTGRES`, and fail without it in CI.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use gust_host::service::StoreLocation;
use gust_host::store::postgres::PgStore;
use gust_host::store::{
    DeployRequest, FunctionWorld, JobCancel, JobCaps, JobClaim, JobError, JobRecord, JobStatus,
    MetaStore, ScheduleRecord, SharedStore,
};
use gust_test_artifacts as artifacts;
use serde_json::Value;
use tempfile::TempDir;

use super::crash::Host;
use super::jobs::poll_json;
use super::server::{TestServer, deploy, request, tenant};
use super::store::test_database;

/// The one value `sql` returns, asked on a connection of its own.
fn query_one<T>(url: &str, sql: &str) -> T
where
    T: for<'r> tokio_postgres::types::FromSql<'r> + Send + 'static,
{
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            let driver = tokio::spawn(connection);
            let value: T = client.query_one(&sql, &[]).await.unwrap().get(0);
            drop(client);
            let _ = driver.await;
            value
        })
    })
    .join()
    .unwrap()
}

/// The number `sql` (a count) returns.
fn query_i64(url: &str, sql: &str) -> i64 {
    query_one(url, sql)
}

fn deploy_request(name: &str, retryable: bool) -> DeployRequest {
    DeployRequest {
        secrets: Vec::new(),
        config: Default::default(),
        tenant: "acme".into(),
        name: name.into(),
        digest: "sha256:aaaa".into(),
        size: 1,
        world: FunctionWorld::Handler,
        public: false,
        retryable,
    }
}

fn job(n: usize, function: &str) -> JobRecord {
    JobRecord {
        // Ids sort by creation, as the host's do.
        id: format!("job_{n:06}"),
        tenant: "acme".into(),
        function: function.into(),
        status: JobStatus::Pending,
        created_at: 1,
        started_at: None,
        finished_at: None,
        attempts: 0,
        invocation_id: None,
        content_type: "text/plain".into(),
        input: vec![b'x'; 10],
        result: None,
        error: None,
        traceparent: None,
    }
}

fn claim(host: &str, lease: Duration) -> JobClaim {
    JobClaim {
        host: host.into(),
        lease,
        started_at: 5,
        invocation_id: format!("inv_{host}"),
    }
}

fn lost(retryable: bool) -> JobError {
    JobError {
        code: "host-lost".into(),
        status: 500,
        message: format!("lost (retryable: {retryable})"),
    }
}

const CAPS: JobCaps = JobCaps {
    jobs: 1000,
    bytes: 1 << 30,
};

/// Two stores on one database, with tenant `acme` and its functions `once`
/// and `again` (retryable).
fn two_stores() -> Option<(super::store::TestDatabase, PgStore, PgStore)> {
    let db = test_database()?;
    let a = PgStore::connect(&db.url, 100).unwrap();
    let b = PgStore::connect(&db.url, 100).unwrap();
    a.create_tenant("acme").unwrap();
    a.deploy(&deploy_request("once", false)).unwrap();
    a.deploy(&deploy_request("again", true)).unwrap();
    Some((db, a, b))
}

/// Whether `changes` changes within 5 s.
fn changes_within(changes: &tokio::sync::watch::Receiver<u64>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if changes.has_changed().unwrap_or(false) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn shared(store: &PgStore) -> &dyn SharedStore {
    store.shared().expect("PostgreSQL is a shared store")
}

#[test]
fn a_shared_queue_counts_its_limit_and_hands_each_job_out_once() {
    let Some((_db, a, b)) = two_stores() else {
        return;
    };
    for n in 0..40 {
        assert!(shared(&a).enqueue_job(&job(n, "once"), 40).unwrap());
    }
    assert!(
        !shared(&b).enqueue_job(&job(40, "once"), 40).unwrap(),
        "the limit is counted in the database, whichever host asks"
    );
    assert_eq!(shared(&b).pending_job_tenants().unwrap(), ["acme"]);

    // Eight claimers, four per host, at once.
    let claimed: Vec<(String, JobRecord)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|worker| {
                let (store, host) = if worker % 2 == 0 {
                    (&a, "host-a")
                } else {
                    (&b, "host-b")
                };
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(job) = shared(store)
                        .claim_job("acme", &claim(host, Duration::from_secs(60)))
                        .unwrap()
                    {
                        mine.push((host.to_owned(), job));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let ids: HashSet<&str> = claimed.iter().map(|(_, job)| job.id.as_str()).collect();
    assert_eq!(claimed.len(), 40, "every job was claimed");
    assert_eq!(ids.len(), 40, "and none twice");
    assert!(shared(&a).pending_job_tenants().unwrap().is_empty());
    for (host, job) in &claimed {
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.attempts, 1);
        assert_eq!(job.invocation_id.as_deref(), Some(&*format!("inv_{host}")));
        assert_eq!(a.job("acme", &job.id).unwrap().as_ref(), Some(job));
    }
    // Each host renews exactly what it holds.
    let held_by_a = claimed.iter().filter(|(host, _)| host == "host-a").count();
    let renewed = shared(&b)
        .renew_jobs("host-a", Duration::from_secs(60))
        .unwrap();
    assert_eq!(renewed.len(), held_by_a);
    assert!(renewed.iter().all(|(_, cancel)| !cancel));

    // A finish lands only from the host that holds the job.
    let (holder, mut running) = claimed[0].clone();
    let other = if holder == "host-a" {
        "host-b"
    } else {
        "host-a"
    };
    running.status = JobStatus::Succeeded;
    running.finished_at = Some(9);
    assert!(!shared(&a).finish_job(&running, other, CAPS).unwrap());
    assert_eq!(
        a.job("acme", &running.id).unwrap().unwrap().status,
        JobStatus::Running
    );
    assert!(shared(&a).finish_job(&running, &holder, CAPS).unwrap());
    assert_eq!(
        b.job("acme", &running.id).unwrap().unwrap().status,
        JobStatus::Succeeded
    );
    assert!(
        !shared(&a).finish_job(&running, &holder, CAPS).unwrap(),
        "finished once"
    );
}

#[test]
fn lapsed_leases_requeue_retryable_jobs_once_and_fail_the_rest() {
    let Some((_db, a, b)) = two_stores() else {
        return;
    };
    shared(&a).enqueue_job(&job(1, "once"), 10).unwrap();
    shared(&a).enqueue_job(&job(2, "again"), 10).unwrap();
    shared(&a).enqueue_job(&job(3, "again"), 10).unwrap();
    // Host A takes all three with a lease that lapses at once; no expiry
    // before it has.
    let short = Duration::from_millis(1);
    for _ in 0..2 {
        shared(&a)
            .claim_job("acme", &claim("host-a", short))
            .unwrap();
    }
    shared(&a)
        .claim_job("acme", &claim("host-a", Duration::from_secs(60)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let expired = shared(&b).expire_jobs(lost).unwrap();
    assert_eq!((expired.requeued, expired.failed), (1, 1), "{expired:?}");
    let once = b.job("acme", "job_000001").unwrap().unwrap();
    assert_eq!(once.status, JobStatus::Failed);
    assert_eq!(once.error.unwrap().message, "lost (retryable: false)");
    assert!(once.input.is_empty());
    let again = b.job("acme", "job_000002").unwrap().unwrap();
    assert_eq!(again.status, JobStatus::Pending);
    // Host A no longer holds it: its finish does not land, its renewal
    // does not list it.
    let mut late = again.clone();
    late.status = JobStatus::Succeeded;
    assert!(!shared(&a).finish_job(&late, "host-a", CAPS).unwrap());
    let held = shared(&a)
        .renew_jobs("host-a", Duration::from_secs(60))
        .unwrap();
    assert_eq!(held, [("job_000003".to_owned(), false)]);

    // Host B runs it again; when B dies too, it is not retried a third time.
    let retried = shared(&b)
        .claim_job("acme", &claim("host-b", short))
        .unwrap()
        .unwrap();
    assert_eq!((retried.id.as_str(), retried.attempts), ("job_000002", 2));
    std::thread::sleep(Duration::from_millis(20));
    let expired = shared(&a).expire_jobs(lost).unwrap();
    assert_eq!((expired.requeued, expired.failed), (0, 1));
    assert_eq!(
        a.job("acme", "job_000002")
            .unwrap()
            .unwrap()
            .error
            .unwrap()
            .message,
        "lost (retryable: true)"
    );

    // A host that stops gracefully hands its jobs over at once.
    assert_eq!(shared(&a).abandon_jobs("host-a").unwrap(), 1);
    let expired = shared(&b).expire_jobs(lost).unwrap();
    assert_eq!((expired.requeued, expired.failed), (1, 0));
    assert!(shared(&b).expire_jobs(lost).unwrap().requeued == 0);
}

#[test]
fn cancels_settle_pending_jobs_flag_running_ones_and_delete_finished_ones() {
    let Some((_db, a, b)) = two_stores() else {
        return;
    };
    let cancelled = JobError {
        code: "cancelled".into(),
        status: 499,
        message: "cancelled".into(),
    };
    for n in 1..=3 {
        shared(&a).enqueue_job(&job(n, "once"), 10).unwrap();
    }
    let running = shared(&a)
        .claim_job("acme", &claim("host-a", Duration::from_secs(60)))
        .unwrap()
        .unwrap();
    assert_eq!(running.id, "job_000001");

    // Asked on host B: the pending one is cancelled in the store.
    match shared(&b)
        .cancel_job("acme", "job_000002", &cancelled, 77, CAPS)
        .unwrap()
    {
        JobCancel::Settled(job) => {
            assert_eq!(job.status, JobStatus::Cancelled);
            assert_eq!(job.finished_at, Some(77));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        a.job("acme", "job_000002").unwrap().unwrap().status,
        JobStatus::Cancelled
    );
    // The running one is flagged for host A, which learns it at its next
    // renewal (and, on a host, at once from the notification).
    let mut asked = shared(&a).cancels_requested();
    asked.mark_unchanged();
    assert!(matches!(
        shared(&b)
            .cancel_job("acme", "job_000001", &cancelled, 78, CAPS)
            .unwrap(),
        JobCancel::Requested(_)
    ));
    assert!(changes_within(&asked), "host A was notified");
    assert_eq!(
        shared(&a)
            .renew_jobs("host-a", Duration::from_secs(60))
            .unwrap(),
        [("job_000001".to_owned(), true)]
    );
    // Another tenant's job is not found; a finished one is deleted.
    assert!(matches!(
        shared(&b)
            .cancel_job("other", "job_000003", &cancelled, 79, CAPS)
            .unwrap(),
        JobCancel::Missing
    ));
    assert!(matches!(
        shared(&b)
            .cancel_job("acme", "job_000002", &cancelled, 79, CAPS)
            .unwrap(),
        JobCancel::Deleted
    ));
    assert!(a.job("acme", "job_000002").unwrap().is_none());
}

#[test]
fn finished_jobs_are_capped_per_tenant_and_pruned_by_age() {
    let Some((_db, a, _b)) = two_stores() else {
        return;
    };
    for n in 1..=5 {
        shared(&a).enqueue_job(&job(n, "once"), 10).unwrap();
    }
    // Finished in order 1..5 at times 10..50; each result holds 100 bytes.
    for n in 1..=5u64 {
        let mut job = shared(&a)
            .claim_job("acme", &claim("host-a", Duration::from_secs(60)))
            .unwrap()
            .unwrap();
        job.status = JobStatus::Succeeded;
        job.finished_at = Some(n * 10);
        job.input = Vec::new();
        job.result = Some(gust_host::store::JobResult {
            status: 200,
            content_type: "text/plain".into(),
            body: vec![b'r'; 100],
        });
        let caps = JobCaps {
            jobs: 3,
            bytes: 250,
        };
        assert!(shared(&a).finish_job(&job, "host-a", caps).unwrap());
    }
    // At most 3 jobs and 250 bytes: the two newest.
    let kept: Vec<String> = a
        .all_jobs()
        .unwrap()
        .into_iter()
        .map(|job| job.id)
        .collect();
    assert_eq!(kept, ["job_000004", "job_000005"]);
    assert_eq!(shared(&a).prune_jobs(40).unwrap(), 1);
    assert_eq!(a.all_jobs().unwrap().len(), 1);
}

#[test]
fn each_schedule_tick_is_claimed_by_one_host() {
    let Some((_db, a, b)) = two_stores() else {
        return;
    };
    let schedule = ScheduleRecord {
        tenant: "acme".into(),
        function: "once".into(),
        cron: "* * * * * *".into(),
        input: Value::Null,
        created_at: 1000,
        last_run_at: None,
        last_invocation_id: None,
        last_outcome: None,
    };
    a.put_schedule(&schedule).unwrap();
    assert!(shared(&a).claim_fire("acme", "once", 1000, 2000).unwrap());
    assert!(!shared(&b).claim_fire("acme", "once", 1000, 2000).unwrap());
    assert!(!shared(&a).claim_fire("acme", "once", 1000, 1000).unwrap());
    // A replaced schedule: fires of the old one are refused.
    a.put_schedule(&ScheduleRecord {
        created_at: 1500,
        ..schedule.clone()
    })
    .unwrap();
    assert!(!shared(&b).claim_fire("acme", "once", 1000, 3000).unwrap());
    assert!(shared(&b).claim_fire("acme", "once", 1500, 3000).unwrap());
    // Noting a run is not a change other hosts reload for; a new setting is.
    let mut changes = shared(&a).schedules_changed();
    changes.mark_unchanged();
    a.put_schedule(&ScheduleRecord {
        created_at: 1500,
        last_run_at: Some(3000),
        ..schedule.clone()
    })
    .unwrap();
    a.delete_schedule("acme", "once").unwrap();
    assert!(changes_within(&changes), "a removal is announced");
    assert!(!shared(&a).claim_fire("acme", "once", 1500, 4000).unwrap());
}

/// A host of the test setup on the database at `url`, with `config` on top.
async fn host_on(dir: &Path, url: &str, lease: Duration) -> TestServer {
    let url = url.to_owned();
    TestServer::start_configured(dir, move |config| {
        config.store = StoreLocation::Postgres(url);
        config.job_lease = lease;
    })
    .await
}

/// Polls `url` (with `key`) until it answers 200.
async fn until_ok(url: &str, key: &str, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = request("POST", url, Some(key), body.to_owned()).await;
        if reply.status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "{url}: {}", reply.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spawned_on_two_hosts_each_run_exactly_once() {
    let Some(db) = test_database() else { return };
    let (a_dir, b_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    for dir in [&a_dir, &b_dir] {
        let policies = super::server::policies(dir.path());
        std::fs::write(
            policies.join("cluster.toml"),
            "max_queued_jobs = 1000\nmax_concurrency = 4\n",
        )
        .unwrap();
    }
    let a = host_on(a_dir.path(), &db.url, Duration::from_secs(30)).await;
    let b = host_on(b_dir.path(), &db.url, Duration::from_secs(30)).await;
    let key = tenant(&a, "cluster").await;
    for (name, component) in [
        ("hello", artifacts::HELLO_COMPONENT),
        ("echo", artifacts::ECHO_COMPONENT),
    ] {
        assert_eq!(deploy(&a, &key, name, component).await.status, 201);
    }
    // Host B follows the deploys: once it serves the second, it has the
    // first. (Asked of `echo`, so that every record of `hello` is a job's.)
    until_ok(&b.url("/v1/functions/echo/invoke"), &key, "B").await;

    let spawns = (0..200).map(|n| {
        let host = if n % 2 == 0 { &a } else { &b };
        let (url, key) = (host.url("/v1/functions/hello/spawn"), key.clone());
        async move {
            let reply = request("POST", &url, Some(&key), format!("{n}")).await;
            assert_eq!(reply.status, 202, "{}", reply.text());
            (n, reply.json()["job_id"].as_str().unwrap().to_owned())
        }
    });
    let ids = futures::future::join_all(spawns).await;
    for (n, id) in &ids {
        // Read on the other host than the one it was spawned on.
        let host = if n % 2 == 0 { &b } else { &a };
        let job = poll_json(&host.url(&format!("/v1/jobs/{id}")), &key, |job| {
            job["status"] != "pending" && job["status"] != "running"
        })
        .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
        assert_eq!(job["result"]["output"], format!("Hello, {n}!"), "{job}");
    }
    // One invocation record per job: none ran twice. Records are written
    // off the request path: wait for the last.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ran = loop {
        let ran = query_i64(
            &db.url,
            "SELECT count(*) FROM invocations WHERE function = 'hello'",
        );
        if ran >= 200 || Instant::now() > deadline {
            break ran;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A run twice would show as a 201st (with a later check, so that a
    // late one is seen too).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ran_finally = query_i64(
        &db.url,
        "SELECT count(*) FROM invocations WHERE function = 'hello'",
    );
    assert_eq!((ran, ran_finally), (200, 200));
    let distinct = query_i64(
        &db.url,
        "SELECT count(DISTINCT record ->> 'invocation_id') FROM jobs",
    );
    assert_eq!(distinct, 200);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_on_one_host_is_cancelled_from_another() {
    let Some(db) = test_database() else { return };
    let (a_dir, b_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let a = host_on(a_dir.path(), &db.url, Duration::from_secs(30)).await;
    let key = tenant(&a, "other").await;
    deploy(&a, &key, "loop", artifacts::INFINITE_LOOP_COMPONENT).await;
    let spawned = request("POST", &a.url("/v1/functions/loop/spawn"), Some(&key), "").await;
    let id = spawned.json()["job_id"].as_str().unwrap().to_owned();
    poll_json(&a.url(&format!("/v1/jobs/{id}")), &key, |job| {
        job["status"] == "running"
    })
    .await;
    // Host B starts after the job is running on A, so A runs it.
    let b = host_on(b_dir.path(), &db.url, Duration::from_secs(30)).await;
    let asked = Instant::now();
    let cancel = request("DELETE", &b.url(&format!("/v1/jobs/{id}")), Some(&key), "").await;
    assert_eq!(cancel.status, 202, "{}", cancel.text());
    let job = poll_json(&b.url(&format!("/v1/jobs/{id}")), &key, |job| {
        job["status"] == "cancelled"
    })
    .await;
    // Well inside the function's 5 s timeout: the notification, not the
    // timeout, stopped it.
    let took = asked.elapsed();
    eprintln!("cancelled on the other host after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(job["error"]["code"], "cancelled", "{job}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hosts_jobs_are_finished_elsewhere_or_fail_host_lost() {
    let Some(db) = test_database() else { return };
    let (a_dir, b_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let a = Host::start_with(a_dir.path(), &["--store", &db.url, "--job-lease", "1s"]);
    let admin = super::server::ADMIN_KEY;
    let created = request(
        "POST",
        &format!("{}/v1/tenants", a.url),
        Some(admin),
        r#"{"name": "other"}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let key = created.json()["key"]["key"].as_str().unwrap().to_owned();
    let component = std::fs::read(artifacts::INFINITE_LOOP_COMPONENT).unwrap();
    for url in ["/v1/functions/again?retryable=true", "/v1/functions/once"] {
        let reply = request(
            "PUT",
            &format!("{}{url}", a.url),
            Some(&key),
            component.clone(),
        )
        .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let mut spawned = Vec::new();
    // Long enough to be running when A is killed; short enough to finish
    // on B within the tenant's 5 s timeout.
    for (function, input) in [
        ("again", "for 1500"),
        ("again", "for 1500"),
        ("once", "for 4000"),
    ] {
        let reply = request(
            "POST",
            &format!("{}/v1/functions/{function}/spawn", a.url),
            Some(&key),
            input,
        )
        .await;
        assert_eq!(reply.status, 202, "{}", reply.text());
        spawned.push((
            function,
            reply.json()["job_id"].as_str().unwrap().to_owned(),
        ));
    }
    for (_, id) in &spawned {
        poll_json(&format!("{}/v1/jobs/{id}", a.url), &key, |job| {
            job["status"] == "running"
        })
        .await;
    }
    let b = host_on(b_dir.path(), &db.url, Duration::from_secs(1)).await;
    a.kill();
    for (function, id) in &spawned {
        let job = poll_json(&b.url(&format!("/v1/jobs/{id}")), &key, |job| {
            job["status"] != "running" && job["status"] != "pending"
        })
        .await;
        if *function == "again" {
            assert_eq!(job["status"], "succeeded", "{job}");
            assert_eq!(job["attempts"], 2, "{job}");
            assert_eq!(job["result"]["output"], "spun", "{job}");
        } else {
            assert_eq!(job["status"], "failed", "{job}");
            assert_eq!(job["error"]["code"], "host-lost", "{job}");
            assert_eq!(job["attempts"], 1, "{job}");
        }
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_once_per_second_with_three_hosts_up() {
    let Some(db) = test_database() else { return };
    let dirs = [
        TempDir::new().unwrap(),
        TempDir::new().unwrap(),
        TempDir::new().unwrap(),
    ];
    let mut hosts = Vec::new();
    for dir in &dirs {
        hosts.push(host_on(dir.path(), &db.url, Duration::from_secs(30)).await);
    }
    let key = hosts[0].demo_key.clone().unwrap();
    deploy(&hosts[0], &key, "hello", artifacts::HELLO_COMPONENT).await;
    deploy(&hosts[0], &key, "echo", artifacts::ECHO_COMPONENT).await;
    // Every host has both once it serves the second (asked of `echo`, so
    // that every record of `hello` is a scheduled run's).
    for host in &hosts[1..] {
        until_ok(&host.url("/v1/functions/echo/invoke"), &key, "up").await;
    }
    let set = request(
        "PUT",
        &hosts[1].url("/v1/functions/hello/schedule"),
        Some(&key),
        r#"{"cron": "* * * * * *", "input": "tick"}"#,
    )
    .await;
    assert_eq!(set.status, 201, "{}", set.text());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let removed = request(
        "DELETE",
        &hosts[2].url("/v1/functions/hello/schedule"),
        Some(&key),
        "",
    )
    .await;
    assert_eq!(removed.status, 204, "{}", removed.text());
    // The last run's record is written after its call.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fired = query_i64(
        &db.url,
        "SELECT count(*) FROM invocations WHERE function = 'hello'",
    );
    eprintln!("fired {fired} times in 10 s on three hosts");
    assert!((9..=11).contains(&fired), "fired {fired} times");
    for host in hosts {
        host.stop().await;
    }
}

/// A TCP proxy to PostgreSQL that a test can cut (every connection
/// dropped, new ones closed at once) and mend: a database gone from one
/// host's view while the cluster serves the other tests.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn to(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_seen) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *cut_seen.borrow() {
                    continue;
                }
                let mut cut_seen = cut_seen.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_seen.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// `url` with its host and port replaced by the proxy's.
    fn url(&self, url: &str) -> String {
        let at = url
            .find('@')
            .map_or(url.find("://").unwrap() + 3, |at| at + 1);
        let end = at + url[at..].find('/').unwrap();
        format!("{}{}{}", &url[..at], self.addr, &url[end..])
    }
}

/// The address of the URL's server.
fn server_addr(url: &str) -> std::net::SocketAddr {
    let at = url
        .find('@')
        .map_or(url.find("://").unwrap() + 3, |at| at + 1);
    let end = at + url[at..].find('/').unwrap();
    use std::net::ToSocketAddrs as _;
    url[at..end].to_socket_addrs().unwrap().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_loses_its_database_stops_being_ready_and_serves_what_it_has() {
    let Some(db) = test_database() else { return };
    let proxy = Proxy::to(server_addr(&db.url)).await;
    let dir = TempDir::new().unwrap();
    let host = host_on(dir.path(), &proxy.url(&db.url), Duration::from_secs(30)).await;
    let key = host.demo_key.clone().unwrap();
    deploy(&host, &key, "hello", artifacts::HELLO_COMPONENT).await;
    let invoke_url = host.url("/v1/functions/hello/invoke");
    let invoke = || request("POST", &invoke_url, Some(&key), "Ada");
    assert_eq!(invoke().await.text(), "Hello, Ada!");
    let ready = request("GET", &host.url("/readyz"), None, "").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["status"], "ready");

    proxy.set_cut(true);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = request("GET", &host.url("/readyz"), None, "").await;
        if ready.status == 503 {
            ready.problem(503, "not-ready");
            break;
        }
        assert!(Instant::now() < deadline, "still ready: {}", ready.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Alive, and serving the function it has loaded to the key it knows,
    // without waiting on the database.
    let health = request("GET", &host.url("/healthz"), None, "").await;
    assert_eq!(health.status, 200);
    for _ in 0..3 {
        let started = Instant::now();
        let reply = invoke().await;
        assert_eq!(reply.text(), "Hello, Ada!");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // What needs the database is refused, clearly.
    let refused = deploy(&host, &key, "later", artifacts::ECHO_COMPONENT).await;
    refused.problem(503, "store-unavailable");
    let logs = request("GET", &host.url("/v1/functions/hello/logs"), Some(&key), "").await;
    logs.problem(503, "store-unavailable");

    // Mended: ready again, deploys go through, and the records of the
    // calls made meanwhile were written after all.
    proxy.set_cut(false);
    let deadline = Instant::now() + Duration::from_secs(15);
    while request("GET", &host.url("/readyz"), None, "").await.status != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        deploy(&host, &key, "later", artifacts::ECHO_COMPONENT)
            .await
            .status,
        201
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let logs = request("GET", &host.url("/v1/functions/hello/logs"), Some(&key), "").await;
        if logs.status == 200 && logs.json()["invocations"].as_array().unwrap().len() == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", logs.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.stop().await;
}

/// `gust store migrate` with `args`; its exit status and stdout.
fn migrate(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gust"))
        .args(["store", "migrate"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_set_on_one_host_is_used_and_rotated_on_another() {
    let Some(db) = test_database() else { return };
    let (a_dir, b_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    // Hosts sharing a store share the secrets key.
    let key = gust_host::service::SecretsKeyText("42".repeat(32));
    let start = |dir: &Path| {
        let (url, key) = (db.url.clone(), key.clone());
        let dir = dir.to_owned();
        async move {
            TestServer::start_configured(&dir, move |config| {
                config.store = StoreLocation::Postgres(url);
                config.secrets_key = Some(key);
            })
            .await
        }
    };
    let a = start(a_dir.path()).await;
    let b = start(b_dir.path()).await;
    let demo = a.demo_key.clone().or(b.demo_key.clone()).unwrap();
    let set = |value: &'static str| {
        let url = a.url("/v1/secrets/SHARED_TOKEN");
        let demo = demo.clone();
        async move { request("PUT", &url, Some(&demo), value).await }
    };
    assert_eq!(set("first-value-1").await.status, 201);
    let deployed = request(
        "PUT",
        &a.url("/v1/functions/env?secrets=SHARED_TOKEN"),
        Some(&demo),
        std::fs::read(artifacts::ENV_VAR_COMPONENT).unwrap(),
    )
    .await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    // Host B sees the deploy and the secret within moments.
    let read_on_b = || {
        let url = b.url("/v1/functions/env/invoke");
        let demo = demo.clone();
        async move {
            request("POST", &url, Some(&demo), "SHARED_TOKEN")
                .await
                .text()
        }
    };
    let until = |expected: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = read_on_b().await;
            if seen == expected {
                return;
            }
            assert!(Instant::now() < deadline, "host B still answers {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    until("first-value-1").await;
    // Rotated on A: B's next calls see the new value.
    assert_eq!(set("second-value-2").await.status, 200);
    until("second-value-2").await;
    // The database holds it sealed.
    let plain: i64 = query_one(
        &db.url,
        "SELECT count(*) FROM secrets WHERE position('second-value'::bytea IN sealed) > 0",
    );
    assert_eq!(plain, 0);
    let listed = request("GET", &b.url("/v1/secrets"), Some(&demo), "").await;
    assert_eq!(listed.json()["secrets"][0]["name"], "SHARED_TOKEN");
    // Deleted on B: A's calls fail with secret-missing.
    let deleted = request(
        "DELETE",
        &b.url("/v1/secrets/SHARED_TOKEN"),
        Some(&demo),
        "",
    )
    .await;
    assert_eq!(deleted.status, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = request(
            "POST",
            &a.url("/v1/functions/env/invoke"),
            Some(&demo),
            "SHARED_TOKEN",
        )
        .await;
        if reply.status == 409 {
            reply.problem(409, "secret-missing");
            break;
        }
        assert!(Instant::now() < deadline, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_host_moves_to_postgres_with_gust_store_migrate() {
    let Some(db) = test_database() else { return };
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    // A single host on sled, with versions, a schedule, and jobs left
    // running and waiting when it stops.
    let sled = TestServer::start(dir.path()).await;
    let demo = sled.demo_key.clone().unwrap();
    deploy(&sled, &demo, "hello", artifacts::HELLO_COMPONENT).await;
    let public = request(
        "PUT",
        &sled.url("/v1/functions/hello?public=true"),
        Some(&demo),
        std::fs::read(artifacts::HELLO_COMPONENT).unwrap(),
    )
    .await;
    assert_eq!(public.json()["version"], 2, "{}", public.text());
    let scheduled = request(
        "PUT",
        &sled.url("/v1/functions/hello/schedule"),
        Some(&demo),
        r#"{"cron": "0 0 1 1 *", "input": "new year"}"#,
    )
    .await;
    assert_eq!(scheduled.status, 201, "{}", scheduled.text());
    let queue = tenant(&sled, "queue").await;
    deploy(&sled, &queue, "loop", artifacts::INFINITE_LOOP_COMPONENT).await;
    deploy(&sled, &queue, "hello", artifacts::HELLO_COMPONENT).await;
    let spawn = |function: &str, input: &str| {
        let url = sled.url(&format!("/v1/functions/{function}/spawn"));
        let (queue, input) = (queue.clone(), input.to_owned());
        async move {
            let reply = request("POST", &url, Some(&queue), input).await;
            assert_eq!(reply.status, 202, "{}", reply.text());
            reply.json()["job_id"].as_str().unwrap().to_owned()
        }
    };
    let looping = spawn("loop", "").await;
    poll_json(&sled.url(&format!("/v1/jobs/{looping}")), &queue, |job| {
        job["status"] == "running"
    })
    .await;
    let waiting = spawn("hello", "later").await;
    // A secret and a function deployed with it.
    let set = request(
        "PUT",
        &sled.url("/v1/secrets/MIGRATED_TOKEN"),
        Some(&demo),
        "moved-along-0042",
    )
    .await;
    assert_eq!(set.status, 201, "{}", set.text());
    let env = request(
        "PUT",
        &sled.url("/v1/functions/env?secrets=MIGRATED_TOKEN"),
        Some(&demo),
        std::fs::read(artifacts::ENV_VAR_COMPONENT).unwrap(),
    )
    .await;
    assert_eq!(env.status, 201, "{}", env.text());
    // Key-value entries, counters included.
    for (path, value) in [
        ("/v1/kv/cache/a", "1"),
        ("/v1/kv/cache/b%2Fc", "two"),
        ("/v1/kv/hits/n", "41"),
    ] {
        let put = request("PUT", &sled.url(path), Some(&demo), value).await;
        assert_eq!(put.status, 204, "{}", put.text());
    }
    sled.stop().await;

    // Bad input first: not a data directory, not a database URL.
    let (status, _, err) = migrate(&["--from", "/nonexistent", "--to", &db.url]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("no embedded store"), "{err}");
    let (status, _, err) = migrate(&["--from", data.to_str().unwrap(), "--to", "mysql://x"]);
    assert_eq!(status, 2, "{err}");

    let (status, out, err) = migrate(&["--from", data.to_str().unwrap(), "--to", &db.url]);
    assert_eq!(status, 0, "{out}{err}");
    eprintln!("{out}");
    let counts = |out: &str, what: &str| -> (u64, u64) {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(what))
            .unwrap_or_else(|| panic!("no {what} in {out}"));
        let numbers: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (numbers[0], numbers[1])
    };
    assert_eq!(counts(&out, "tenants"), (2, 0));
    assert_eq!(counts(&out, "keys"), (2, 0));
    assert_eq!(counts(&out, "secrets"), (1, 0));
    assert_eq!(counts(&out, "kv"), (3, 0));
    assert_eq!(counts(&out, "functions"), (4, 0));
    assert_eq!(counts(&out, "schedules"), (1, 0));
    assert_eq!(counts(&out, "jobs"), (2, 0));
    // Again: nothing new, nothing overwritten.
    let (status, again, err) = migrate(&["--from", data.to_str().unwrap(), "--to", &db.url]);
    assert_eq!(status, 0, "{again}{err}");
    assert_eq!(counts(&again, "functions"), (0, 4));
    assert_eq!(counts(&again, "secrets"), (0, 1));
    assert_eq!(counts(&again, "kv"), (0, 3));
    assert_eq!(counts(&again, "jobs"), (0, 2));

    // A host on PostgreSQL, on the same data directory: the same keys,
    // functions and versions, with nothing compiled again.
    let pg = host_on(dir.path(), &db.url, Duration::from_secs(1)).await;
    assert!(pg.demo_key.is_none());
    let invoked = request(
        "POST",
        &pg.url("/v1/functions/hello/invoke"),
        Some(&demo),
        "pg",
    )
    .await;
    assert_eq!(invoked.text(), "Hello, pg!");
    let function = request("GET", &pg.url("/v1/functions/hello"), Some(&demo), "").await;
    assert_eq!(function.json()["version"], 2, "{}", function.text());
    assert_eq!(function.json()["public"], true);
    let schedule = request(
        "GET",
        &pg.url("/v1/functions/hello/schedule"),
        Some(&demo),
        "",
    )
    .await;
    assert_eq!(schedule.json()["cron"], "0 0 1 1 *", "{}", schedule.text());
    // The secret came along sealed; the same data directory's key opens it.
    let secret = request(
        "POST",
        &pg.url("/v1/functions/env/invoke"),
        Some(&demo),
        "MIGRATED_TOKEN",
    )
    .await;
    assert_eq!(secret.text(), "moved-along-0042");
    let moved = request("GET", &pg.url("/v1/kv/cache/b%2Fc"), Some(&demo), "").await;
    assert_eq!((moved.status, moved.text().as_str()), (200, "two"));
    let buckets = request("GET", &pg.url("/v1/kv"), Some(&demo), "").await;
    assert_eq!(buckets.json()["buckets"][1]["name"], "hits");
    assert_eq!(buckets.json()["buckets"][0]["keys"], 2);
    let metrics = request(
        "GET",
        &pg.url("/metrics"),
        Some(super::server::ADMIN_KEY),
        "",
    )
    .await
    .text();
    assert!(
        metrics.lines().any(|l| l == "gust_compile_total 0"),
        "{metrics}"
    );
    // The waiting job runs; the one that was running when its host stopped
    // ends as a lost host's job does.
    let job = poll_json(&pg.url(&format!("/v1/jobs/{waiting}")), &queue, |job| {
        job["status"] == "succeeded"
    })
    .await;
    assert_eq!(job["result"]["output"], "Hello, later!");
    let job = poll_json(&pg.url(&format!("/v1/jobs/{looping}")), &queue, |job| {
        job["status"] == "failed"
    })
    .await;
    assert_eq!(job["error"]["code"], "host-lost", "{job}");
    pg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_host_restarted_serves_everything_without_compiling() {
    let Some(db) = test_database() else { return };
    let dirs = [TempDir::new().unwrap(), TempDir::new().unwrap()];
    let a = host_on(dirs[0].path(), &db.url, Duration::from_secs(30)).await;
    let b = host_on(dirs[1].path(), &db.url, Duration::from_secs(30)).await;
    let key = a.demo_key.clone().unwrap();
    deploy(&a, &key, "hello", artifacts::HELLO_COMPONENT).await;
    deploy(&b, &key, "echo", artifacts::ECHO_COMPONENT).await;
    for host in [&a, &b] {
        until_ok(&host.url("/v1/functions/hello/invoke"), &key, "x").await;
        until_ok(&host.url("/v1/functions/echo/invoke"), &key, "x").await;
    }
    a.stop().await;
    b.stop().await;

    for dir in &dirs {
        let host = host_on(dir.path(), &db.url, Duration::from_secs(30)).await;
        let hello = request(
            "POST",
            &host.url("/v1/functions/hello/invoke"),
            Some(&key),
            "again",
        )
        .await;
        assert_eq!(hello.text(), "Hello, again!");
        let echo = request(
            "POST",
            &host.url("/v1/functions/echo/invoke"),
            Some(&key),
            "again",
        )
        .await;
        assert_eq!(echo.text(), "again");
        let metrics = request(
            "GET",
            &host.url("/metrics"),
            Some(super::server::ADMIN_KEY),
            "",
        )
        .await
        .text();
        assert!(
            metrics.lines().any(|l| l == "gust_compile_total 0"),
            "{metrics}"
        );
        host.stop().await;
    }
}

/// `sslmode` as libpq reads it: encrypted unless `disable`; verified
/// against the system's roots (or `sslrootcert`) with `verify-*`, which
/// refuses the test cluster's self-signed certificate.
#[test]
fn tls_to_the_database_follows_sslmode() {
    let Some(db) = test_database() else { return };
    let with = |options: &str| {
        let joiner = if db.url.contains('?') { '&' } else { '?' };
        format!("{}{joiner}{options}", db.url)
    };
    // Connections of this store, encrypted or not, as the server sees them.
    let encrypted = |name: &str, ssl: bool| {
        query_i64(
            &db.url,
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = '{name}' AND s.ssl = {ssl}"
            ),
        )
    };
    let plain = PgStore::connect(&with("sslmode=disable&application_name=gust-plain"), 10).unwrap();
    plain.tenants().unwrap();
    assert!(encrypted("gust-plain", false) > 0);
    assert_eq!(encrypted("gust-plain", true), 0);
    if query_one::<String>(&db.url, "SHOW ssl") != "on" {
        eprintln!("the test cluster has no TLS: checking only that sslmode=require is refused");
        let error = PgStore::connect(&with("sslmode=require"), 10).unwrap_err();
        eprintln!("{error}");
        return;
    }
    let required =
        PgStore::connect(&with("sslmode=require&application_name=gust-require"), 10).unwrap();
    required.tenants().unwrap();
    assert!(encrypted("gust-require", true) > 0);
    assert_eq!(encrypted("gust-require", false), 0);
    // The default, `prefer`, encrypts when the server can.
    let preferred = PgStore::connect(&with("application_name=gust-prefer"), 10).unwrap();
    preferred.tenants().unwrap();
    assert!(encrypted("gust-prefer", true) > 0);
    // A certificate no trusted root vouches for is refused, saying why.
    let error = PgStore::connect(&with("sslmode=verify-full"), 10).unwrap_err();
    let message = format!("{error:?}");
    assert!(
        message.contains("certificate") || message.contains("Certificate"),
        "{message}"
    );
    let error =
        PgStore::connect(&with("sslmode=verify-ca&sslrootcert=/nonexistent.pem"), 10).unwrap_err();
    assert!(error.to_string().contains("/nonexistent.pem"), "{error}");
}
