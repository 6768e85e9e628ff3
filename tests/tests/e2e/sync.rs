//! Cursor-mode sync against the real Postgres, Redis and local BigQuery.

use std::collections::BTreeSet;
use tenantsync_core::WriteApi;
use tenantsync_store::control::tasks::TaskId;
use tenantsync_tests::{cell, scalar_i64, CrashOnceAt, TestEnv};
use tenantsync_worker::{CrashPoint, SliceOutcome};
use tokio_util::sync::CancellationToken;

/// Rows of `table` for one organization as comparable strings, from Postgres.
async fn pg_rows(env: &TestEnv, sql: &str, org: i64) -> BTreeSet<String> {
    let rows: Vec<Vec<String>> = sqlx::query_scalar::<_, Vec<String>>(sql)
        .bind(org)
        .fetch_all(env.source_pool())
        .await
        .unwrap()
        .into_iter()
        .map(|r: Vec<String>| r)
        .collect();
    rows.into_iter().map(|r| r.join("|")).collect()
}

async fn bq_rows(bq: &tenantsync_bigquery::BigQuery, sql: &str) -> BTreeSet<String> {
    bq.query(sql)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| cell(r, i))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_tenant_gets_only_its_rows_and_latest_equals_postgres() {
    let env = TestEnv::new().await.unwrap();
    let orgs = [1i64, 2, 3];
    tenantsync_demo::seed(env.source_pool(), &orgs, 40)
        .await
        .unwrap();
    let tables = env.add_demo_tables().await.unwrap();
    let mut tenants = Vec::new();
    for org in orgs {
        tenants.push(env.add_tenant(&format!("org-{org}"), org).await.unwrap());
    }
    let mut generator =
        tenantsync_demo::Generator::new(env.source_pool().clone(), orgs.to_vec(), 7)
            .await
            .unwrap();
    for _ in 0..20 {
        generator.step(60).await.unwrap();
    }
    // Pages of 64 rows: every backfill slice is read and sent in several pages, and the
    // watermark must still move exactly past what was sent.
    let mut cfg = env.worker_config();
    cfg.page_rows = 64;
    let worker = env.worker_with(cfg, std::sync::Arc::new(tenantsync_worker::NoHooks));
    let first = env.sync_once(&worker).await.unwrap();
    assert!(first.rows > 500, "backfill synced only {} rows", first.rows);
    // More inserts and updates on top: the watermark must continue, updates must win in _latest.
    for _ in 0..10 {
        generator.step(60).await.unwrap();
    }
    env.sync_once(&worker).await.unwrap();

    for (tenant, org) in tenants.iter().zip(orgs) {
        let bq = env.bq(tenant).await.unwrap();
        for spec in &tables {
            let t = &spec.source_table;
            let col = &spec.tenant_column;
            // Isolation: the base table (every version ever sent) holds only this tenant's rows.
            let seen = bq_rows(
                &bq,
                &format!(
                    "SELECT DISTINCT CAST({col} AS STRING) FROM {}",
                    bq.qualified(t)
                ),
            )
            .await;
            assert_eq!(
                seen,
                BTreeSet::from([org.to_string()]),
                "{t} of {} holds other tenants' rows",
                tenant.slug
            );
            // Same keys and versions in `_latest` as in Postgres.
            let pg = pg_rows(
                &env,
                &format!(
                    "SELECT ARRAY[id::text, (extract(epoch FROM updated_at) * 1000000)::bigint::text]
                     FROM {t} WHERE {col} = $1"
                ),
                org,
            )
            .await;
            let got = bq_rows(
                &bq,
                &format!(
                    "SELECT CAST(id AS STRING), CAST(UNIX_MICROS(updated_at) AS STRING) FROM {}",
                    bq.qualified(&format!("{t}_latest"))
                ),
            )
            .await;
            assert!(!pg.is_empty(), "no source rows in {t} for org {org}");
            assert_eq!(
                got, pg,
                "{t}_latest of {} differs from Postgres",
                tenant.slug
            );
        }
        // Contents, not just versions: every mapped type of contacts round-trips.
        let pg = pg_rows(
            &env,
            "SELECT ARRAY[id::text, coalesce(name, 'NULL'), phone, language, optin_status::text,
                          coalesce((balance * 100)::bigint::text, 'NULL'), array_to_string(tags, ','),
                          fields->>'visits', coalesce((extract(epoch FROM optin_time) * 1000000)::bigint::text, 'NULL')]
             FROM contacts WHERE organization_id = $1",
            org,
        )
        .await;
        let got = bq_rows(
            &bq,
            &format!(
                "SELECT CAST(id AS STRING), name, phone, language, CAST(optin_status AS STRING),
                        CAST(CAST(balance * 100 AS INT64) AS STRING), ARRAY_TO_STRING(tags, ','),
                        JSON_VALUE(fields, '$.visits'), CAST(UNIX_MICROS(optin_time) AS STRING)
                 FROM {}",
                bq.qualified("contacts_latest")
            ),
        )
        .await;
        assert_eq!(got, pg, "contacts contents of {} differ", tenant.slug);
    }
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_open_while_later_rows_commit_is_not_skipped() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1], 5)
        .await
        .unwrap();
    let contacts = env.add_table("contacts", "organization_id").await.unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let worker = env.worker();
    env.sync_once(&worker).await.unwrap();

    // T1 starts and writes a row (updated_at = T1's start) but does not commit yet.
    let mut slow = env.source_pool().begin().await.unwrap();
    let early: i64 = sqlx::query_scalar(
        "INSERT INTO contacts (organization_id, phone, name) VALUES (1, '+1', 'slow') RETURNING id",
    )
    .fetch_one(&mut *slow)
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // A later transaction commits a row with a larger updated_at.
    let late: i64 = sqlx::query_scalar(
        "INSERT INTO contacts (organization_id, phone, name) VALUES (1, '+2', 'fast') RETURNING id",
    )
    .fetch_one(env.source_pool())
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let task = TaskId {
        tenant_id: tenant.id,
        table_id: contacts.id,
    };
    let never = CancellationToken::new();
    for _ in 0..3 {
        worker.try_execute_task(task, &never).await.unwrap();
    }
    let bq = env.bq(&tenant).await.unwrap();
    let ids = |bq: tenantsync_bigquery::BigQuery| async move {
        bq_rows(
            &bq,
            &format!(
                "SELECT CAST(id AS STRING) FROM {}",
                bq.qualified("contacts_latest")
            ),
        )
        .await
    };
    let before = ids(bq.clone()).await;
    // Polling by watermark alone would have sent `late` and moved past `early` for good.
    assert!(
        !before.contains(&late.to_string()),
        "row committed after an open transaction's start was read past it"
    );

    slow.commit().await.unwrap();
    env.sync_once(&worker).await.unwrap();
    let after = ids(bq).await;
    assert!(
        after.contains(&early.to_string()),
        "the out-of-order commit was skipped"
    );
    assert!(after.contains(&late.to_string()));
    let pg: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts WHERE organization_id = 1")
        .fetch_one(env.source_pool())
        .await
        .unwrap();
    assert_eq!(after.len() as i64, pg);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_insert_all_and_commit_loses_nothing_and_duplicates_stay_invisible() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1], 300)
        .await
        .unwrap();
    let contacts = env.add_table("contacts", "organization_id").await.unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let task = TaskId {
        tenant_id: tenant.id,
        table_id: contacts.id,
    };

    let mut cfg = env.worker_config();
    cfg.lease_ttl = std::time::Duration::from_secs(4);
    let crashing = env.worker_with(cfg.clone(), CrashOnceAt::new(CrashPoint::BeforeCommit));
    let never = CancellationToken::new();
    env.past_skew().await;
    let r = crashing.try_execute_task(task, &never).await.unwrap();
    assert_eq!(r.outcome, SliceOutcome::Crashed);
    // The crashed worker still "holds" its lease until the TTL runs out: nobody else may run.
    let busy = env.worker().try_execute_task(task, &never).await.unwrap();
    assert_eq!(busy.outcome, SliceOutcome::Busy);
    let bq = env.bq(&tenant).await.unwrap();
    let sent = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {}",
            bq.qualified("contacts")
        ))
        .await
        .unwrap(),
    );
    // insertAll delivered the slice before the crash; a Storage Write slice's pending stream
    // was never committed, so nothing of it is in the table.
    let expected = match env.write_api() {
        WriteApi::InsertAll => 300,
        WriteApi::Storage => 0,
    };
    assert_eq!(
        sent, expected,
        "rows in the table after a crash before commit"
    );
    // ... and it committed nothing.
    let claim_state = env.control.status().await.unwrap();
    assert_eq!(claim_state[0].rows_synced, 0);
    let t0 = std::time::Instant::now();
    while env.lease_holder(task).await.is_some() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "lease never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A new worker takes over after the lease expired and re-sends the same versions.
    let fresh = env.worker();
    env.sync_once(&fresh).await.unwrap();

    let pg: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts WHERE organization_id = 1")
        .fetch_one(env.source_pool())
        .await
        .unwrap();
    let latest = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(*) FROM {}",
            bq.qualified("contacts_latest")
        ))
        .await
        .unwrap(),
    );
    assert_eq!(latest, pg);
    let dup_keys = bq
        .query(&format!(
            "SELECT id FROM {} GROUP BY id HAVING COUNT(*) > 1",
            bq.qualified("contacts_latest")
        ))
        .await
        .unwrap();
    assert!(
        dup_keys.is_empty(),
        "_latest shows duplicates: {dup_keys:?}"
    );
    // Retries reuse insertIds, so even the base table holds each version once here.
    let versions = scalar_i64(
        &bq.query(&format!(
            "SELECT COUNT(DISTINCT _version_id) FROM {}",
            bq.qualified("contacts")
        ))
        .await
        .unwrap(),
    );
    assert_eq!(versions, pg);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_row_tenant_check_stops_a_row_the_sql_filter_let_through() {
    // A numeric tenant column: SQL equality says 1.0 = 1, but the row's tenant value as sent
    // ("1.0") is not the tenant's id ("1"). The per-row check refuses the whole slice.
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE ledger (id bigint PRIMARY KEY, org numeric NOT NULL, amount numeric(10,2),
                              updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO ledger VALUES (1, 1, 10.00, now() - interval '1 minute'), (2, 1.0, 5.00, now() - interval '1 minute');",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let ledger = env.add_table("ledger", "org").await.unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let task = TaskId {
        tenant_id: tenant.id,
        table_id: ledger.id,
    };
    let r = env
        .worker()
        .try_execute_task(task, &CancellationToken::new())
        .await
        .unwrap();
    match r.outcome {
        SliceOutcome::Failed {
            rows: 0,
            error,
            permanent,
        } => {
            assert!(error.contains("tenant isolation check failed"), "{error}");
            assert!(permanent, "an isolation breach is not retried away");
        }
        other => panic!("expected the slice to be refused, got {other:?}"),
    }
    let bq = env.bq(&tenant).await.unwrap();
    let sent = scalar_i64(
        &bq.query(&format!("SELECT COUNT(*) FROM {}", bq.qualified("ledger")))
            .await
            .unwrap(),
    );
    assert_eq!(sent, 0, "nothing of a refused slice may be sent");
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_type_without_mapping_is_named_when_the_table_is_added() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE places (id bigint PRIMARY KEY, organization_id bigint NOT NULL, area polygon,
                              updated_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let err = env
        .add_table("places", "organization_id")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"area\"") && err.contains("polygon"), "{err}");
    assert!(
        env.control.tables().await.unwrap().is_empty(),
        "nothing may be saved"
    );
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_wider_than_one_json_object_arrives_whole() {
    // 60 columns, one array with a NULL element, and a row of NULLs: every column arrives, the
    // NULL element is dropped and the NULL array arrives empty.
    let env = TestEnv::new().await.unwrap();
    let cols: Vec<String> = (0..60).map(|i| format!("c{i} int")).collect();
    let vals: Vec<String> = (0..60).map(|i| format!("{}", i * 10)).collect();
    sqlx::raw_sql(&format!(
        "CREATE TABLE wide (id bigint PRIMARY KEY, organization_id bigint NOT NULL, {},
                            tags text[], updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO wide VALUES (1, 1, {}, ARRAY['a', NULL, 'b'], now() - interval '1 minute');
         INSERT INTO wide (id, organization_id, updated_at) VALUES (2, 1, now() - interval '1 minute');",
        cols.join(", "),
        vals.join(", ")
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    env.add_table("wide", "organization_id").await.unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    env.sync_once(&env.worker()).await.unwrap();
    let bq = env.bq(&t).await.unwrap();
    let rows = bq
        .query(&format!(
            // COALESCE: BigQuery stores an absent repeated field as []; the local BigQuery
            // stores one sent through the Storage Write API (no element in the message) as NULL.
            "SELECT id, c0, c49, c50, c59, COALESCE(ARRAY_LENGTH(tags), 0), _op FROM {} ORDER BY id",
            bq.qualified("wide_latest")
        ))
        .await
        .unwrap();
    let got: Vec<Vec<String>> = rows
        .iter()
        .map(|r| (0..7).map(|i| cell(r, i)).collect())
        .collect();
    // NULL elements are dropped and a NULL array arrives empty.
    assert_eq!(
        got,
        [
            ["1", "0", "490", "500", "590", "2", "upsert"],
            ["2", "NULL", "NULL", "NULL", "NULL", "0", "upsert"]
        ]
    );
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_and_commits_of_several_tasks_in_one_statement_keep_each_task_apart() {
    // The worker sends the claims (and commits) of slices that start (end) together as one
    // statement: each task still gets its own token and result, a paused tenant's task is
    // not claimed, and a superseded token is refused for its task only.
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1, 2, 3], 5)
        .await
        .unwrap();
    let tables = env.add_demo_tables().await.unwrap();
    let mut tasks = Vec::new();
    for org in [1i64, 2, 3] {
        let t = env.add_tenant(&format!("org-{org}"), org).await.unwrap();
        tasks.push(env.task(&t, &tables[0]).await);
    }
    let (ok, out) = env.cli(&["tenant", "pause", "org-3"]);
    assert!(ok, "{out}");
    let missing = TaskId {
        tenant_id: 999_999,
        table_id: tables[0].id,
    };
    let mut batch = tasks.clone();
    batch.push(missing);
    let starts = env.control.start_slices(&batch).await.unwrap();
    assert_eq!(starts.len(), 4);
    let claims: Vec<_> = starts[..2]
        .iter()
        .map(|s| {
            s.as_ref()
                .unwrap()
                .claim
                .clone()
                .expect("active tenant is claimed")
        })
        .collect();
    assert_eq!(claims[0].task, tasks[0]);
    assert_eq!(claims[1].task, tasks[1]);
    let paused = starts[2].as_ref().unwrap();
    assert_eq!(paused.tenant.slug, "org-3");
    assert!(
        paused.claim.is_none(),
        "a paused tenant's task is not claimed"
    );
    assert!(
        starts[3].is_err(),
        "a task that does not exist is an error of its own"
    );

    // Task 1 is claimed again behind the batch's back: its token is superseded.
    let newer = env.control.claim(tasks[1]).await.unwrap();
    assert!(newer.fencing_token > claims[1].fencing_token);
    let finish = |c: &tenantsync_store::control::tasks::Claim, cursor: &str| {
        tenantsync_store::control::tasks::FinishRequest {
            claim: c.clone(),
            progress: tenantsync_store::control::tasks::Progress {
                watermark: Some(tenantsync_store::control::tasks::Watermark {
                    cursor: Some(cursor.into()),
                    key: vec!["42".into()],
                }),
                synced_through: Some(chrono::Utc::now()),
                rows: 1,
                next_run_in: std::time::Duration::from_secs(60),
                rerun_if_changed_in: None,
                error: None,
                batches_visible_through: None,
            },
            run: tenantsync_store::control::tasks::RunRecord {
                task: c.task,
                worker: "test".into(),
                fencing_token: c.fencing_token,
                started_at: chrono::Utc::now(),
                duration: std::time::Duration::from_millis(5),
                rows: 1,
                outcome: "ok",
                error: None,
            },
            compact_every: None,
        }
    };
    let done = env
        .control
        .finish_slices(&[
            finish(&claims[0], "2024-01-01 00:00:00+00"),
            finish(&claims[1], "2024-01-02 00:00:00+00"),
        ])
        .await
        .unwrap();
    use tenantsync_store::control::tasks::Commit;
    assert_eq!(done[0].commit, Commit::Committed);
    assert_eq!(done[1].commit, Commit::Fenced);
    let state: Vec<(i64, Option<String>, Option<Vec<String>>)> = sqlx::query_as(
        "SELECT tenant_id, watermark_cursor, watermark_key FROM sync_state
         WHERE table_id = $1 AND tenant_id = ANY($2) ORDER BY tenant_id",
    )
    .bind(tables[0].id)
    .bind(vec![tasks[0].tenant_id, tasks[1].tenant_id])
    .fetch_all(env.control.pool())
    .await
    .unwrap();
    assert_eq!(
        state[0],
        (
            tasks[0].tenant_id,
            Some("2024-01-01 00:00:00+00".into()),
            Some(vec!["42".into()])
        )
    );
    assert_eq!(state[1].1, None, "the fenced commit moved nothing");
    let runs: Vec<(i64, String)> = sqlx::query_as(
        "SELECT tenant_id, outcome FROM sync_runs WHERE worker = 'test' ORDER BY tenant_id",
    )
    .fetch_all(env.control.pool())
    .await
    .unwrap();
    assert_eq!(
        runs,
        [
            (tasks[0].tenant_id, "ok".to_string()),
            (tasks[1].tenant_id, "fenced".to_string())
        ]
    );
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leading_coordinator_prunes_the_run_log_past_its_retention() {
    // One run-log row per slice adds up to millions a day: the leader deletes the rows of
    // slices that started longer ago than TENANTSYNC_RUN_LOG_KEEP_S and keeps the rest.
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1], 1)
        .await
        .unwrap();
    let tables = env.add_demo_tables().await.unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    sqlx::query(
        "INSERT INTO sync_runs (tenant_id, table_id, worker, fencing_token, started_at,
                                duration_ms, rows, outcome)
         SELECT $1, $2, 'test', g, now() - make_interval(hours => CASE WHEN g <= 25 THEN 3 ELSE 0 END),
                1, 1, 'ok'
         FROM generate_series(1, 40) g ORDER BY g",
    )
    .bind(t.id)
    .bind(tables[0].id)
    .execute(env.control.pool())
    .await
    .unwrap();
    let _coordinator = env.spawn(
        "coordinator",
        &["coordinator"],
        &[("TENANTSYNC_RUN_LOG_KEEP_S", "3600")],
    );
    let count = |sql: &'static str| {
        let pool = env.control.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let t0 = std::time::Instant::now();
    while count("SELECT count(*) FROM sync_runs WHERE worker = 'test'").await > 15 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "old run-log rows were not pruned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        count("SELECT count(*) FROM sync_runs WHERE worker = 'test' AND started_at > now() - interval '1 hour'").await,
        15,
        "the rows inside the retention stay"
    );
    env.cleanup().await.unwrap();
}
