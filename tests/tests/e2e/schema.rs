//! Schema evolution: a column added in Postgres appears in the BigQuery table and the view;
//! type changes BigQuery can follow keep syncing (widened in place where the BigQuery type
//! changes); an incompatible type change stops that table with an error naming the column, and
//! the other tables keep syncing.

use std::sync::Arc;
use tenantsync_tests::{scalar_i64, TestEnv};
use tenantsync_worker::{NoHooks, RunMode};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_added_column_flows_through_and_an_incompatible_change_stops_only_its_table() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE things (id bigint PRIMARY KEY, organization_id bigint NOT NULL, name text,
                              updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE others (id bigint PRIMARY KEY, organization_id bigint NOT NULL, name text,
                              updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO things SELECT g, 1, 'thing ' || g, now() - interval '1 minute' FROM generate_series(1, 20) g;
         INSERT INTO others SELECT g, 1, 'other ' || g, now() - interval '1 minute' FROM generate_series(1, 20) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.add_table("things", "organization_id").await.unwrap();
    env.add_table("others", "organization_id").await.unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let worker = env.worker_with(env.worker_config(), Arc::new(NoHooks));
    env.sync_once(&worker).await.unwrap();
    let bq = env.bq(&t).await.unwrap();

    // A new column, filled for some rows.
    sqlx::raw_sql(
        "ALTER TABLE things ADD COLUMN score numeric(10,2);
         UPDATE things SET score = id * 1.5, updated_at = now() WHERE id <= 5;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.sync_once(&worker).await.unwrap();
    let fields: Vec<String> = bq
        .table_schema("things")
        .await
        .unwrap()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert!(fields.contains(&"score".to_string()), "{fields:?}");
    let latest = bq.qualified("things_latest");
    let scored = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {latest} WHERE score IS NOT NULL"
        ))
        .await
        .unwrap(),
    );
    assert_eq!(scored, 5, "the new column's values are in the view");
    let rows = scalar_i64(
        &bq.query(&format!("SELECT COUNT(*) FROM {latest}"))
            .await
            .unwrap(),
    );
    assert_eq!(rows, 20, "old rows stay, with NULL in the new column");

    // Incompatible: text becomes integer. That table stops with a clear error; the other
    // keeps syncing.
    sqlx::raw_sql(
        "ALTER TABLE things ALTER COLUMN name TYPE bigint USING length(name);
         UPDATE things SET updated_at = now() WHERE id = 1;
         INSERT INTO others VALUES (21, 1, 'after the change', now());",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.past_skew().await;
    let summary = tenantsync_worker::run(worker.clone(), RunMode::Once, CancellationToken::new())
        .await
        .unwrap();
    let errors: Vec<&String> = summary.failed.values().collect();
    assert_eq!(errors.len(), 1, "only `things` fails: {errors:?}");
    assert!(
        errors[0].contains("column \"name\" is STRING in BigQuery table things")
            && errors[0].contains("INT64"),
        "the error names the column and both types: {}",
        errors[0]
    );
    let others = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {}",
            bq.qualified("others_latest")
        ))
        .await
        .unwrap(),
    );
    assert_eq!(others, 21, "the other table kept syncing");
    let (_, status) = env.cli(&["status"]);
    assert!(
        status.contains("column \"name\" is STRING"),
        "status shows the error:\n{status}"
    );
    env.cleanup().await.unwrap();
}

/// int to bigint, varchar(20) to text, numeric(10,2) to numeric(12,2) and a dropped NOT NULL
/// change nothing in BigQuery; int to numeric(12,2) is INT64 widened to NUMERIC in place. The
/// table keeps syncing through all of them, old and new values side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn type_changes_bigquery_can_follow_keep_the_table_syncing() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE w (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                         c_int int, c_vc varchar(20), c_num numeric(10,2), c_nn text NOT NULL,
                         c_w int, updated_at timestamptz NOT NULL);
         INSERT INTO w SELECT g, 1, g, 'v' || g, g + 0.25, 'n', g, now() - interval '1 minute'
         FROM generate_series(1, 10) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.add_table("w", "organization_id").await.unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let worker = env.worker_with(env.worker_config(), Arc::new(NoHooks));
    env.sync_once(&worker).await.unwrap();

    sqlx::raw_sql(
        "ALTER TABLE w ALTER COLUMN c_int TYPE bigint, ALTER COLUMN c_vc TYPE text,
                       ALTER COLUMN c_num TYPE numeric(12,2), ALTER COLUMN c_nn DROP NOT NULL,
                       ALTER COLUMN c_w TYPE numeric(12,2);
         INSERT INTO w VALUES (11, 1, 5000000000, repeat('x', 30), 1234567890.12, NULL, 12.5,
                               now());",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.past_skew().await;
    let summary = env.sync_once(&worker).await.unwrap();
    assert!(summary.failed.is_empty(), "{:?}", summary.failed);

    let bq = env.bq(&t).await.unwrap();
    let rows = bq
        .query(&format!(
            "SELECT id, c_int, c_vc, c_num, c_nn, c_w FROM {} ORDER BY id",
            bq.qualified("w_latest")
        ))
        .await
        .unwrap();
    let got: Vec<Vec<String>> = rows
        .iter()
        .map(|r| (0..6).map(|i| tenantsync_tests::cell(r, i)).collect())
        .collect();
    assert_eq!(got.len(), 11, "{got:?}");
    assert_eq!(got[0], ["1", "1", "v1", "1.25", "n", "1"]);
    assert_eq!(
        got[10],
        [
            "11",
            "5000000000",
            &"x".repeat(30),
            "1234567890.12",
            "NULL",
            "12.5"
        ]
    );
    let schema = bq.table_schema("w").await.unwrap().unwrap();
    let ty = |name: &str| {
        schema
            .iter()
            .find(|f| f["name"] == name)
            .and_then(|f| f["type"].as_str())
            .map(str::to_string)
    };
    assert_eq!(ty("c_w").as_deref(), Some("NUMERIC"), "widened in place");
    assert_eq!(ty("c_int").as_deref(), Some("INTEGER"));
    env.cleanup().await.unwrap();
}
