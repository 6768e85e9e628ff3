//! Change semantics under concurrency: random inserts, updates and (soft) deletes across
//! tenants, in transactions that commit out of order, end with `verify` reporting no drift and
//! every tenant's `_latest` equal to Postgres, row for row.

use rand::Rng;
use std::time::Duration;
use tenantsync_tests::interleave::{bq_pairs, pg_pairs, sync_while_writing_with};
use tenantsync_tests::TestEnv;

const TENANTS: [i64; 4] = [1, 2, 3, 4];

/// Inserts, updates, soft deletes and undeletes. `updated_at = now()` is the transaction's
/// start, so the writers' out-of-order commits put older cursors behind newer ones.
fn pick(rng: &mut rand::rngs::StdRng) -> String {
    match rng.gen_range(0..10) {
        0..=3 => "INSERT INTO items (organization_id, v, note) VALUES ($1, $2, 'new')",
        4..=6 => {
            "UPDATE items SET v = $2, note = 'updated', updated_at = now()
             WHERE id = (SELECT id FROM items WHERE organization_id = $1
                         ORDER BY random() LIMIT 1)"
        }
        7..=8 => {
            "UPDATE items SET deleted_at = now(), updated_at = now(), v = $2
             WHERE id = (SELECT id FROM items WHERE organization_id = $1
                         AND deleted_at IS NULL ORDER BY random() LIMIT 1)"
        }
        _ => {
            // Undelete: the key comes back to `_latest`.
            "UPDATE items SET deleted_at = NULL, updated_at = now(), v = $2
             WHERE id = (SELECT id FROM items WHERE organization_id = $1
                         AND deleted_at IS NOT NULL ORDER BY random() LIMIT 1)"
        }
    }
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_interleavings_with_out_of_order_commits_end_with_zero_drift() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE items (
             id bigserial PRIMARY KEY,
             organization_id bigint NOT NULL,
             v int NOT NULL,
             note text,
             updated_at timestamptz NOT NULL DEFAULT now(),
             deleted_at timestamptz);
         CREATE INDEX ON items (organization_id, updated_at);
         INSERT INTO items (organization_id, v, note, updated_at)
         SELECT 1 + g % 4, g, 'seed', now() - interval '1 hour' FROM generate_series(1, 400) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    let spec = env.add_table("items", "organization_id").await.unwrap();
    tenantsync_worker::onboard::set_soft_delete(
        &env.control,
        &env.source,
        spec,
        Some("deleted_at"),
    )
    .await
    .unwrap();
    let mut tenants = Vec::new();
    for o in TENANTS {
        tenants.push(env.add_tenant(&format!("org-{o}"), o).await.unwrap());
    }

    // Merges into `items_current`, compaction and the pruning of listings every 2 s, mid-run:
    // `_latest` is `_current` plus the versions of the last 3 s (window 1 s, slices of at
    // most 2 s, one clock) while the writers run.
    let vars = [
        ("TENANTSYNC_COMPACT_EVERY_S", "2"),
        ("TENANTSYNC_COMPACT_WINDOW_S", "1"),
        ("TENANTSYNC_SETTLE_S", "1"),
        ("TENANTSYNC_SLICE_MAX_MS", "2000"),
        ("TENANTSYNC_CLOCK_SKEW_S", "0"),
    ];
    let ops = sync_while_writing_with(&env, &TENANTS, 1000, pick, Duration::from_secs(90), &vars)
        .await
        .unwrap();

    // Merges while the writers ran, not only at the end: the run's log names each one.
    let log = std::env::temp_dir().join(format!("tstest-{}-run.log", env.id));
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let merge_lines = log.matches("merged visible versions into _current").count();
    assert!(
        merge_lines >= 2 * TENANTS.len(),
        "only {merge_lines} merges into items_current during the run"
    );
    let (ok, out) = env.cli(&["verify"]);
    assert!(ok, "verify after {ops} random operations:\n{out}");
    assert_eq!(out.matches("ok    org-").count(), TENANTS.len(), "{out}");

    // And row for row: `_latest` holds exactly the live rows, with their last values.
    let mut merges = Vec::new();
    for (t, org) in tenants.iter().zip(TENANTS) {
        let pg = pg_pairs(
            env.source_pool(),
            "SELECT id, v FROM items WHERE organization_id = $1 AND deleted_at IS NULL",
            org,
        )
        .await
        .unwrap();
        let bq = env.bq(t).await.unwrap();
        let latest = bq_pairs(&bq, "items_latest").await.unwrap();
        // The merges ran mid-run: `_current` holds keys, has a merge point, and the view
        // reads only versions from shortly before it.
        let point = tenantsync_bigquery::schema::merge_point(&bq, "items")
            .await
            .unwrap();
        let merged = tenantsync_tests::scalar_i64(
            &bq.query(&format!(
                "SELECT COUNT(*) FROM {}",
                bq.qualified("items_current")
            ))
            .await
            .unwrap(),
        );
        assert!(
            point.is_some() && merged > 0,
            "{}: no merge into items_current ({merged} rows)",
            t.slug
        );
        merges.push(merged);
        let deleted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM items WHERE organization_id = $1 AND deleted_at IS NOT NULL",
        )
        .bind(org)
        .fetch_one(env.source_pool())
        .await
        .unwrap();
        assert!(
            latest == pg,
            "{}: _latest differs from Postgres ({} vs {} rows, {deleted} soft-deleted)",
            t.slug,
            latest.len(),
            pg.len()
        );
    }
    println!(
        "{ops} random operations over {} tenants: no drift; {merge_lines} merges; rows in \
         items_current: {merges:?}",
        TENANTS.len()
    );
    env.cleanup().await.unwrap();
}
