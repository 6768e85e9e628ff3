//! CDC mode (issue 15): tables with a primary key, rows on the default stream with
//! `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER`.
//!
//! The local BigQuery does not implement CDC (it rejects `_CHANGE_TYPE` as an unknown field),
//! so these tests check what the worker SENDS: a recording gRPC proxy
//! (`tests/scripts/grpc_fault_proxy.py --record`) answers the CDC table's appends itself and
//! keeps the exact rows, decoded with the descriptor the worker sent; `tenantsync_tests::cdc`
//! applies BigQuery's documented CDC rules to them (the only mocked part: nothing offline
//! implements them); the result must equal Postgres, tenant by tenant. Tables, datasets and
//! every other call go to the local BigQuery. This verifies against BigQuery's documented
//! semantics, not a live BigQuery.

use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tenantsync_core::{Capture, Mode, TableSpec, Tenant};
use tenantsync_store::changelog::{self, Changelog};
use tenantsync_store::control::NewTableSpec;
use tenantsync_tests::cdc::{apply, pairs, Applied};
use tenantsync_tests::grpc_faults::{FaultPlan, GrpcFaultProxy};
use tenantsync_tests::interleave::{pg_pairs, random_writers, PickSql};
use tenantsync_tests::TestEnv;
use tenantsync_worker::{onboard, NoHooks};

const TENANTS: [i64; 3] = [1, 2, 3];

fn grpc_host() -> String {
    std::env::var("BIGQUERY_STORAGE_EMULATOR_HOST")
        .expect("BIGQUERY_STORAGE_EMULATOR_HOST (scripts/dev-env test writes it to .env.test)")
}

/// A seed per run (printed, and taken from `TENANTSYNC_CDC_SEED` to replay one).
fn seed() -> u64 {
    let s = std::env::var("TENANTSYNC_CDC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen_range(0..1_000_000));
    eprintln!("cdc seed {s} (TENANTSYNC_CDC_SEED={s} replays it)");
    s
}

async fn cdc_table(
    env: &TestEnv,
    capture: Capture,
    soft_delete: Option<&str>,
    max_staleness_s: i32,
) -> TableSpec {
    let mut spec = onboard::add_table(
        &env.control,
        &env.source,
        NewTableSpec {
            source_schema: "public".into(),
            source_table: "items".into(),
            key_columns: vec![],
            cursor_column: "updated_at".into(),
            tenant_column: "organization_id".into(),
            mode: Mode::Cdc,
            sync_interval_ms: 100,
            slice_rows: 5000,
            soft_delete_column: soft_delete.map(str::to_string),
            capture,
            exclude_columns: Vec::new(),
            hash_columns: Vec::new(),
        },
    )
    .await
    .unwrap();
    env.control
        .set_max_staleness(spec.id, max_staleness_s)
        .await
        .unwrap();
    spec.max_staleness_s = max_staleness_s;
    spec
}

/// The table resource as BigQuery (the local one) has it, or None when there is no table.
async fn table_resource(env: &TestEnv, t: &Tenant, table: &str) -> Option<serde_json::Value> {
    let url = format!(
        "{}/projects/{}/datasets/{}/tables/{table}",
        env.endpoint.base_url, t.bq_project, t.bq_dataset
    );
    let r = reqwest::get(&url).await.unwrap();
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    Some(r.json().await.unwrap())
}

/// Random writers on every tenant while the worker syncs through the recording proxy, then a
/// last sync; returns the recorded appends applied with BigQuery's CDC rules, after checking
/// them against Postgres (`pg_sql`: `id, v` of one tenant's live rows).
async fn write_sync_compare(
    env: &TestEnv,
    tenants: &[Tenant],
    pick: PickSql,
    pg_sql: &str,
    seed: u64,
) -> Applied {
    // Faults on the answered appends: a dropped answer (rows applied, client not told) makes
    // the worker send them again, which CDC must absorb.
    let proxy = GrpcFaultProxy::recording(
        &grpc_host(),
        &FaultPlan {
            appends: "pass,pass,drop_after,pass,unavailable,pass",
            ..Default::default()
        },
        &["items"],
    );
    let mut cfg = env.worker_config();
    cfg.endpoint = cfg.endpoint.with_storage_emulator(Some(&proxy.host));
    cfg.chunk_limits.max_rows = 20;
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    env.sync_once(&worker).await.unwrap();
    for round in 0..3u64 {
        let writers = random_writers(
            env.source_pool(),
            &TENANTS,
            4,
            seed * 10 + round,
            Duration::from_secs(3),
            pick,
        );
        let syncs = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            env.sync_once(&worker).await
        };
        let (ops, synced) = tokio::join!(writers, syncs);
        ops.unwrap();
        synced.unwrap();
    }
    env.sync_once(&worker).await.unwrap();
    env.sync_once(&worker).await.unwrap();

    let recorded = proxy.recorded();
    assert!(
        recorded
            .iter()
            .all(|a| a.stream.ends_with("/tables/items/streams/_default")),
        "every CDC append goes to the default stream"
    );
    let applied = apply(&recorded, &["id"]);
    assert!(
        applied.conflicts.is_empty(),
        "one key and sequence number with two contents: {:#?}",
        applied.conflicts
    );
    for t in tenants {
        let org: i64 = t.organization_id.parse().unwrap();
        let pg = pg_pairs(env.source_pool(), pg_sql, org).await.unwrap();
        let bq = pairs(&applied, &t.bq_dataset);
        assert!(!pg.is_empty(), "tenant {org} has rows (seed {seed})");
        if pg != bq {
            let missing: Vec<_> = pg.iter().filter(|(k, v)| bq.get(k) != Some(v)).collect();
            let extra: Vec<_> = bq.iter().filter(|(k, v)| pg.get(k) != Some(v)).collect();
            panic!(
                "tenant {org} (seed {seed}): CDC state differs from Postgres; Postgres rows not so in BigQuery {missing:?}, BigQuery rows not so in Postgres {extra:?}"
            );
        }
    }
    eprintln!(
        "cdc: {} appends, {} rows ({} DELETE, {} repeated versions), {} tenants equal Postgres",
        recorded.len(),
        applied.rows,
        applied.deletes,
        applied.repeats,
        tenants.len()
    );
    applied
}

/// Inserts, updates, hard deletes, primary-key changes and moves to another tenant.
fn changelog_pick(rng: &mut rand::rngs::StdRng) -> String {
    let row = "(SELECT id FROM items WHERE organization_id = $1 ORDER BY random() LIMIT 1)";
    match rng.gen_range(0..20) {
        0..=6 => "INSERT INTO items (organization_id, v) VALUES ($1, $2)".to_string(),
        7..=11 => format!("UPDATE items SET v = $2 WHERE id = {row}"),
        12..=14 => format!("DELETE FROM items WHERE id = {row} AND $2 >= 0"),
        // The key changes: the changelog files a delete of the old key and an insert of the
        // new one, which become DELETE + UPSERT.
        15..=17 => {
            format!("UPDATE items SET id = nextval('items_id_seq'), v = $2 WHERE id = {row}")
        }
        _ => format!("UPDATE items SET organization_id = 1 + $1 % 3, v = $2 WHERE id = {row}"),
    }
}

/// Tenants `org-<n>` for each organization of `TENANTS`.
async fn add_tenants(env: &TestEnv) -> Vec<Tenant> {
    let mut tenants = Vec::new();
    for org in TENANTS {
        tenants.push(env.add_tenant(&format!("org-{org}"), org).await.unwrap());
    }
    tenants
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changelog_interleavings_applied_as_bigquery_cdc_equal_postgres() {
    let seed = seed();
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE items (id bigserial PRIMARY KEY, organization_id bigint NOT NULL, v int,
                             updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO items (organization_id, v) SELECT 1 + g % 3, g FROM generate_series(1, 60) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    changelog::install(
        env.source_pool(),
        &Changelog {
            schema: "public".into(),
            table: "items".into(),
            key_columns: vec!["id".into()],
            tenant_column: "organization_id".into(),
            changed_only: false,
        },
    )
    .await
    .unwrap();
    let spec = cdc_table(&env, Capture::Changelog, None, 120).await;
    let tenants = add_tenants(&env).await;
    let applied = write_sync_compare(
        &env,
        &tenants,
        changelog_pick,
        "SELECT id, v FROM items WHERE organization_id = $1",
        seed,
    )
    .await;
    assert!(applied.deletes > 0, "deletes and key changes were sent");

    // The table: primary key and max staleness, no view, no batch listing.
    let t = table_resource(&env, &tenants[0], &spec.bq_table())
        .await
        .expect("the CDC table exists");
    assert_eq!(
        t["tableConstraints"]["primaryKey"]["columns"],
        serde_json::json!(["id"]),
        "{t}"
    );
    assert_eq!(t["maxStaleness"], "0-0 0 0:2:0", "{t}");
    assert!(table_resource(&env, &tenants[0], "items_latest")
        .await
        .is_none());
    for listings in ["_sync_batches", "_sync_batches_items"] {
        assert!(table_resource(&env, &tenants[0], listings).await.is_none());
    }
    // Every change sent was pruned from the change table.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tenantsync_changes.public__items")
        .fetch_one(env.source_pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    env.cleanup().await.unwrap();
}

/// Inserts, updates and soft deletes (and undeletes) with the cursor set at the write itself.
fn cursor_pick(rng: &mut rand::rngs::StdRng) -> String {
    let row = "(SELECT id FROM items WHERE organization_id = $1 ORDER BY random() LIMIT 1)";
    match rng.gen_range(0..10) {
        0..=3 => "INSERT INTO items (organization_id, v) VALUES ($1, $2)".to_string(),
        4..=6 => {
            format!("UPDATE items SET v = $2, updated_at = clock_timestamp() WHERE id = {row}")
        }
        7..=8 => format!(
            "UPDATE items SET deleted_at = clock_timestamp(), updated_at = clock_timestamp(), v = $2
             WHERE id = {row}"
        ),
        _ => format!(
            "UPDATE items SET deleted_at = NULL, updated_at = clock_timestamp(), v = $2
             WHERE id = {row}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cursor_interleavings_with_soft_deletes_applied_as_bigquery_cdc_equal_postgres() {
    let seed = seed();
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE items (id bigserial PRIMARY KEY, organization_id bigint NOT NULL, v int,
                             deleted_at timestamptz,
                             updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO items (organization_id, v, updated_at)
         SELECT 1 + g % 3, g, now() - interval '1 minute' FROM generate_series(1, 60) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let spec = cdc_table(&env, Capture::Cursor, Some("deleted_at"), 900).await;
    assert_eq!(spec.mode, Mode::Cdc);
    let tenants = add_tenants(&env).await;
    let applied = write_sync_compare(
        &env,
        &tenants,
        cursor_pick,
        "SELECT id, v FROM items WHERE organization_id = $1 AND deleted_at IS NULL",
        seed,
    )
    .await;
    assert!(applied.deletes > 0, "soft deletes were sent as DELETE");
    let t = table_resource(&env, &tenants[1], "items").await.unwrap();
    assert_eq!(t["maxStaleness"], "0-0 0 0:15:0", "{t}");
    env.cleanup().await.unwrap();
}
