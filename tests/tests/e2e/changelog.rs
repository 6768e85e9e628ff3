//! Changelog capture: `source install-changelog` (idempotent, reversible), exact change order
//! with hard deletes and tenant moves under transactions that commit out of order, and merge
//! mode rebuilding full rows from partial ones.

use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tenantsync_tests::interleave::{bq_pairs, pg_pairs, sync_while_writing};
use tenantsync_tests::{cell, scalar_i64, TestEnv};
use tenantsync_worker::NoHooks;

const TENANTS: [i64; 4] = [1, 2, 3, 4];

async fn count(env: &TestEnv, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(env.source_pool())
        .await
        .unwrap()
}

/// Triggers, functions and change tables of the source database, by name.
async fn installed_objects(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT 'trigger ' || tgname::text FROM pg_trigger WHERE tgname = 'tenantsync_capture'
         UNION ALL SELECT 'function ' || proname::text FROM pg_proc
                   WHERE pronamespace = to_regnamespace('tenantsync_changes')
         UNION ALL SELECT 'table ' || relname::text FROM pg_class
                   WHERE relnamespace = to_regnamespace('tenantsync_changes') AND relkind = 'r'
         ORDER BY 1",
    )
    .fetch_all(env.source_pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn install_is_idempotent_checked_and_reversible() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE items (id bigserial PRIMARY KEY, organization_id bigint NOT NULL, v int,
                             updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO items (organization_id, v) SELECT 1 + g % 2, g FROM generate_series(1, 30) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();

    // Registering before installing names the missing step.
    let (ok, out) = env.cli(&["tables", "add", "items", "--capture", "changelog"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("tenantsync source install-changelog public.items"),
        "{out}"
    );
    let (ok, out) = env.cli(&[
        "source",
        "install-changelog",
        "items",
        "--tenant-column",
        "nope",
    ]);
    assert!(!ok && out.contains("\"nope\" does not exist"), "{out}");
    assert!(installed_objects(&env).await.is_empty());

    // First install files the 30 existing rows; the second changes nothing and files none.
    let (ok, out) = env.cli(&["source", "install-changelog", "items"]);
    assert!(ok && out.contains("30 existing rows"), "{out}");
    let (ok, out) = env.cli(&["source", "install-changelog", "items"]);
    assert!(ok && out.contains("0 existing rows"), "{out}");
    assert_eq!(
        installed_objects(&env).await,
        [
            "function public__items_capture",
            "table public__items",
            "trigger tenantsync_capture"
        ]
    );
    let changes = "SELECT count(*) FROM tenantsync_changes.public__items";
    assert_eq!(count(&env, changes).await, 30);
    // One trigger, not two: an update files exactly one change.
    sqlx::query("UPDATE items SET v = -1 WHERE id = 1")
        .execute(env.source_pool())
        .await
        .unwrap();
    assert_eq!(count(&env, changes).await, 31);

    // Merge mode needs changed-columns-only rows; latest mode cannot use them.
    let (ok, out) = env.cli(&[
        "tables",
        "add",
        "items",
        "--capture",
        "changelog",
        "--mode",
        "merge",
    ]);
    assert!(!ok && out.contains("--changed-only"), "{out}");
    let (ok, out) = env.cli(&["tables", "add", "items", "--mode", "merge"]);
    assert!(!ok && out.contains("needs changelog capture"), "{out}");
    // A bad soft-delete column is refused before anything is registered.
    let (ok, out) = env.cli(&["tables", "add", "items", "--soft-delete", "nope"]);
    assert!(!ok && out.contains("soft-delete column \"nope\""), "{out}");
    assert!(env.control.tables().await.unwrap().is_empty());
    let (ok, out) = env.cli(&["tables", "add", "items", "--capture", "changelog"]);
    assert!(ok && out.contains("changelog capture"), "{out}");

    // A registered changelog table is not uninstalled by accident.
    let (ok, out) = env.cli(&["source", "uninstall-changelog", "items"]);
    assert!(!ok && out.contains("--force"), "{out}");
    assert_eq!(installed_objects(&env).await.len(), 3);
    let (ok, out) = env.cli(&["source", "uninstall-changelog", "items", "--force"]);
    assert!(ok && out.contains("removed"), "{out}");
    assert!(installed_objects(&env).await.is_empty());
    let (ok, out) = env.cli(&["source", "uninstall-changelog", "items", "--force"]);
    assert!(ok && out.contains("was not installed"), "{out}");
    // Writes work without the trigger.
    sqlx::query("UPDATE items SET v = -2 WHERE id = 1")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.cleanup().await.unwrap();
}

/// Inserts, updates, hard deletes, and moving a row to another tenant.
fn pick(rng: &mut rand::rngs::StdRng) -> String {
    let row = "(SELECT id FROM items WHERE organization_id = $1 ORDER BY random() LIMIT 1)";
    match rng.gen_range(0..20) {
        0..=7 => "INSERT INTO items (organization_id, v) VALUES ($1, $2)".to_string(),
        8..=13 => format!("UPDATE items SET v = $2 WHERE id = {row}"),
        14..=18 => format!("DELETE FROM items WHERE id = {row} AND $2 >= 0"),
        // The row leaves this tenant's dataset and appears in the next one's.
        _ => format!("UPDATE items SET organization_id = 1 + $1 % 4, v = $2 WHERE id = {row}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_deletes_and_out_of_order_commits_end_with_zero_drift() {
    let env = TestEnv::new().await.unwrap();
    // No cursor column at all: changelog capture does not need one.
    sqlx::raw_sql(
        "CREATE TABLE items (id bigserial PRIMARY KEY, organization_id bigint NOT NULL, v int NOT NULL);
         INSERT INTO items (organization_id, v) SELECT 1 + g % 4, g FROM generate_series(1, 400) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let (ok, out) = env.cli(&["source", "install-changelog", "items"]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&["tables", "add", "items", "--capture", "changelog"]);
    assert!(ok, "{out}");
    let mut tenants = Vec::new();
    for o in TENANTS {
        tenants.push(env.add_tenant(&format!("org-{o}"), o).await.unwrap());
    }

    let ops = sync_while_writing(&env, &TENANTS, 2000, pick, Duration::from_secs(120))
        .await
        .unwrap();

    // Every change was sent and then deleted from the change table.
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM tenantsync_changes.public__items"
        )
        .await,
        0
    );
    let (ok, out) = env.cli(&["verify"]);
    assert!(ok, "verify after {ops} random operations:\n{out}");
    assert_eq!(out.matches("ok    org-").count(), TENANTS.len(), "{out}");

    let mut deletes = 0;
    for (t, org) in tenants.iter().zip(TENANTS) {
        let pg = pg_pairs(
            env.source_pool(),
            "SELECT id, v FROM items WHERE organization_id = $1",
            org,
        )
        .await
        .unwrap();
        let bq = env.bq(t).await.unwrap();
        let latest = bq_pairs(&bq, "items_latest").await.unwrap();
        assert!(
            latest == pg,
            "{}: _latest differs from Postgres ({} vs {} rows)",
            t.slug,
            latest.len(),
            pg.len()
        );
        deletes += scalar_i64(
            &bq.query(&format!(
                "SELECT COUNT(*) FROM {} WHERE _op = 'delete'",
                bq.qualified("items")
            ))
            .await
            .unwrap(),
        );
    }
    // The writers did delete: the comparison above covered tombstones, not just inserts.
    assert!(deletes > 0, "no delete versions after {ops} operations");
    println!("{ops} random operations, {deletes} delete versions: no drift");
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_rebuilds_full_rows_from_partial_ones() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE people (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                                name text, phone text, email text, score int);
         INSERT INTO people VALUES
             (1, 1, 'ann', '111', 'ann@x', 1),
             (2, 1, 'bob', '222', 'bob@x', 2),
             (3, 1, 'cy',  '333', 'cy@x',  3),
             (9, 2, 'other', '999', 'o@x', 9);",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let (ok, out) = env.cli(&["source", "install-changelog", "people", "--changed-only"]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&[
        "tables",
        "add",
        "people",
        "--capture",
        "changelog",
        "--mode",
        "merge",
    ]);
    assert!(ok, "{out}");
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let mut cfg = env.worker_config();
    cfg.merge_every = Duration::ZERO;
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    env.sync_once(&worker).await.unwrap();

    // Partial updates, each in its own transaction, and a key deleted then inserted again
    // with fewer columns: the new row must not inherit the old one's values.
    for sql in [
        "UPDATE people SET name = 'ann2' WHERE id = 1",
        "UPDATE people SET phone = '112' WHERE id = 1",
        "UPDATE people SET score = 20, email = 'bob@y' WHERE id = 2",
        "DELETE FROM people WHERE id = 3",
        "INSERT INTO people (id, organization_id, name) VALUES (3, 1, 'cy-again')",
        "INSERT INTO people VALUES (4, 1, 'dee', '444', 'dee@x', 4)",
        "DELETE FROM people WHERE id = 4",
        "INSERT INTO people VALUES (5, 1, 'eve', '555', 'eve@x', 5)",
    ] {
        sqlx::query(sql).execute(env.source_pool()).await.unwrap();
    }
    // The change table holds only what changed (plus key and tenant) for updates.
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT (SELECT string_agg(k, ',' ORDER BY k) FROM jsonb_object_keys(row) k)
         FROM tenantsync_changes.public__people WHERE op = 'update' ORDER BY seq",
    )
    .fetch_all(env.source_pool())
    .await
    .unwrap();
    assert_eq!(
        stored,
        [
            "id,name,organization_id",
            "id,organization_id,phone",
            "email,id,organization_id,score"
        ]
    );
    env.sync_once(&worker).await.unwrap();

    let bq = env.bq(&t).await.unwrap();
    // The base table holds the partial versions as they came…
    let partial = bq
        .query(&format!(
            "SELECT name, phone, email FROM {} WHERE id = 1 AND _op = 'update' ORDER BY _source_ts",
            bq.qualified("people")
        ))
        .await
        .unwrap();
    assert_eq!(partial.len(), 2);
    assert_eq!(
        (cell(&partial[0], 0), cell(&partial[0], 1)),
        ("ann2".into(), "NULL".into())
    );
    // …and `_final` holds one full row per key, equal to Postgres.
    let final_rows = bq
        .query(&format!(
            "SELECT id, name, phone, email, score FROM {} ORDER BY id",
            bq.qualified("people_final")
        ))
        .await
        .unwrap();
    let got: Vec<Vec<String>> = final_rows
        .iter()
        .map(|r| (0..5).map(|i| cell(r, i)).collect())
        .collect();
    let pg: Vec<Vec<String>> = sqlx::query_as::<
        _,
        (
            i64,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i32>,
        ),
    >(
        "SELECT id, name, phone, email, score FROM people WHERE organization_id = 1 ORDER BY id",
    )
    .fetch_all(env.source_pool())
    .await
    .unwrap()
    .into_iter()
    .map(|(id, n, p, e, s)| {
        vec![
            id.to_string(),
            n.unwrap_or("NULL".into()),
            p.unwrap_or("NULL".into()),
            e.unwrap_or("NULL".into()),
            s.map_or("NULL".into(), |s| s.to_string()),
        ]
    })
    .collect();
    assert_eq!(got, pg);
    assert_eq!(
        got[0],
        ["1", "ann2", "112", "ann@x", "1"],
        "two partial updates merged"
    );
    assert_eq!(
        got[2],
        ["3", "cy-again", "NULL", "NULL", "NULL"],
        "re-inserted row"
    );

    let (ok, out) = env.cli(&["verify", "--tenant", "org-1"]);
    assert!(ok, "{out}");
    env.cleanup().await.unwrap();
}

/// `people_final` as strings, by id (NULL as "NULL").
async fn final_rows(bq: &tenantsync_bigquery::BigQuery, from: &str) -> Vec<Vec<String>> {
    let rows = bq
        .query(&format!(
            "SELECT id, name, phone, score FROM {from} ORDER BY id"
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| (0..4).map(|i| cell(r, i)).collect())
        .collect()
}

async fn pg_people(env: &TestEnv) -> Vec<Vec<String>> {
    pg_people_of(env, 1).await
}

async fn pg_people_of(env: &TestEnv, org: i64) -> Vec<Vec<String>> {
    sqlx::query_as::<_, (i64, Option<String>, Option<String>, Option<i32>)>(
        "SELECT id, name, phone, score FROM people WHERE organization_id = $1 ORDER BY id",
    )
    .bind(org)
    .fetch_all(env.source_pool())
    .await
    .unwrap()
    .into_iter()
    .map(|(id, n, p, s)| {
        let s = s.map_or("NULL".into(), |s| s.to_string());
        vec![
            id.to_string(),
            n.unwrap_or("NULL".into()),
            p.unwrap_or("NULL".into()),
            s,
        ]
    })
    .collect()
}

/// Sync until tenant 1's changes are all in BigQuery (the change table drops them once a
/// slice commits): with a read-back of seconds, a slice slowed by a busy machine past it is
/// not committed and sends its rows again at the next sync.
async fn sync_all_changes(env: &TestEnv, worker: &Arc<tenantsync_worker::Worker>) {
    let left = "SELECT count(*) FROM tenantsync_changes.public__people WHERE tenant::text = '1'";
    for _ in 0..30 {
        env.sync_once(worker).await.unwrap();
        if count(env, left).await == 0 {
            return;
        }
    }
    panic!("tenant 1's changes still unsent after 30 syncs");
}

/// One random change to tenant 1's people: partial updates (one column, never to NULL,
/// which merge mode cannot tell from "unchanged"), deletes, inserts with columns missing, and
/// a deleted id inserted again with fewer columns.
fn people_change(rng: &mut rand::rngs::StdRng, round: usize, i: usize) -> String {
    let id = rng.gen_range(1..=60);
    let tag = format!("r{round}i{i}");
    match rng.gen_range(0..10) {
        0..=1 => format!("UPDATE people SET name = 'n-{tag}' WHERE id = {id}"),
        2..=3 => format!("UPDATE people SET phone = 'p-{tag}' WHERE id = {id}"),
        4..=5 => format!(
            "UPDATE people SET score = {} WHERE id = {id}",
            rng.gen_range(0..1000)
        ),
        6..=7 => format!("DELETE FROM people WHERE id = {id}"),
        _ => format!(
            "INSERT INTO people (id, organization_id, name) VALUES ({id}, 1, 'new-{tag}') \
             ON CONFLICT (id) DO NOTHING"
        ),
    }
}

/// Merge mode's incremental merge (issue 16): rounds of random partial changes with merges
/// between them, the merge's read-back shortened to seconds so its cutoff moves on every
/// round. After each merge `people_final` equals Postgres and the fold of every version
/// computed from scratch, while the merge read only the versions synced since its previous
/// cutoff; a version arriving out of order (older than the key's merged state, as a retried
/// dead letter is) is folded in exactly by reading that key's history again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_reads_only_new_versions_and_final_stays_exact() {
    use rand::SeedableRng;
    use tenantsync_bigquery::final_merge::{fold_sql, value_columns};
    use tenantsync_bigquery::listings::committed_between;
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE people (id bigint PRIMARY KEY, organization_id bigint NOT NULL,
                              name text, phone text, score int);
         INSERT INTO people SELECT g, 1 + (g > 60)::int, 'n' || g, 'p' || g, g
           FROM generate_series(1, 80) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let (ok, out) = env.cli(&["source", "install-changelog", "people", "--changed-only"]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&[
        "tables",
        "add",
        "people",
        "--capture",
        "changelog",
        "--mode",
        "merge",
    ]);
    assert!(ok, "{out}");
    let t = env.add_tenant("org-1", 1).await.unwrap();
    let spec = env.control.tables().await.unwrap().remove(0);
    let mut cfg = env.worker_config();
    // A read-back of 7 s instead of 6 min: the cutoff passes each round's versions.
    cfg.settle_window = Duration::from_secs(5);
    cfg.slice_max_duration = Duration::from_secs(2);
    cfg.clock_skew = Duration::ZERO;
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    let back = worker.read_back();
    let bq = env.bq(&t).await.unwrap();
    let keys = vec!["id".to_string()];
    let values = value_columns(
        &["id", "organization_id", "name", "phone", "score"].map(String::from),
        &keys,
    );
    let from_scratch = format!(
        "({}) WHERE _op != 'delete'",
        fold_sql(
            &keys,
            &values,
            &committed_between(&bq, "people", None, None, None)
        )
    );
    let total = |bq: &tenantsync_bigquery::BigQuery| {
        let sql = format!("SELECT COUNT(*) FROM {}", bq.qualified("people"));
        let bq = bq.clone();
        async move { scalar_i64(&bq.query(&sql).await.unwrap()) }
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut read = Vec::new();
    for round in 0..6 {
        for i in 0..25 {
            let sql = people_change(&mut rng, round, i);
            sqlx::query(&sql).execute(env.source_pool()).await.unwrap();
        }
        sync_all_changes(&env, &worker).await;
        let merged = worker.merge(&t, &spec).await.unwrap();
        assert_eq!(
            merged.refolded, 0,
            "round {round}: nothing arrived out of order"
        );
        let pg = pg_people(&env).await;
        assert_eq!(
            final_rows(&bq, &bq.qualified("people_final")).await,
            pg,
            "round {round}"
        );
        assert_eq!(
            final_rows(&bq, &from_scratch).await,
            pg,
            "round {round}: from scratch"
        );
        // What the merge read: the versions synced since its previous cutoff.
        if let Some(since) = merged.read_since {
            let sql = format!(
                "SELECT COUNT(*) FROM {} WHERE _synced_at >= TIMESTAMP_MICROS({})",
                bq.qualified("people"),
                since.timestamp_micros()
            );
            read.push((scalar_i64(&bq.query(&sql).await.unwrap()), total(&bq).await));
        }
        tokio::time::sleep(back + Duration::from_secs(1)).await;
    }
    println!("versions the merges read / in the table: {read:?}");
    assert!(read.len() >= 4, "the cutoff moved: {read:?}");
    let (last_read, last_total) = read[read.len() - 1];
    assert!(
        last_read * 2 < last_total,
        "the last merge read {last_read} of {last_total} versions"
    );

    // A version out of order: older than key 7's merged state (a retried dead letter), synced
    // now and listed. It sets a phone that no newer version of key 7 overrides only if none
    // changed it since; the from-scratch fold says what `_final` must hold either way.
    sqlx::query("INSERT INTO people (id, organization_id, name) VALUES (7, 1, 'seven') ON CONFLICT (id) DO UPDATE SET name = 'seven'")
        .execute(env.source_pool())
        .await
        .unwrap();
    sync_all_changes(&env, &worker).await;
    // Folded into `people_current` first: the cutoff passes key 7's newest version.
    tokio::time::sleep(back + Duration::from_secs(1)).await;
    worker.merge(&t, &spec).await.unwrap();
    let newest = bq
        .query(&format!(
            "SELECT UNIX_MICROS(MAX(_source_ts)) FROM {} WHERE id = 7",
            bq.qualified("people")
        ))
        .await
        .unwrap();
    let late_ts = scalar_i64(&newest) - 1;
    bq.query(&format!(
        "INSERT INTO {} (id, organization_id, name, phone, score, _op, _source_ts, _synced_at, \
         _batch_id, _version_id) VALUES (7, 1, NULL, 'late-phone', NULL, 'update', \
         TIMESTAMP_MICROS({late_ts}), CURRENT_TIMESTAMP(), 'late-batch', 'late-version')",
        bq.qualified("people")
    ))
    .await
    .unwrap();
    bq.query(&format!(
        "INSERT INTO {} (batch_id, committed_at, `rows`) \
         VALUES ('late-batch', CURRENT_TIMESTAMP(), 1)",
        bq.qualified("_sync_batches_people")
    ))
    .await
    .unwrap();
    tokio::time::sleep(back + Duration::from_secs(1)).await;
    let merged = worker.merge(&t, &spec).await.unwrap();
    assert_eq!(merged.refolded, 1, "key 7 folded again");
    let expected = final_rows(&bq, &from_scratch).await;
    let seven = expected.iter().find(|r| r[0] == "7").unwrap();
    assert_eq!(seven[1], "seven", "the newer insert keeps its name");
    assert_eq!(
        final_rows(&bq, &bq.qualified("people_final")).await,
        expected
    );
    env.cleanup().await.unwrap();
}

/// Partial updates of one column each, inserts with columns missing, hard deletes, and moving
/// a row to another tenant (a delete there and a full insert here).
fn pick_partial(rng: &mut rand::rngs::StdRng) -> String {
    let row = "(SELECT id FROM people WHERE organization_id = $1 ORDER BY random() LIMIT 1)";
    match rng.gen_range(0..20) {
        0..=4 => {
            "INSERT INTO people (organization_id, name, score) VALUES ($1, 'n' || $2, $2)".into()
        }
        5..=7 => format!("UPDATE people SET name = 'u' || $2 WHERE id = {row}"),
        8..=10 => format!("UPDATE people SET phone = 'p' || $2 WHERE id = {row}"),
        11..=13 => format!("UPDATE people SET score = $2 WHERE id = {row}"),
        14..=17 => format!("DELETE FROM people WHERE id = {row} AND $2 >= 0"),
        _ => format!("UPDATE people SET organization_id = 1 + $1 % 4, score = $2 WHERE id = {row}"),
    }
}

/// Merge mode under the random-interleavings harness: four tenants' writers commit partial
/// changes (some rolled back) while `tenantsync run` syncs and merges every second with a
/// read-back of seconds, so cutoffs move and `<t>_current` folds mid-run. After a last merge,
/// each tenant's `people_final` equals Postgres and the fold of all its versions from scratch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_mode_under_random_interleavings_ends_equal_to_postgres() {
    use tenantsync_bigquery::final_merge::{fold_sql, value_columns};
    use tenantsync_bigquery::listings::committed_between;
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE people (id bigserial PRIMARY KEY, organization_id bigint NOT NULL,
                              name text, phone text, score int);
         INSERT INTO people (organization_id, name, phone, score)
           SELECT 1 + g % 4, 'n' || g, 'p' || g, g FROM generate_series(1, 200) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let (ok, out) = env.cli(&["source", "install-changelog", "people", "--changed-only"]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&[
        "tables",
        "add",
        "people",
        "--capture",
        "changelog",
        "--mode",
        "merge",
    ]);
    assert!(ok, "{out}");
    let mut tenants = Vec::new();
    for o in TENANTS {
        tenants.push(env.add_tenant(&format!("org-{o}"), o).await.unwrap());
    }
    let read_back = [
        ("TENANTSYNC_MERGE_EVERY_S", "1"),
        ("TENANTSYNC_SETTLE_S", "5"),
        ("TENANTSYNC_SLICE_MAX_MS", "2000"),
        ("TENANTSYNC_CLOCK_SKEW_S", "0"),
    ];
    let ops = tenantsync_tests::interleave::sync_while_writing_with(
        &env,
        &TENANTS,
        1616,
        pick_partial,
        Duration::from_secs(120),
        &read_back,
    )
    .await
    .unwrap();
    let log = std::env::temp_dir().join(format!("tstest-{}-run.log", env.id));
    let logs = std::fs::read_to_string(log).unwrap_or_default();
    let mid_run = logs.matches("merged partial versions into _final").count();
    assert!(
        mid_run >= TENANTS.len(),
        "only {mid_run} merges during the run"
    );

    // The last changes reach `_final` with one more merge (the run stopped between turns).
    let spec = env.control.tables().await.unwrap().remove(0);
    let mut cfg = env.worker_config();
    cfg.settle_window = Duration::from_secs(5);
    cfg.slice_max_duration = Duration::from_secs(2);
    cfg.clock_skew = Duration::ZERO;
    let worker = env.worker_with(cfg, Arc::new(NoHooks));
    let keys = vec!["id".to_string()];
    let values = value_columns(
        &["id", "organization_id", "name", "phone", "score"].map(String::from),
        &keys,
    );
    let mut cutoffs = 0;
    for (t, org) in tenants.iter().zip(TENANTS) {
        let merged = worker.merge(t, &spec).await.unwrap();
        cutoffs += usize::from(merged.read_since.is_some());
        let bq = env.bq(t).await.unwrap();
        let pg = pg_people_of(&env, org).await;
        let from_scratch = format!(
            "({}) WHERE _op != 'delete'",
            fold_sql(
                &keys,
                &values,
                &committed_between(&bq, "people", None, None, None)
            )
        );
        assert_eq!(
            final_rows(&bq, &bq.qualified("people_final")).await,
            pg,
            "{}: people_final differs from Postgres",
            t.slug
        );
        assert_eq!(final_rows(&bq, &from_scratch).await, pg, "{}", t.slug);
    }
    assert_eq!(cutoffs, TENANTS.len(), "every tenant merged from a cutoff");
    println!("{ops} random operations, {mid_run} merges mid-run: people_final equals Postgres");
    env.cleanup().await.unwrap();
}
