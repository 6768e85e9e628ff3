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
            exclude_columns: Vec::new(),
            hash_columns: Vec::new(),
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
    // The CLI says the same and exits non-zero.
    let (ok, out) = env.cli(&["tables", "add", "b", "--schema", "a"]);
    assert!(
        !ok && out.contains(
            "table a.b maps to BigQuery table a__b, which public.a__b (registered) already uses"
        ),
        "{out}"
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
async fn changelogs_of_tables_with_a_long_common_prefix_stay_apart() {
    let env = TestEnv::new().await.unwrap();
    // 60 bytes of common prefix: `public__<prefix>_one` is past Postgres' 63 bytes.
    let prefix = format!("flow_results_{}", "x".repeat(47));
    assert_eq!(prefix.len(), 60);
    let one = format!("{prefix}one");
    let two = format!("{prefix}two");
    let ddl = [
        create(&one, ", v text"),
        create(&two, ", v text"),
        format!("INSERT INTO {one} SELECT g, 1 + g % 2, now() - interval '1 minute', 'one' FROM generate_series(1, 6) g;"),
        format!("INSERT INTO {two} SELECT g, 1 + g % 2, now() - interval '1 minute', 'two' FROM generate_series(1, 4) g;"),
    ]
    .join("\n");
    sqlx::raw_sql(&ddl)
        .execute(env.source_pool())
        .await
        .unwrap();
    // What an older install left on `one`: a trigger function named as Postgres truncated it.
    // Installing again moves the trigger to the new name and drops the old function.
    let legacy = tenantsync_core::names::legacy_capture_function("public", &one);
    assert_eq!(legacy.len(), 63);
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA tenantsync_changes;
         CREATE FUNCTION tenantsync_changes.\"{legacy}\"() RETURNS trigger LANGUAGE plpgsql
           AS $$ BEGIN RETURN NULL; END $$;
         CREATE TRIGGER tenantsync_capture AFTER INSERT ON {one}
           FOR EACH ROW EXECUTE FUNCTION tenantsync_changes.\"{legacy}\"();"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    for table in [&one, &two] {
        let seeded = changelog::install(
            env.source_pool(),
            &Changelog {
                schema: "public".into(),
                table: table.clone(),
                key_columns: vec!["id".into()],
                tenant_column: "organization_id".into(),
                changed_only: false,
            },
        )
        .await
        .unwrap();
        assert!(seeded > 0, "each install files its own table's rows");
    }
    // Writes after the install go to each table's own change table.
    sqlx::raw_sql(&format!(
        "INSERT INTO {one} VALUES (7, 1, now(), 'one'); UPDATE {one} SET v = 'one', updated_at = now() WHERE id = 1;
         INSERT INTO {two} VALUES (5, 2, now(), 'two'); DELETE FROM {two} WHERE id = 2;"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    for (table, v, changes) in [(&one, "one", 6 + 1 + 1), (&two, "two", 4 + 1 + 1)] {
        let ct = changelog::change_table("public", table);
        let (all, own): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(*) FILTER (WHERE row->>'v' = $1) FROM {ct}"
        ))
        .bind(v)
        .fetch_one(env.source_pool())
        .await
        .unwrap();
        assert_eq!(
            (all, own),
            (changes, changes),
            "change table {ct} of {table}"
        );
    }
    let objects: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relnamespace = to_regnamespace('tenantsync_changes') AND relkind = 'r'
         UNION ALL SELECT proname::text FROM pg_proc WHERE pronamespace = to_regnamespace('tenantsync_changes')",
    )
    .fetch_all(env.source_pool())
    .await
    .unwrap();
    assert_eq!(
        objects.len(),
        4,
        "two change tables, two functions: {objects:?}"
    );

    // And end to end: each table's BigQuery table holds its own rows only.
    add(&env, "public", &one, Mode::Latest, Capture::Changelog)
        .await
        .unwrap();
    add(&env, "public", &two, Mode::Latest, Capture::Changelog)
        .await
        .unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let worker = env.worker_with(env.worker_config(), Arc::new(NoHooks));
    let bq = env.bq(&t).await.unwrap();
    let counts = |table: String, v: &'static str| {
        let bq = &bq;
        async move {
            let view = bq.qualified(&format!("{table}_latest"));
            let view = &view;
            let n = |filter: String| async move {
                scalar_i64(
                    &bq.query(&format!("SELECT COUNT(*) FROM {view} {filter}"))
                        .await
                        .unwrap(),
                )
            };
            (n(String::new()).await, n(format!("WHERE v = '{v}'")).await)
        }
    };
    // Changes are read below the cluster-wide snapshot xmin: a write transaction of another
    // test's database can hide them from one run (which then rightly sends nothing), so sync
    // until they are there, each table's BigQuery table holding only its own rows throughout.
    let t0 = std::time::Instant::now();
    loop {
        env.sync_once(&worker).await.unwrap();
        let got = (
            counts(one.clone(), "one").await,
            counts(two.clone(), "two").await,
        );
        assert_eq!(
            got.0 .0, got.0 .1,
            "{one}_latest holds another table's rows"
        );
        assert_eq!(
            got.1 .0, got.1 .1,
            "{two}_latest holds another table's rows"
        );
        if got == ((4, 4), (1, 1)) {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "changes never arrived: {got:?}"
        );
    }
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_table_name_two_sources_would_share_is_refused() {
    let env = TestEnv::new().await.unwrap();
    // `a.b__c` and `a__b.c` both spell `a__b__c` as `<schema>__<table>`.
    let ddl = [
        "CREATE SCHEMA a; CREATE SCHEMA a__b;".to_string(),
        create("a.b__c", ""),
        create("a__b.c", ""),
    ]
    .join("\n");
    sqlx::raw_sql(&ddl)
        .execute(env.source_pool())
        .await
        .unwrap();
    let install = |schema: &str, table: &str| Changelog {
        schema: schema.into(),
        table: table.into(),
        key_columns: vec!["id".into()],
        tenant_column: "organization_id".into(),
        changed_only: false,
    };
    changelog::install(env.source_pool(), &install("a", "b__c"))
        .await
        .unwrap();
    let e = changelog::install(env.source_pool(), &install("a__b", "c"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a__b.c") && e.contains("a.b__c"),
        "the refusal names both tables: {e}"
    );
    // The first install still works, and `a__b.c` reads as not installed.
    sqlx::query("INSERT INTO a.b__c VALUES (1, 1, now())")
        .execute(env.source_pool())
        .await
        .unwrap();
    sqlx::query("INSERT INTO a__b.c VALUES (1, 1, now())")
        .execute(env.source_pool())
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}",
        changelog::change_table("a", "b__c")
    ))
    .fetch_one(env.source_pool())
    .await
    .unwrap();
    assert_eq!(n, 1, "only a.b__c's row");
    assert!(changelog::installed(env.source_pool(), "a__b", "c")
        .await
        .map(|c| c.is_none())
        .unwrap_or(true));
    // Uninstalling the table that never got the name leaves the other's change table alone.
    assert!(!changelog::uninstall(env.source_pool(), "a__b", "c")
        .await
        .unwrap());
    assert!(changelog::installed(env.source_pool(), "a", "b__c")
        .await
        .unwrap()
        .is_some());
    sqlx::query("INSERT INTO a.b__c VALUES (2, 1, now())")
        .execute(env.source_pool())
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}",
        changelog::change_table("a", "b__c")
    ))
    .fetch_one(env.source_pool())
    .await
    .unwrap();
    assert_eq!(n, 2, "a.b__c is still captured");
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
                exclude_columns: Vec::new(),
                hash_columns: Vec::new(),
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
