//! Latest mode compacts superseded versions older than the window and never younger ones;
//! history mode keeps every version.

use std::sync::Arc;
use std::time::Duration;
use tenantsync_core::Mode;
use tenantsync_tests::{count_rows as count, TestEnv};
use tenantsync_worker::NoHooks;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_keeps_young_versions_and_history_keeps_all() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE cur (id bigint PRIMARY KEY, organization_id bigint NOT NULL, v int,
                           updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE hist (LIKE cur INCLUDING ALL);
         INSERT INTO cur SELECT g, 1, 1, now() - interval '1 minute' FROM generate_series(1, 10) g;
         INSERT INTO hist SELECT * FROM cur;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.add_table("cur", "organization_id").await.unwrap();
    let hist = env.add_table("hist", "organization_id").await.unwrap();
    env.set_mode(&hist, Mode::History).await.unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let mut cfg = env.worker_config();
    // A sync here takes 2-3 s, more on a busy machine (each one also merges into
    // `cur_current`); the window must span two syncs comfortably (v3 must still be young when
    // v4's sync compacts). Versions are compacted once older than the window and than the
    // merges' read-back (settle window, slice length, clock allowance): 20 + 1 + 0 s here.
    cfg.compact_window = Duration::from_secs(20);
    cfg.settle_window = Duration::from_secs(20);
    cfg.slice_max_duration = Duration::from_secs(1);
    cfg.clock_skew = Duration::ZERO;
    cfg.compact_every = Duration::ZERO;
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    let bq = env.bq(&t).await.unwrap();
    let count = |table: &'static str, filter: &'static str| count(&bq, table, filter);
    let update = |ids: &str| {
        let sql = format!(
            "UPDATE cur SET v = v + 1, updated_at = now() WHERE id IN ({ids});
             UPDATE hist SET v = v + 1, updated_at = now() WHERE id IN ({ids});"
        );
        let pool = env.source_pool().clone();
        async move { sqlx::raw_sql(&sql).execute(&pool).await.unwrap() }
    };

    env.sync_once(&worker).await.unwrap(); // v1 of 10 rows; the first turn starts the clock
    update("1,2,3,4,5,6,7,8,9,10").await;
    env.sync_once(&worker).await.unwrap(); // v2: compaction runs, v1 is younger than 20 s
    assert_eq!(count("cur", "").await, 20, "superseded but young: kept");

    tokio::time::sleep(Duration::from_secs(22)).await;
    update("1,2,3,4,5").await;
    env.sync_once(&worker).await.unwrap(); // v3 of 5 rows: v1 and v2 of those are old now
    update("1").await;
    env.sync_once(&worker).await.unwrap(); // v4 of row 1: its v3 is superseded but young

    // Left: the newest version of each key (10) and row 1's young v3.
    assert_eq!(count("cur", "").await, 11);
    assert_eq!(count("cur", "WHERE id = 1").await, 2);
    assert_eq!(count("cur_latest", "").await, 10);
    assert_eq!(count("cur_latest", "WHERE v = 4 AND id = 1").await, 1);
    assert_eq!(count("cur_latest", "WHERE v = 3").await, 4);
    assert_eq!(count("cur_latest", "WHERE v = 2").await, 5);
    // History: 10 + 10 + 5 + 1 versions, all kept.
    assert_eq!(count("hist", "").await, 26);
    assert_eq!(count("hist_latest", "").await, 10);
    env.cleanup().await.unwrap();
}

/// A worker that died after its rows landed sends them again once BigQuery's insertId window
/// has passed: the base table then holds two copies of one version (same `_version_id`).
/// Compaction must keep the key's newest version whatever copies exist (issue 13: it deleted
/// every row of a version id ranked second, so the key vanished from `_latest`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_keeps_a_newest_version_stored_twice() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE twice (id bigint PRIMARY KEY, organization_id bigint NOT NULL, v int,
                             updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO twice SELECT g, 1, 1, now() - interval '1 minute' FROM generate_series(1, 10) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let spec = env.add_table("twice", "organization_id").await.unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let mut cfg = env.worker_config();
    cfg.compact_window = Duration::from_secs(3);
    cfg.settle_window = Duration::from_secs(3);
    cfg.slice_max_duration = Duration::from_secs(1);
    cfg.clock_skew = Duration::ZERO;
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    let bq = env.bq(&t).await.unwrap();
    let count = |table: &'static str, filter: &'static str| count(&bq, table, filter);

    env.sync_once(&worker).await.unwrap(); // v1 of 10 keys
    sqlx::raw_sql("UPDATE twice SET v = 2, updated_at = now() WHERE id <= 5")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.sync_once(&worker).await.unwrap(); // v2 of keys 1-5
                                           // The re-send: every stored row once more, same version ids (keys 1-5 now have a
                                           // superseded v1 and two copies of v2; keys 6-10 two copies of v1).
    let table = bq.qualified("twice");
    bq.query(&format!("INSERT INTO {table} SELECT * FROM {table}"))
        .await
        .unwrap();
    assert_eq!(count("twice", "").await, 30);
    assert_eq!(count("twice_latest", "").await, 10);

    // Everything is past the window (3 s) plus the slice length (1 s) now.
    tokio::time::sleep(Duration::from_secs(5)).await;
    worker.compact(&t, &spec).await.unwrap();
    assert_eq!(
        count("twice_latest", "").await,
        10,
        "compaction removed keys whose newest version was stored twice"
    );
    assert_eq!(count("twice_latest", "WHERE v = 2").await, 5);
    assert_eq!(
        count("twice", "WHERE v = 1 AND id <= 5").await,
        0,
        "superseded v1 removed"
    );
    env.cleanup().await.unwrap();
}
