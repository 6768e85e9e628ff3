//! Change semantics under concurrency: random inserts, updates and (soft) deletes across
//! tenants, in transactions that commit out of order, end with `verify` reporting no drift and
//! every tenant's `_latest` equal to Postgres, row for row.

use rand::Rng;
use std::time::Duration;
use tenantsync_tests::interleave::{bq_pairs, pg_pairs, sync_while_writing};
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

    let ops = sync_while_writing(&env, &TENANTS, 1000, pick, Duration::from_secs(90))
        .await
        .unwrap();

    let (ok, out) = env.cli(&["verify"]);
    assert!(ok, "verify after {ops} random operations:\n{out}");
    assert_eq!(out.matches("ok    org-").count(), TENANTS.len(), "{out}");

    // And row for row: `_latest` holds exactly the live rows, with their last values.
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
        "{ops} random operations over {} tenants: no drift",
        TENANTS.len()
    );
    env.cleanup().await.unwrap();
}
