//! The store contract: one suite over the [`MetaStore`] and [`BlobStore`]
//! traits, run against the embedded sled store and against PostgreSQL.
//!
//! PostgreSQL comes from `GUST_TEST_POSTGRES` (a URL of a role that may
//! create databases; `.ci/run` starts a cluster and sets it). Each test
//! makes a database of its own and drops it after. Without the variable
//! the PostgreSQL half skips with a message, except in CI (`CI=true`),
//! where a missing database is a failure.

use std::sync::Arc;

use gust_host::digest::Digest;
use gust_host::store::postgres::{PgBlobStore, PgStore};
use gust_host::store::sled::SledStore;
use gust_host::store::{
    ApiKeyRecord, BlobStore, DeployRequest, FsBlobStore, FunctionWorld, InvocationRecord,
    JobRecord, JobStatus, KvBucket, KvLimits, KvRefused, KvWrite, MetaStore, ScheduleRecord,
    StoreError, TimingsRecord,
};
use tempfile::TempDir;

/// A store under test and what keeps it alive; `reopen` gives a second
/// handle on the same data (after dropping the first, for sled).
struct Subject {
    store: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    kind: Kind,
    dir: TempDir,
    retention: usize,
}

enum Kind {
    Sled,
    Postgres(TestDatabase),
}

impl Subject {
    fn reopen(self) -> Self {
        let Self {
            store,
            blobs,
            kind,
            dir,
            retention,
        } = self;
        drop((store, blobs));
        match kind {
            Kind::Sled => sled_at(dir, retention),
            Kind::Postgres(db) => {
                let store = PgStore::connect(&db.url, retention).unwrap();
                let blobs = PgBlobStore::new(store.clone(), &dir.path().join("cache2")).unwrap();
                Self {
                    store: Arc::new(store),
                    blobs: Arc::new(blobs),
                    kind: Kind::Postgres(db),
                    dir,
                    retention,
                }
            }
        }
    }
}

fn sled_at(dir: TempDir, retention: usize) -> Subject {
    let store = SledStore::open(&dir.path().join("meta"), retention).unwrap();
    let blobs = FsBlobStore::open(&dir.path().join("blobs")).unwrap();
    Subject {
        store: Arc::new(store),
        blobs: Arc::new(blobs),
        kind: Kind::Sled,
        dir,
        retention,
    }
}

/// A database of one test, dropped with it.
pub(crate) struct TestDatabase {
    admin: String,
    name: String,
    /// The database's URL.
    pub(crate) url: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = admin_sql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs `sql` on the admin URL, with a throwaway client on a thread and
/// runtime of its own (so that async tests may call it too).
fn admin_sql(url: &str, sql: &str) -> Result<(), tokio_postgres::Error> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let (client, connection) =
                        tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                    let driver = tokio::spawn(connection);
                    let done = client.batch_execute(sql).await;
                    drop(client);
                    let _ = driver.await;
                    done
                })
            })
            .join()
            .unwrap()
    })
}

/// The PostgreSQL admin URL, or `None` (with a message) to skip; panics in
/// CI, where the database must be there.
fn postgres_url() -> Option<String> {
    match std::env::var("GUST_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but GUST_TEST_POSTGRES is not set: .ci/run starts PostgreSQL")
        }
        _ => {
            eprintln!("skipping the PostgreSQL store tests: GUST_TEST_POSTGRES is not set");
            None
        }
    }
}

/// A fresh database on the PostgreSQL of `GUST_TEST_POSTGRES` (dropped
/// with the value), or `None` (with a message) to skip.
pub(crate) fn test_database() -> Option<TestDatabase> {
    let admin = postgres_url()?;
    // Unique across the tests running at once in this process and others.
    let seed = format!(
        "{:?}{:?}{}",
        std::time::SystemTime::now(),
        std::thread::current().id(),
        std::process::id()
    );
    let name = format!("gust_test_{}", &Digest::of(seed.as_bytes()).hex()[..16]);
    admin_sql(&admin, &format!("CREATE DATABASE {name}")).unwrap();
    let url = with_database(&admin, &name);
    Some(TestDatabase { admin, name, url })
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let host_at = base.find("://").map_or(0, |at| at + 3);
    let base = match base[host_at..].find('/') {
        Some(slash) => &base[..host_at + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

fn postgres_subject(retention: usize) -> Option<Subject> {
    let db = test_database()?;
    let dir = TempDir::new().unwrap();
    let store = PgStore::connect(&db.url, retention).unwrap();
    let blobs = PgBlobStore::new(store.clone(), &dir.path().join("cache")).unwrap();
    Some(Subject {
        store: Arc::new(store),
        blobs: Arc::new(blobs),
        kind: Kind::Postgres(db),
        dir,
        retention,
    })
}

/// Runs `test` on a sled store and, when reachable, a PostgreSQL one.
fn both(retention: usize, test: impl Fn(Subject)) {
    test(sled_at(TempDir::new().unwrap(), retention));
    if let Some(subject) = postgres_subject(retention) {
        test(subject);
    }
}

fn request(tenant: &str, name: &str, digest: &str, public: bool) -> DeployRequest {
    DeployRequest {
        secrets: Vec::new(),
        config: Default::default(),
        tenant: tenant.into(),
        name: name.into(),
        digest: digest.into(),
        size: 1234,
        world: FunctionWorld::Handler,
        public,
        retryable: false,
    }
}

fn key(tenant: &str, id: &str, byte: u8) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.into(),
        tenant: tenant.into(),
        hash: [byte; 32],
        created_at: 7,
    }
}

fn invocation(tenant: &str, function: &str, id: &str) -> InvocationRecord {
    InvocationRecord {
        id: id.into(),
        tenant: tenant.into(),
        function: function.into(),
        version: 1,
        started_at: 42,
        status: 200,
        outcome: "ok".into(),
        message: None,
        timings: TimingsRecord {
            instantiate_us: 1,
            call_us: 2,
            total_us: 3,
            reused_instance: false,
            ready_instance: false,
        },
        peak_memory_bytes: 65536,
        stdout: "out".into(),
        stderr: String::new(),
        stdout_dropped_bytes: 0,
        stderr_dropped_bytes: 0,
        egress_denied: Vec::new(),
        trace_id: None,
    }
}

fn ids(records: &[InvocationRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

const A: &str = "sha256:aaaa";
const B: &str = "sha256:bbbb";

#[test]
fn tenants_are_created_once_and_listed_by_name() {
    both(10, |s| {
        s.store.create_tenant("beta").unwrap();
        s.store.create_tenant("alpha").unwrap();
        s.store.create_tenant("Zed").unwrap();
        assert!(matches!(
            s.store.create_tenant("beta"),
            Err(StoreError::Conflict(_))
        ));
        let names: Vec<String> = s
            .store
            .tenants()
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        // Byte order, as sled keeps it.
        assert_eq!(names, ["Zed", "alpha", "beta"]);
        assert_eq!(s.store.tenant("alpha").unwrap().unwrap().name, "alpha");
        assert!(s.store.tenant("nobody").unwrap().is_none());
    });
}

#[test]
fn keys_need_their_tenant_are_unique_and_revoke() {
    both(10, |s| {
        s.store.create_tenant("acme").unwrap();
        assert!(matches!(
            s.store.add_key(&key("ghost", "k0", 9)),
            Err(StoreError::Missing(_))
        ));
        s.store.add_key(&key("acme", "k2", 2)).unwrap();
        s.store.add_key(&key("acme", "k1", 1)).unwrap();
        assert!(matches!(
            s.store.add_key(&key("acme", "k1", 3)),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            s.store.add_key(&key("acme", "k3", 1)),
            Err(StoreError::Conflict(_))
        ));
        let listed: Vec<String> = s
            .store
            .keys("acme")
            .unwrap()
            .into_iter()
            .map(|k| k.id)
            .collect();
        assert_eq!(listed, ["k1", "k2"]);
        assert_eq!(
            s.store.key_by_hash(&[2; 32]).unwrap().unwrap(),
            key("acme", "k2", 2)
        );
        assert!(s.store.revoke_key("acme", "k2").unwrap());
        assert!(!s.store.revoke_key("acme", "k2").unwrap());
        assert!(!s.store.revoke_key("other", "k1").unwrap());
        assert!(s.store.key_by_hash(&[2; 32]).unwrap().is_none());
        assert_eq!(s.store.keys("acme").unwrap().len(), 1);
    });
}

#[test]
fn deploys_version_only_on_change_and_track_digests() {
    both(10, |s| {
        s.store.create_tenant("acme").unwrap();
        s.store.create_tenant("beta").unwrap();
        let first = s.store.deploy(&request("acme", "f", A, false)).unwrap();
        assert!(first.changed);
        assert_eq!(first.function.version, 1);
        let same = s.store.deploy(&request("acme", "f", A, false)).unwrap();
        assert!(!same.changed);
        assert_eq!(same.function, first.function);
        let public = s.store.deploy(&request("acme", "f", A, true)).unwrap();
        assert!(public.changed);
        assert_eq!(public.function.version, 2);
        assert_eq!(public.function.created_at, first.function.created_at);
        s.store.deploy(&request("beta", "g", A, false)).unwrap();
        let moved = s.store.deploy(&request("acme", "f", B, true)).unwrap();
        assert_eq!(moved.function.version, 3);
        assert!(s.store.digest_in_use(A).unwrap(), "beta/g still uses it");
        assert!(s.store.digest_in_use(B).unwrap());
        s.store.delete_function("beta", "g").unwrap().unwrap();
        assert!(!s.store.digest_in_use(A).unwrap());
        assert!(s.store.delete_function("beta", "g").unwrap().is_none());
        assert_eq!(
            s.store.function("acme", "f").unwrap().unwrap(),
            moved.function
        );
        s.store.deploy(&request("acme", "a", B, false)).unwrap();
        let names: Vec<String> = s
            .store
            .functions("acme")
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["a", "f"]);
        assert_eq!(s.store.all_functions().unwrap().len(), 2);
        assert!(s.store.functions("beta").unwrap().is_empty());
    });
}

#[test]
fn records_are_newest_first_paged_and_kept_by_retention() {
    both(3, |s| {
        s.store.create_tenant("acme").unwrap();
        s.store.deploy(&request("acme", "f", A, false)).unwrap();
        let mut pruned = 0;
        for i in 0..5 {
            pruned += s
                .store
                .record_invocation(&invocation("acme", "f", &format!("inv_{i}")))
                .unwrap();
        }
        assert_eq!(pruned, 2);
        assert_eq!(
            ids(&s.store.invocations("acme", "f", 10).unwrap()),
            ["inv_4", "inv_3", "inv_2"]
        );
        let page = s.store.invocations_before("acme", "f", 2, None).unwrap();
        assert_eq!(page.len(), 2);
        let rest = s
            .store
            .invocations_before("acme", "f", 2, Some(page[1].0))
            .unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.id, "inv_2");
        assert!(s.store.invocation("acme", "inv_0").unwrap().is_none());
        assert_eq!(
            s.store.invocation("acme", "inv_3").unwrap().unwrap(),
            invocation("acme", "f", "inv_3")
        );
        // Another tenant's id is not found.
        assert!(s.store.invocation("other", "inv_3").unwrap().is_none());
        // The same record again is a retried write; another under its id
        // is a conflict; a missing function is refused.
        assert_eq!(
            s.store
                .record_invocation(&invocation("acme", "f", "inv_4"))
                .unwrap(),
            0
        );
        let mut changed = invocation("acme", "f", "inv_4");
        changed.status = 500;
        assert!(matches!(
            s.store.record_invocation(&changed),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            s.store
                .record_invocation(&invocation("acme", "ghost", "inv_x")),
            Err(StoreError::Missing(_))
        ));
    });
}

/// A batch (what the record writer hands over) answers each record as a
/// single write would, keeps the batch's order, and prunes per function.
#[test]
fn a_batch_of_records_answers_each_like_a_single_write() {
    both(3, |s| {
        s.store.create_tenant("acme").unwrap();
        s.store.deploy(&request("acme", "f", A, false)).unwrap();
        s.store.deploy(&request("acme", "g", B, false)).unwrap();
        s.store
            .record_invocation(&invocation("acme", "f", "inv_0"))
            .unwrap();
        let mut changed = invocation("acme", "f", "inv_0");
        changed.status = 500;
        let mut batch = vec![
            // A retried write, then a conflicting one.
            invocation("acme", "f", "inv_0"),
            changed,
            invocation("acme", "ghost", "inv_x"),
        ];
        batch.extend((1..=4).map(|i| invocation("acme", "f", &format!("inv_{i}"))));
        batch.push(invocation("acme", "g", "inv_g"));
        let answers = s.store.record_invocations(&batch);
        assert_eq!(answers.len(), batch.len());
        assert!(matches!(answers[0], Ok(0)), "{:?}", answers[0]);
        assert!(matches!(answers[1], Err(StoreError::Conflict(_))));
        assert!(matches!(answers[2], Err(StoreError::Missing(_))));
        // Five records of f, three kept: two pruned, all told.
        let pruned: u64 = answers[3..7].iter().map(|a| *a.as_ref().unwrap()).sum();
        assert_eq!(pruned, 2);
        assert!(matches!(answers[7], Ok(0)));
        assert_eq!(
            ids(&s.store.invocations("acme", "f", 10).unwrap()),
            ["inv_4", "inv_3", "inv_2"]
        );
        assert_eq!(
            ids(&s.store.invocations("acme", "g", 10).unwrap()),
            ["inv_g"]
        );
    });
}

#[test]
fn a_deleted_functions_records_never_show_again() {
    both(10, |s| {
        s.store.create_tenant("acme").unwrap();
        s.store.deploy(&request("acme", "f", A, false)).unwrap();
        s.store
            .record_invocation(&invocation("acme", "f", "inv_old"))
            .unwrap();
        s.store.delete_function("acme", "f").unwrap().unwrap();
        s.store.deploy(&request("acme", "f", A, false)).unwrap();
        assert!(s.store.invocation("acme", "inv_old").unwrap().is_none());
        assert!(s.store.invocations("acme", "f", 10).unwrap().is_empty());
        s.store
            .record_invocation(&invocation("acme", "f", "inv_new"))
            .unwrap();
        assert_eq!(
            ids(&s.store.invocations("acme", "f", 10).unwrap()),
            ["inv_new"]
        );
    });
}

#[test]
fn retention_zero_keeps_nothing_and_concurrent_records_respect_retention() {
    both(0, |s| {
        s.store.create_tenant("acme").unwrap();
        s.store.deploy(&request("acme", "f", A, false)).unwrap();
        assert_eq!(
            s.store
                .record_invocation(&invocation("acme", "f", "i"))
                .unwrap(),
            1
        );
        assert!(s.store.invocations("acme", "f", 10).unwrap().is_empty());
    });
    both(5, |s| {
        s.store.create_tenant("acme").unwrap();
        s.store.deploy(&request("acme", "f", A, false)).unwrap();
        let pruned: u64 = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|t| {
                    let store = Arc::clone(&s.store);
                    scope.spawn(move || {
                        (0..25)
                            .map(|i| {
                                store
                                    .record_invocation(&invocation(
                                        "acme",
                                        "f",
                                        &format!("inv_{t}_{i}"),
                                    ))
                                    .unwrap()
                            })
                            .sum::<u64>()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(s.store.invocations("acme", "f", 100).unwrap().len(), 5);
        assert_eq!(
            pruned, 95,
            "every record written is kept or counted as pruned"
        );
    });
}

#[test]
fn jobs_and_schedules_round_trip_and_everything_survives_a_reopen() {
    both(10, |s| {
        s.store.create_tenant("acme").unwrap();
        s.store.deploy(&request("acme", "f", A, false)).unwrap();
        s.store.add_key(&key("acme", "k1", 1)).unwrap();
        s.store
            .record_invocation(&invocation("acme", "f", "inv_1"))
            .unwrap();
        let job = JobRecord {
            id: "job_1".into(),
            tenant: "acme".into(),
            function: "f".into(),
            status: JobStatus::Pending,
            created_at: 1,
            started_at: None,
            finished_at: None,
            attempts: 0,
            invocation_id: None,
            content_type: "application/octet-stream".into(),
            input: vec![0, 1, 2, 255],
            result: None,
            error: None,
            traceparent: None,
        };
        s.store.put_job(&job).unwrap();
        let mut running = job.clone();
        running.status = JobStatus::Running;
        running.attempts = 1;
        s.store.put_job(&running).unwrap();
        assert_eq!(s.store.job("acme", "job_1").unwrap().unwrap(), running);
        assert!(s.store.job("other", "job_1").unwrap().is_none());
        let schedule = ScheduleRecord {
            tenant: "acme".into(),
            function: "f".into(),
            cron: "* * * * * *".into(),
            input: serde_json::json!({"n": 1}),
            created_at: 5,
            last_run_at: None,
            last_invocation_id: None,
            last_outcome: None,
        };
        s.store.put_schedule(&schedule).unwrap();
        assert_eq!(s.store.schedule("acme", "f").unwrap().unwrap(), schedule);
        let digest = Digest::of(b"component bytes");
        s.blobs.put(&digest, b"component bytes").unwrap();
        assert!(matches!(
            s.blobs.put(&Digest::of(b"other"), b"component bytes"),
            Err(StoreError::DigestMismatch { .. })
        ));
        s.store.flush().unwrap();

        let s = s.reopen();
        assert_eq!(s.store.tenants().unwrap().len(), 1);
        assert_eq!(s.store.key_by_hash(&[1; 32]).unwrap().unwrap().id, "k1");
        assert_eq!(s.store.function("acme", "f").unwrap().unwrap().version, 1);
        assert_eq!(
            ids(&s.store.invocations("acme", "f", 10).unwrap()),
            ["inv_1"]
        );
        assert_eq!(s.store.all_jobs().unwrap(), [running]);
        assert_eq!(s.store.all_schedules().unwrap(), [schedule]);
        assert_eq!(s.blobs.get(&digest).unwrap().unwrap(), b"component bytes");
        assert!(s.blobs.contains(&digest).unwrap());
        assert_eq!(s.blobs.list().unwrap(), [digest]);
        assert!(s.store.delete_job("acme", "job_1").unwrap());
        assert!(!s.store.delete_job("acme", "job_1").unwrap());
        assert!(s.store.delete_schedule("acme", "f").unwrap());
        assert!(s.store.all_schedules().unwrap().is_empty());
        assert!(s.blobs.remove(&digest).unwrap());
        assert!(s.blobs.get(&digest).unwrap().is_none());
        assert!(!s.blobs.remove(&digest).unwrap());
    });
}

#[test]
fn database_urls_name_the_test_database() {
    for (admin, want) in [
        ("postgres://u:p@h:5432/postgres", "postgres://u:p@h:5432/t"),
        ("postgres://u:p@h:5432", "postgres://u:p@h:5432/t"),
        (
            "postgresql://h/db?sslmode=disable",
            "postgresql://h/t?sslmode=disable",
        ),
    ] {
        assert_eq!(with_database(admin, "t"), want);
    }
}

/// A host on PostgreSQL serves what another host stored there: tenants,
/// keys, functions (their blobs come from the database), records and
/// schedules; a delete on one is seen by the other's next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_on_one_database_serve_what_each_stored() {
    use gust_host::service::StoreLocation;
    use gust_test_artifacts as artifacts;

    use super::server::{TestServer, deploy, request, tenant};

    let Some(db) = test_database() else { return };
    let start = |dir: std::path::PathBuf| {
        let url = db.url.clone();
        async move {
            TestServer::start_configured(&dir, |config| {
                config.store = StoreLocation::Postgres(url);
            })
            .await
        }
    };
    let (first_dir, second_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let a = start(first_dir.path().to_owned()).await;
    let demo = a
        .demo_key
        .clone()
        .expect("the first host makes the demo tenant");
    assert_eq!(
        deploy(&a, &demo, "echo", artifacts::ECHO_COMPONENT)
            .await
            .status,
        201
    );
    let acme = tenant(&a, "acme").await;
    let invoked = request(
        "POST",
        &a.url("/v1/functions/echo/invoke"),
        Some(&demo),
        "one",
    )
    .await;
    assert_eq!(invoked.text(), "one");
    let scheduled = request(
        "PUT",
        &a.url("/v1/functions/echo/schedule"),
        Some(&demo),
        r#"{"cron": "0 0 1 1 *", "input": {"n": 1}}"#,
    )
    .await;
    assert_eq!(scheduled.status, 201, "{}", scheduled.text());
    a.stop().await;

    // Another host, with an empty data directory: everything comes from
    // the database.
    let b = start(second_dir.path().to_owned()).await;
    assert!(b.demo_key.is_none(), "the demo tenant exists already");
    let again = request(
        "POST",
        &b.url("/v1/functions/echo/invoke"),
        Some(&demo),
        "two",
    )
    .await;
    assert_eq!(again.text(), "two");
    // On a shared store the record is written off the request path: soon
    // after the answer, not before it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let logs = request("GET", &b.url("/v1/functions/echo/logs"), Some(&demo), "").await;
        let kept = logs.json()["invocations"].as_array().unwrap().len();
        if kept == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{kept} records");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let keys = request("GET", &b.url("/v1/keys"), Some(&acme), "").await;
    assert_eq!(keys.status, 200);
    let schedule = request(
        "GET",
        &b.url("/v1/functions/echo/schedule"),
        Some(&demo),
        "",
    )
    .await;
    assert_eq!(schedule.json()["cron"], "0 0 1 1 *");
    let cached = second_dir.path().join("data/blob-cache");
    assert!(cached.read_dir().unwrap().next().is_some());
    let deleted = request("DELETE", &b.url("/v1/functions/echo"), Some(&demo), "").await;
    assert_eq!(deleted.status, 204);
    b.stop().await;

    let a = start(first_dir.path().to_owned()).await;
    request(
        "POST",
        &a.url("/v1/functions/echo/invoke"),
        Some(&demo),
        "x",
    )
    .await
    .problem(404, "not-found");
    a.stop().await;
}

/// Hosts up at the same time on one database follow each other: a deploy,
/// a redeploy and a delete on one are served by the other moments later
/// (a notification, then a load: from the database's blob, compiled
/// there), and a key revoked on one stops working on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_up_together_follow_each_others_changes() {
    use std::time::{Duration, Instant};

    use gust_host::service::StoreLocation;
    use gust_test_artifacts as artifacts;

    use super::server::{Reply, TestServer, deploy, request};

    let Some(db) = test_database() else { return };
    let (a_dir, b_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let start = |dir: &TempDir| {
        let (url, dir) = (db.url.clone(), dir.path().to_owned());
        async move {
            TestServer::start_configured(&dir, |config| {
                config.store = StoreLocation::Postgres(url);
            })
            .await
        }
    };
    let a = start(&a_dir).await;
    let b = start(&b_dir).await;
    let demo = a.demo_key.clone().unwrap();
    // Polls `call` until `done` holds; how long that took. Generous
    // deadline: the other host compiles the component (a debug build, on a
    // loaded machine) after the notification.
    async fn until<F, Fut>(what: &str, mut call: F, done: impl Fn(&Reply) -> bool) -> Duration
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Reply>,
    {
        let started = Instant::now();
        loop {
            let reply = call().await;
            if done(&reply) {
                let took = started.elapsed();
                eprintln!("{what}: seen after {took:?}");
                return took;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{what}: not seen in 20 s; last answer {} {}",
                reply.status,
                reply.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let invoke = |host: &TestServer, key: &str| {
        let (url, key) = (host.url("/v1/functions/f/invoke"), key.to_owned());
        move || {
            let (url, key) = (url.clone(), key.clone());
            async move { request("POST", &url, Some(&key), "Ada").await }
        }
    };

    assert_eq!(
        deploy(&a, &demo, "f", artifacts::ECHO_COMPONENT)
            .await
            .status,
        201
    );
    until("a deploy on A, on B", invoke(&b, &demo), |r| {
        r.text() == "Ada"
    })
    .await;
    assert_eq!(
        deploy(&b, &demo, "f", artifacts::HELLO_COMPONENT)
            .await
            .status,
        201
    );
    until("a redeploy on B, on A", invoke(&a, &demo), |r| {
        r.text() == "Hello, Ada!"
    })
    .await;
    let deleted = request("DELETE", &a.url("/v1/functions/f"), Some(&demo), "").await;
    assert_eq!(deleted.status, 204);
    until("a delete on A, on B", invoke(&b, &demo), |r| {
        r.status == 404
    })
    .await;

    // A key used on A (so A trusts it for a moment), revoked on B.
    let made = request("POST", &b.url("/v1/keys"), Some(&demo), "").await;
    let (id, key) = (
        made.json()["id"].as_str().unwrap().to_owned(),
        made.json()["key"].as_str().unwrap().to_owned(),
    );
    let list = |host: &TestServer| {
        let (url, key) = (host.url("/v1/functions"), key.clone());
        move || {
            let (url, key) = (url.clone(), key.clone());
            async move { request("GET", &url, Some(&key), "").await }
        }
    };
    assert_eq!(list(&a)().await.status, 200);
    let revoked = request("DELETE", &b.url(&format!("/v1/keys/{id}")), Some(&demo), "").await;
    assert_eq!(revoked.status, 204);
    let took = until("a revoke on B, on A", list(&a), |r| r.status == 401).await;
    assert!(
        took < Duration::from_secs(2),
        "a revoked key worked {took:?} on"
    );
    a.stop().await;
    b.stop().await;
}

const KV_LIMITS: KvLimits = KvLimits {
    max_buckets: 3,
    max_keys: 4,
    max_bytes: 200,
};

fn set(key: &str, value: &[u8]) -> KvWrite {
    KvWrite::Set(key.to_owned(), value.to_vec())
}

#[test]
fn kv_entries_are_read_written_listed_and_kept_per_tenant_and_bucket() {
    both(10, |s| {
        s.store.create_tenant("acme").unwrap();
        s.store.create_tenant("acme2").unwrap();
        let kv = s.store.kv();
        kv.kv_write(
            "acme",
            "b",
            &[set("x", b"1"), set("a/b", b"22"), set("\u{e9}", b"")],
            KV_LIMITS,
        )
        .unwrap()
        .unwrap();
        kv.kv_write("acme2", "b", &[set("x", b"other")], KV_LIMITS)
            .unwrap()
            .unwrap();
        assert_eq!(
            kv.kv_get("acme", "b", "x").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(
            kv.kv_get("acme2", "b", "x").unwrap().as_deref(),
            Some(&b"other"[..])
        );
        assert_eq!(kv.kv_get("acme", "c", "x").unwrap(), None);
        assert_eq!(
            kv.kv_get_many("acme", "b", &["a/b".into(), "nope".into(), "\u{e9}".into()])
                .unwrap(),
            vec![Some(b"22".to_vec()), None, Some(Vec::new())]
        );
        // Byte order, paged by offset.
        assert_eq!(
            kv.kv_keys("acme", "b", 0, 10).unwrap(),
            ["a/b", "x", "\u{e9}"]
        );
        assert_eq!(kv.kv_keys("acme", "b", 1, 1).unwrap(), ["x"]);
        assert!(kv.kv_keys("acme", "b", 5, 10).unwrap().is_empty());
        assert_eq!(
            kv.kv_buckets("acme").unwrap(),
            [KvBucket {
                name: "b".into(),
                keys: 3,
                bytes: 2 + 5 + 2
            }]
        );
        // A delete in a batch with a set; the emptied bucket goes.
        kv.kv_write(
            "acme",
            "b",
            &[
                KvWrite::Delete("x".into()),
                KvWrite::Delete("a/b".into()),
                KvWrite::Delete("\u{e9}".into()),
            ],
            KV_LIMITS,
        )
        .unwrap()
        .unwrap();
        assert!(kv.kv_buckets("acme").unwrap().is_empty());
        assert_eq!(kv.kv_get("acme", "b", "x").unwrap(), None);

        kv.kv_write("acme", "kept", &[set("k", b"v")], KV_LIMITS)
            .unwrap()
            .unwrap();
        let s = s.reopen();
        let kv = s.store.kv();
        assert_eq!(
            kv.kv_get("acme", "kept", "k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        assert_eq!(kv.kv_buckets("acme").unwrap()[0].keys, 1);
    });
}

#[test]
fn kv_quotas_refuse_the_whole_write_and_never_a_shrinking_one() {
    both(10, |s| {
        s.store.create_tenant("acme").unwrap();
        let kv = s.store.kv();
        for bucket in ["a", "b", "c"] {
            kv.kv_write("acme", bucket, &[set("k", b"v")], KV_LIMITS)
                .unwrap()
                .unwrap();
        }
        assert_eq!(
            kv.kv_write("acme", "d", &[set("k", b"v")], KV_LIMITS)
                .unwrap(),
            Err(KvRefused::Buckets { max: 3 })
        );
        let five: Vec<KvWrite> = (0..5).map(|i| set(&format!("n{i}"), b"")).collect();
        assert!(matches!(
            kv.kv_write("acme", "a", &five, KV_LIMITS).unwrap(),
            Err(KvRefused::Keys { max: 4, .. })
        ));
        // Nothing of the refused batch was stored.
        assert_eq!(kv.kv_keys("acme", "a", 0, 10).unwrap(), ["k"]);
        assert!(matches!(
            kv.kv_write("acme", "a", &[set("big", &[0; 200])], KV_LIMITS)
                .unwrap(),
            Err(KvRefused::Bytes { max: 200, .. })
        ));
        // Under a lowered quota, deleting still works.
        let none = KvLimits {
            max_buckets: 0,
            max_keys: 0,
            max_bytes: 0,
        };
        kv.kv_write("acme", "a", &[KvWrite::Delete("k".into())], none)
            .unwrap()
            .unwrap();
        assert_eq!(kv.kv_buckets("acme").unwrap().len(), 2);
        // Writes of a tenant that does not exist are refused (sled has no
        // tenant check of its own: the service only writes for tenants).
        if matches!(s.kind, Kind::Postgres(_)) {
            assert!(
                kv.kv_write("ghost", "a", &[set("k", b"v")], KV_LIMITS)
                    .is_err()
            );
        }
    });
}

#[test]
fn kv_counters_add_up_under_concurrent_increments() {
    both(10, |s| {
        s.store.create_tenant("acme").unwrap();
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let store = Arc::clone(&s.store);
                scope.spawn(move || {
                    for _ in 0..25 {
                        store
                            .kv()
                            .kv_increment("acme", "c", "hits", 2, KV_LIMITS)
                            .unwrap()
                            .unwrap();
                    }
                });
            }
        });
        let kv = s.store.kv();
        assert_eq!(
            kv.kv_get("acme", "c", "hits").unwrap().as_deref(),
            Some(&b"400"[..])
        );
        assert_eq!(
            kv.kv_increment("acme", "c", "hits", 0, KV_LIMITS).unwrap(),
            Ok(400)
        );
        kv.kv_write("acme", "c", &[set("text", b"abc")], KV_LIMITS)
            .unwrap()
            .unwrap();
        assert_eq!(
            kv.kv_increment("acme", "c", "text", 1, KV_LIMITS).unwrap(),
            Err(KvRefused::NotANumber { key: "text".into() })
        );
        assert_eq!(kv.kv_buckets("acme").unwrap()[0].keys, 2);
    });
}
