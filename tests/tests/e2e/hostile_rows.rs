//! Source rows no tenant or no point in time can be given to: they are reported (with their
//! key and value) and never stop other rows, other tables or other tenants (issue 13).

use std::time::{Duration, Instant};
use tenantsync_coordinator::{CoordinatorConfig, Deps, Scheduler};
use tenantsync_tests::TestEnv;

async fn get(addr: &str, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn coordinator_deps(env: &TestEnv) -> Deps {
    Deps {
        control: env.control.clone(),
        source: env.source.clone(),
        leases: env.leases.clone(),
    }
}

fn coordinator_config(env: &TestEnv) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::new(format!("c-{}", env.id));
    cfg.cursor_skew = Duration::from_millis(50);
    cfg
}

/// A row whose tenant column is NULL belongs to nobody: change detection passes over it
/// (before, decoding it failed every tick and no tenant was scheduled at all); and a table
/// whose change detection fails for any reason leaves the other tables scanned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_without_tenant_or_a_broken_table_stops_no_other_table() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE a (id bigint PRIMARY KEY, organization_id bigint, v int,
                         updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE b (LIKE a INCLUDING ALL);
         CREATE TABLE c (LIKE a INCLUDING ALL);
         INSERT INTO a VALUES (1, 1, 1, now() - interval '1 minute'),
                              (2, NULL, 1, now() - interval '1 minute');
         INSERT INTO b VALUES (1, 2, 1, now() - interval '1 minute');
         INSERT INTO c VALUES (1, 2, 1, now() - interval '1 minute');",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    for t in ["a", "b", "c"] {
        env.add_table(t, "organization_id").await.unwrap();
    }
    env.add_tenant("org-1", 1).await.unwrap();
    env.add_tenant("org-2", 2).await.unwrap();
    let (cfg, deps) = (coordinator_config(&env), coordinator_deps(&env));
    let mut sched = Scheduler::default();
    let r = sched
        .tick(&cfg, &deps)
        .await
        .expect("a NULL tenant value must not fail the tick");
    assert_eq!(r.scan_failures, 0);
    // org-1 in a, org-2 in b and c; the NULL row is nobody's.
    assert_eq!(r.changed_tasks, 3, "{r:?}");

    // c goes away under the coordinator's cached plan: its scans fail, b's go on.
    sqlx::raw_sql(
        "ALTER TABLE c RENAME TO c_gone;
         INSERT INTO b VALUES (2, 2, 1, now());",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // past the skew
    let r = sched
        .tick(&cfg, &deps)
        .await
        .expect("one table's failure must not fail the tick");
    assert_eq!(r.scan_failures, 1, "{r:?}");
    let changed_b: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_state s JOIN table_specs t ON t.id = s.table_id
         WHERE t.source_table = 'b' AND s.changed_until > now() - interval '1 minute'",
    )
    .fetch_one(env.control.pool())
    .await
    .unwrap();
    assert_eq!(changed_b, 1, "b's new row was detected");
    env.cleanup().await.unwrap();
}

/// A coordinator whose every tick fails says so: `/readyz` turns 503 naming it and the tick
/// failure counter rises (before, readiness stayed 200 and no metric showed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_whose_ticks_keep_failing_is_not_ready() {
    let env = TestEnv::new().await.unwrap();
    // The coordinator reads a source database of its own, which the test then drops: every
    // tick's horizon query fails while the control plane and Redis stay reachable.
    let doomed = format!("tstest_{}_doomed", env.id);
    sqlx::query(&format!("CREATE DATABASE {doomed}"))
        .execute(env.control.pool())
        .await
        .unwrap();
    let url = format!("{}/{doomed}", env.source_url.rsplit_once('/').unwrap().0);
    let coord = env.spawn(
        "coord",
        &["coordinator"],
        &[("SOURCE_DATABASE_URL", url.as_str())],
    );
    let addr = env.metrics_addr(&coord).await;
    let t0 = Instant::now();
    while get(&addr, "/readyz").await.0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sqlx::query(&format!("DROP DATABASE {doomed} WITH (FORCE)"))
        .execute(env.control.pool())
        .await
        .unwrap();
    let dropped = Instant::now();
    let body = loop {
        let (status, body) = get(&addr, "/readyz").await;
        if status == 503 {
            break body;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(90),
            "still ready {:?} after every tick started failing",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(body.contains("coordinator ticks failing"), "{body}");
    let metrics = get(&addr, "/metrics").await.1;
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("tenantsync_coordinator_tick_failures_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(failures.is_some_and(|n| n >= 1.0), "{failures:?}");
    drop(coord);
    env.cleanup().await.unwrap();
}

/// Rows whose cursor is `-infinity`, `infinity` or NULL cannot be ordered among versions.
/// They are dead-lettered with key and value, everything else keeps syncing, verify lists them
/// apart from drift, and a row given a real time syncs and its letter is closed. Before, a
/// `-infinity` row stopped its table for good ("a row of … has no version time") and the
/// others were silently never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_without_a_point_in_time_are_reported_and_stop_nothing() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE t (id bigint PRIMARY KEY, organization_id bigint NOT NULL, v int,
                         updated_at timestamptz);
         CREATE INDEX ON t (organization_id, updated_at, id);
         INSERT INTO t SELECT g, 1 + g % 2, g, now() - interval '1 minute' FROM generate_series(1, 10) g;
         UPDATE t SET updated_at = '-infinity' WHERE id = 3;
         UPDATE t SET updated_at = 'infinity' WHERE id = 5;
         UPDATE t SET updated_at = NULL WHERE id = 7;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let spec = env.add_table("t", "organization_id").await.unwrap();
    let org1 = env.add_tenant("org-1", 1).await.unwrap();
    let org2 = env.add_tenant("org-2", 2).await.unwrap();
    let mut cfg = env.worker_config();
    cfg.compact_every = Duration::ZERO; // every caught-up slice after the first takes a turn
    let worker = env.worker_with(cfg, std::sync::Arc::new(tenantsync_worker::NoHooks));
    let ids = |tenant: &tenantsync_core::Tenant| {
        let tenant = tenant.clone();
        let env = &env;
        async move {
            let bq = env.bq(&tenant).await.unwrap();
            let rows = bq
                .query(&format!(
                    "SELECT id FROM {} ORDER BY id",
                    bq.qualified("t_latest")
                ))
                .await
                .unwrap();
            rows.iter()
                .map(|r| tenantsync_tests::cell(r, 0))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let open_letters = || async {
        let mut v: Vec<(String, String)> = env
            .control
            .dead_letters(Some("org-2"), Some("open"))
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.key.join(","), d.cursor))
            .collect();
        v.sort();
        v
    };

    env.sync_once(&worker)
        .await
        .expect("rows at ±infinity or NULL must not stop the table");
    assert_eq!(ids(&org2).await, "1,9", "org-2's rows with a real time");
    assert_eq!(ids(&org1).await, "2,4,6,8,10");
    assert_eq!(
        open_letters().await,
        vec![
            ("3".to_string(), "-infinity".to_string()),
            ("5".to_string(), "infinity".to_string()),
            ("7".to_string(), "NULL".to_string()),
        ],
        "each unsyncable row is reported with its key and value"
    );
    let letters = env
        .control
        .dead_letters(Some("org-2"), Some("open"))
        .await
        .unwrap();
    assert!(
        letters[0].reason.contains("updated_at"),
        "{}",
        letters[0].reason
    );
    // A retry has nothing to send and says why.
    let e = worker.resend_dead_letter(&letters[0]).await.unwrap_err();
    assert!(e.to_string().contains("never sent"), "{e}");

    let v = worker.verify(&org2, &spec, false).await.unwrap();
    assert!(!v.drifted(), "{v:?}");
    assert_eq!(v.unsyncable.len(), 3, "{v:?}");

    // Row 5 gets a real time: it syncs, the others still stop nothing, its letter closes.
    sqlx::raw_sql(
        "UPDATE t SET updated_at = now() WHERE id = 5;
         INSERT INTO t VALUES (11, 2, 11, now());",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.sync_once(&worker).await.unwrap();
    env.sync_once(&worker).await.unwrap(); // a caught-up slice with its periodic turn
    assert_eq!(ids(&org2).await, "1,5,9,11");
    assert_eq!(
        open_letters().await,
        vec![
            ("3".to_string(), "-infinity".to_string()),
            ("7".to_string(), "NULL".to_string()),
        ]
    );
    env.cleanup().await.unwrap();
}
