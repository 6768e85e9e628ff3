//! The coordinator and the worker pool as separate processes of the real binary.

use chrono::Utc;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tenantsync_store::control::tasks::TaskId;
use tenantsync_tests::{scalar_i64, Proc, TestEnv};

const POOL_TABLES: [&str; 4] = ["contacts", "flows", "messages", "flow_results"];

async fn setup(env: &TestEnv, orgs: &[i64], contacts: i64) -> Vec<tenantsync_core::TableSpec> {
    tenantsync_demo::seed(env.source_pool(), orgs, contacts)
        .await
        .unwrap();
    let mut specs = Vec::new();
    for t in POOL_TABLES {
        specs.push(env.add_table(t, "organization_id").await.unwrap());
    }
    for &org in orgs {
        env.add_tenant(&format!("org-{org}"), org).await.unwrap();
    }
    specs
}

/// Every tenant's `_latest` equals Postgres in count, and holds no key twice.
async fn assert_complete(env: &TestEnv, tables: &[&str]) {
    for t in env.control.tenants().await.unwrap() {
        let bq = env.bq(&t).await.unwrap();
        for table in tables {
            let pg: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table} WHERE organization_id = $1::bigint"
            ))
            .bind(&t.organization_id)
            .fetch_one(env.source_pool())
            .await
            .unwrap();
            let latest = bq.qualified(&format!("{table}_latest"));
            let got = scalar_i64(
                &bq.query(&format!("SELECT COUNT(*) - (SELECT COUNT(DISTINCT id) FROM {latest}) + COUNT(*) * 1000000 FROM {latest}"))
                    .await
                    .unwrap(),
            );
            assert_eq!(
                got,
                pg * 1_000_000,
                "{} {table}: count or duplicate keys differ (pg {pg}, encoded {got})",
                t.slug
            );
        }
    }
}

/// A slice as the run log has it: start, end, worker.
type Interval = (chrono::DateTime<Utc>, chrono::DateTime<Utc>, String);

/// From the run log: slices of the same task by different workers never overlapped in time.
async fn assert_one_writer_per_task(env: &TestEnv) -> usize {
    let rows: Vec<(i64, i64, String, chrono::DateTime<Utc>, i32)> = sqlx::query_as(
        "SELECT tenant_id, table_id, worker, started_at, duration_ms FROM sync_runs ORDER BY tenant_id, table_id, started_at",
    )
    .fetch_all(env.control.pool())
    .await
    .unwrap();
    let mut by_task: BTreeMap<(i64, i64), Vec<Interval>> = BTreeMap::new();
    for (tenant, table, worker, start, ms) in rows.iter().cloned() {
        by_task.entry((tenant, table)).or_default().push((
            start,
            start + chrono::Duration::milliseconds(ms as i64),
            worker,
        ));
    }
    for (task, runs) in &by_task {
        for w in runs.windows(2) {
            assert!(
                w[1].0 >= w[0].1,
                "task {task:?}: {} started at {} while {} held it until {}",
                w[1].2,
                w[1].0,
                w[0].2,
                w[0].1
            );
        }
    }
    rows.iter()
        .map(|r| r.2.clone())
        .collect::<BTreeSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_and_two_coordinators_sync_twenty_tenants_with_one_writer_per_task() {
    let env = TestEnv::new().await.unwrap();
    // 80 tasks: plenty for three workers to share and for a second writer to show up if the
    // leases let one through. With 50 tenants (200 tasks) the wait below needed 566-600 s of
    // its 600 s on a busy machine, nearly all of it the emulator creating 200 tables and views
    // in one Python process; scale is what the benchmarks measure, not this test.
    let orgs: Vec<i64> = (1..=20).collect();
    setup(&env, &orgs, 10).await;
    let mut generator = tenantsync_demo::Generator::new(env.source_pool().clone(), orgs.clone(), 3)
        .await
        .unwrap();
    generator.step(500).await.unwrap();

    let env_vars = [
        ("TENANTSYNC_LEASE_TTL_MS", "3000"),
        ("TENANTSYNC_CONCURRENCY", "4"),
    ];
    let _c1 = env.spawn("c1", &["coordinator"], &env_vars);
    let _c2 = env.spawn("c2", &["coordinator"], &env_vars);
    let _w: Vec<_> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| env.spawn(n, &["worker"], &env_vars))
        .collect();
    // Traffic while the pool runs.
    for _ in 0..15 {
        generator.step(100).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last_write = Utc::now();
    // Bound by the emulator: 80 tasks create their tables and views through one Python
    // process (about 2 minutes on a busy 2-core machine). Speed is not what this test checks.
    env.wait_synced_through(last_write, Duration::from_secs(600))
        .await
        .unwrap();
    assert_complete(&env, &POOL_TABLES).await;
    let workers = assert_one_writer_per_task(&env).await;
    assert_eq!(workers, 3, "every worker should have taken work");
    env.cleanup().await.unwrap();
}

/// One tenant with 4000 contacts, a coordinator and worker `w1` with small chunks (so its
/// contacts slice takes seconds), returned once `w1` is inside that slice.
async fn slow_slice_in_progress(env: &TestEnv, vars: &[(&str, &str)]) -> (TaskId, Proc, Proc) {
    let specs = setup(env, &[1], 4000).await;
    let tenant = env.control.tenant("org-1").await.unwrap();
    let task = TaskId {
        tenant_id: tenant.id,
        table_id: specs[0].id,
    };
    let c = env.spawn("c1", &["coordinator"], vars);
    let w1 = env.spawn("w1", &["worker"], vars);
    let t0 = Instant::now();
    while env.lease_holder(task).await.as_deref() != Some("w1") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "w1 never took the contacts task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    (task, c, w1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_slice_is_replaced_after_its_lease_expires() {
    let env = TestEnv::new().await.unwrap();
    // Small chunks make the 4000-row slice take seconds, so the kill lands inside it.
    let slow = [
        ("TENANTSYNC_LEASE_TTL_MS", "2000"),
        ("TENANTSYNC_CHUNK_ROWS", "20"),
    ];
    let (task, _c, w1) = slow_slice_in_progress(&env, &slow).await;
    w1.signal("-9");
    let status = env.control.status().await.unwrap();
    let contacts = status.iter().find(|r| r.table == "contacts").unwrap();
    assert!(
        contacts.synced_through.is_none(),
        "the killed slice must not have committed"
    );

    let _w2 = env.spawn("w2", &["worker"], &slow);
    env.wait_synced_through(Utc::now(), Duration::from_secs(120))
        .await
        .unwrap();
    assert_complete(&env, &POOL_TABLES).await;
    let runs: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT worker FROM sync_runs WHERE table_id = $1")
            .bind(task.table_id)
            .fetch_all(env.control.pool())
            .await
            .unwrap();
    assert_eq!(
        runs,
        vec!["w2".to_string()],
        "only the replacement may have committed"
    );
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_frozen_past_its_lease_cannot_move_the_watermark() {
    let env = TestEnv::new().await.unwrap();
    let slow = [
        ("TENANTSYNC_LEASE_TTL_MS", "1500"),
        ("TENANTSYNC_CHUNK_ROWS", "20"),
    ];
    let (task, _c, w1) = slow_slice_in_progress(&env, &slow).await;
    w1.signal("-STOP");
    let _w2 = env.spawn("w2", &["worker"], &slow);
    env.wait_synced_through(Utc::now(), Duration::from_secs(120))
        .await
        .unwrap();
    let before = env.control.status().await.unwrap();

    w1.signal("-CONT");
    // w1 wakes up mid-slice, notices its lease is gone, and its commit is refused.
    let t0 = Instant::now();
    loop {
        let fenced: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync_runs WHERE worker = 'w1' AND outcome = 'fenced'",
        )
        .fetch_one(env.control.pool())
        .await
        .unwrap();
        if fenced > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "w1 never recorded its refused commit"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let committed_by_w1: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_runs WHERE worker = 'w1' AND table_id = $1 AND outcome <> 'fenced'")
        .bind(task.table_id)
        .fetch_one(env.control.pool())
        .await
        .unwrap();
    assert_eq!(committed_by_w1, 0);
    let after = env.control.status().await.unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert!(
            a.watermark >= b.watermark || a.table != "contacts",
            "watermark of {} went backwards",
            a.table
        );
        assert!(
            a.synced_through >= b.synced_through,
            "synced_through of {} went backwards",
            a.table
        );
    }
    assert_complete(&env, &POOL_TABLES).await;
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_hands_scheduling_over_and_a_new_worker_takes_work() {
    let env = TestEnv::new().await.unwrap();
    // 16 tasks: enough for a second worker to find work. The first sync shares the local
    // BigQuery with the other tests of this file; with 32 tasks it once synced none of them
    // within its 60 s on a busy machine.
    let orgs: Vec<i64> = (1..=4).collect();
    setup(&env, &orgs, 5).await;
    let ttl = 2000u64;
    let vars = [("TENANTSYNC_LEADER_TTL_MS", "2000")];
    let c1 = env.spawn("c1", &["coordinator"], &vars);
    let c2 = env.spawn("c2", &["coordinator"], &vars);
    let _w1 = env.spawn("w1", &["worker"], &vars);
    env.wait_synced_through(Utc::now(), Duration::from_secs(60))
        .await
        .unwrap();

    let leader = env.leases.leader().await.unwrap().expect("a leader");
    let (dead, standby) = if leader == "c1" {
        (&c1, "c2")
    } else {
        (&c2, "c1")
    };
    dead.signal("-9");
    let killed_at = Instant::now();
    while env.leases.leader().await.unwrap().as_deref() != Some(standby) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no new leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handover = killed_at.elapsed();
    assert!(
        handover <= Duration::from_millis(ttl + 500),
        "handover took {handover:?}, lease TTL is {ttl} ms"
    );

    // A worker added now takes work with no configuration change.
    let _w2 = env.spawn("w2", &["worker"], &vars);
    let mut generator = tenantsync_demo::Generator::new(env.source_pool().clone(), orgs.clone(), 5)
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        generator.step(50).await.unwrap();
        let w2_runs: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sync_runs WHERE worker = 'w2' AND rows > 0")
                .fetch_one(env.control.pool())
                .await
                .unwrap();
        if w2_runs > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the new worker never synced anything"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_synced_through(Utc::now(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_complete(&env, &POOL_TABLES).await;
    env.cleanup().await.unwrap();
}
