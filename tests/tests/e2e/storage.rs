//! The Storage Write API path (issue 15), against the local BigQuery's gRPC port: a slice's
//! rows appear only when its pending stream is committed, exactly once, under gRPC faults.
//! The other modules run through this path too when `TENANTSYNC_WRITE_API=storage`
//! (scripts/run-tests does that for the ones that prove the sync properties).

use std::sync::Arc;
use std::time::{Duration, Instant};
use tenantsync_core::{TableSpec, WriteApi};
use tenantsync_store::control::tasks::TaskId;
use tenantsync_tests::grpc_faults::{FaultPlan, GrpcFaultProxy};
use tenantsync_tests::interleave::{bq_pairs, pg_pairs};
use tenantsync_tests::{scalar_i64, CrashOnceAt, TestEnv};
use tenantsync_worker::{CrashPoint, NoHooks, SliceOutcome};
use tokio_util::sync::CancellationToken;

const ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                                        v int NOT NULL, updated_at timestamptz NOT NULL)";

/// `n` rows for each organization of `orgs`, written a minute ago.
async fn seed_items(env: &TestEnv, orgs: &[i64], n: i64) {
    sqlx::raw_sql(ITEMS)
        .execute(env.source_pool())
        .await
        .unwrap();
    for &org in orgs {
        sqlx::query(
            "INSERT INTO items SELECT $1 * 1000000 + g, $1, g::int, now() - interval '1 minute'
             FROM generate_series(1, $2) g",
        )
        .bind(org)
        .bind(n)
        .execute(env.source_pool())
        .await
        .unwrap();
    }
}

async fn storage_table(env: &TestEnv, name: &str) -> TableSpec {
    let mut t = env.add_table(name, "organization_id").await.unwrap();
    env.control
        .set_write_api(t.id, Some(WriteApi::Storage))
        .await
        .unwrap();
    t.write_api = Some(WriteApi::Storage);
    t
}

fn grpc_host() -> String {
    std::env::var("BIGQUERY_STORAGE_EMULATOR_HOST")
        .expect("BIGQUERY_STORAGE_EMULATOR_HOST (scripts/dev-env test writes it to .env.test)")
}

async fn wait_lease_free(env: &TestEnv, task: TaskId) {
    let t0 = Instant::now();
    while env.lease_holder(task).await.is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const PG_ITEMS: &str = "SELECT id, v FROM items WHERE organization_id = $1";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_of_an_uncommitted_stream_is_ever_in_the_table_and_a_commit_is_exactly_once() {
    let env = TestEnv::new().await.unwrap();
    seed_items(&env, &[1], 100).await;
    let items = storage_table(&env, "items").await;
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let task = env.task(&tenant, &items).await;
    let mut cfg = env.worker_config();
    cfg.chunk_limits.max_rows = 20;
    cfg.lease_ttl = Duration::from_secs(2);
    let bq = env.bq(&tenant).await.unwrap();
    let count = |sql: String| {
        let bq = &bq;
        async move { scalar_i64(&bq.query(&sql).await.unwrap()) }
    };
    let (base, latest) = (bq.qualified("items"), bq.qualified("items_latest"));

    // Killed after its first chunk was appended, then (another worker) after every chunk was
    // appended but before the batch was committed: the table stays empty, not just the view.
    for point in [CrashPoint::AfterFirstChunk, CrashPoint::BeforeCommit] {
        env.past_skew().await;
        let dying = env.worker_with(cfg.clone(), CrashOnceAt::new(point));
        let r = dying
            .try_execute_task(task, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(r.outcome, SliceOutcome::Crashed, "{point:?}");
        assert_eq!(
            count(format!("SELECT COUNT(*) FROM {base}")).await,
            0,
            "rows of an uncommitted pending stream are visible after {point:?}"
        );
        wait_lease_free(&env, task).await;
    }
    env.sync_once(&env.worker_with(cfg, Arc::new(NoHooks)))
        .await
        .unwrap();
    // Exactly once: each row is in the table one time (insertAll may hold copies the view
    // hides; a committed stream holds none).
    assert_eq!(count(format!("SELECT COUNT(*) FROM {base}")).await, 100);
    assert_eq!(
        count(format!("SELECT COUNT(DISTINCT id) FROM {base}")).await,
        100
    );
    let want = pg_pairs(env.source_pool(), PG_ITEMS, 1).await.unwrap();
    assert_eq!(bq_pairs(&bq, "items_latest").await.unwrap(), want);
    assert_eq!(count(format!("SELECT COUNT(*) FROM {latest}")).await, 100);
    env.cleanup().await.unwrap();
}

/// UNAVAILABLE and RESOURCE_EXHAUSTED before the emulator, and answers dropped after it did
/// the work (an append, a finalize, a commit), on every method the path uses: every row ends
/// in the table once and in `_latest` with its newest value, for two tenants.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_faults_leave_every_row_in_latest_exactly_once() {
    let env = TestEnv::new().await.unwrap();
    seed_items(&env, &[1, 2], 150).await;
    let _items = storage_table(&env, "items").await;
    let tenants = [
        env.add_tenant("org-1", 1).await.unwrap(),
        env.add_tenant("org-2", 2).await.unwrap(),
    ];
    let proxy = GrpcFaultProxy::start(
        &grpc_host(),
        &FaultPlan {
            appends: "pass,unavailable,drop_after,pass,exhausted,drop_after",
            creates: "unavailable,pass,pass",
            finalizes: "drop_after,pass",
            commits: "drop_after,unavailable,pass",
        },
    );
    let mut cfg = env.worker_config();
    cfg.endpoint = cfg.endpoint.with_storage_emulator(Some(&proxy.host));
    cfg.chunk_limits.max_rows = 25;
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    env.sync_once(&worker).await.unwrap();
    // Updates after the first sync: the newest value must win, once.
    sqlx::query("UPDATE items SET v = v + 1000, updated_at = now() WHERE id % 3 = 0")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.sync_once(&worker).await.unwrap();

    for (t, org) in tenants.iter().zip([1, 2]) {
        let bq = env.bq(t).await.unwrap();
        let want = pg_pairs(env.source_pool(), PG_ITEMS, org).await.unwrap();
        assert_eq!(want.len(), 150);
        assert_eq!(
            bq_pairs(&bq, "items_latest").await.unwrap(),
            want,
            "{}",
            t.slug
        );
        // 150 first versions and 50 updates, each written once.
        let versions = bq
            .query(&format!(
                "SELECT COUNT(*), COUNT(DISTINCT _version_id) FROM {}",
                bq.qualified("items")
            ))
            .await
            .unwrap();
        assert_eq!(tenantsync_tests::cell(&versions[0], 0), "200", "{}", t.slug);
        assert_eq!(tenantsync_tests::cell(&versions[0], 1), "200", "{}", t.slug);
    }
    let counts = proxy.counts();
    for fault in [
        "AppendRows:unavailable",
        "AppendRows:exhausted",
        "AppendRows:drop_after",
        "CreateWriteStream:unavailable",
        "FinalizeWriteStream:drop_after",
        "BatchCommitWriteStreams:drop_after",
        "BatchCommitWriteStreams:unavailable",
    ] {
        assert!(
            counts.get(fault).copied().unwrap_or(0) >= 1,
            "{fault} never injected: {counts:?}"
        );
    }
    env.cleanup().await.unwrap();
}

/// A table switched between write methods keeps one correct `_latest`: the views read both
/// methods' rows through the same batch listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_switched_between_write_methods_stays_equal_to_postgres() {
    let env = TestEnv::new().await.unwrap();
    seed_items(&env, &[1], 60).await;
    let items = env.add_table("items", "organization_id").await.unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let mut cfg = env.worker_config();
    cfg.write_api = WriteApi::InsertAll;
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    let bq = env.bq(&tenant).await.unwrap();
    for (round, method) in [WriteApi::Storage, WriteApi::InsertAll, WriteApi::Storage]
        .into_iter()
        .enumerate()
    {
        env.control
            .set_write_api(items.id, Some(method))
            .await
            .unwrap();
        sqlx::query("UPDATE items SET v = v + 1, updated_at = now() WHERE id % $1 = 0")
            .bind(round as i64 + 2)
            .execute(env.source_pool())
            .await
            .unwrap();
        sqlx::query("INSERT INTO items VALUES (1000000 + 100 + $1, 1, 7, now())")
            .bind(round as i64)
            .execute(env.source_pool())
            .await
            .unwrap();
        env.sync_once(&worker).await.unwrap();
        let want = pg_pairs(env.source_pool(), PG_ITEMS, 1).await.unwrap();
        assert_eq!(
            bq_pairs(&bq, "items_latest").await.unwrap(),
            want,
            "after round {round} ({method})"
        );
    }
    env.cleanup().await.unwrap();
}

/// Values BigQuery would refuse are refused by the encoder, before a pending stream sees them
/// (the local BigQuery validates pending rows only at the commit, and then drops the whole
/// batch while answering success): each is dead-lettered with its key, every other row lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_bigquery_refuses_are_dead_lettered_before_they_reach_a_stream() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE odd (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                           n numeric, t time, d date, updated_at timestamptz NOT NULL);
         INSERT INTO odd SELECT g, 1, g, '12:00', '2024-01-01', now() - interval '1 minute'
         FROM generate_series(1, 40) g;
         UPDATE odd SET n = 'NaN' WHERE id = 3;
         UPDATE odd SET t = '24:00:00' WHERE id = 7;
         UPDATE odd SET d = 'infinity' WHERE id = 11;
         UPDATE odd SET d = '0044-03-15 BC' WHERE id = 13;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let odd = storage_table(&env, "odd").await;
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    env.sync_once(&env.worker()).await.unwrap();
    let bq = env.bq(&tenant).await.unwrap();
    let ids = bq
        .query(&format!(
            "SELECT id FROM {} ORDER BY id",
            bq.qualified("odd_latest")
        ))
        .await
        .unwrap();
    let ids: Vec<String> = ids.iter().map(|r| tenantsync_tests::cell(r, 0)).collect();
    assert_eq!(ids.len(), 36, "{ids:?}");
    for bad in ["3", "7", "11", "13"] {
        assert!(!ids.contains(&bad.to_string()), "{bad} landed");
    }
    let letters = env
        .control
        .dead_letters(Some("org-1"), Some("open"))
        .await
        .unwrap();
    let mut keys: Vec<String> = letters
        .iter()
        .filter(|d| d.table_id == odd.id)
        .map(|d| d.key.join(","))
        .collect();
    keys.sort();
    assert_eq!(keys, ["11", "13", "3", "7"], "{letters:?}");
    env.cleanup().await.unwrap();
}

/// A key the Storage Write API refuses (`UNAUTHENTICATED`, `PERMISSION_DENIED`) pauses its
/// tenant, as a 401/403 from insertAll does, with the reason stored; nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_credentials_on_the_grpc_path_pause_the_tenant() {
    for refusal in ["unauthenticated", "denied"] {
        let env = TestEnv::new().await.unwrap();
        seed_items(&env, &[1], 10).await;
        let items = storage_table(&env, "items").await;
        let tenant = env.add_tenant("org-1", 1).await.unwrap();
        let plan = FaultPlan {
            creates: refusal,
            appends: refusal,
            ..Default::default()
        };
        let proxy = GrpcFaultProxy::start(&grpc_host(), &plan);
        let mut cfg = env.worker_config();
        cfg.endpoint = cfg.endpoint.with_storage_emulator(Some(&proxy.host));
        let worker = env.worker_with(cfg, Arc::new(NoHooks));
        env.past_skew().await;
        let task = env.task(&tenant, &items).await;
        let r = worker
            .try_execute_task(task, &CancellationToken::new())
            .await
            .unwrap();
        assert!(
            matches!(&r.outcome, SliceOutcome::Failed { error, .. } if error.contains("credentials")),
            "{refusal}: {:?}",
            r.outcome
        );
        let t = env.control.tenant("org-1").await.unwrap();
        assert_eq!(
            t.status,
            tenantsync_core::TenantStatus::CredentialsInvalid,
            "{refusal}"
        );
        let bq = env.bq(&tenant).await.unwrap();
        let n = bq
            .query(&format!("SELECT COUNT(*) FROM {}", bq.qualified("items")))
            .await
            .unwrap();
        assert_eq!(scalar_i64(&n), 0, "{refusal}");
        env.cleanup().await.unwrap();
    }
}
