//! Names (issue 13, items 6 and 7): `tables add` refuses a table whose BigQuery objects or
//! columns would meet another's, a column added later under a reserved name stops only its own
//! table, and changelog objects of tables whose names share a long prefix stay apart.

use std::sync::Arc;
use tenantsync_core::{Capture, Mode, TableSpec};
use tenantsync_store::changelog::{self, Changelog};
use tenantsync_store::control::NewTableSpec;
use tenantsync_tests::{scalar_i64, TestEnv};
use tenantsync_worker::{onboard, NoHooks, RunMode};
use tokio_util::sync::CancellationToken;

async fn add(
    env: &TestEnv,
    schema: &str,
    table: &str,
    mode: Mode,
    capture: Capture,
) -> Result<TableSpec, String> {
    onboard::add_table(
        &env.control,
        &env.source,
        NewTableSpec {
            source_schema: schema.into(),
            source_table: table.into(),
            key_columns: vec![],
            cursor_column: "updated_at".into(),
            tenant_column: "organization_id".into(),
            mode,
            sync_interval_ms: 100,
            slice_rows: 5000,
            soft_delete_column: None,
            capture,
        },
    )
    .await
    .map_err(|e| e.to_string())
}

async fn add_latest(env: &TestEnv, schema: &str, table: &str) -> Result<TableSpec, String> {
    add(env, schema, table, Mode::Latest, Capture::Cursor).await
}

/// `CREATE TABLE <name> (...)` with the columns every test table has, plus `extra`.
fn create(name: &str, extra: &str) -> String {
    format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                              updated_at timestamptz NOT NULL DEFAULT now(){extra});"
    )
}

fn refused(r: Result<TableSpec, String>, must_name: &[&str]) {
    match r {
        Ok(spec) => panic!(
            "{}.{} was registered; expected a refusal naming {must_name:?}",
            spec.source_schema, spec.source_table
        ),
        Err(e) => {
            for n in must_name {
                assert!(e.contains(n), "the refusal names {n:?}: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tables_add_refuses_colliding_tables_views_and_columns() {
    let env = TestEnv::new().await.unwrap();
    let ddl = [
        "CREATE SCHEMA a;".to_string(),
        create("public.a__b", ""),
        create("a.b", ""),
        create("notes", ""),
        create("notes_latest", ""),
        create("x_latest", ""),
        create("x", ""),
        create("p", ", v text"),
        create("p_final", ""),
        create("\"_sync_batches\"", ""),
        create("\"Notes\"", ""),
        create("meta_case", ", \"_OP\" text"),
        create("meta_lower", ", \"_Source_Ts\" timestamptz"),
        create("helper", ", _rn int"),
        create("helper_merge", ", _reset int"),
        create("dup_case", ", \"Name\" text, name text"),
    ]
    .join("\n");
    sqlx::raw_sql(&ddl)
        .execute(env.source_pool())
        .await
        .unwrap();
    changelog::install(
        env.source_pool(),
        &Changelog {
            schema: "public".into(),
            table: "p".into(),
            key_columns: vec!["id".into()],
            tenant_column: "organization_id".into(),
            changed_only: true,
        },
    )
    .await
    .unwrap();

    // `public.a__b` and `a.b` both become BigQuery table `a__b`.
    add_latest(&env, "public", "a__b").await.unwrap();
    refused(
        add_latest(&env, "a", "b").await,
        &["a.b", "a__b", "public.a__b"],
    );
    // A table named like another's view, in both orders.
    add_latest(&env, "public", "notes").await.unwrap();
    refused(
        add_latest(&env, "public", "notes_latest").await,
        &["public.notes_latest", "public.notes", "view"],
    );
    add_latest(&env, "public", "x_latest").await.unwrap();
    refused(
        add_latest(&env, "public", "x").await,
        &["public.x", "x_latest", "public.x_latest"],
    );
    // A table named like a merge-mode table's `_final` table.
    add(&env, "public", "p", Mode::Merge, Capture::Changelog)
        .await
        .unwrap();
    refused(
        add_latest(&env, "public", "p_final").await,
        &["public.p_final", "public.p"],
    );
    // tenantsync's own table in every dataset.
    refused(
        add_latest(&env, "public", "_sync_batches").await,
        &["_sync_batches", "tenantsync"],
    );
    // BigQuery table names compared case-insensitively here.
    refused(
        add_latest(&env, "public", "Notes").await,
        &["public.Notes", "public.notes"],
    );
    // Metadata and helper columns in any case, and columns differing only in case.
    refused(
        add_latest(&env, "public", "meta_case").await,
        &["_OP", "_op"],
    );
    refused(
        add_latest(&env, "public", "meta_lower").await,
        &["_Source_Ts", "_source_ts"],
    );
    refused(add_latest(&env, "public", "helper").await, &["_rn"]);
    refused(
        add_latest(&env, "public", "helper_merge").await,
        &["_reset"],
    );
    refused(
        add_latest(&env, "public", "dup_case").await,
        &["\"Name\"", "\"name\""],
    );

    let mut registered: Vec<String> = env
        .control
        .tables()
        .await
        .unwrap()
        .iter()
        .map(|s| format!("{}.{}", s.source_schema, s.source_table))
        .collect();
    registered.sort();
    assert_eq!(
        registered,
        ["public.a__b", "public.notes", "public.p", "public.x_latest"],
        "nothing refused was registered"
    );
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_column_added_later_under_a_reserved_name_stops_only_its_table() {
    let env = TestEnv::new().await.unwrap();
    let ddl = [
        create("things", ", name text"),
        create("others", ", name text"),
        "INSERT INTO things SELECT g, 1, now() - interval '1 minute', 'thing' FROM generate_series(1, 10) g;"
            .into(),
        "INSERT INTO others SELECT g, 1, now() - interval '1 minute', 'other' FROM generate_series(1, 10) g;"
            .into(),
    ]
    .join("\n");
    sqlx::raw_sql(&ddl)
        .execute(env.source_pool())
        .await
        .unwrap();
    add_latest(&env, "public", "things").await.unwrap();
    add_latest(&env, "public", "others").await.unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let worker = env.worker_with(env.worker_config(), Arc::new(NoHooks));
    env.sync_once(&worker).await.unwrap();

    // `_rn` is the view's row-number column: synced, it would vanish from `things_latest`.
    sqlx::raw_sql(
        "ALTER TABLE things ADD COLUMN _rn int;
         UPDATE things SET _rn = 7, updated_at = now() WHERE id = 1;
         INSERT INTO others VALUES (11, 1, now(), 'after the change');",
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
        errors[0].contains("_rn") && errors[0].contains("public.things"),
        "the error names the column and the table: {}",
        errors[0]
    );
    let bq = env.bq(&t).await.unwrap();
    let others = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {}",
            bq.qualified("others_latest")
        ))
        .await
        .unwrap(),
    );
    assert_eq!(others, 11, "the other table kept syncing");
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_tables_registered_before_the_check_the_later_one_stops() {
    let env = TestEnv::new().await.unwrap();
    let ddl = [
        "CREATE SCHEMA a;".to_string(),
        create("public.a__b", ", v text"),
        create("a.b", ", v text"),
        "INSERT INTO public.a__b SELECT g, 1, now() - interval '1 minute', 'public' FROM generate_series(1, 3) g;".into(),
        "INSERT INTO a.b SELECT g, 1, now() - interval '1 minute', 'a' FROM generate_series(1, 5) g;".into(),
    ]
    .join("\n");
    sqlx::raw_sql(&ddl)
        .execute(env.source_pool())
        .await
        .unwrap();
    // Straight into the control plane, as older versions of `tables add` let them through.
    for schema in ["public", "a"] {
        env.control
            .add_table(&NewTableSpec {
                source_schema: schema.into(),
                source_table: if schema == "a" { "b" } else { "a__b" }.into(),
                key_columns: vec!["id".into()],
                cursor_column: "updated_at".into(),
                tenant_column: "organization_id".into(),
                mode: Mode::Latest,
                sync_interval_ms: 100,
                slice_rows: 5000,
                soft_delete_column: None,
                capture: Capture::Cursor,
            })
            .await
            .unwrap();
    }
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let worker = env.worker_with(env.worker_config(), Arc::new(NoHooks));
    env.past_skew().await;
    let summary = tenantsync_worker::run(worker.clone(), RunMode::Once, CancellationToken::new())
        .await
        .unwrap();
    let errors: Vec<&String> = summary.failed.values().collect();
    assert_eq!(errors.len(), 1, "only a.b fails: {errors:?}");
    assert!(
        errors[0].contains("table a.b maps to BigQuery table a__b")
            && errors[0].contains("public.a__b (registered)"),
        "{}",
        errors[0]
    );
    let bq = env.bq(&t).await.unwrap();
    let rows = bq
        .query(&format!(
            "SELECT COUNT(*), COUNTIF(v = 'public') FROM {}",
            bq.qualified("a__b_latest")
        ))
        .await
        .unwrap();
    assert_eq!(
        (
            tenantsync_tests::cell(&rows[0], 0),
            tenantsync_tests::cell(&rows[0], 1)
        ),
        ("3".to_string(), "3".to_string()),
        "a__b holds public.a__b's rows only"
    );
    env.cleanup().await.unwrap();
}
