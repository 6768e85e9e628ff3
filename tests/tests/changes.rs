//! Change semantics under concurrency: random inserts, updates and (soft) deletes across
//! tenants, in transactions that commit out of order, end with `verify` reporting no drift and
//! every tenant's `_latest` equal to Postgres, row for row.

use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Duration;
use tenantsync_tests::TestEnv;

const TENANTS: [i64; 4] = [1, 2, 3, 4];

/// One writer: transactions of 1–5 random operations on random tenants' rows, each holding its
/// transaction open for a random time so that later-started ones often commit first (their
/// `updated_at = now()` is the transaction's start), and about one in ten rolled back.
async fn writer(pool: sqlx::PgPool, seed: u64, until: std::time::Instant) -> anyhow::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ops = 0;
    while std::time::Instant::now() < until {
        let mut tx = pool.begin().await?;
        for _ in 0..rng.gen_range(1..=5) {
            let org = TENANTS[rng.gen_range(0..TENANTS.len())];
            let v: i32 = rng.gen_range(0..1_000_000);
            let sql = match rng.gen_range(0..10) {
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
            };
            sqlx::query(sql).bind(org).bind(v).execute(&mut *tx).await?;
            ops += 1;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
        if rng.gen_range(0..10) == 0 {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
    }
    Ok(ops)
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

    // The real binary syncs while four writers run for 12 s.
    let run = env.spawn("run", &["run"], &[]);
    let until = std::time::Instant::now() + Duration::from_secs(12);
    let writers: Vec<_> = (0..4)
        .map(|i| tokio::spawn(writer(env.source_pool().clone(), 1000 + i, until)))
        .collect();
    let mut ops = 0;
    for w in writers {
        ops += w.await.unwrap().unwrap();
    }
    env.wait_synced_through(chrono::Utc::now(), Duration::from_secs(90))
        .await
        .unwrap();
    drop(run);

    let (ok, out) = env.cli(&["verify"]);
    assert!(ok, "verify after {ops} random operations:\n{out}");
    assert_eq!(out.matches("ok    org-").count(), TENANTS.len(), "{out}");

    // And row for row: `_latest` holds exactly the live rows, with their last values.
    for (t, org) in tenants.iter().zip(TENANTS) {
        let pg: BTreeMap<i64, i64> = sqlx::query_as::<_, (i64, i32)>(
            "SELECT id, v FROM items WHERE organization_id = $1 AND deleted_at IS NULL",
        )
        .bind(org)
        .fetch_all(env.source_pool())
        .await
        .unwrap()
        .into_iter()
        .map(|(id, v)| (id, i64::from(v)))
        .collect();
        let bq = env.bq(t).await.unwrap();
        let rows = bq
            .query(&format!(
                "SELECT id, v FROM {}",
                bq.qualified("items_latest")
            ))
            .await
            .unwrap();
        let latest: BTreeMap<i64, i64> = rows
            .iter()
            .map(|r| {
                let n = |v: &serde_json::Value| {
                    v.as_str()
                        .and_then(|s| s.parse().ok())
                        .or(v.as_i64())
                        .unwrap()
                };
                (n(&r[0]), n(&r[1]))
            })
            .collect();
        assert_eq!(
            latest.len(),
            rows.len(),
            "{}: a key twice in _latest",
            t.slug
        );
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
