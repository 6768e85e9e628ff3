//! Rows BigQuery cannot take go to the dead-letter table; everything else keeps flowing.

use chrono::Utc;
use std::sync::Arc;
use tenantsync_tests::{scalar_i64, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_and_oversized_rows_are_dead_lettered_and_the_rest_syncs() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE readings (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                                value numeric(12,2), note text, updated_at timestamptz NOT NULL);
         INSERT INTO readings
         SELECT g, 1, g * 1.5, 'ok', now() - interval '1 minute' + g * interval '1 ms'
         FROM generate_series(1, 40) g;
         -- BigQuery's NUMERIC has no NaN.
         UPDATE readings SET value = 'NaN' WHERE id = 7;
         -- Larger than the request limit configured below.
         UPDATE readings SET note = repeat('x', 100000) WHERE id = 23;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let spec = env.add_table("readings", "organization_id").await.unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let mut cfg = env.worker_config();
    cfg.chunk_limits.max_bytes = 64 * 1024;
    cfg.chunk_limits.max_rows = 10;
    let worker = env.worker_with(cfg, Arc::new(tenantsync_worker::NoHooks));
    let start = Utc::now();
    env.sync_once(&worker).await.unwrap();

    // Every valid row arrived once; the task moved past both bad rows.
    let bq = env.bq(&tenant).await.unwrap();
    let latest = bq.qualified("readings_latest");
    let ids = bq
        .query(&format!("SELECT id FROM {latest} ORDER BY id"))
        .await
        .unwrap();
    let ids: Vec<i64> = ids
        .iter()
        .map(|r| r[0].as_str().unwrap().parse().unwrap())
        .collect();
    let expected: Vec<i64> = (1..=40).filter(|i| *i != 7 && *i != 23).collect();
    assert_eq!(ids, expected);
    let status = env.control.status().await.unwrap();
    assert_eq!(status[0].rows_synced, 38);
    assert!(
        status[0].synced_through.unwrap() >= start,
        "the watermark must pass dead-lettered rows"
    );

    // Both are recorded with a reason that names the problem.
    let dl = env.control.dead_letters(None, Some("open")).await.unwrap();
    assert_eq!(dl.len(), 2, "{dl:?}");
    let nan = dl
        .iter()
        .find(|d| d.key == vec!["7".to_string()])
        .expect("NaN row dead-lettered");
    let big = dl
        .iter()
        .find(|d| d.key == vec!["23".to_string()])
        .expect("oversized row dead-lettered");
    assert!(
        nan.reason.to_lowercase().contains("numeric") || nan.reason.contains("NaN"),
        "{}",
        nan.reason
    );
    assert!(
        big.reason.contains("bytes, over the 65536-byte"),
        "{}",
        big.reason
    );
    assert_eq!(big.table_id, spec.id);

    // Operators act on them with the CLI: the oversized row fits a real request, so a retry
    // delivers it; the NaN row is refused again and then discarded.
    let (ok, out) = env.cli(&["dlq", "list", "--json"]);
    assert!(ok && out.contains("\"reason\""), "{out}");
    let (ok, out) = env.cli(&["dlq", "retry", &big.id.to_string()]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&["dlq", "retry", &nan.id.to_string()]);
    assert!(!ok && out.contains("refused again"), "{out}");
    let (ok, out) = env.cli(&["dlq", "discard", &nan.id.to_string()]);
    assert!(ok, "{out}");
    assert!(env
        .control
        .dead_letters(None, Some("open"))
        .await
        .unwrap()
        .is_empty());
    let n = scalar_i64(
        &bq.query(&format!("SELECT COUNT(*) FROM {latest}"))
            .await
            .unwrap(),
    );
    assert_eq!(n, 39, "the retried row must have arrived");
    env.cleanup().await.unwrap();
}
