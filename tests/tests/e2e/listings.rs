//! Batch listings are pruned (issue 16): each table's `_sync_batches_<table>` keeps only the
//! listings a reader can still need, and every read stays exact: the narrowed view, a view
//! written after a schema change, a first merge after `<table>_current` was lost, history mode
//! without the versions of a slice that died, and listings written before per-table listing
//! tables.

use std::sync::Arc;
use std::time::Duration;
use tenantsync_bigquery::listings::LISTED_BEFORE_LABEL;
use tenantsync_bigquery::BigQuery;
use tenantsync_core::Mode;
use tenantsync_store::control::tasks::TaskId;
use tenantsync_tests::{count_rows as count, CrashOnceAt, TestEnv};
use tenantsync_worker::{CrashPoint, NoHooks, SliceOutcome, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// `id:v[:note]` of every row, in id order: what `_latest` shows, or what Postgres holds.
async fn bq_rows(bq: &BigQuery, view: &str, note: bool) -> Vec<String> {
    let note = if note { "IFNULL(note, '-')" } else { "'-'" };
    let sql = format!(
        "SELECT CONCAT(CAST(id AS STRING), ':', CAST(v AS STRING), ':', {note}) FROM {} ORDER BY id",
        bq.qualified(view)
    );
    let rows = bq.query(&sql).await.unwrap();
    rows.iter()
        .map(|r| r[0].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn pg_rows(env: &TestEnv, table: &str, note: bool) -> Vec<String> {
    let note = if note { "coalesce(note, '-')" } else { "'-'" };
    sqlx::query_scalar(&format!(
        "SELECT id || ':' || v || ':' || {note} FROM {table} ORDER BY id"
    ))
    .fetch_all(env.source_pool())
    .await
    .unwrap()
}

/// Short windows: versions and listings settle a few seconds after they are written, and every
/// caught-up slice takes its periodic turn.
fn quick(mut cfg: WorkerConfig) -> WorkerConfig {
    cfg.compact_window = Duration::from_secs(3);
    cfg.settle_window = Duration::from_secs(3);
    cfg.slice_max_duration = Duration::from_secs(1);
    cfg.clock_skew = Duration::ZERO;
    cfg.compact_every = Duration::ZERO;
    cfg
}

/// Past the listing point of everything synced so far: the read-back (3 + 1 s) and the window.
const SETTLE: Duration = Duration::from_secs(6);

async fn listed_before(bq: &BigQuery, table: &str) -> Option<String> {
    let labels = bq.table_labels(table).await.unwrap().unwrap_or_default();
    labels
        .get(LISTED_BEFORE_LABEL)
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listings_are_pruned_and_every_read_stays_exact() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE lcur (id bigint PRIMARY KEY, organization_id bigint NOT NULL, v int,
                            updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE lhist (LIKE lcur INCLUDING ALL);
         INSERT INTO lcur SELECT g, 1, 1, now() - interval '1 minute' FROM generate_series(1, 10) g;
         INSERT INTO lhist SELECT * FROM lcur;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.add_table("lcur", "organization_id").await.unwrap();
    let hist = env.add_table("lhist", "organization_id").await.unwrap();
    env.set_mode(&hist, Mode::History).await.unwrap();
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let worker = env.worker_with(quick(env.worker_config()), Arc::new(NoHooks));
    let bq = env.bq(&t).await.unwrap();
    let update = |ids: &'static str| {
        let sql = format!(
            "UPDATE lcur SET v = v + 1, updated_at = now() WHERE id IN ({ids});
             UPDATE lhist SET v = v + 1, updated_at = now() WHERE id IN ({ids});"
        );
        let pool = env.source_pool().clone();
        async move { sqlx::raw_sql(&sql).execute(&pool).await.unwrap() }
    };

    // Seven slices per table: the first sync and six rounds of updates (odd keys each time,
    // so even keys' only versions are the first ones, whose listings will be gone).
    env.sync_once(&worker).await.unwrap();
    for _ in 0..5 {
        update("1,3,5,7,9").await;
        env.sync_once(&worker).await.unwrap();
    }
    tokio::time::sleep(SETTLE).await;
    update("1").await;
    env.sync_once(&worker).await.unwrap();

    for table in ["lcur", "lhist"] {
        let listings = count(&bq, &format!("_sync_batches_{table}"), "").await;
        let point = listed_before(&bq, table).await;
        println!("{table}: {listings} listings left of 7 slices, listing point {point:?}");
        match env.write_api() {
            tenantsync_core::WriteApi::InsertAll => {
                assert!(listings <= 2, "{table}: {listings} listings kept");
                assert!(point.is_some(), "{table}: no listing point");
            }
            // Storage Write batches are visible by their id: nothing is listed.
            tenantsync_core::WriteApi::Storage => assert_eq!(listings, 0),
        }
        assert_eq!(
            bq_rows(&bq, &format!("{table}_latest"), false).await,
            pg_rows(&env, table, false).await,
            "{table}_latest after pruning"
        );
    }
    // History keeps every committed version: 10 + 5 * 5 + 1.
    assert_eq!(count(&bq, "lhist", "").await, 36);

    // A schema change rewrites the view narrowed to `_current`'s point, not over every
    // version (which would now lean on the listing point alone).
    sqlx::raw_sql(
        "ALTER TABLE lcur ADD COLUMN note text;
         UPDATE lcur SET note = 'n' || id, v = v + 1, updated_at = now() WHERE id <= 3;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    // No periodic turn this time: the view checked is the schema sync's own.
    let mut no_turn = quick(env.worker_config());
    no_turn.compact_every = Duration::from_secs(3600);
    env.sync_once(&env.worker_with(no_turn, Arc::new(NoHooks)))
        .await
        .unwrap();
    let view = bq.table_resource("lcur_latest").await.unwrap().unwrap();
    let sql = view["view"]["query"].as_str().unwrap_or_default();
    assert!(
        sql.contains("lcur_current"),
        "view after the schema change: {sql}"
    );
    assert_eq!(
        bq_rows(&bq, "lcur_latest", true).await,
        pg_rows(&env, "lcur", true).await,
        "lcur_latest after the schema change"
    );

    // An operator drops `lcur_current`: the next merge starts over from every version, and
    // those below the listing point count as committed though their listings are gone.
    tokio::time::sleep(SETTLE).await;
    update("2").await;
    env.sync_once(&worker).await.unwrap();
    bq.query(&format!("DROP TABLE {}", bq.qualified("lcur_current")))
        .await
        .unwrap();
    update("4").await;
    env.sync_once(&worker).await.unwrap();
    assert!(count(&bq, "lcur_current", "").await >= 10);
    assert_eq!(
        bq_rows(&bq, "lcur_latest", true).await,
        pg_rows(&env, "lcur", true).await,
        "lcur_latest after lcur_current was dropped and merged again"
    );
    env.cleanup().await.unwrap();
}

/// History mode keeps every version, but not those of a slice that died half-way (a later
/// slice sent the same rows again): they go when the listing point passes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_slices_versions_leave_a_history_table_at_the_listing_point() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1], 100)
        .await
        .unwrap();
    let contacts = env.add_table("contacts", "organization_id").await.unwrap();
    env.set_mode(&contacts, Mode::History).await.unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let task = TaskId {
        tenant_id: tenant.id,
        table_id: contacts.id,
    };
    let mut cfg = env.worker_config();
    cfg.chunk_limits.max_rows = 20;
    cfg.lease_ttl = Duration::from_secs(2);
    // The default slice length: a 1 s slice through the Storage Write API can end at its time
    // bound after the first chunk, before the crash point.
    let dying = env.worker_with(cfg.clone(), CrashOnceAt::new(CrashPoint::AfterFirstChunk));
    let cfg = quick(cfg);
    env.past_skew().await;
    let r = dying
        .try_execute_task(task, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(r.outcome, SliceOutcome::Crashed);
    let bq = env.bq(&tenant).await.unwrap();
    let dead = match env.write_api() {
        tenantsync_core::WriteApi::InsertAll => 20,
        // The dead slice's pending stream was never committed: none of its rows exist.
        tenantsync_core::WriteApi::Storage => 0,
    };
    assert_eq!(
        count(&bq, "contacts", "").await,
        dead,
        "the dead slice's rows"
    );
    while env.lease_holder(task).await.is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    env.sync_once(&worker).await.unwrap();

    tokio::time::sleep(SETTLE).await;
    sqlx::raw_sql("UPDATE contacts SET updated_at = now() WHERE id = 1")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.sync_once(&worker).await.unwrap();
    assert_eq!(
        count(&bq, "contacts", "").await,
        101,
        "the dead slice's versions are gone, every committed one is kept"
    );
    assert_eq!(count(&bq, "contacts_latest", "").await, 100);
    env.cleanup().await.unwrap();
}

/// A dataset written by a release with one `_sync_batches` for all tables: the table's own
/// listing table is created with its listings copied in, so nothing already visible vanishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listings_of_the_dataset_wide_table_are_copied_into_the_tables_own() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1], 30)
        .await
        .unwrap();
    let contacts = env.add_table("contacts", "organization_id").await.unwrap();
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let worker = env.worker_with(env.worker_config(), Arc::new(NoHooks));
    env.sync_once(&worker).await.unwrap();
    let bq = env.bq(&tenant).await.unwrap();
    // What the older release left: the listings in `_sync_batches` (with a table column), no
    // `_sync_batches_contacts`, and no `_current` merge yet.
    bq.query(&format!(
        "CREATE TABLE {} AS SELECT batch_id, 'contacts' AS table_name, committed_at, `rows` FROM {}",
        bq.qualified("_sync_batches"),
        bq.qualified("_sync_batches_contacts")
    ))
    .await
    .unwrap();
    let listed = count(&bq, "_sync_batches", "").await;
    for t in ["_sync_batches_contacts", "contacts_current"] {
        bq.query(&format!("DROP TABLE IF EXISTS {}", bq.qualified(t)))
            .await
            .unwrap();
    }
    sqlx::query("UPDATE sync_state SET schema_hash = NULL WHERE tenant_id = $1 AND table_id = $2")
        .bind(tenant.id)
        .bind(contacts.id)
        .execute(env.control.pool())
        .await
        .unwrap();
    sqlx::raw_sql("UPDATE contacts SET updated_at = now() WHERE id IN (SELECT id FROM contacts ORDER BY id LIMIT 2)")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.sync_once(&worker).await.unwrap();
    let copied = count(&bq, "_sync_batches_contacts", "").await;
    match env.write_api() {
        tenantsync_core::WriteApi::InsertAll => {
            assert!(listed >= 1);
            assert_eq!(copied, listed + 1, "the old listings and the new slice's");
        }
        tenantsync_core::WriteApi::Storage => assert_eq!(copied, 0),
    }
    assert_eq!(count(&bq, "contacts_latest", "").await, 30);
    env.cleanup().await.unwrap();
}
